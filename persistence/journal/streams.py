"""The regions' event streams as the journal reads them: its consumer group, and the raw
replies of the stream commands (read as the server sends them, without redis-py's parsing).
"""

from __future__ import annotations

from typing import Any

__all__ = ["GROUP"]

GROUP = "journal"
"""The consumer group every journal worker joins on every region's stream."""
_GROUP_B = GROUP.encode()


def _as_is(response: Any, **options: Any) -> Any:
    return response


def _streams(reply: Any) -> list[tuple[bytes, list[Any]]]:
    """(stream, entries) pairs of a raw XREADGROUP reply: a map under RESP3, a list of pairs
    under RESP2."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(stream, entries) for stream, entries in reply]


def _e_field(fields: Any) -> bytes | None:
    """The `e` field of an entry given as a flat [field, value, ...] list (None for an entry
    deleted while pending, or one without `e`)."""
    if not fields:
        return None
    if isinstance(fields, dict):
        return fields.get(b"e")
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"e":
            return fields[i + 1]
    return None


def _stream_id(value: Any) -> tuple[int, int]:
    text = _text(value) or "0-0"
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return None if value is None else str(value)
