"""The high-rate heartbeat path: heartbeats from many sockets coalesced into batched market calls.

An agent with many nodes (a datacenter, a simulated fleet) sends its heartbeats over its WebSocket
in batches. `HeartbeatBatcher.submit()` queues a socket's batch and returns a future; within a
short window (`window_ms`, or sooner when `max_batch` beats are waiting) everything queued is
grouped by owner and sent as one `Market.heartbeat(owner_id, beats, now_ms, min_interval_ms)` call
per owner (the market runs one script per region; an owner's group is cut into calls of about
`max_call_beats` at submission boundaries), and each future gets the outcomes of its own entries,
in its order.

Rules:
- The owner of a batch is the authenticated principal; ownership of each node is checked inside the
  market script (`forbidden` outcomes), never trusted from the client.
- Rate limit: `min_interval_ms` per node is the same rule as the REST route (the script answers
  `too_soon` with `retry_after_ms`).
- Backpressure: at most `max_concurrency` market calls run at once; while they run, new heartbeats
  keep coalescing into the next window, so batches grow under load instead of queues of calls.
  Callers bound how many batches each socket may have in flight.
- A failed call (Redis down) fails the futures of that owner's group only, with the exception,
  logged once per call. A market refusal of the whole call (one malformed beat) is retried one
  submission at a time, so only the submission that carried the bad beat fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from engine.errors import MarketError
from engine.market import HeartbeatOutcome as Outcome
from engine.types import Heartbeat, LeaseMeter
from gateway import protocol

__all__ = ["HeartbeatBatcher", "HeartbeatSink", "Outcome", "market_heartbeat"]

log = logging.getLogger("mnemo.gateway.heartbeats")


def market_heartbeat(node_id: str, body: protocol.Heartbeat) -> Heartbeat:
    """The market's heartbeat of node `node_id` from the wire's body (REST's, or a `Beat` of a
    WebSocket batch): the one place that maps the wire's fields to the engine's."""
    return Heartbeat(
        node_id=node_id,
        available_ram_gb=body.available_ram_gb,
        available_vram_gb=body.available_vram_gb,
        cpu_usage_pct=body.cpu_usage_pct,
        gpu_usage_pct=body.gpu_usage_pct,
        temperature_c=body.temperature_c,
        bandwidth_mbps=body.bandwidth_mbps,
        lat=body.latitude,
        lng=body.longitude,
        leases=None
        if body.leases is None
        else [
            LeaseMeter(
                contract_id=m.contract_id,
                egress_bytes=m.egress_bytes,
                peak_memory_bytes=m.peak_memory_bytes,
            )
            for m in body.leases
        ],
    )


class HeartbeatSink(Protocol):
    """What the batcher needs of `engine.market.Market`."""

    async def heartbeat(
        self, owner_id: str, beats: Sequence[Heartbeat], now_ms: int, min_interval_ms: int
    ) -> list[Outcome]: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_Item = tuple[list[Heartbeat], "asyncio.Future[list[Outcome]]"]


class HeartbeatBatcher:
    """Coalesces submitted heartbeats per owner into batched market calls (see the module doc)."""

    def __init__(
        self,
        market: HeartbeatSink,
        *,
        min_interval_ms: int,
        window_ms: float = 5.0,
        max_batch: int = 5000,
        max_call_beats: int = 1000,
        max_concurrency: int = 8,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self._market = market
        self.min_interval_ms = min_interval_ms
        self.window_s = window_ms / 1000
        self.max_batch = max_batch
        self.max_call_beats = max_call_beats
        self._calls = asyncio.Semaphore(max_concurrency)
        self._clock = clock
        self._pending: dict[str, list[_Item]] = {}
        self._pending_beats = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.beats = 0
        """Heartbeats handed to the market."""
        self.calls = 0
        """Market calls made."""

    def submit(self, owner_id: str, beats: list[Heartbeat]) -> asyncio.Future[list[Outcome]]:
        """Queue `beats` of `owner_id`; the future gets one outcome per beat, in order."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Outcome]] = loop.create_future()
        if self._closed:
            fut.set_exception(RuntimeError("heartbeat batcher is closed"))
            return fut
        if not beats:
            fut.set_result([])
            return fut
        self._pending.setdefault(owner_id, []).append((beats, fut))
        self._pending_beats += len(beats)
        if self._pending_beats >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return fut

    async def aclose(self) -> None:
        """Send what is queued, wait for every call in flight; later submits fail."""
        self._closed = True
        self._flush()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._pending_beats = 0
        for owner_id, items in pending.items():
            # Chunk at submission boundaries so no single script call holds Redis for long.
            chunk: list[_Item] = []
            size = 0
            for item in items:
                chunk.append(item)
                size += len(item[0])
                if size >= self.max_call_beats:
                    self._spawn(owner_id, chunk)
                    chunk, size = [], 0
            if chunk:
                self._spawn(owner_id, chunk)

    def _spawn(self, owner_id: str, items: list[_Item]) -> None:
        task = asyncio.create_task(self._call(owner_id, items))
        self._tasks.add(task)
        task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("heartbeat call task failed", exc_info=exc)

    async def _call(self, owner_id: str, items: list[_Item]) -> None:
        beats = [b for item_beats, _ in items for b in item_beats]
        try:
            async with self._calls:
                outcomes = await self._market.heartbeat(
                    owner_id, beats, self._clock(), self.min_interval_ms
                )
            if len(outcomes) != len(beats):
                raise RuntimeError(
                    f"market answered {len(outcomes)} outcomes for {len(beats)} beats"
                )
        except asyncio.CancelledError:
            for _, fut in items:
                fut.cancel()
            raise
        except MarketError as exc:
            if len(items) > 1:
                # The market refuses a whole call for one malformed beat: retry each
                # submission alone so only the one that carried it fails.
                for item in items:
                    await self._call(owner_id, [item])
                return
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
            return
        except Exception as exc:
            log.warning("heartbeat batch of %d for owner %s failed: %r", len(beats), owner_id, exc)
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.calls += 1
        self.beats += len(beats)
        start = 0
        for item_beats, fut in items:
            end = start + len(item_beats)
            if not fut.done():
                fut.set_result(outcomes[start:end])
            start = end
