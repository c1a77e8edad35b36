"""The event log's shape: how an event travels on its region's stream, in one place.

Every change to the live market appends one entry to its region's stream (`Keys.events`): a
single field, `FIELD` (`e`), holding the event's JSON as the Lua script wrote it. The event
carries its id, `"<region>:<seq>"`, where `seq` counts the region's events from 1 without gaps;
the stream's own entry ids (`<ms>-<n>`) are Redis's and mean nothing else. Every reader (the
engine, the gateways' market views, the journal, the replay, the benchmarks) goes through this
module to find the field in an entry, to decode the event and to read its id, so that a change
of the shape is a change here.

Where a new event type goes:
1. its Struct in `engine.types` (frozen, tagged, new fields with defaults) and a member of the
   `Event` union there;
2. the Lua script that makes the change appends it (`event()` in `engine/lua/_lib.lua`);
3. every consumer's `match` over events ends in `assert_never`, so `scripts/check` (mypy) names
   each one that does not handle it yet: the journal's fold (`persistence/journal/fold.py`, with
   a migration if it has a table to write), the ledger's movements (`persistence/ledger.py`),
   the replay (`engine/replay.py`), the ask and bid
   books (`engine/scoring.py`, `engine/book.py`), the engine loop (`engine/process.py`), the
   quotes (`engine/quotes.py`) and the notices (`engine/notify.py`).
`tests/test_event_log.py` proves step 3: it adds a dummy event to the union and checks that mypy
names every consumer.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.types import Event

__all__ = [
    "DECODER",
    "FIELD",
    "as_sent",
    "decode",
    "encode",
    "entry_payload",
    "event_id",
    "parse_event_id",
    "seq_of",
    "stream_entries",
    "stream_id",
]

FIELD = "e"
"""The one field of a stream entry: the event's JSON."""
_FIELD_B = FIELD.encode()

DECODER = msgspec.json.Decoder(Event, strict=False)
"""Decodes an entry's event (JSON written by the Lua scripts: numbers may come as floats or
strings of them, which strict=False reads back into the exact ints and floats of the Struct)."""
_ENCODER = msgspec.json.Encoder()


def decode(raw: bytes | str) -> Event:
    """An entry's event; `msgspec.DecodeError` if it is none."""
    return DECODER.decode(raw)


def encode(event: Event) -> bytes:
    """An event's JSON as an entry's `FIELD` holds it (tests and benchmarks append with it)."""
    return _ENCODER.encode(event)


def event_id(region: str, seq: int) -> str:
    """The id of the region's `seq`-th event."""
    return f"{region}:{seq}"


def parse_event_id(value: str) -> tuple[str, int]:
    """(region, seq) of an event id; ValueError unless it spells `<region>:<seq>` exactly (a
    seq of decimal digits without a leading zero)."""
    region, sep, seq_text = value.rpartition(":")
    if not sep or not region or not seq_text.isdigit() or seq_text[0] == "0":
        raise ValueError(f"malformed event id {value!r}")
    return region, int(seq_text)


def seq_of(value: str) -> int:
    """The seq of a well-formed event id (the hot path: no checks)."""
    return int(value.rpartition(":")[2])


def entry_payload(fields: Any) -> Any:
    """The `FIELD` of a stream entry's fields, whichever way the client gave them (a dict with
    bytes or str keys, or RESP's flat [name, value, ...] list); None without one."""
    if isinstance(fields, dict):
        raw = fields.get(_FIELD_B)
        return raw if raw is not None else fields.get(FIELD)
    if fields:
        for i in range(0, len(fields) - 1, 2):
            if fields[i] == _FIELD_B or fields[i] == FIELD:
                return fields[i + 1]
    return None


def stream_entries(reply: Any) -> list[tuple[Any, list[Any]]]:
    """(stream, entries) pairs of a raw XREAD / XREADGROUP reply: a map under RESP3, a list of
    pairs under RESP2, nothing for an empty reply."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(stream, entries) for stream, entries in reply]


def stream_id(value: Any) -> tuple[int, int]:
    """A stream entry id (`<ms>-<n>`, bytes or str; None for `0-0`) as a comparable pair."""
    text = (value.decode() if isinstance(value, bytes) else str(value or "")) or "0-0"
    ms, _, n = text.partition("-")
    return int(ms), int(n or 0)


def as_sent(response: Any, **options: Any) -> Any:
    """A redis-py response callback that hands a stream reply over as the server sent it:
    readers that decode thousands of entries skip redis-py's building of a dict per entry."""
    return response
