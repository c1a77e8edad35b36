"""The engine process (Procfile `engine`): the market's clockwork, one loop per region.

`run_engine(settings)` serves a set of regions (the `regions` argument, else `settings.regions`,
else every region in the `regions` set, re-read every few seconds). For each region it holds a
lease (`Keys.engine_lease`: SET NX PX, renewed; only the holder works the region, so two engines
never cross the same book), takes a snapshot of the region (nodes, open bids, live contracts),
then tails the region's event stream and keeps its own view current from it. Several engines
spread the regions among them (`Engine._balance`: each takes at most its share of the leases
and lets go of the rest), so more engines, on one machine or many, add cores to the market; on a
Redis Cluster each region's keys (its lease included) live on its slot's primary.
The lease is for efficiency, not safety: two engines that both believed they held a region (a
lease lost in a primary's fail-over, say) would only race each other's reserves, which the
scripts settle atomically.

- an `AskBook` (engine.scoring) of the region's nodes, for ranking;
- a `BidBook` (engine.book): the open bids and the crossing rule, pure; this module is its
  adapter (it feeds the book, sends the reserves the book decides on, and hands back outcomes);
- a `Notifier` (engine.notify) that turns every event into pub/sub messages;
- a `QuoteBook` (engine.quotes): the region's quote and supply summary, and whether an event
  made room for a resting bid.

Duties, each an atomic `Market` script call (the scripts are the truth; the view may be a few
milliseconds stale, so a refused reserve is a normal result and the next candidate is tried):

- Crossing, in price-time priority, as `engine.book` states it: a bid is tried when it arrives,
  when an ask it could use gets better, and (every open bid) on a slow tick, `CROSS_TICK_S`, as
  a backstop. Each fill is one `Market.reserve(..., bid_id=...)`; a pass's reserves go out in
  pipelined batches (`Market.reserve_many`), and a bid that lost a race falls through to its
  next candidates with single reserves.
- Expiry of bids (`expire_bids`) and settlement of contracts whose end passed (`due_contracts`
  then `settle(..., egress 0)`), due when the view knows of one, and on a periodic sweep, which
  also delists expired asks (`expire_asks`).
- Liveness: `stale_nodes` -> `mark_offline` -> each active contract moves to the best other node
  of the region that can hold it for the remaining time within the contract's price cap
  (`failover`), else ends pro-rated (`fail_contract`). A delivered lease moves only to a node
  that delivers, and bills its delivered time up to its node's last heartbeat. An offline
  node's uptime windows close as they end (`sweep_uptime`, engine.trust), on the same sweep.
- Delivery: a delivered lease that its node has not reported ready within
  `lease_ready_timeout_ms` is handled as if its node had failed (failed over, or failed,
  uncharged); a delivered lease whose term ends is closed (`close_lease`: its node is told to
  stop, wipe and report) rather than settled, and settled (`settle_lease`) once the node's
  report is in, or `lease_close_timeout_ms` after the close order with the last heartbeat's
  meter.
- Quotes on `quotes_channel(region)`, computed from the view (the same answer as
  `Market.quote`, without reading Redis), at most `QUOTE_MIN_INTERVAL_S` apart and only when
  something other than the timestamp changed; the `market` summary at most once a
  second (when it changed, and every `SUMMARY_KEEPALIVE_S` regardless).
- Notifications for every event (engine.notify), including `contract_ending` notices.

Publishing never blocks a region loop: messages go to a bounded queue drained by one writer task
(one small script call PUBLISHes a whole batch); when the queue is full, messages are dropped and
counted.

Time: market time (expiry, ends, heartbeat deadlines, quote windows) comes from the injected
`clock` (Unix ms); pacing (lease renewal, quote and summary rates, how long a loop may sleep)
uses the monotonic clock. A loop never sleeps longer than `TICK_S` without reading `clock`, so a
test that moves an injected clock forward sees the effect within a tick.

Failures: a region loop that raises logs the error, lets its lease go and starts over after a
short pause; the other regions carry on. A lost Redis connection (Redis restarting) is one
warning line per attempt, with pauses growing to `_RETRY_PAUSE_MAX_S`; once Redis answers again
each loop retakes its lease and a fresh snapshot, and resumes. Cancellation (or `stop`) ends
every loop, releases the leases and closes the Redis client.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, assert_never

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine import log as event_log
from engine.book import Attempt, BidBook, Outcome
from engine.connection import is_cluster, open_redis
from engine.core import successor_duration_s
from engine.errors import CapacityTaken, Conflict, MarketError, NotFound, Unavailable
from engine.keys import Keys
from engine.market import Market, ReserveRequest
from engine.notify import Message, Notifier, encode_message
from engine.quotes import QuoteBook
from engine.scoring import AskBook, MatchRequest, rank, warm_up
from engine.settings import ConfigError, Settings
from engine.types import (
    BidCancelled,
    BidExpired,
    BidPlaced,
    Contract,
    ContractCreated,
    ContractExtended,
    ContractSettled,
    Event,
    HeartbeatsApplied,
    LeaseChanged,
    Node,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
    Quote,
    StakeChanged,
    TransferReceived,
    TransferSent,
    TrustUpdated,
    WalletCredited,
    WalletDebited,
)

__all__ = ["Clock", "Engine", "run_engine", "wall_clock_ms"]

log = logging.getLogger("mnemo.engine")

Clock = Callable[[], int]
"""Market time in Unix milliseconds."""

LEASE_TTL_MS = 10_000
"""A region's lease lapses this long after its holder's last renewal (a dead engine's regions
are taken over by another within this time)."""
LEASE_RENEW_S = 2.0
LEASE_RETRY_S = 1.0
"""How often an engine that does not hold a region's lease tries to take it."""
SHED_PAUSE_S = 3 * LEASE_RETRY_S
"""How long a region an engine let go (it served more than its share) waits before this engine
tries it again: long enough for a peer under its share to take it."""
TICK_S = 0.1
"""The longest a region loop waits without reading the clock."""
SWEEP_MS = 1_000
"""Market-time interval of the backstop sweeps: stale nodes, due contracts, expired bids."""
CROSS_TICK_S = 10.0
"""Every open bid is tried again at least this often, whatever happened (a backstop: between
these, a bid is tried when it arrives and when an ask it could use gets better)."""
QUOTE_MIN_INTERVAL_S = 0.1
QUOTE_REFRESH_S = 1.0
"""Quotes are recomputed this often even without events (the 24 h window slides)."""
SUMMARY_MIN_INTERVAL_S = 1.0
SUMMARY_KEEPALIVE_S = 10.0
REGION_RESCAN_S = 2.0
STREAM_BATCH = 1_000
SETTLE_CONCURRENCY = 32
FAILOVER_K = 16
SCRIPT_LIMIT = 500
"""Page size of the list-returning scripts (expire, due, stale)."""
PUBLISH_QUEUE = 100_000
PUBLISH_BATCH = 500
MAX_CONNECTIONS = 1024
GC_THRESHOLDS = (700, 10, 1000)
"""The engine process's `gc.set_threshold` (CPython's default: (700, 10, 10))."""
_RETRY_PAUSE_S = 1.0
_RETRY_PAUSE_MAX_S = 5.0
"""A region loop that lost Redis retries after 1, 2, 4, 5, 5... s (back within 5 s of its return)."""

_LOST_RACE = (CapacityTaken, Unavailable)
_GONE = (Conflict, NotFound)
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _reserve_request(attempt: Attempt) -> ReserveRequest:
    bid, fill = attempt.bid, attempt.fill
    return ReserveRequest(
        node_id=fill.node_id,
        client_id=bid.client_id,
        user_id=bid.user_id,
        ram_gb=fill.ram_gb,
        vram_gb=fill.vram_gb,
        duration_s=bid.duration_s,
        max_price_pusd=bid.max_price_pusd,
        bid_id=bid.bid_id,
    )


def wall_clock_ms() -> int:
    """The default clock: Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


async def run_engine(
    settings: Settings,
    *,
    regions: Sequence[str] | None = None,
    stop: asyncio.Event | None = None,
    clock: Clock | None = None,
) -> None:
    """Run the engine until `stop` is set (or the task is cancelled).

    `regions`: the regions to serve; None means `settings.regions`, and if that is empty too,
    every region in the `regions` set (re-read periodically). `clock`: market time in Unix ms
    (tests inject one). Raises ConfigError without a Redis URL; a Redis that cannot be reached at
    start-up raises after a few logged retries.
    """
    if settings.redis_url is None:
        raise ConfigError("MNEMO_REDIS_URL", "the engine needs a Redis URL")
    # A blocking pool: past the cap a command waits for a free connection instead of failing
    # (each served region holds one for its blocking stream read). A cluster: per node.
    redis = open_redis(settings.redis_url, max_connections=MAX_CONNECTIONS, timeout_s=30)
    thresholds = gc.get_threshold()
    try:
        await _connect(redis)
        # The process keeps many long-lived objects (the books, the open bids, the live
        # contracts, the notifier's memory). With CPython's default thresholds the collector
        # walks all of them again every second or so under load, finding nothing (an eighth
        # of a busy crossing loop's CPU). Start-up's objects (Numba, LLVM) are frozen out of
        # collection, and full collections wait for far more allocations (restored on return,
        # for a caller that goes on, like a test).
        await asyncio.to_thread(warm_up)
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        engine = Engine(
            redis,
            Keys(settings.key_prefix),
            regions=tuple(regions or settings.regions) or None,
            clock=clock or wall_clock_ms,
            missed_heartbeats_offline=settings.missed_heartbeats_offline,
            ack_replicas=settings.redis_ack_replicas,
            platform_fee_bps=settings.platform_fee_bps,
            transfer_repair_after_ms=int(settings.transfer_repair_after_s * 1000),
            lease_ready_timeout_ms=settings.lease_ready_timeout_ms,
            lease_close_timeout_ms=settings.lease_close_timeout_ms,
        )
        await engine.run(stop or asyncio.Event())
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        await asyncio.shield(redis.aclose())


async def _connect(redis: aioredis.Redis, attempts: int = 5) -> None:
    """Ping Redis, retrying connection errors with a logged countdown, then re-raise."""
    for left in range(attempts - 1, -1, -1):
        try:
            await redis.ping()
            return
        except _CONNECTION_ERRORS as exc:
            if left == 0:
                raise
            log.warning("redis not reachable (%s); %d retries left", exc, left)
            await asyncio.sleep(1.0)


class Engine:
    """The engine of one process: region workers, their leases, and the publisher.

    Build with an open Redis client; `await run(stop)` serves until `stop` is set. Tests and
    benchmarks may build it directly (and read `workers` to see what it holds).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        regions: Sequence[str] | None = None,
        clock: Clock = wall_clock_ms,
        missed_heartbeats_offline: int = 3,
        ack_replicas: int = 0,
        platform_fee_bps: int = 1000,
        transfer_repair_after_ms: int = 5_000,
        lease_ready_timeout_ms: int = 3_000,
        lease_close_timeout_ms: int = 10_000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_ready_timeout_ms = lease_ready_timeout_ms
        self.lease_close_timeout_ms = lease_close_timeout_ms
        self.market = Market(
            redis,
            keys,
            missed_heartbeats_offline=missed_heartbeats_offline,
            ack_replicas=ack_replicas,
            platform_fee_bps=platform_fee_bps,
        )
        self.transfer_repair_after_ms = transfer_repair_after_ms
        self.clock = clock
        self.fixed_regions = tuple(regions) if regions else None
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.publisher = Publisher(redis)
        # The region loops read their streams through this client (same connections): it
        # hands XREAD replies over as the server sent them, skipping redis-py's building of a
        # dict per entry (a few microseconds an event, two events a bid).
        # (A cluster client has no pool to share: its own XREAD replies go as sent; nothing else
        # of the engine reads with XREAD.)
        self.stream_reader = (
            redis if is_cluster(redis) else aioredis.Redis(connection_pool=redis.connection_pool)
        )
        self.stream_reader.set_response_callback("XREAD", event_log.as_sent)
        self.workers: dict[str, RegionWorker] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.cap = 1 << 30  # most regions this engine serves at once (`_balance`)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve regions until `stop` is set; cleans up on return and on cancellation."""
        await self.market.load_scripts()
        # compile (or load) the Numba kernels now, not in the first crossing
        await asyncio.to_thread(warm_up)
        publisher = asyncio.create_task(self.publisher.run(), name="mnemo-engine-publisher")
        try:
            while not stop.is_set():
                await self._sync_regions(stop)
                await self._balance()
                await self._repair_transfers()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), REGION_RESCAN_S)
        finally:
            with contextlib.suppress(Exception):  # peers count us out at once
                await asyncio.shield(self.redis.zrem(self.keys.engines, self.owner))
            for worker in self.workers.values():
                worker.stopping = True
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
            await asyncio.shield(self.publisher.close(publisher))

    def may_take(self) -> bool:
        """Whether this engine may take one more region's lease (it serves fewer than its
        share, `cap`)."""
        return sum(1 for w in self.workers.values() if w.taking or w.lease.valid()) < self.cap

    async def _balance(self) -> None:
        """Spread the regions over the live engines: each announces itself in the `engines`
        set (renewed each rescan, gone `LEASE_TTL_MS` after its last), takes at most
        `cap = ceil(regions / engines)` leases, and lets go of the regions it holds beyond that
        (the last in name order), which then wait `SHED_PAUSE_S` before trying again so a peer
        under its share picks them up. Any number of engines, on any hosts: they converge to
        an even spread, and when one dies its peers' shares grow and they take its regions
        when its leases lapse."""
        now_ms = wall_clock_ms()
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(self.keys.engines, {self.owner: now_ms})
            pipe.zremrangebyscore(self.keys.engines, "-inf", now_ms - LEASE_TTL_MS)
            pipe.zcard(self.keys.engines)
            _, _, peers = await pipe.execute()
        except _CONNECTION_ERRORS as exc:
            log.warning("cannot announce this engine: %s", exc)
            return
        regions = len(self.workers)
        self.cap = max(1, -(-regions // max(1, int(peers))))
        serving = sorted(
            (w for w in self.workers.values() if w.lease.valid()), key=lambda w: w.region
        )
        for worker in serving[self.cap :]:
            if not worker.shed:
                log.info(
                    "region %s: letting go (%d engines: %d regions each)",
                    worker.region,
                    peers,
                    self.cap,
                )
                worker.shed = True

    async def _repair_transfers(self) -> None:
        """Finish money transfers left half done by a crash (issue 14: `Market.transfer`'s
        outbox). Every engine does it for every slot: the steps are idempotent."""
        try:
            done = await self.market.complete_transfers(
                self.clock(), older_than_ms=self.transfer_repair_after_ms
            )
        except _CONNECTION_ERRORS as exc:
            log.warning("cannot repair transfers now: %s", exc)
            return
        except Exception:
            log.exception("transfer repair failed")
            return
        if done:
            log.info("finished %d money transfers left half done", done)

    async def _sync_regions(self, stop: asyncio.Event) -> None:
        if self.fixed_regions is not None:
            wanted: Iterable[str] = self.fixed_regions
        else:
            try:
                wanted = sorted(_text(r) for r in await self.redis.smembers(self.keys.regions))
            except _CONNECTION_ERRORS as exc:
                log.warning("cannot read the regions set: %s", exc)
                return
        for region in wanted:
            if region in self._tasks:
                continue
            worker = RegionWorker(self, region, stop)
            self.workers[region] = worker
            self._tasks[region] = asyncio.create_task(worker.run(), name=f"mnemo-engine-{region}")


# ---------------------------------------------------------------------------------------------
# Leases


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """A per-region exclusive lease: `SET key owner NX PX ttl`, renewed by compare-and-expire,
    released by compare-and-delete. `valid()` is False once a renewal failed or could not be
    confirmed within the TTL (less a margin for clock drift between us and Redis)."""

    def __init__(self, redis: aioredis.Redis, key: str, owner: str, ttl_ms: int = LEASE_TTL_MS):
        self.redis = redis
        self.key = key
        self.owner = owner.encode()
        self.ttl_ms = ttl_ms
        self._valid_until = 0.0
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def valid(self) -> bool:
        return time.monotonic() < self._valid_until

    def _confirmed(self, sent_at: float) -> None:
        self._valid_until = sent_at + self.ttl_ms / 1000 * 0.8

    async def acquire(self) -> bool:
        sent_at = time.monotonic()
        if await self.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            self._confirmed(sent_at)
            return True
        return await self.renew()

    async def renew(self) -> bool:
        sent_at = time.monotonic()
        if await self._renew(keys=[self.key], args=[self.owner, self.ttl_ms]):
            self._confirmed(sent_at)
            return True
        self._valid_until = 0.0
        return False

    async def release(self) -> None:
        self._valid_until = 0.0
        await self._release(keys=[self.key], args=[self.owner])


# ---------------------------------------------------------------------------------------------
# Publishing


_PUBLISH_ROUTE = "mnemo:publisher"
"""Names the node of a cluster the fan-out script runs on (never read or written)."""

_FAN_OUT = """
local data, at, n = ARGV[2], 1, 0
for size, payload in string.gmatch(ARGV[1], '(%d+),(%d+)') do
  local channel_end = at + tonumber(size)
  local payload_end = channel_end + tonumber(payload)
  redis.call('PUBLISH', string.sub(data, at, channel_end - 1), string.sub(data, channel_end, payload_end - 1))
  at, n = payload_end, n + 1
end
return n
"""


class Publisher:
    """Fan-out that never blocks its callers: a bounded queue and one writer.

    `publish` only appends (dropping, and counting, what does not fit); the writer sends whatever
    accumulated, up to `PUBLISH_BATCH` messages per call of a tiny script that PUBLISHes each
    (one command instead of one per message: a quarter of the client's cost; the messages go as
    one blob and their lengths, so the client packs two arguments, not two per message). A failed
    write is logged and dropped: pub/sub is fire-and-forget, and subscribers resynchronise from
    the API."""

    def __init__(self, redis: aioredis.Redis, maxsize: int = PUBLISH_QUEUE) -> None:
        self.redis = redis
        self.maxsize = maxsize
        self.dropped = 0
        self.sent = 0
        self._queue: deque[Message] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._fan_out = redis.register_script(_FAN_OUT)

    def publish(self, messages: Iterable[Message]) -> None:
        queue = self._queue
        for message in messages:
            if len(queue) >= self.maxsize:
                self.dropped += 1
                if self.dropped % 10_000 == 1:
                    log.warning("publish queue full: %d notifications dropped so far", self.dropped)
                continue
            queue.append(message)
        if queue:
            self._wake.set()

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Two arguments, whatever the batch: the lengths and the bytes, cut apart by the
            # script (packing two arguments per message was most of this writer's CPU).
            data: list[bytes] = []
            sizes: list[str] = []
            while queue and len(sizes) < PUBLISH_BATCH:
                channel, payload = queue.popleft()
                name = channel.encode() if isinstance(channel, str) else channel
                data += (name, payload)
                sizes.append(f"{len(name)},{len(payload)}")
            try:
                # The key is never touched: it routes every batch to one node of a cluster,
                # so that batches reach a subscriber in the order they were sent (a PUBLISH on
                # another node comes over the cluster bus, after what its own node sends).
                await self._fan_out(keys=[_PUBLISH_ROUTE], args=[" ".join(sizes), b"".join(data)])
                self.sent += len(sizes)
            except _CONNECTION_ERRORS as exc:
                self.dropped += len(sizes)
                log.warning("publish failed, %d notifications dropped: %s", len(sizes), exc)
                await asyncio.sleep(0.2)

    async def close(self, task: asyncio.Task[None]) -> None:
        """Send what is queued (briefly), then stop the writer."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 2.0)
        except (TimeoutError, Exception):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# ---------------------------------------------------------------------------------------------
# One region


class RegionWorker:
    """Serves one region while holding its lease (see the module docstring)."""

    def __init__(self, engine: Engine, region: str, stop: asyncio.Event) -> None:
        self.engine = engine
        self.region = region
        self.stop = stop
        self.redis = engine.redis
        self.keys = engine.keys
        self.market = engine.market
        self.clock = engine.clock
        self.publisher = engine.publisher
        self.stream = engine.keys.events(region)
        self.lease = Lease(engine.redis, engine.keys.engine_lease(region), engine.owner)
        self.stopping = False
        self.serving = False
        self.taking = False  # between taking the lease and serving
        self.shed = False  # the engine serves more than its share: let this region go
        """True while this worker holds the lease and works the region."""
        self.fills = 0
        """Reserves this worker made for bids (benchmarks and tests read it)."""
        self._reset()

    def _reset(self) -> None:
        self.asks = AskBook(self.region)
        self.quotes = QuoteBook(self.region)
        self.bids = BidBook(self.region, self.asks, self.quotes)
        self.notifier = Notifier(self.keys, self.region)
        self.last_id: bytes | str = b"0-0"
        self._ends: list[tuple[int, str]] = []
        self._lease_due: list[tuple[int, str]] = []
        """(when, contract id): a delivered lease's readiness or close deadline, or its report."""
        self._next_sweep_ms = 0
        self._next_full_cross = 0.0
        self._quote_dirty = True
        self._last_quote: Quote | None = None
        self._quote_at = 0.0
        self._last_summary: dict[str, Any] | None = None
        self._summary_at = 0.0
        self._summary_checked_at = 0.0

    def _running(self) -> bool:
        return not (self.stopping or self.stop.is_set())

    async def run(self) -> None:
        delay_s = _RETRY_PAUSE_S
        while self._running():
            try:
                if self.shed:
                    self.shed = False
                    await self._pause(SHED_PAUSE_S)
                    continue
                if not self.engine.may_take():
                    await self._pause(LEASE_RETRY_S)
                    continue
                self.taking = True
                try:
                    taken = await self.lease.acquire()
                finally:
                    self.taking = False
                if not taken:
                    await self._pause(LEASE_RETRY_S)
                    continue
                delay_s = _RETRY_PAUSE_S
                renewer = asyncio.create_task(self._renew_lease())
                try:
                    await self._serve()
                finally:
                    self.serving = False
                    renewer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await renewer
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.lease.release())
                    self._reset()
            except asyncio.CancelledError:
                raise
            except _CONNECTION_ERRORS as exc:
                # Redis restarting, say: one line, no traceback, and a growing pause, so an
                # outage does not flood the log; the lease and the snapshot are taken anew.
                log.warning(
                    "region %s: Redis unavailable (%s); starting over in %.1f s",
                    self.region,
                    exc,
                    delay_s,
                )
                await self._pause(delay_s)
                delay_s = min(delay_s * 2, _RETRY_PAUSE_MAX_S)
            except Exception:
                log.exception("region %s: loop failed; starting over", self.region)
                await self._pause(_RETRY_PAUSE_S)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _renew_lease(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                if not await self.lease.renew():
                    log.warning("region %s: lease lost", self.region)
                    return
            except _CONNECTION_ERRORS as exc:
                log.warning("region %s: lease renewal failed: %s", self.region, exc)

    # -- serving ------------------------------------------------------------------------------

    async def _serve(self) -> None:
        await self._snapshot()
        self.serving = True
        log.info(
            "region %s: serving (%d nodes, %d open bids)",
            self.region,
            len(self.asks),
            len(self.bids),
        )
        crossed_at = time.monotonic()
        while self._running() and self.lease.valid() and not self.shed:
            block_ms = None if self.bids.pending else max(1, int(TICK_S * 1000))
            reply: Any = await self.engine.stream_reader.xread(
                {self.stream: self.last_id}, count=STREAM_BATCH, block=block_ms
            )
            n = 0
            for _stream, entries in event_log.stream_entries(reply):
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    n += 1
                    await self._on_entry(fields)
            if n == STREAM_BATCH and time.monotonic() - crossed_at < TICK_S:
                continue  # catch up with the stream before deciding anything
            now_ms = self.clock()
            await self._duties(now_ms)
            if not self.lease.valid():
                break
            await self._cross(now_ms)
            crossed_at = time.monotonic()
            await self._publish_state(now_ms)

    async def _snapshot(self) -> None:
        """Load the region as it is; the stream is then read from a point at or before it
        (events set absolute values, so re-applying the overlap converges)."""
        # The fills (quotes' last price and volume) are not idempotent to replay, so they are
        # read in one transaction with the stream position the replay starts from.
        pipe = self.redis.pipeline(transaction=True)
        pipe.xrevrange(self.stream, count=1)
        pipe.zrange(self.keys.fills(self.region), 0, -1, withscores=True)
        last, fills = await pipe.execute()
        self.last_id = last[0][0] if last else b"0-0"
        nodes, bids, contracts = await asyncio.gather(
            self.market.nodes(self.region),
            self.market.bids(self.region),
            self.market.contracts(region=self.region),
        )
        for node in nodes:
            self.asks.upsert(node)
            self.quotes.upsert_node(node)
        for member, ts in fills:
            self.quotes.load_fill(_text(member), int(ts))
        for bid in bids:
            self.bids.add(bid)
            self.notifier.remember(bid)
            self.quotes.add_bid(bid)
        for contract in contracts:
            if contract.status == "active":
                self.notifier.remember(contract)
                heapq.heappush(self._ends, (contract.end_ms, contract.contract_id))

    async def _on_entry(self, fields: list[Any]) -> None:
        try:
            event = event_log.decode(event_log.entry_payload(fields))
        except (TypeError, msgspec.DecodeError) as exc:
            log.error("region %s: undecodable stream entry skipped: %s", self.region, exc)
            return
        self.quotes.apply(event)
        self.asks.apply(event)
        self.bids.apply(event)
        self._quote_dirty = True
        match event:
            case BidPlaced(bid=bid):
                if bid.status == "open":
                    self.notifier.remember(bid)
            case ContractCreated(contract=c):
                heapq.heappush(self._ends, (c.end_ms, c.contract_id))
                if c.lease_state == "pending":
                    due = c.start_ms + self.engine.lease_ready_timeout_ms
                    heapq.heappush(self._lease_due, (due, c.contract_id))
            case ContractExtended():
                heapq.heappush(self._ends, (event.end_ms, event.contract_id))
            case LeaseChanged():
                if event.change == "closing":
                    due = event.closing_ms + self.engine.lease_close_timeout_ms
                    heapq.heappush(self._lease_due, (due, event.contract_id))
                elif event.change == "reported":
                    heapq.heappush(self._lease_due, (event.ts_ms, event.contract_id))
            case (
                NodeRegistered()
                | NodeUpdated()
                | NodeDeactivated()
                | HeartbeatsApplied()
                | NodeOffline()
                | BidCancelled()
                | BidExpired()
                | ContractSettled()
                | TrustUpdated()
                | StakeChanged()
            ):
                pass  # no contract's end to schedule, no new bid to address notices to
            case WalletCredited() | WalletDebited() | TransferSent() | TransferReceived():
                pass  # money: nothing to schedule or address
            case _:
                assert_never(event)
        await self._notify(event)

    async def _notify(self, event: Event) -> None:
        notifier = self.notifier
        # An event about something the snapshot missed (it ended before we started, or the
        # stream overlap): look it up so the message can still be addressed.
        match event:
            case (
                ContractExtended(contract_id=cid)
                | ContractSettled(contract_id=cid)
                | LeaseChanged(contract_id=cid)
            ):
                if not notifier.knows_contract(cid):
                    found = await self.market.get_contract(cid)
                    if found is not None:
                        notifier.remember(found)
            case BidCancelled(bid_id=bid_id) | BidExpired(bid_id=bid_id):
                if not notifier.knows_bid(bid_id):
                    found_bid = await self.market.get_bid(bid_id)
                    if found_bid is not None:
                        notifier.remember(found_bid)
            case (
                NodeRegistered()
                | NodeUpdated()
                | NodeDeactivated()
                | HeartbeatsApplied()
                | NodeOffline()
                | BidPlaced()
                | ContractCreated()
                | TrustUpdated()
                | StakeChanged()
            ):
                pass  # these carry whatever their notices are addressed by
            case WalletCredited() | WalletDebited() | TransferSent() | TransferReceived():
                pass  # money: nothing to schedule or address
            case _:
                assert_never(event)
        self.publisher.publish(notifier.on_event(event))

    # -- time-driven duties -------------------------------------------------------------------

    async def _duties(self, now_ms: int) -> None:
        sweep = now_ms >= self._next_sweep_ms
        if sweep:
            self._next_sweep_ms = now_ms + SWEEP_MS
        if sweep or self.bids.expiry_due(now_ms):
            await self._expire_bids(now_ms)
        if sweep or self._due(self._ends, now_ms):
            await self._settle_ended(now_ms)
        if sweep or self._due(self._lease_due, now_ms):
            await self._watch_leases(now_ms)
        if sweep:
            await self._check_liveness(now_ms)
            await self._expire_asks(now_ms)
            await self._sweep_uptime(now_ms)
        self.publisher.publish(self.notifier.due_notices(now_ms))

    @staticmethod
    def _due(heap: list[tuple[int, str]], now_ms: int) -> bool:
        """Pop every entry of `heap` whose time has come; True if there was one (whether a
        contract's end still holds is the script's call)."""
        due = False
        while heap and heap[0][0] <= now_ms:
            heapq.heappop(heap)
            due = True
        return due

    async def _expire_bids(self, now_ms: int) -> None:
        while True:
            expired = await self.market.expire_bids(self.region, now_ms, limit=SCRIPT_LIMIT)
            for bid in expired:
                self.bids.remove(bid.bid_id)
            if len(expired) < SCRIPT_LIMIT:
                return

    async def _expire_asks(self, now_ms: int) -> None:
        """Delist asks whose expiry passed with no change since (the scripts read no clock)."""
        while (
            len(await self.market.expire_asks(self.region, now_ms, limit=SCRIPT_LIMIT))
            == SCRIPT_LIMIT
        ):
            pass

    async def _settle_ended(self, now_ms: int) -> None:
        while True:
            due = await self.market.due_contracts(self.region, now_ms, limit=SCRIPT_LIMIT)
            for start in range(0, len(due), SETTLE_CONCURRENCY):
                chunk = due[start : start + SETTLE_CONCURRENCY]
                results = await asyncio.gather(
                    *(self._end_term(cid, now_ms) for cid in chunk), return_exceptions=True
                )
                for cid, result in zip(chunk, results, strict=True):
                    if isinstance(result, BaseException) and not isinstance(result, _GONE):
                        log.error("region %s: settling %s failed: %r", self.region, cid, result)
            if len(due) < SCRIPT_LIMIT:
                return

    async def _end_term(self, contract_id: str, now_ms: int) -> Contract:
        """A contract whose end came: settled, or, a lease its node delivers, closed (its node
        stops, wipes and reports; `_watch_leases` settles it)."""
        c = self.notifier.contract(contract_id) or await self.market.get_contract(contract_id)
        if c is not None and c.lease_state in ("pending", "ready"):
            return await self.market.close_lease(contract_id, now_ms)
        return await self.market.settle(contract_id, 0, now_ms)

    async def _watch_leases(self, now_ms: int) -> None:
        """Leases not ready in time fail over (or fail, uncharged); closing leases whose node
        reported, or whose close timeout passed, are settled."""
        engine = self.engine
        while True:
            late = await self.market.pending_leases(
                self.region, now_ms - engine.lease_ready_timeout_ms, limit=SCRIPT_LIMIT
            )
            for cid in late:
                contract = await self.market.get_contract(cid)
                if contract is None or contract.status != "active":
                    continue
                if contract.lease_state == "pending":
                    log.info(
                        "region %s: lease %s not ready on node %s in %d ms: treated as failed",
                        self.region,
                        cid,
                        contract.node_id,
                        engine.lease_ready_timeout_ms,
                    )
                    node = self.asks.node(contract.node_id)
                    await self._fail_over(contract, node, now_ms)
            if len(late) < SCRIPT_LIMIT:
                break
        while True:
            due = await self.market.closing_leases(
                self.region, now_ms - engine.lease_close_timeout_ms, limit=SCRIPT_LIMIT
            )
            results = await asyncio.gather(
                *(self.market.settle_lease(cid, now_ms) for cid in due), return_exceptions=True
            )
            for cid, result in zip(due, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, _GONE):
                    log.error("region %s: settling lease %s failed: %r", self.region, cid, result)
            if len(due) < SCRIPT_LIMIT:
                return

    async def _check_liveness(self, now_ms: int) -> None:
        while True:
            stale = await self.market.stale_nodes(self.region, now_ms, limit=SCRIPT_LIMIT)
            for node_id in stale:
                await self._take_offline(node_id, now_ms)
            if len(stale) < SCRIPT_LIMIT:
                return

    async def _sweep_uptime(self, now_ms: int) -> None:
        """Close the uptime windows of offline nodes as they end (engine.trust)."""
        while (
            await self.market.sweep_uptime(self.region, now_ms, limit=SCRIPT_LIMIT) == SCRIPT_LIMIT
        ):
            pass

    async def _take_offline(self, node_id: str, now_ms: int) -> None:
        try:
            contracts = await self.market.mark_offline(node_id, now_ms)
        except _GONE:
            return  # a heartbeat arrived meanwhile, or the node is gone
        self.asks.set_status(node_id, "offline")
        self.quotes.set_status(node_id, "offline")
        node = self.asks.node(node_id) or await self.market.get_node(node_id)
        for contract in contracts:
            if contract.status == "active":
                stop_ms = None
                if contract.delivered:
                    # a delivered lease was served until its node's last sign of life
                    last = node.last_heartbeat_ms if node is not None else 0
                    stop_ms = max(last, contract.ready_ms)
                await self._fail_over(contract, node, now_ms, stop_ms=stop_ms)

    async def _fail_over(
        self, contract: Contract, node: Node | None, now_ms: int, *, stop_ms: int | None = None
    ) -> None:
        """Move the contract to the best other node that can hold it, else fail it pro-rated
        (a delivered lease: to a node that delivers; billed up to `stop_ms`)."""
        if contract.lease_state == "closing":
            # the renter or the term had closed it already: settle it with what was metered
            with contextlib.suppress(*_GONE):
                await self.market.settle_lease(contract.contract_id, now_ms)
            return
        remaining_s = successor_duration_s(contract, now_ms, stop_ms)
        if remaining_s <= 0:
            # its whole term is served (the node died as it ended): that is a completion
            with contextlib.suppress(*_GONE):
                await self.market.settle(contract.contract_id, 0, now_ms)
            return
        cap = contract.max_price_pusd or contract.price_pusd
        req = MatchRequest(
            ram_gb=contract.ram_gb,
            vram_gb=contract.vram_gb,
            duration_s=remaining_s,
            max_price_pusd=cap,
            lat=node.lat if node is not None else None,
            lng=node.lng if node is not None else None,
            prefer_local=True,
            region=self.region,
            limit=FAILOVER_K,
        )
        for match in rank(self.asks, req, now_ms, FAILOVER_K + 1):
            if match.node_id == contract.node_id:
                continue
            if contract.delivered and not self._delivers(match.node_id):
                continue
            try:
                _old, new = await self.market.failover(
                    contract.contract_id, match.node_id, now_ms, stop_ms=stop_ms
                )
            except _LOST_RACE:
                continue
            except _GONE:
                return  # settled or moved meanwhile
            except MarketError as exc:
                log.warning(
                    "region %s: failover to %s refused: %s", self.region, match.node_id, exc
                )
                continue
            self.bids.debit(new.node_id, new.ram_gb, new.vram_gb)
            log.info(
                "region %s: contract %s failed over from %s to %s",
                self.region,
                contract.contract_id,
                contract.node_id,
                new.node_id,
            )
            return
        try:
            await self.market.fail_contract(contract.contract_id, now_ms, stop_ms=stop_ms)
            log.info(
                "region %s: contract %s failed (no alternative)", self.region, contract.contract_id
            )
        except _GONE:
            pass

    def _delivers(self, node_id: str) -> bool:
        node = self.asks.node(node_id)
        return node is not None and node.delivers

    # -- crossing: engine.book decides, this performs ------------------------------------

    async def _cross(self, now_ms: int) -> None:
        now = time.monotonic()
        crossing = self.bids.cross(now_ms, everything=now >= self._next_full_cross)
        if crossing.everything:
            self._next_full_cross = now + CROSS_TICK_S
        while not crossing.done:
            batch = crossing.next_batch(now_ms)
            if not self.lease.valid() or not self._running():
                return
            if batch:
                await self._execute(batch, now_ms)
                now_ms = self.clock()  # a long pass must not date contracts in the past
            elif not crossing.done:
                await asyncio.sleep(0)  # a long pass lets the other regions' loops run

    async def _execute(self, batch: list[Attempt], now_ms: int) -> None:
        """Send the batch's reserves in one pipelined round trip (`Market.reserve_many`, each
        still its own atomic script), then the fall-through of the bids that lost a race, one
        reserve at a time."""
        results = await self.market.reserve_many([_reserve_request(a) for a in batch], now_ms)
        gone: set[str] = set()
        for attempt, result in zip(batch, results, strict=True):
            if self._resolve(attempt, result) == "gone":
                gone.add(attempt.bid.bid_id)
        for bid_id in gone:
            await self._refresh_bid(bid_id)
        while self.lease.valid() and (next_try := self.bids.fall_through(now_ms)) is not None:
            bid, fill = next_try.bid, next_try.fill
            try:
                result = await self.market.reserve(
                    node_id=fill.node_id,
                    client_id=bid.client_id,
                    user_id=bid.user_id,
                    ram_gb=fill.ram_gb,
                    vram_gb=fill.vram_gb,
                    duration_s=bid.duration_s,
                    max_price_pusd=bid.max_price_pusd,
                    now_ms=now_ms,
                    bid_id=bid.bid_id,
                )
            except MarketError as exc:
                result = exc  # a refusal is an outcome, like reserve_many's
            if self._resolve(next_try, result) == "gone":
                await self._refresh_bid(bid.bid_id)

    def _resolve(self, attempt: Attempt, result: Contract | MarketError) -> Outcome:
        outcome = self.bids.resolve(attempt, result)
        if isinstance(result, Contract):
            self.fills += 1
            heapq.heappush(self._ends, (result.end_ms, result.contract_id))
        elif outcome == "refused":
            # e.g. a split piece planned as "the rest" after an earlier piece lost its race
            log.info(
                "region %s: reserve for bid %s refused: %s", self.region, attempt.bid.bid_id, result
            )
        return outcome

    async def _refresh_bid(self, bid_id: str) -> None:
        """Re-read a bid the script refused to fill (it may have been cancelled or expired, or
        our view of its fill state may be behind)."""
        self.bids.refresh(bid_id, await self.market.get_bid(bid_id))

    # -- quotes and summary -------------------------------------------------------------------

    async def _publish_state(self, now_ms: int) -> None:
        now = time.monotonic()
        if now - self._quote_at >= QUOTE_MIN_INTERVAL_S and (
            self._quote_dirty or now - self._quote_at >= QUOTE_REFRESH_S
        ):
            self._quote_at = now
            self._quote_dirty = False
            quote = self.quotes.quote(now_ms)
            last = self._last_quote
            if last is None or msgspec.structs.replace(last, ts_ms=quote.ts_ms) != quote:
                self._last_quote = quote
                self.publisher.publish(
                    [
                        (
                            self.keys.quotes_channel(self.region),
                            encode_message(f"quotes:{self.region}", quote),
                        )
                    ]
                )
        if now - self._summary_checked_at >= SUMMARY_MIN_INTERVAL_S:
            self._summary_checked_at = now
            summary = self.quotes.summary(now_ms)
            if summary != self._last_summary or now - self._summary_at >= SUMMARY_KEEPALIVE_S:
                self._summary_at = now
                self._last_summary = summary
                self.publisher.publish(
                    [(self.keys.market_channel, encode_message("market", summary))]
                )
