"""MarketView: a process's read model of the live market, kept current from the event streams.

One `AskBook` (engine.scoring) per region. `start()` snapshots every region's nodes from Redis,
then a background task tails every region's stream with one blocking `XREAD` and applies each
event to its book (`AskBook.apply`). Requests read the books, never Redis.

Snapshot and tail fit together without a transaction: for each region the current event
sequence number and the last stream entry id are read first, atomically (one MULTI on the
region's slot), then the node hashes; tailing starts after that entry. Events set absolute values
(whole node, offered/available, reserved after a reserve or settle), so an event the snapshot
already reflects is re-applied harmlessly and the book converges to the live state.
Event ids are `"<region>:<seq>"` with seq increasing by exactly one per event: any other step
(entries trimmed before this view read them after a long disconnection, or a region rebuilt
under it) makes the view re-snapshot that region, so it never silently misses a change. A
snapshot (a new region, or a re-snapshot) pauses event application for its duration, roughly
10-20 us per node of the region (reading the hashes, decoding, ~5 us per upsert).

Staleness bound. While the view keeps up, an event is in the book one round trip after the
script that wrote it returned: XREAD BLOCK returns as soon as an entry is appended, and a batch
of up to `batch` entries is applied before the next read (a heartbeat entry costs ~2-3 us, so
a 1000-beat event ~3 ms), yielding to the event loop every 2 ms so requests keep flowing. Requests
between the script and that moment see the previous state: the bound is the Redis round trip
plus the event loop's latency plus one batch, typically well under 10 ms on one host. A new
region is discovered within `regions_poll_s` (1 s by default) of its first node. Nothing here
is authoritative: a reserve checks capacity, price and terms atomically, and a lost race falls
through to the next candidate. `sync()` waits until the view has applied every event written
before the call (read-your-writes, for tests and for callers that need it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine import core
from engine import log as event_log
from engine.connection import read_streams
from engine.keys import Keys
from engine.scoring import AskBook, Match, MatchRequest, merge_matches, rank, warm_up
from engine.types import Node

__all__ = ["MarketView"]

log = logging.getLogger(__name__)

_RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_YIELD_EVERY_S = 0.002


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class MarketView:
    """Columnar books of every region, current to within the staleness bound (module docstring).

    Use from one event loop. `start()` warms the scoring kernels, snapshots, and starts tailing;
    `stop()` ends the tail task. Reads (`book`, `books`, `rank_all`) are synchronous.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        block_ms: int = 1000,
        regions_poll_s: float = 1.0,
        batch: int = 100,
        snapshot_chunk: int = 1000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.block_ms = block_ms
        self.regions_poll_s = regions_poll_s
        self.batch = batch
        self.snapshot_chunk = snapshot_chunk
        self._books: dict[str, AskBook] = {}
        self._last_id: dict[str, str] = {}
        self._seq: dict[str, int] = {}
        self._last_ts_ms: dict[str, int] = {}
        self._stream_region: dict[str, str] = {}
        self._resnapshot: set[str] = set()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.events_applied = 0
        """Events applied since start (a metric)."""
        self.snapshots = 0
        """Region snapshots taken since start, re-snapshots after a gap included (a metric)."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Compile (or load) the kernels, snapshot every region, start tailing the streams."""
        if self._task is not None:
            return
        # the first call of a kernel compiles it or loads it from the on-disk cache: pay it here
        await asyncio.to_thread(warm_up)
        self._stopping = False
        await self._discover()
        self._task = asyncio.create_task(self._tail(), name="market-view-tail")

    async def stop(self) -> None:
        """Stop tailing (the books stay readable, frozen)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def sync(self, timeout_s: float = 5.0) -> None:
        """Return once every event written before this call is in the books.

        Raises TimeoutError if the view does not catch up in `timeout_s`.
        """
        await self._discover()
        targets: dict[str, tuple[int, int]] = {}
        for region in list(self._books):
            last = await self.redis.xrevrange(self.keys.events(region), "+", "-", count=1)
            targets[region] = event_log.stream_id(last[0][0]) if last else (0, 0)

        def behind() -> dict[str, tuple[str, str]]:
            return {
                r: (self._last_id[r], f"{t[0]}-{t[1]}")
                for r, t in targets.items()
                if r in self._resnapshot or event_log.stream_id(self._last_id[r]) < t
            }

        deadline = time.monotonic() + timeout_s
        while lagging := behind():
            if self._task is None or self._task.done():
                raise RuntimeError("the view is not tailing (start() it)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"market view behind (applied, wanted): {lagging}")
            await asyncio.sleep(0.002)

    # -- reads -----------------------------------------------------------------------------------

    def book(self, region: str) -> AskBook | None:
        """The region's book, or None for a region this view has not seen."""
        return self._books.get(region)

    def books(self) -> list[AskBook]:
        return list(self._books.values())

    def regions(self) -> list[str]:
        return sorted(self._books)

    def last_event_ms(self, region: str) -> int | None:
        """`ts_ms` of the last event applied to the region's book (None before any)."""
        return self._last_ts_ms.get(region)

    def rank_all(self, req: MatchRequest, now_ms: int, k: int | None = None) -> list[Match]:
        """The best `k` (default `req.limit`) matches over every region (or `req.region` only)."""
        req.validate()
        k = req.limit if k is None else k
        if req.region is not None:
            book = self._books.get(req.region)
            return [] if book is None else rank(book, req, now_ms, k)
        return merge_matches((rank(book, req, now_ms, k) for book in self._books.values()), k)

    # -- snapshot ------------------------------------------------------------------------------

    async def _discover(self) -> None:
        """Snapshot the regions that appeared (and those marked for a re-snapshot)."""
        async with self._lock:
            raw = await self.redis.smembers(self.keys.regions)
            wanted = {_text(r) for r in raw}
            for region in sorted((wanted - set(self._books)) | self._resnapshot):
                await self._snapshot(region)

    async def _snapshot(self, region: str) -> None:
        # position first (seq and the last entry together, atomically), nodes after: every
        # change after the position is re-applied by the tail
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.seq(region))
        pipe.xrevrange(self.keys.events(region), "+", "-", count=1)
        raw_seq, last = await pipe.execute()
        seq = int(_text(raw_seq)) if raw_seq is not None else 0
        last_id = _text(last[0][0]) if last else "0-0"
        book = AskBook(region)
        ids = [_text(i) for i in await self.redis.zrange(self.keys.geo(region), 0, -1)]
        for start in range(0, len(ids), self.snapshot_chunk):
            for node in await self._load_nodes(region, ids[start : start + self.snapshot_chunk]):
                book.upsert(node)
        self._books[region] = book
        self._last_id[region] = last_id
        self._seq[region] = seq
        self._stream_region[self.keys.events(region)] = region
        self._resnapshot.discard(region)
        self.snapshots += 1

    async def _load_nodes(self, region: str, ids: Sequence[str]) -> list[Node]:
        pipe = self.redis.pipeline(transaction=False)
        for node_id in ids:
            pipe.hgetall(self.keys.node(region, node_id))
        out = []
        for raw in await pipe.execute():
            if raw:  # gone since the id was listed: its event says so
                out.append(core.from_fields(Node, {_text(k): _text(v) for k, v in raw.items()}))
        return out

    # -- tail ------------------------------------------------------------------------------------

    async def _tail(self) -> None:
        next_poll = time.monotonic() + self.regions_poll_s
        backoff = 0.1
        while not self._stopping:
            try:
                now = time.monotonic()
                if now >= next_poll or self._resnapshot:
                    await self._discover()
                    next_poll = time.monotonic() + self.regions_poll_s
                    now = time.monotonic()
                streams: dict[Any, Any] = {
                    self.keys.events(r): last for r, last in self._last_id.items()
                }
                block = max(1, min(self.block_ms, int((next_poll - now) * 1000)))
                if not streams:
                    await asyncio.sleep(block / 1000)
                    continue
                # one XREAD (one per slot on a cluster)
                reply = await read_streams(self.redis, streams, count=self.batch, block_ms=block)
                if reply:
                    async with self._lock:
                        await self._apply_reply(reply)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except _RETRYABLE as exc:
                log.warning("market view: Redis unavailable (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
            except Exception:
                # a bug, not an outage: say so loudly, rebuild from snapshots, keep serving
                log.exception("market view: tail failed; re-snapshotting every region")
                self._resnapshot.update(self._books)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    async def _apply_reply(self, reply: Any) -> None:
        items: Iterable[tuple[Any, Any]] = reply.items() if isinstance(reply, dict) else reply
        yielded = time.monotonic()
        for raw_stream, entries in items:
            region = self._stream_region.get(_text(raw_stream))
            for raw_id, fields in entries:
                if region is None or region in self._resnapshot:
                    break
                self._apply_entry(region, _text(raw_id), fields)
                # a reply can hold many big heartbeat batches: let requests run in between
                if time.monotonic() - yielded > _YIELD_EVERY_S:
                    await asyncio.sleep(0)
                    yielded = time.monotonic()

    def _apply_entry(self, region: str, entry_id: str, fields: Any) -> None:
        if event_log.stream_id(entry_id) <= event_log.stream_id(self._last_id[region]):
            return  # read before a re-snapshot that already covers it
        event = event_log.decode(event_log.entry_payload(fields))
        seq = event_log.seq_of(event.event_id)
        if seq != self._seq[region] + 1:
            # after the snapshot's position every entry is the next event; anything else
            # means entries were trimmed unread, or the region was rebuilt under us
            log.warning(
                "market view: region %s went from event %d to %d; re-snapshotting",
                region,
                self._seq[region],
                seq,
            )
            self._resnapshot.add(region)
            return
        self._books[region].apply(event)
        self._seq[region] = seq
        self._last_ts_ms[region] = event.ts_ms
        self.events_applied += 1
        self._last_id[region] = entry_id
