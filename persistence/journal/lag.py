"""The journal's lag, read from Redis alone: entries pending and undelivered per region, and
the age of the oldest unacknowledged event. Light: the gateway imports it for `/metrics`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from engine import log as event_log
from engine.keys import FUNDING, Keys
from persistence.journal.stored import decode_entry
from persistence.journal.streams import GROUP, _text

__all__ = ["JournalLag", "RegionLag", "journal_lag"]

_LAG_COUNT_MAX = 100_000


class RegionLag(msgspec.Struct, kw_only=True):
    """One region's stream as the journal's consumer group sees it."""

    region: str
    stream_length: int
    pending: int
    """Delivered to a worker, not yet acknowledged."""
    undelivered: int
    """In the stream, not yet read by any worker."""
    oldest_unacked_age_s: float
    """Age of the oldest event not yet acknowledged (0 when everything is)."""
    last_event_id: str | None


class JournalLag(msgspec.Struct, kw_only=True):
    """The journal's lag across regions (for `/metrics` and `mnemo journal-status`)."""

    regions: list[RegionLag]
    pending: int
    undelivered: int
    oldest_unacked_age_s: float


async def _entry_ts_ms(redis: aioredis.Redis, key: str, entry_id: Any) -> int | None:
    entries = await redis.xrange(key, min=entry_id, max=entry_id, count=1)
    if not entries or not entries[0][1]:
        return None
    raw = event_log.entry_payload(entries[0][1])
    try:
        return decode_entry(raw).ts_ms if raw is not None else None
    except ValueError:
        return None


async def journal_lag(
    redis: aioredis.Redis, keys: Keys, *, now_ms: int | None = None, group: str = GROUP
) -> JournalLag:
    """The journal's lag, read from Redis: per region, entries pending (read, not acknowledged)
    and undelivered, and the age of the oldest unacknowledged event. Cheap (a few commands per
    region); works with either `decode_responses` setting."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    members = await redis.smembers(keys.regions)
    regions = sorted({_text(m) or "" for m in members} | {FUNDING})
    out = []
    for region in regions:
        key = keys.events(region)
        try:
            info = await redis.xinfo_stream(key)
            groups = await redis.xinfo_groups(key)
        except ResponseError:
            continue
        length = int(info.get("length", 0))
        g = next((x for x in groups if _text(x.get("name")) == group), None)
        if g is None:
            pending, delivered_id = 0, "0-0"
        else:
            pending = int(g.get("pending", 0))
            delivered_id = _text(g.get("last-delivered-id")) or "0-0"
        undelivered_entries = await redis.xrange(key, min=f"({delivered_id}", count=1)
        if g is not None and g.get("lag") is not None:
            undelivered = int(g["lag"])
        elif undelivered_entries:
            # The server cannot tell (entries deleted mid-stream): count, up to a bound.
            counted = await redis.xrange(key, min=f"({delivered_id}", count=_LAG_COUNT_MAX)
            undelivered = len(counted or [])
        else:
            undelivered = 0
        oldest_id = None
        if pending:
            summary = await redis.xpending(key, group)
            oldest_id = summary.get("min")
        elif undelivered_entries:
            oldest_id = undelivered_entries[0][0]
        age_s = 0.0
        if oldest_id is not None:
            ts = await _entry_ts_ms(redis, key, oldest_id)
            if ts is not None:
                age_s = max(0.0, (now_ms - ts) / 1000)
        last_event_id = None
        last_entry = info.get("last-entry")
        if last_entry and last_entry[1]:
            raw = event_log.entry_payload(last_entry[1])
            with contextlib.suppress(ValueError, TypeError):
                last_event_id = decode_entry(raw).event_id
        out.append(
            RegionLag(
                region=region,
                stream_length=length,
                pending=pending,
                undelivered=undelivered,
                oldest_unacked_age_s=age_s,
                last_event_id=last_event_id,
            )
        )
    return JournalLag(
        regions=out,
        pending=sum(r.pending for r in out),
        undelivered=sum(r.undelivered for r in out),
        oldest_unacked_age_s=max((r.oldest_unacked_age_s for r in out), default=0.0),
    )
