"""The simulation model of a fleet: what each virtual node reports, interval by interval.

Over time each node's free memory follows a mean-reverting random walk, schedules open and close,
unreliable nodes fall silent for a few intervals (long enough for the engine to mark them offline
and fail their contracts over) and come back, and now and then a node reprices its ask (the node
is queued in `repricing` for `agent.repricer` to PUT).

Capacity reported follows the agent's accounting (`agent.leases.available_gb`): with notices on,
the fleet keeps each node's lease totals from its `node:<id>` channel (`apply_notice`).

The model is pure: no I/O, no clock, no global random state. Time comes in as arguments (the
wall-clock instant for the schedules, one call of `beat` per interval passed), randomness from the
model's own generator seeded by the caller, so the same seed and the same calls give the same
beats. What it wants done outside (PUT a new ask) it leaves in `repricing`; the heartbeat shards
(`agent.shards`) keep their own clock readings. The I/O shell is `agent.fleet.drive_fleet`.

Scale: a node is a row in parallel lists (no object per node).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from agent.leases import LeaseBook, available_gb
from agent.population import VirtualNode
from agent.schedule import IdleSchedule
from gateway.protocol import Beat, ContractNoticeKind, ContractOut, LeaseMeter

__all__ = ["Fleet"]


class Fleet:
    """The simulation state of N registered virtual nodes (parallel lists, one row a node)."""

    def __init__(
        self,
        nodes: Sequence[VirtualNode],
        node_ids: Sequence[str],
        *,
        seed: int = 0,
        churn: bool = True,
        reprice_per_beat: float = 0.0,
    ) -> None:
        if len(nodes) != len(node_ids):
            raise ValueError("one id per node")
        self.nodes = list(nodes)
        self.ids = list(node_ids)
        self._index: dict[str, int] | None = None
        self.churn = churn
        self.reprice_per_beat = reprice_per_beat
        self.rng = random.Random(seed ^ 0x5EED)
        rng = self.rng
        self.total_ram = [v.total_ram_gb for v in nodes]
        self.total_vram = [v.total_vram_gb for v in nodes]
        self.free = [min(1.0, max(0.0, rng.gauss(v.mean_free, 0.1))) for v in nodes]
        self.mean_free = [v.mean_free for v in nodes]
        # An outage starts with probability p per beat and lasts OUTAGE_BEATS beats, so the
        # long-run fraction up matches `reliability`.
        self.p_outage = [(1.0 - v.reliability) / self.OUTAGE_BEATS for v in nodes]
        self.silent_left = [0] * len(nodes)
        self.leased_ram = [0] * len(nodes)
        self.leased_vram = [0] * len(nodes)
        self.books: dict[int, LeaseBook] = {}
        self.price = [v.price_per_gb_sec for v in nodes]
        groups: dict[tuple[str, str], int] = {}
        self.group = [groups.setdefault((v.idle_schedule, v.timezone), len(groups)) for v in nodes]
        # Keys are in insertion order, which is their index order.
        self.schedules = [(IdleSchedule.parse(text), ZoneInfo(tz)) for (text, tz) in groups]
        self.repricing: list[int] = []
        """Nodes whose price changed and awaits a PUT (drained by the fleet's repricer)."""
        self.lease_meters: dict[int, list[LeaseMeter]] = {}
        """Row -> the meters of the node's lease servers, set by the fleet's delivery (each
        beat of the node carries them)."""

    @property
    def index(self) -> dict[str, int]:
        """node id -> row (built on first use: a million-entry dict is not free)."""
        if self._index is None:
            self._index = {node_id: i for i, node_id in enumerate(self.ids)}
        return self._index

    OUTAGE_BEATS = 4
    """An outage lasts this many intervals (> the engine's 3 missed heartbeats: it goes offline)."""

    def idle_now(self, now: datetime) -> list[bool]:
        """Whether each schedule group lends capacity at `now` (an aware datetime), read in the
        group's time zone."""
        out = []
        for schedule, zone in self.schedules:
            local = now.astimezone(zone)
            out.append(schedule.is_idle(local.hour * 60 + local.minute))
        return out

    def beat(self, i: int, idle: bool) -> Beat | None:
        """Advance node i by one interval; its beat, or None while it simulates an outage."""
        rng = self.rng
        if self.churn:
            if self.silent_left[i] > 0:
                self.silent_left[i] -= 1
                return None
            if rng.random() < self.p_outage[i]:
                self.silent_left[i] = self.OUTAGE_BEATS - 1
                return None
        f = self.free[i]
        # Mean-reverting walk; the noise is a cheap triangular variate (sd ~0.05), not gauss().
        f += 0.15 * (self.mean_free[i] - f) + (rng.random() + rng.random() - 1.0) * 0.12
        f = 0.0 if f < 0.0 else 1.0 if f > 1.0 else f
        self.free[i] = f
        if self.reprice_per_beat and rng.random() < self.reprice_per_beat:
            self.price[i] = round(self.price[i] * rng.uniform(0.9, 1.1), 12)
            self.repricing.append(i)
        return Beat(
            node_id=self.ids[i],
            available_ram_gb=available_gb(
                int(self.total_ram[i] * f), None, self.leased_ram[i], idle=idle
            ),
            available_vram_gb=available_gb(
                int(self.total_vram[i] * f), None, self.leased_vram[i], idle=idle
            ),
            cpu_usage_pct=round((1.0 - f) * 80.0 + rng.random() * 10.0, 1),
            leases=self.lease_meters.get(i) or None,
        )

    def apply_notice(self, node_id: str, notice: ContractNoticeKind, contract: ContractOut) -> None:
        """Keep node `node_id`'s lease totals from a `node:<id>` notice."""
        i = self.index.get(node_id)
        if i is None:
            return
        book = self.books.get(i)
        if book is None:
            book = self.books[i] = LeaseBook()
        book.apply(notice, contract)
        self.leased_ram[i] = book.leased_ram_gb
        self.leased_vram[i] = book.leased_vram_gb
        if not len(book):
            del self.books[i]
