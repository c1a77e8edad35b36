"""A simulated fleet: N virtual nodes driven over a few WebSocket connections by one process.

For demos (a newcomer sees a live market) and load (the gateway benchmark's traffic source).

Geography: nodes cluster around metros of each region, weighted by how much supply a region
has (Long Island/NYC for us-east-2, the SF Bay for us-west-1, London/Dublin, Frankfurt/Munich,
Tokyo, Singapore, ...). Mist nodes scatter over a metro (tens of km), edge clusters less,
datacenters sit on a few campus sites. Types, sizes, prices and reliability follow the node type;
mist nodes mostly lend on idle schedules read in their metro's time zone.

Over time each node's free memory follows a mean-reverting random walk, schedules open and close,
unreliable nodes fall silent for a few intervals (long enough for the engine to mark them offline
and fail their contracts over) and come back, and now and then a node reprices its ask.

Capacity reported follows the agent's accounting (`agent.leases.available_gb`): with notices on,
each connection subscribes to its nodes' `node:<id>` channels and keeps their lease totals.

Scale: a node is a row in parallel lists (no object per node); a connection owns a shard of
nodes and a timing wheel of `interval / tick` slots, each node in one slot by its phase, so each
tick sends one batched `heartbeat` message per up-to-`batch` nodes. Every node beats at most once
per `min_gap_s` (the gateway's per-node limit) *as the gateway measures it*: the gap is counted
from the ack of the node's previous beat (the script that checked the limit ran before the ack
left), and a node whose beat is still unacknowledged sends no other, so no delay between the
simulator and Redis can squeeze two beats together; a `too_soon` answer pushes the node back too. While a connection is down its nodes' beats are skipped (an
HTTP fallback for thousands of nodes would be a storm); it reconnects with jittered backoff.

Registration: `POST /api/nodes/register/batch` with 1,000 nodes a request, a few requests in
flight, an `Idempotency-Key` per batch (a retry after a lost reply registers nothing twice); one
`POST /api/nodes/register` per node (`concurrency` in flight) against a gateway without the batch
route. Only transient failures are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from agent.client import (
    ApiError,
    Backoff,
    Beat,
    BeatOutcome,
    Gateway,
    GatewaySocket,
    GatewayUnavailable,
    retrying,
)
from agent.leases import LeaseBook, available_gb
from agent.schedule import IdleSchedule

__all__ = [
    "METROS",
    "REGISTER_BATCH",
    "Fleet",
    "FleetStats",
    "Metro",
    "VirtualNode",
    "make_fleet",
    "register_fleet",
    "run_fleet",
]

log = logging.getLogger("mnemo.agent.fleet")


class Metro(msgspec.Struct, frozen=True):
    """A cluster of supply: a region, a centre, a spread, a time zone and a share of nodes."""

    region: str
    name: str
    lat: float
    lng: float
    tz: str
    weight: float
    spread_km: float = 25.0


METROS: tuple[Metro, ...] = (
    # us-east-2: the spec's home, a dense Long Island / NYC mesh of consumer GPUs.
    Metro("us-east-2", "Queens", 40.7282, -73.7949, "America/New_York", 7, 8),
    Metro("us-east-2", "Manhattan", 40.7831, -73.9712, "America/New_York", 6, 5),
    Metro("us-east-2", "Brooklyn", 40.6782, -73.9442, "America/New_York", 5, 6),
    Metro("us-east-2", "Long Island", 40.7891, -73.1350, "America/New_York", 5, 30),
    Metro("us-east-2", "Jersey City", 40.7178, -74.0431, "America/New_York", 2, 10),
    Metro("us-east-1", "Ashburn", 39.0438, -77.4874, "America/New_York", 5, 15),
    Metro("us-east-1", "Washington", 38.9072, -77.0369, "America/New_York", 3, 20),
    Metro("us-central-1", "Chicago", 41.8781, -87.6298, "America/Chicago", 5, 30),
    Metro("us-central-1", "Dallas", 32.7767, -96.7970, "America/Chicago", 3, 35),
    Metro("us-west-1", "San Francisco", 37.7749, -122.4194, "America/Los_Angeles", 5, 10),
    Metro("us-west-1", "San Jose", 37.3382, -121.8863, "America/Los_Angeles", 4, 15),
    Metro("us-west-1", "Oakland", 37.8044, -122.2712, "America/Los_Angeles", 2, 10),
    Metro("us-west-2", "Seattle", 47.6062, -122.3321, "America/Los_Angeles", 3, 20),
    Metro("us-west-2", "Hillsboro", 45.5229, -122.9898, "America/Los_Angeles", 2, 15),
    Metro("eu-west-1", "London", 51.5074, -0.1278, "Europe/London", 7, 25),
    Metro("eu-west-1", "Dublin", 53.3498, -6.2603, "Europe/Dublin", 4, 15),
    Metro("eu-central-1", "Frankfurt", 50.1109, 8.6821, "Europe/Berlin", 6, 20),
    Metro("eu-central-1", "Munich", 48.1351, 11.5820, "Europe/Berlin", 3, 20),
    Metro("eu-central-1", "Amsterdam", 52.3676, 4.9041, "Europe/Amsterdam", 3, 15),
    Metro("ap-northeast-1", "Tokyo", 35.6762, 139.6503, "Asia/Tokyo", 7, 25),
    Metro("ap-northeast-1", "Yokohama", 35.4437, 139.6380, "Asia/Tokyo", 2, 10),
    Metro("ap-southeast-1", "Singapore", 1.3521, 103.8198, "Asia/Singapore", 4, 12),
    Metro("ap-south-1", "Mumbai", 19.0760, 72.8777, "Asia/Kolkata", 3, 25),
    Metro("ap-south-1", "Bengaluru", 12.9716, 77.5946, "Asia/Kolkata", 3, 20),
    Metro("sa-east-1", "Sao Paulo", -23.5505, -46.6333, "America/Sao_Paulo", 3, 30),
)

_FIRST_NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
    "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Uma", "Victor", "Wendy", "Xena",
    "Yuki", "Zoe", "Kenji", "Priya", "Lars", "Ines", "Mateo", "Aoife", "Hana",
)  # fmt: skip

# (gpu model, VRAM GB per card) for consumer and pro cards.
_CONSUMER_GPUS = (("RTX 4090", 24), ("RTX 4080", 16), ("RTX 3090", 24), ("RTX 3080", 10),
                  ("RTX 4070 Ti", 12), ("RTX 3060", 12), ("RX 7900 XTX", 24))  # fmt: skip
_PRO_GPUS = (("A100-80GB", 80), ("H100-80GB", 80), ("L40S", 48), ("A10", 24), ("L4", 24))
_SCHEDULES = ("9am-5pm, 11pm-7am", "11pm-7am", "always", "9am-5pm", "10pm-8am", "always",
              "8am-6pm", "always")  # fmt: skip


class VirtualNode(msgspec.Struct, kw_only=True):
    """What a virtual node registers as, plus the simulation's knobs for it."""

    node_type: str
    name: str
    region: str
    latitude: float
    longitude: float
    total_ram_gb: int
    total_vram_gb: int
    bandwidth_mbps: int
    base_latency_ms: float
    price_per_gb_sec: float
    idle_schedule: str
    timezone: str
    gpu_model: str | None
    reliability: float
    """Long-run fraction of time the node is up (it falls silent the rest)."""
    mean_free: float
    """The free fraction of memory its random walk reverts to."""

    def registration_body(self) -> dict[str, Any]:
        metadata: dict[str, str] = {
            "idle_schedule": self.idle_schedule,
            "timezone": self.timezone,
            "simulated": "true",
        }
        if self.gpu_model:
            metadata["gpu_model"] = self.gpu_model
        return {
            "node_type": self.node_type,
            "name": self.name,
            "region": self.region,
            "latitude": self.latitude,
            "longitude": self.longitude,
            "total_ram_gb": self.total_ram_gb,
            "total_vram_gb": self.total_vram_gb,
            "bandwidth_mbps": self.bandwidth_mbps,
            "base_latency_ms": self.base_latency_ms,
            "price_per_gb_sec": self.price_per_gb_sec,
            "metadata": metadata,
        }


def _scatter(rng: random.Random, metro: Metro, spread_km: float) -> tuple[float, float]:
    # Gaussian scatter in km around the centre, converted to degrees at that latitude.
    north = rng.gauss(0.0, spread_km)
    east = rng.gauss(0.0, spread_km)
    lat = metro.lat + north / 111.0
    lng = metro.lng + east / (111.0 * max(0.2, math.cos(math.radians(metro.lat))))
    return round(max(-90.0, min(90.0, lat)), 6), round((lng + 180.0) % 360.0 - 180.0, 6)


def _price(rng: random.Random, low: float, high: float) -> float:
    # Prices cluster (log-uniform) and are quoted to a pico-dollar.
    return round(math.exp(rng.uniform(math.log(low), math.log(high))), 12)


def _make_node(rng: random.Random, metro: Metro, serial: int) -> VirtualNode:
    roll = rng.random()
    if roll < 0.62:
        gpu = rng.choice(_CONSUMER_GPUS) if rng.random() < 0.7 else None
        lat, lng = _scatter(rng, metro, metro.spread_km)
        return VirtualNode(
            node_type="mist_node",
            name=f"{rng.choice(_FIRST_NAMES)}_{gpu[0].replace(' ', '') if gpu else 'CPU'}_{serial}",
            region=metro.region,
            latitude=lat,
            longitude=lng,
            total_ram_gb=rng.choice((16, 32, 32, 64, 64, 128)),
            total_vram_gb=gpu[1] if gpu else 0,
            bandwidth_mbps=rng.choice((300, 500, 940, 980, 1000, 2000)),
            base_latency_ms=round(rng.uniform(0.4, 3.0), 2),
            price_per_gb_sec=_price(rng, 3e-7, 1.2e-6),
            idle_schedule=rng.choice(_SCHEDULES),
            timezone=metro.tz,
            gpu_model=gpu[0] if gpu else None,
            reliability=rng.uniform(0.93, 0.995),
            mean_free=rng.uniform(0.45, 0.8),
        )
    if roll < 0.9:
        cards = rng.choice((0, 1, 2, 4))
        gpu = rng.choice(_PRO_GPUS)
        lat, lng = _scatter(rng, metro, metro.spread_km / 3)
        return VirtualNode(
            node_type="edge_cluster",
            name=f"edge-{metro.name.lower().replace(' ', '-')}-{serial}",
            region=metro.region,
            latitude=lat,
            longitude=lng,
            total_ram_gb=rng.choice((256, 384, 512, 768, 1024)),
            total_vram_gb=cards * gpu[1],
            bandwidth_mbps=rng.choice((10_000, 25_000, 40_000)),
            base_latency_ms=round(rng.uniform(1.0, 5.0), 2),
            price_per_gb_sec=_price(rng, 5e-7, 1.5e-6),
            idle_schedule="always",
            timezone=metro.tz,
            gpu_model=f"{cards}x {gpu[0]}" if cards else None,
            reliability=rng.uniform(0.98, 0.999),
            mean_free=rng.uniform(0.35, 0.7),
        )
    cards = rng.choice((4, 8, 8, 16))
    gpu = rng.choice(_PRO_GPUS[:3])
    lat, lng = _scatter(rng, metro, 2.0)
    return VirtualNode(
        node_type="datacenter",
        name=f"dc-{metro.name.lower().replace(' ', '-')}-{serial}",
        region=metro.region,
        latitude=lat,
        longitude=lng,
        total_ram_gb=rng.choice((1024, 2048, 4096)),
        total_vram_gb=cards * gpu[1],
        bandwidth_mbps=rng.choice((40_000, 100_000)),
        base_latency_ms=round(rng.uniform(4.0, 20.0), 2),
        price_per_gb_sec=_price(rng, 9e-7, 2.5e-6),
        idle_schedule="always",
        timezone=metro.tz,
        gpu_model=f"{cards}x {gpu[0]}",
        reliability=rng.uniform(0.995, 0.9999),
        mean_free=rng.uniform(0.5, 0.85),
    )


def make_fleet(n: int, *, seed: int = 0, regions: Sequence[str] | None = None) -> list[VirtualNode]:
    """N virtual nodes, deterministic for a seed; `regions` restricts the metros used."""
    metros = [m for m in METROS if regions is None or m.region in regions]
    if not metros:
        raise ValueError(f"no metros in regions {list(regions or [])}")
    rng = random.Random(seed)
    weights = [m.weight for m in metros]
    picks = rng.choices(metros, weights=weights, k=n)
    return [_make_node(rng, metro, i) for i, metro in enumerate(picks)]


# ---------------------------------------------------------------------------------------------
# Registration


REGISTER_BATCH = 1000
"""Nodes per batch registration (the gateway's maximum)."""
BATCHES_IN_FLIGHT = 4
"""Batch registrations in flight: enough to keep the gateway's workers and Redis busy."""
_REGISTER = "/api/nodes/register"
_REGISTER_BATCH = "/api/nodes/register/batch"

Post = Callable[[str, Any, str | None], Awaitable[Any]]
"""POSTs a JSON body to an API path (with an optional idempotency key); the decoded answer."""


def _httpx_post(gateway: Gateway) -> Post:
    async def post(path: str, body: Any, key: str | None) -> Any:
        return await gateway.request("POST", path, body=body, idempotency_key=key)

    return post


@contextlib.asynccontextmanager
async def _aiohttp_post(gateway: Gateway, concurrency: int) -> AsyncIterator[Post | None]:
    """A bulk poster on aiohttp when it is installed (None otherwise).

    httpx costs about 1-2 ms of client CPU per request here (its pool polls every idle
    connection per request), aiohttp about 0.1 ms: for a fleet of 100k nodes that is the
    difference between minutes and seconds of the simulator's own time. The single-node agent
    sends a request a minute and keeps httpx.
    """
    try:
        import aiohttp
    except ImportError:
        yield None
        return
    headers = {"Content-Type": "application/json", "User-Agent": "mnemo-agent-fleet/0.1"}
    if gateway.api_key:
        headers["X-API-Key"] = gateway.api_key
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=60)
    encode = msgspec.json.encode
    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout
    ) as session:

        async def post(path: str, body: Any, key: str | None) -> Any:
            extra = {"Idempotency-Key": key} if key else None
            url = f"{gateway.api_url}{path}"
            try:
                async with session.post(url, data=encode(body), headers=extra) as response:
                    raw = await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise GatewayUnavailable(f"POST {path}: {type(exc).__name__}: {exc}") from exc
            if status in (502, 503, 504):
                raise GatewayUnavailable(f"POST {path}: HTTP {status}")
            if status >= 400:
                try:
                    error = msgspec.json.decode(raw).get("error", {})
                except (msgspec.DecodeError, AttributeError):
                    error = {}
                raise ApiError(
                    status,
                    str(error.get("code", "http_error")),
                    str(error.get("message", raw[:200])),
                    error.get("field"),
                    float(retry_after) if retry_after and retry_after.isdigit() else None,
                )
            return msgspec.json.decode(raw)

        yield post


async def register_fleet(
    gateway: Gateway,
    nodes: Sequence[VirtualNode],
    *,
    concurrency: int = 32,
    batch: int = REGISTER_BATCH,
    batches_in_flight: int = BATCHES_IN_FLIGHT,
    stop: asyncio.Event | None = None,
    progress: Callable[[int, float], None] | None = None,
    idempotent: bool = True,
) -> list[str]:
    """Register every node; their ids, in order.

    By batches (`POST /api/nodes/register/batch`, `batch` nodes each, `batches_in_flight` at a
    time); a gateway without that route (404 on the first batch: an older gateway) gets one
    request per node instead, `concurrency` in flight, as does `batch=1`. Uses aiohttp when
    installed (much cheaper per request), else the gateway's httpx client. Transient failures
    (connection lost, 502/503/504, 429) are retried with backoff; any other refusal raises
    `ApiError`. `idempotent` sends an `Idempotency-Key` per request (per batch, or per node) so
    that a retry after a lost reply cannot register anything twice (the gateway keeps the keys
    in Postgres: one row per request, which costs single registrations much throughput).
    """
    ids: list[str | None] = [None] * len(nodes)
    key_prefix = f"fleet-{uuid.uuid4().hex}" if idempotent else None
    registered = 0
    started = time.perf_counter()

    def done(count: int) -> None:
        nonlocal registered
        before, registered = registered, registered + count
        if progress is not None and registered // 10_000 > before // 10_000:
            progress(registered, time.perf_counter() - started)

    async def in_parallel(workers: int, work: Callable[[int], Awaitable[None]], items: int) -> None:
        cursor = iter(range(items))

        async def worker() -> None:
            for item in cursor:
                if stop is not None and stop.is_set():
                    return
                await work(item)

        tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(workers, items)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async with _aiohttp_post(gateway, max(concurrency, batches_in_flight)) as fast:
        post = fast or _httpx_post(gateway)

        async def one(i: int) -> None:
            key = f"{key_prefix}-{i}" if key_prefix else None
            body = nodes[i].registration_body()
            answer = await retrying(
                "registering a virtual node",
                lambda: post(_REGISTER, body, key),
                backoff=Backoff(0.2, 10.0),
                stop=stop,
            )
            ids[i] = str(answer["node_id"])
            done(1)

        async def many(k: int) -> None:
            span = range(k * batch, min(len(nodes), (k + 1) * batch))
            key = f"{key_prefix}-b{k}" if key_prefix else None
            body = {"nodes": [nodes[i].registration_body() for i in span]}
            answer = await retrying(
                "registering a batch of virtual nodes",
                lambda: post(_REGISTER_BATCH, body, key),
                backoff=Backoff(0.2, 10.0),
                stop=stop,
            )
            got = answer["node_ids"]
            if len(got) != len(span):
                raise ValueError(f"the gateway answered {len(got)} ids for {len(span)} nodes")
            for i, node_id in zip(span, got, strict=True):
                ids[i] = str(node_id)
            done(len(span))

        batches = -(-len(nodes) // batch) if batch > 1 else 0
        if batches:
            try:
                # The first batch alone: it tells whether the gateway has batch registration.
                await many(0)
            except ApiError as exc:
                if exc.status not in (404, 405):
                    raise
                log.info("the gateway has no batch registration; registering node by node")
                batches = 0
            else:
                await in_parallel(batches_in_flight, lambda k: many(k + 1), batches - 1)
        if not batches:
            todo = [i for i, node_id in enumerate(ids) if node_id is None]
            await in_parallel(concurrency, lambda j: one(todo[j]), len(todo))
    if any(i is None for i in ids):
        raise asyncio.CancelledError("registration stopped")
    return [i for i in ids if i is not None]


# ---------------------------------------------------------------------------------------------
# Heartbeats


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
        self.last_sent = [-math.inf] * len(nodes)
        """Monotonic time of each node's last beat, moved to its ack's arrival when that comes
        (the rate-limit guard: see `_Shard._on_ack`)."""
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

    @property
    def index(self) -> dict[str, int]:
        """node id -> row (built on first use: a million-entry dict is not free)."""
        if self._index is None:
            self._index = {node_id: i for i, node_id in enumerate(self.ids)}
        return self._index

    OUTAGE_BEATS = 4
    """An outage lasts this many intervals (> the engine's 3 missed heartbeats: it goes offline)."""

    def idle_now(self, now: datetime | None = None) -> list[bool]:
        """Whether each schedule group lends capacity now."""
        out = []
        for schedule, zone in self.schedules:
            local = (now or datetime.now(zone)).astimezone(zone)
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
        )

    def apply_notice(self, node_id: str, notice: str, contract: dict[str, Any]) -> None:
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


class _Link:
    """One reconnecting `/ws` connection with its subscriptions (re-made on every reconnect)."""

    def __init__(
        self,
        name: str,
        *,
        api_url: str,
        api_key: str,
        channels: list[str],
        stats: FleetStats,
        on_event: Callable[[str, Any], None] | None = None,
        on_ack: Callable[[Any, list[BeatOutcome] | None], None] | None = None,
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


class _Shard:
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
    ) -> None:
        self.number = number
        self.fleet = fleet
        self.members = members
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
        self.link = _Link(
            f"fleet shard {number}",
            api_url=api_url,
            api_key=api_key,
            channels=[],
            stats=stats,
            on_ack=self._on_ack,
            on_down=self._on_down,
        )

    def _on_ack(self, ref: Any, results: list[BeatOutcome] | None) -> None:
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
            last_sent = self.fleet.last_sent
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
        last_sent = self.fleet.last_sent
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
            next_ok, last_sent = self.next_ok, fleet.last_sent
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


async def _repricer(gateway: Gateway, fleet: Fleet, stats: FleetStats, stop: asyncio.Event) -> None:
    """PUT the new ask of nodes that repriced (a trickle: one request at a time)."""
    while not stop.is_set():
        while fleet.repricing and not stop.is_set():
            i = fleet.repricing.pop()
            try:
                await gateway.update_node(fleet.ids[i], {"price_per_gb_sec": fleet.price[i]})
                stats.repriced += 1
            except (ApiError, GatewayUnavailable) as exc:
                log.debug("repricing %s: %s", fleet.ids[i], exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def drive_fleet(
    fleet: Fleet,
    *,
    api_url: str,
    api_key: str,
    stop: asyncio.Event,
    interval_s: float = 60.0,
    min_gap_s: float | None = None,
    tick_s: float = 0.25,
    nodes_per_connection: int = 25_000,
    batch: int = 1000,
    notices: bool | None = None,
    channels_per_socket: int = 256,
    stats: FleetStats | None = None,
    gateway: Gateway | None = None,
) -> FleetStats:
    """Heartbeat every node of `fleet` every `interval_s` until `stop`; returns the counters.

    `min_gap_s` (default 0.9 x interval) is the least time between two beats of one node: set it
    at or above the gateway's per-node minimum. `notices` (default: on up to 2,560 nodes)
    subscribes each node's `node:<id>` channel, `channels_per_socket` per extra connection (the
    gateway's per-socket limit), to keep the nodes' lease totals.
    """
    if min_gap_s is None:
        min_gap_s = 0.9 * interval_s
    if min_gap_s > interval_s:
        raise ValueError("min_gap_s must not exceed interval_s")
    if notices is None:
        notices = len(fleet.ids) <= 10 * channels_per_socket
    stats = stats or FleetStats()
    rng = random.Random(len(fleet.ids))
    order = list(range(len(fleet.ids)))
    per = max(1, nodes_per_connection)
    shards = [
        _Shard(
            k,
            fleet,
            order[lo : lo + per],
            api_url=api_url,
            api_key=api_key,
            interval_s=interval_s,
            min_gap_s=min_gap_s,
            tick_s=tick_s,
            batch=batch,
            stats=stats,
            rng=rng,
        )
        for k, lo in enumerate(range(0, len(order), per))
    ]

    def on_notice(channel: str, data: Any) -> None:
        if channel.startswith("node:") and isinstance(data, dict):
            notice = str(data.get("notice"))
            stats.notices[notice] += 1
            fleet.apply_notice(channel[5:], notice, data.get("contract") or {})

    links = [shard.link for shard in shards]
    if notices:
        channels = [f"node:{node_id}" for node_id in fleet.ids]
        for k, lo in enumerate(range(0, len(channels), channels_per_socket)):
            links.append(
                _Link(
                    f"fleet notices {k}",
                    api_url=api_url,
                    api_key=api_key,
                    channels=channels[lo : lo + channels_per_socket],
                    stats=stats,
                    on_event=on_notice,
                )
            )
    # Schedules change by the minute: compute every group's state once per second, not per node.
    cache: dict[str, Any] = {"at": 0.0, "idle": fleet.idle_now()}

    def idle_of() -> list[bool]:
        now = time.monotonic()
        if now - cache["at"] >= 1.0:
            cache["at"] = now
            cache["idle"] = fleet.idle_now()
        return cache["idle"]

    tasks: list[asyncio.Task[Any]] = []
    for link in links:
        tasks.append(asyncio.create_task(link.run(stop), name=link.name))
    for shard in shards:
        tasks.append(
            asyncio.create_task(
                shard.beat_loop(stop, idle_of, shard.number / len(shards)),
                name=f"fleet-hb-{shard.number}",
            )
        )
    if gateway is not None and fleet.reprice_per_beat:
        tasks.append(
            asyncio.create_task(_repricer(gateway, fleet, stats, stop), name="fleet-price")
        )
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return stats


# ---------------------------------------------------------------------------------------------
# The whole thing, as `mnemo-agent --simulate N` runs it


class _FleetState(msgspec.Struct):
    api_url: str
    api_key: str
    seed: int
    n: int
    regions: list[str] | None
    node_ids: list[str]


def _load_state(
    path: Path | None,
    api_url: str,
    api_key: str | None,
    seed: int,
    n: int,
    regions: Sequence[str] | None,
) -> _FleetState | None:
    """The saved fleet at `path` if it is this fleet (same gateway, seed, size, regions, key)."""
    if path is None or not path.exists():
        return None
    try:
        state = msgspec.json.decode(path.read_bytes(), type=_FleetState)
    except (msgspec.DecodeError, OSError) as exc:
        log.warning("ignoring fleet state %s: %s", path, exc)
        return None
    if (
        state.api_url != api_url.rstrip("/")
        or state.seed != seed
        or state.n != n
        or state.regions != (list(regions) if regions else None)
        or (api_key is not None and api_key != state.api_key)
    ):
        log.info("fleet state in %s is for another fleet; starting anew", path)
        return None
    return state


def _save_state(path: Path, state: _FleetState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    tmp.chmod(0o600)  # holds the fleet account's API key
    tmp.replace(path)


async def run_fleet(
    api_url: str,
    n: int,
    *,
    stop: asyncio.Event,
    api_key: str | None = None,
    seed: int = 0,
    regions: Sequence[str] | None = None,
    interval_s: float = 60.0,
    min_gap_s: float | None = None,
    concurrency: int = 32,
    nodes_per_connection: int = 25_000,
    notices: bool | None = None,
    churn: bool = True,
    reprice_per_beat: float = 0.002,
    state_path: Path | None = None,
    report_every_s: float = 30.0,
) -> FleetStats:
    """Sign up (unless `api_key`), register N virtual nodes, and drive them until `stop`.

    `state_path` keeps the account key and node ids, so a restart with the same `seed`, `n` and
    `regions` resumes the same fleet instead of registering a new one.
    """
    nodes = make_fleet(n, seed=seed, regions=regions)
    state = _load_state(state_path, api_url, api_key, seed, n, regions)
    key: str | None = api_key or (state.api_key if state else None)
    async with Gateway(api_url, key, max_connections=max(4, concurrency)) as gateway:
        if state is not None:
            node_ids = state.node_ids
            key = state.api_key
            log.info("resuming %d virtual nodes from %s", len(node_ids), state_path)
        else:
            if api_key is None:
                email = f"fleet-{uuid.uuid4().hex[:12]}@example.com"
                password = uuid.uuid4().hex
                await retrying(
                    "signing up the fleet's provider account",
                    lambda: gateway.signup(
                        email, password, role="provider", organization="Simulated fleet"
                    ),
                    stop=stop,
                )
                log.info("signed up the fleet's provider account %s", email)
            key = gateway.api_key
            assert key is not None
            log.info("registering %d virtual nodes (batches of %d)", n, REGISTER_BATCH)
            started = time.perf_counter()
            node_ids = await register_fleet(
                gateway,
                nodes,
                concurrency=concurrency,
                stop=stop,
                progress=lambda done, s: log.info("registered %d nodes (%.0f/s)", done, done / s),
            )
            elapsed = time.perf_counter() - started
            log.info("registered %d nodes in %.1f s (%.0f/s)", n, elapsed, n / max(elapsed, 1e-9))
            if state_path is not None:
                regions_list = list(regions) if regions else None
                _save_state(
                    state_path, _FleetState(gateway.api_url, key, seed, n, regions_list, node_ids)
                )
        fleet = Fleet(nodes, node_ids, seed=seed, churn=churn, reprice_per_beat=reprice_per_beat)
        stats = FleetStats()
        reporter = asyncio.create_task(_report(stats, stop, report_every_s))
        try:
            log.info(
                "driving %d nodes: one beat each per %.0f s over %d connection(s)",
                n,
                interval_s,
                math.ceil(n / nodes_per_connection),
            )
            await drive_fleet(
                fleet,
                api_url=api_url,
                api_key=key,
                stop=stop,
                interval_s=interval_s,
                min_gap_s=min_gap_s,
                nodes_per_connection=nodes_per_connection,
                notices=notices,
                stats=stats,
                gateway=gateway,
            )
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    return stats


async def _report(stats: FleetStats, stop: asyncio.Event, every_s: float) -> None:
    last_sent, last_t = 0, time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        now = time.monotonic()
        rate = (stats.sent - last_sent) / max(now - last_t, 1e-9)
        last_sent, last_t = stats.sent, now
        log.info("fleet: %.0f beats/s; %s", rate, stats.snapshot())
