"""`mnemo rebuild-live`: repopulate Redis's live market from Postgres after Redis was lost.

The journal keeps every event the scripts wrote in `events`, so the live market is rebuilt the
way the engine defines it: each region's events are folded, in sequence order, by the engine's
own `engine.replay.RegionImage` (the same rules as the Lua scripts: asks listed or not, heartbeat
deadlines, the bid book, open contracts and their indexes, the `seq`/`arrival` counters, the
directory), and the image is written into Redis. The invariants the scripts keep therefore hold
afterwards, and the engine's tests check that replay against the scripts.

Rules:
- Run it with the engine and the gateways stopped, against a Redis that lost the market: a
  region that still has state in Redis (its `seq` key exists) is left alone and reported,
  because replay merges rather than replaces.
- A region's events are replayed from its first stored event up to the first gap in the stored
  sequence (events that never reached Postgres are gone with Redis); what lies beyond a gap is
  reported and not replayed, and the region's `seq` counter is set past every stored event so new
  events never reuse a journaled id.
- Closed contracts and bids older than the retention would already have expired from Redis and
  are not written back.
- Events the journal had not yet read when Redis died are lost; the journal's lag at that moment
  (normally well under a second of changes) bounds the loss.
- Money (issue 14) comes back with the events that moved it: each renter's wallets (funding and
  per region: available, held, budget allowance), the holds on open contracts and bids, the
  credit keys already used, the transfers sent and received, and the outbox of transfers sent
  and not received (the funding slot `+funding` is rebuilt like a region); a transfer whose
  destination received it leaves its sender's outbox.

Progress goes to stderr as a plain text bar.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import asyncpg
import msgspec
import redis.asyncio as aioredis

from engine.connection import open_redis
from engine.keys import Keys
from engine.replay import RegionImage
from engine.settings import ConfigError, Settings
from persistence.journal.stored import Unreadable, decode_entry

__all__ = ["rebuild_live"]

_CHUNK = 5000
_RETENTION_MS = 86_400_000


class _Progress:
    """A plain-text progress bar on a stream (redrawn at most ten times a second)."""

    def __init__(self, label: str, total: int, out: TextIO) -> None:
        self.label, self.total, self.out = label, max(total, 1), out
        self.done = 0
        self.shown = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown >= 0.1 or self.done >= self.total:
            self.shown = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            self.out.write(f"\r{self.label:<24} [{bar:<30}] {self.done}/{self.total} events")
            self.out.flush()

    def finish(self, note: str = "") -> None:
        self.out.write(f"\r{self.label:<24} [{'#' * 30}] {self.done}/{self.total} events {note}\n")
        self.out.flush()


async def rebuild_live(
    settings: Settings,
    *,
    regions: list[str] | None = None,
    now_ms: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Rebuild the live market of `regions` (default: every region with journaled events) from
    Postgres into Redis. Returns 0 when every region was rebuilt completely, 1 when a region was
    skipped (already live) or replayed only up to a gap."""
    if not settings.redis_url or not settings.database_url:
        raise ConfigError(
            "MNEMO_REDIS_URL" if not settings.redis_url else "MNEMO_DATABASE_URL",
            "rebuild-live needs both Redis and Postgres URLs",
        )
    out = out or sys.stderr
    keys = Keys(settings.key_prefix)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    redis = open_redis(settings.redis_url)
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    status = 0
    try:
        bounds = await conn.fetch(
            "SELECT region, min(seq) AS first, max(seq) AS last, count(*) AS n FROM events "
            "GROUP BY region ORDER BY region"
        )
        for row in bounds:
            region = row["region"]
            if regions is not None and region not in regions:
                continue
            if await redis.exists(keys.seq(region)):
                out.write(f"{region}: Redis still holds this region's market; left alone\n")
                status = 1
                continue
            complete = await _rebuild_region(
                conn, redis, keys, settings, region, row, now_ms=now_ms, out=out
            )
            status = status or (0 if complete else 1)
        await _settle_outboxes(redis, keys, [row["region"] for row in bounds])
    finally:
        await conn.close()
        await redis.aclose()
    return status


async def _rebuild_region(
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    region: str,
    bounds: asyncpg.Record,
    *,
    now_ms: int,
    out: TextIO,
) -> bool:
    image = RegionImage(region, missed_heartbeats_offline=settings.missed_heartbeats_offline)
    progress = _Progress(region, bounds["n"], out)
    expected = bounds["first"]
    gap_at: int | None = None
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        cursor = conn.cursor(
            "SELECT seq, payload::text FROM events WHERE region = $1 ORDER BY seq",
            region,
            prefetch=_CHUNK,
        )
        async for seq, payload in cursor:
            if seq != expected:
                gap_at = expected
                break
            try:
                event = decode_entry(payload).event
            except ValueError as e:
                # An event this version cannot read (a newer engine's): replay stops before it,
                # as at a gap, rather than rebuilding a market that lacks it.
                out.write(f"{region}: event {seq} cannot be read ({e}); replayed up to it\n")
                gap_at = expected
                break
            assert not isinstance(event, Unreadable)  # strict decoding raises instead
            image.apply(event)
            expected += 1
            progress.advance(1)
    _prune_closed(image, now_ms)
    await image.write(redis, keys, retention_ms=_RETENTION_MS)
    # New events must never reuse a journaled id, even one beyond a gap that was not replayed.
    await redis.set(keys.seq(region), max(image.seq, bounds["last"]))
    if gap_at is None:
        progress.finish(
            f"({len(image.nodes)} nodes, {len(image.book)} resting bids, "
            f"{len(image.ends)} open contracts)"
        )
        return True
    progress.finish(
        f"stopped at missing event {region}:{gap_at}; "
        f"{bounds['last'] - gap_at + 1} later events not replayed"
    )
    return False


async def _settle_outboxes(redis: aioredis.Redis, keys: Keys, slots: list[str]) -> None:
    """Money transfers (issue 14) whose destination has received them leave their sender's
    outbox: the sender's last step writes no event, so a slot's replay alone keeps them."""
    for slot in slots:
        for transfer_id, raw in (await redis.hgetall(keys.outbox(slot))).items():
            to = msgspec.json.decode(raw)["to_slot"]
            tid = transfer_id.decode() if isinstance(transfer_id, bytes) else transfer_id
            if await redis.zscore(keys.transfers(to), f"in:{tid}") is not None:
                await redis.hdel(keys.outbox(slot), transfer_id)


def _prune_closed(image: RegionImage, now_ms: int) -> None:
    """Drop closed contracts and bids that would already have expired from Redis."""
    horizon = now_ms - _RETENTION_MS
    for contract_id in [c for c in image.closed if c in image.contracts]:
        if image.contracts[contract_id].completed_ms < horizon:
            del image.contracts[contract_id]
            image.closed.discard(contract_id)
    for bid_id in [b for b in image.closed if b in image.bids]:
        bid = image.bids[bid_id]
        if max(bid.created_ms, bid.expires_ms) < horizon:
            del image.bids[bid_id]
            image.closed.discard(bid_id)
