"""Stored events: a stream entry's `e` field decoded once (msgspec) into a `StoredEvent`, its
JSON kept verbatim for `events`; an envelope that is sound around a body this journal cannot
read becomes an `Unreadable` event, stored and set aside rather than refused.
"""

from __future__ import annotations

import re
from typing import NamedTuple, get_args

import msgspec

from engine import log as event_log
from engine.core import MAX_TIME_MS
from engine.types import Event

__all__ = ["StoredEvent", "Unreadable", "decode_entry"]


class Unreadable(NamedTuple):
    """In place of an event whose envelope (id, region, type, time) is sound but whose body this
    journal cannot read (a type it does not know, a field of the wrong shape): it is stored like
    any event and set aside when applied, so a newer engine's event waits for a newer journal
    (`mnemo journal-replay`) instead of stopping this one."""

    problem: str


class StoredEvent(NamedTuple):
    """One decoded event with its JSON as the script wrote it (stored verbatim in `events`)."""

    event_id: str
    region: str
    seq: int
    type: str
    ts_ms: int
    payload: str
    event: Event | Unreadable


class _Envelope(msgspec.Struct):
    event_id: str
    region: str
    ts_ms: int
    type: str


_TAGS: dict[type, str] = {cls: str(cls.__struct_config__.tag) for cls in get_args(Event)}
_new_tuple = tuple.__new__
_ENVELOPE_DECODER = msgspec.json.Decoder(_Envelope)
_REGION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_TYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_SEQ = 2**63 - 1


def decode_entry(raw: bytes | str, *, lenient: bool = False) -> StoredEvent:
    """Decode a stream entry's `e` field. Raises `ValueError` for anything not a valid event;
    with `lenient`, an event whose envelope is sound but whose body is not (see `Unreadable`)
    comes back with an `Unreadable` as its event instead."""
    try:
        event = event_log.decode(raw)
    except msgspec.DecodeError as e:
        problem = f"not an event: {e}"
        if not lenient:
            raise ValueError(problem) from None
        return _unreadable(raw, problem)
    event_id = event.event_id
    # `engine.log.parse_event_id`, inlined on the hot path; anything unusual takes `_envelope`.
    region, sep, seq_text = event_id.rpartition(":")
    if (
        not sep
        or not seq_text.isdigit()
        or region != event.region
        or seq_text[0] == "0"
        or len(seq_text) > 18
        or not 0 <= event.ts_ms <= MAX_TIME_MS
    ):
        _envelope(event_id, event.region, event.ts_ms)  # raises, naming what is wrong
    payload = raw.decode() if isinstance(raw, bytes) else raw
    # tuple.__new__ skips the NamedTuple's Python-level __new__ (the hot path: every event).
    return _new_tuple(  # type: ignore[no-any-return]
        StoredEvent,
        (event_id, region, int(seq_text), _TAGS[type(event)], event.ts_ms, payload, event),
    )


def _envelope(event_id: str, region: str, ts_ms: int) -> int:
    """The seq of a sound envelope, else ValueError: an id spelling `<region>:<seq>` exactly (the
    `events` table checks it), a region name as the market makes them, a seq and a time that
    Postgres and Python can both hold."""
    try:
        prefix, seq = event_log.parse_event_id(event_id)
    except ValueError:
        prefix, seq = "", 0
    if prefix != region or not _REGION_NAME.fullmatch(region) or not 0 < seq <= _MAX_SEQ:
        raise ValueError(f"malformed event id {event_id!r} for region {region!r}")
    if not 0 <= ts_ms <= MAX_TIME_MS:
        raise ValueError(f"event {event_id}: ts_ms {ts_ms} is not a time")
    return seq


def _unreadable(raw: bytes | str, problem: str) -> StoredEvent:
    try:
        env = _ENVELOPE_DECODER.decode(raw)
    except msgspec.DecodeError:
        raise ValueError(problem) from None
    seq = _envelope(env.event_id, env.region, env.ts_ms)
    if not _TYPE_NAME.fullmatch(env.type):
        raise ValueError(f"{problem} (type {env.type[:64]!r})")
    payload = raw.decode() if isinstance(raw, bytes) else raw
    return StoredEvent(
        env.event_id, env.region, seq, env.type, env.ts_ms, payload, Unreadable(problem)
    )
