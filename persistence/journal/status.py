"""The journal's status: each region's position in Postgres and the events set aside and not
yet replayed (`rejected_counts` is light: the gateway counts them for `/metrics`), with the
lag, as `mnemo journal-status` prints them.
"""

from __future__ import annotations

import sys
from datetime import datetime

import asyncpg
import msgspec

from engine.connection import open_redis
from engine.keys import Keys
from engine.settings import Settings
from persistence.journal.lag import JournalLag, journal_lag
from persistence.journal.streams import GROUP

__all__ = [
    "RegionPosition",
    "RejectedEvent",
    "positions",
    "print_status",
    "rejected_counts",
    "rejected_events",
    "status",
]


class RegionPosition(msgspec.Struct, kw_only=True):
    """How far Postgres has applied a region's events."""

    region: str
    applied_seq: int
    applied_at: datetime | None
    stored_max_seq: int | None
    waiting: int
    """Events stored but not yet applied (waiting for a gap to fill)."""
    skipped: int
    rejected: int
    """Events set aside (`journal_rejects`) and not yet replayed."""


class RejectedEvent(msgspec.Struct, kw_only=True):
    """One row of `journal_rejects` not yet replayed: an event (region and seq), or a stream
    entry that is not an event at all (stream and entry id)."""

    region: str | None
    seq: int | None
    event_type: str | None
    stage: str
    problem: str
    received_at: datetime
    stream: str | None
    entry_id: str | None


async def positions(conn: asyncpg.Connection) -> list[RegionPosition]:
    """Every region's journal position in Postgres."""
    rows = await conn.fetch(
        "SELECT p.region, p.applied_seq, p.applied_ts, p.skipped, "
        "(SELECT max(seq) FROM events e WHERE e.region = p.region) AS max_seq, "
        "(SELECT count(*) FROM events e WHERE e.region = p.region AND e.seq > p.applied_seq) "
        "AS waiting, (SELECT count(*) FROM journal_rejects j WHERE j.region = p.region "
        "AND j.replayed_at IS NULL) AS rejected FROM journal_positions p ORDER BY p.region"
    )
    return [
        RegionPosition(
            region=r["region"],
            applied_seq=r["applied_seq"],
            applied_at=r["applied_ts"],
            stored_max_seq=r["max_seq"],
            waiting=r["waiting"],
            skipped=r["skipped"],
            rejected=r["rejected"],
        )
        for r in rows
    ]


async def rejected_events(conn: asyncpg.Connection, *, limit: int = 20) -> list[RejectedEvent]:
    """The rejects not yet replayed, newest first."""
    rows = await conn.fetch(
        "SELECT region, seq, event_type, stage, problem, received_at, stream, entry_id "
        "FROM journal_rejects WHERE replayed_at IS NULL ORDER BY received_at DESC, id DESC "
        "LIMIT $1",
        limit,
    )
    return [RejectedEvent(**dict(r)) for r in rows]


async def rejected_counts(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int]:
    """Rejects not yet replayed, by region (`""`: stream entries that are not events)."""
    rows = await conn.fetch(
        "SELECT coalesce(region, '') AS region, count(*) AS n FROM journal_rejects "
        "WHERE replayed_at IS NULL GROUP BY 1"
    )
    return {r["region"]: r["n"] for r in rows}


async def status(
    settings: Settings,
) -> tuple[JournalLag, list[RegionPosition], list[RejectedEvent]]:
    """The journal's lag in Redis, its positions in Postgres and its latest rejects."""
    assert settings.redis_url and settings.database_url
    redis = open_redis(settings.redis_url)
    try:
        lag = await journal_lag(redis, Keys(settings.key_prefix))
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        return lag, await positions(conn), await rejected_events(conn)
    finally:
        await conn.close()


async def print_status(settings: Settings) -> int:
    """`mnemo journal-status`: print the lag, the positions and the latest rejects; exit status
    1 if any event is set aside and not yet replayed, else 0."""
    lag, pos, rejects = await status(settings)
    out = sys.stdout
    out.write(
        f"journal group {GROUP!r}: {lag.pending} pending, {lag.undelivered} undelivered, "
        f"oldest unacknowledged event {lag.oldest_unacked_age_s:.1f} s old\n"
    )
    by_region = {p.region: p for p in pos}
    header = f"{'region':<20} {'stream':>9} {'pending':>8} {'undeliv':>8} {'age_s':>8} "
    header += f"{'applied':>10} {'waiting':>8} {'skipped':>8} {'rejected':>8}\n"
    out.write(header)
    for r in lag.regions:
        p = by_region.pop(r.region, None)
        out.write(
            f"{r.region:<20} {r.stream_length:>9} {r.pending:>8} {r.undelivered:>8} "
            f"{r.oldest_unacked_age_s:>8.1f} {p.applied_seq if p else 0:>10} "
            f"{p.waiting if p else 0:>8} {p.skipped if p else 0:>8} {p.rejected if p else 0:>8}\n"
        )
    for p in by_region.values():
        out.write(
            f"{p.region:<20} {'-':>9} {'-':>8} {'-':>8} {'-':>8} {p.applied_seq:>10} "
            f"{p.waiting:>8} {p.skipped:>8} {p.rejected:>8}\n"
        )
    if rejects:
        out.write(
            "set aside (newest first; `mnemo journal-replay --region R` once the cause is "
            "mended):\n"
        )
        for j in rejects:
            what = (
                f"{j.region}:{j.seq} {j.event_type}"
                if j.region is not None
                else f"entry {j.entry_id} of {j.stream}"
            )
            out.write(f"  {j.received_at:%Y-%m-%d %H:%M:%S} {what} at {j.stage}: {j.problem}\n")
    return 1 if any(j.region is not None for j in rejects) else 0
