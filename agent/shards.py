"""The heartbeat shards: a few reconnecting WebSocket connections, each beating for its share of
a fleet, and the counters of what they did (`FleetStats`).

A connection owns a shard of nodes and a timing wheel of `interval / tick` slots, each node in one
slot by its phase, so each tick sends one batched `heartbeat` message per up-to-`batch` nodes.
Every node beats at most once per `min_gap_s` (the gateway's per-node limit) *as the gateway
measures it*: the gap is counted from the ack of the node's previous beat (the script that checked
the limit ran before the ack left), and a node whose beat is still unacknowledged sends no other,
so no delay between the simulator and Redis can squeeze two beats together; a `too_soon` answer
pushes the node back too. While a connection is down its nodes' beats are skipped (an HTTP
fallback for thousands of nodes would be a storm); it reconnects with jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.client import (
    AckHandler,
    ApiError,
    Backoff,
    EventHandler,
    GatewaySocket,
    GatewayUnavailable,
)
from agent.simulation import Fleet
from gateway.protocol import Beat, BeatResult, Ref

__all__ = ["FleetStats", "Link", "Shard"]

# One logger for the whole simulator, whichever of its modules speaks (as before the split).
log = logging.getLogger("mnemo.agent.fleet")


class FleetStats:
    """Counters of a running fleet (read by the CLI's progress line and the benchmark)."""

    def __init__(self) -> None:
        self.sent = 0
        """Beats sent."""
        self.outcomes: Counter[str] = Counter()
        """Acknowledged beats by outcome (ok, too_soon, not_found...)."""
        self.skipped_silent = 0
        """Beats not sent because the node was simulating an outage."""
        self.skipped_rate = 0
        """Beats held back to keep the node within its rate limit."""
        self.skipped_disconnected = 0
        self.notices: Counter[str] = Counter()
        self.reconnects = 0
        self.repriced = 0
        self.late_ticks = 0
        """Ticks that started more than one tick late (the process could not keep up)."""
        self._latencies: list[float] = []
        self._seen_acks = 0
        self._rng = random.Random(0)

    LATENCY_SAMPLES = 10_000

    def ack_latency(self, seconds: float) -> None:
        """Record one batch's send-to-ack time (a uniform reservoir of the last run)."""
        self._seen_acks += 1
        if len(self._latencies) < self.LATENCY_SAMPLES:
            self._latencies.append(seconds)
        else:
            k = self._rng.randrange(self._seen_acks)
            if k < self.LATENCY_SAMPLES:
                self._latencies[k] = seconds

    def ack_latency_ms(self) -> dict[str, float]:
        """p50/p90/p99/max of the batches' send-to-ack time, in ms."""
        if not self._latencies:
            return {}
        ordered = sorted(self._latencies)

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "outcomes": dict(self.outcomes),
            "skipped_silent": self.skipped_silent,
            "skipped_rate": self.skipped_rate,
            "skipped_disconnected": self.skipped_disconnected,
            "notices": dict(self.notices),
            "reconnects": self.reconnects,
            "repriced": self.repriced,
            "late_ticks": self.late_ticks,
            "ack_latency_ms": self.ack_latency_ms(),
        }


class Link:
    """One reconnecting `/ws` connection with its subscriptions (re-made on every reconnect)."""

    def __init__(
        self,
        name: str,
        *,
        api_url: str,
        api_key: str,
        channels: list[str],
        stats: FleetStats,
        on_event: EventHandler | None = None,
        on_ack: AckHandler | None = None,
        on_down: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.api_url = api_url
        self.api_key = api_key
        self.channels = channels
        self.stats = stats
        self.on_event = on_event
        self.on_ack = on_ack
        self.on_down = on_down
        self.socket: GatewaySocket | None = None
        self.up = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(0.5, 30.0)
        while not stop.is_set():
            socket: GatewaySocket | None = None
            try:
                socket = await GatewaySocket.open(
                    self.api_url, self.api_key, on_event=self.on_event, on_ack=self.on_ack
                )
                if self.channels:
                    await socket.subscribe(self.channels, timeout_s=30.0)
                self.socket = socket
                self.up.set()
                backoff.reset()
                await _wait_either(socket.closed, stop)
                if socket.closed.done() and not stop.is_set():
                    log.warning("%s: socket lost (%s)", self.name, socket.closed.result())
            except (GatewayUnavailable, ApiError) as exc:
                log.warning("%s: %s", self.name, exc)
            finally:
                self.up.clear()
                self.socket = None
                if self.on_down is not None:
                    self.on_down()
                if socket is not None:
                    await socket.close()
            if stop.is_set():
                return
            self.stats.reconnects += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff.next_delay())


class Shard:
    """One connection's share of the fleet: its nodes on a timing wheel, its socket, its acks."""

    def __init__(
        self,
        number: int,
        fleet: Fleet,
        members: list[int],
        *,
        api_url: str,
        api_key: str,
        interval_s: float,
        min_gap_s: float,
        tick_s: float,
        batch: int,
        stats: FleetStats,
        rng: random.Random,
        last_sent: list[float],
    ) -> None:
        self.number = number
        self.fleet = fleet
        self.members = members
        self.last_sent = last_sent
        """Monotonic time of each node's last beat (by fleet row, shared by all shards), moved to
        its ack's arrival when that comes (the rate-limit guard: see `_on_ack`)."""
        self.min_gap_s = min_gap_s
        self.in_flight_hold_s = max(30.0, 10 * interval_s)
        self.tick_s = tick_s
        self.batch = min(batch, GatewaySocket.MAX_BEATS_PER_MESSAGE)
        self.stats = stats
        slots = max(1, round(interval_s / tick_s))
        self.wheel: list[list[int]] = [[] for _ in range(slots)]
        for i in members:
            self.wheel[rng.randrange(slots)].append(i)
        self.next_ok: dict[int, float] = {}
        """Node -> monotonic time before which it must not beat (sparse: only nodes held back)."""
        self.pending: dict[int, list[int]] = {}
        self.sent_at: dict[int, float] = {}
        """ref -> the nodes of that batch, in order (the ack's results come in the same order)."""
        self._refs = 0
        self.link = Link(
            f"fleet shard {number}",
            api_url=api_url,
            api_key=api_key,
            channels=[],
            stats=stats,
            on_ack=self._on_ack,
            on_down=self._on_down,
        )

    def _on_ack(self, ref: Ref, results: list[BeatResult] | None) -> None:
        sent = self.pending.pop(ref, None) if isinstance(ref, int) else None
        outcomes = self.stats.outcomes
        now = time.monotonic()
        started = self.sent_at.pop(ref, None) if isinstance(ref, int) else None
        if started is not None:
            self.stats.ack_latency(now - started)
        if sent is not None:
            # The script that applied these beats ran before this ack arrived: measuring the
            # next beat's gap from here keeps every node within the limit as the gateway
            # measures it, whatever the delays in between.
            last_sent = self.last_sent
            for i in sent:
                last_sent[i] = now
        if results is None:  # the whole batch was refused (the gateway could not apply it)
            outcomes["batch_refused"] += len(sent or ())
            return
        for k, result in enumerate(results):
            outcomes[result.outcome] += 1
            if result.outcome == "ok":
                continue
            if sent is not None and k < len(sent) and self.fleet.ids[sent[k]] == result.node_id:
                i = sent[k]
            else:
                i = self.fleet.index.get(result.node_id, -1)
            if i < 0:
                continue
            if result.outcome == "too_soon":
                self.next_ok[i] = now + max(result.retry_after_ms / 1000, self.tick_s)
            elif result.outcome in ("not_found", "forbidden", "deactivated"):
                self.next_ok[i] = math.inf  # this node is gone; stop beating for it
                log.warning(
                    "virtual node %s: %s; no longer simulated", result.node_id, result.outcome
                )

    def _on_down(self) -> None:
        # Beats in flight when the socket went down may or may not have been applied: count
        # their gap from now.
        now = time.monotonic()
        last_sent = self.last_sent
        for sent in self.pending.values():
            for i in sent:
                last_sent[i] = now
        self.pending.clear()
        self.sent_at.clear()

    async def beat_loop(
        self, stop: asyncio.Event, idle_of: Callable[[], list[bool]], phase: float = 0.0
    ) -> None:
        """Send this shard's due beats every tick; `phase` (0..1) offsets its ticks so that
        shards do not all send at the same instant."""
        fleet, stats, wheel = self.fleet, self.stats, self.wheel
        slots = len(wheel)
        start = time.monotonic() + phase * self.tick_s
        tick = 0
        while not stop.is_set():
            target = start + tick * self.tick_s
            now = time.monotonic()
            if target > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), target - now)
                if stop.is_set():
                    return
                now = time.monotonic()
            elif now - target > self.tick_s:
                stats.late_ticks += 1
            members = wheel[tick % slots]
            tick += 1
            socket = self.link.socket
            if socket is None or not socket.is_open:
                stats.skipped_disconnected += len(members)
                continue
            idle = idle_of()
            group = fleet.group
            next_ok, last_sent = self.next_ok, self.last_sent
            min_gap = self.min_gap_s
            in_flight_hold = self.in_flight_hold_s
            beats: list[Beat] = []
            sent: list[int] = []
            for i in members:
                if next_ok and i in next_ok:
                    if now < next_ok[i]:
                        stats.skipped_rate += 1
                        continue
                    del next_ok[i]
                if now - last_sent[i] < min_gap:
                    # Too recent: its last beat's ack came late, or the loop ran late.
                    stats.skipped_rate += 1
                    continue
                beat = fleet.beat(i, idle[group[i]])
                if beat is None:
                    stats.skipped_silent += 1
                    continue
                beats.append(beat)
                sent.append(i)
                # In flight: no next beat until its ack comes (which resets this), or, should
                # an ack never come, until well past any sane delay.
                last_sent[i] = now + in_flight_hold
            for lo in range(0, len(beats), self.batch):
                self._refs += 1
                ref = self._refs
                chunk = beats[lo : lo + self.batch]
                self.pending[ref] = sent[lo : lo + self.batch]
                self.sent_at[ref] = time.monotonic()
                try:
                    await socket.send_heartbeats(chunk, ref)
                except GatewayUnavailable:
                    self.pending.pop(ref, None)
                    self.sent_at.pop(ref, None)
                    stats.skipped_disconnected += len(beats) - lo
                    break
                stats.sent += len(chunk)


async def _wait_either(closed: asyncio.Future[str], stop: asyncio.Event) -> None:
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    waiting: set[asyncio.Future[Any]] = {closed, stopper}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
