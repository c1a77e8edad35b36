"""Shared by the benchmarks: a synthetic fleet generator, and a summary of ratios and tails.

`make_fleet(n, seed=...)` builds `n` nodes of one region shaped like a real market: most of
them consumer mist nodes clustered around metro areas, fewer edge clusters, a few large
datacenters; log-normal prices around 1e-6 USD per GB-second; some capacity already leased;
a few nodes offline, in maintenance, with an expiring ask or with unusual duration terms.
Deterministic for a given seed, and cached per (n, seed, region) for the session.

`make_requests(k, seed=...)` builds renter requests of the same market (sizes, caps, places,
a mix of optional filters).

Summary: after a run with pytest-benchmark, every benchmark group that has one benchmark
marked `benchmark.extra_info["baseline"] = True` gets a table of each benchmark's median as a
ratio to that baseline (measured in the same run), and every benchmark with
`extra_info["tail"] = True` gets its p50/p99/max computed from all of its rounds.
"""

from __future__ import annotations

import functools
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.types import Node

# The benches live outside the installed packages and use the tests' oracle (tests.engine.oracle)
# and this module (bench.conftest): make the repository root importable however pytest started.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

__all__ = ["METROS", "NOW_MS", "make_fleet", "make_requests"]

NOW_MS = 1_700_000_000_000
"""The market time the generated fleets and requests are valid at."""

# (lat, lng) of metro areas across North America: a continent-sized region
METROS: tuple[tuple[float, float], ...] = (
    (40.71, -74.01), (34.05, -118.24), (41.88, -87.63), (29.76, -95.37), (33.45, -112.07),
    (39.95, -75.17), (29.42, -98.49), (32.72, -117.16), (32.78, -96.80), (37.34, -121.89),
    (30.27, -97.74), (30.33, -81.66), (37.77, -122.42), (39.96, -82.99), (35.23, -80.84),
    (39.77, -86.16), (47.61, -122.33), (39.74, -104.99), (38.91, -77.04), (42.36, -71.06),
    (36.17, -115.14), (45.52, -122.68), (43.65, -79.38), (45.50, -73.57), (49.28, -123.12),
    (25.76, -80.19), (33.75, -84.39), (44.98, -93.27), (19.43, -99.13), (51.05, -114.07),
)  # fmt: skip


@functools.cache
def make_fleet(n: int, *, seed: int = 1, region: str = "bench") -> tuple[Node, ...]:
    """`n` nodes of one region (see the module docstring); arrival order = index."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[0.05, 0.25, 0.70])  # datacenter, edge_cluster, mist_node
    metro = rng.integers(0, len(METROS), size=n)
    centre = np.array(METROS)[metro]
    # ~30 km around a metro (a degree of latitude is ~111 km); 10% anywhere in the region
    lat = centre[:, 0] + rng.normal(0, 0.3, size=n)
    lng = centre[:, 1] + rng.normal(0, 0.3, size=n) / np.cos(np.radians(centre[:, 0]))
    scattered = rng.random(n) < 0.10
    lat[scattered] = rng.uniform(20.0, 55.0, size=scattered.sum())
    lng[scattered] = rng.uniform(-125.0, -65.0, size=scattered.sum())
    ram_choices = ([256, 512, 1024, 2048], [64, 128, 256, 512], [16, 32, 64, 128])
    vram_choices = ([0, 80, 320, 640], [0, 48, 96, 192], [0, 8, 12, 16, 24])
    price_median = np.array([6e5, 8e5, 1e6])  # pico-USD per GB-s: datacenters cheapest
    types = ("datacenter", "edge_cluster", "mist_node")
    total_ram = np.choose(kind, [rng.choice(c, size=n) for c in ram_choices])
    total_vram = np.choose(kind, [rng.choice(c, size=n) for c in vram_choices])
    offered_ram = (total_ram * rng.choice([1.0, 0.75, 0.5], size=n)).astype(np.int64)
    busy = rng.random(n)
    reserved_ram = np.where(busy < 0.4, (offered_ram * rng.random(n)).astype(np.int64), 0)
    reserved_vram = np.where(busy < 0.3, (total_vram * rng.random(n)).astype(np.int64), 0)
    roll = rng.random(n)
    status = np.where(roll < 0.95, "active", np.where(roll < 0.98, "offline", "maintenance"))
    roll = rng.random(n)
    expires = np.where(
        roll < 0.03,
        NOW_MS - rng.integers(1, 3_600_000, size=n),  # lapsed, not yet delisted
        np.where(roll < 0.08, NOW_MS + rng.integers(1, 86_400_000, size=n), 0),
    )
    long_terms = rng.random(n) < 0.05
    bandwidth = rng.choice([100, 1000, 10_000], size=n)
    latency = np.round(rng.uniform(0.3, 5.0, size=n), 2)
    uptime = np.round(np.minimum(100.0, 80.0 + rng.gamma(4.0, 3.0, size=n)), 2)
    price = np.maximum(1, rng.lognormal(np.log(price_median[kind]), 0.35)).astype(np.int64)
    lat = np.clip(lat, -90.0, 90.0)
    nodes = [
        Node(
            node_id=f"{region}-{i:07d}",
            owner_id=f"owner-{i % 5000}",
            region=region,
            node_type=types[k],  # type: ignore[arg-type]
            name=f"{types[k]}-{i}",
            lat=la,
            lng=ln,
            total_ram_gb=tr,
            total_vram_gb=tv,
            offered_ram_gb=orr,
            offered_vram_gb=tv,
            reserved_ram_gb=rr,
            reserved_vram_gb=rv,
            bandwidth_mbps=bw,
            base_latency_ms=lt,
            uptime_score=up,
            price_pusd=pr,
            min_duration_s=3600 if lg else 60,
            max_duration_s=604_800 if lg else 86_400,
            status=st,  # type: ignore[arg-type]
            ask_expires_ms=ex,
            arrival_seq=i + 1,
        )
        for i, (k, la, ln, tr, tv, orr, rr, rv, bw, lt, up, pr, lg, st, ex) in enumerate(
            zip(
                kind.tolist(),
                lat.tolist(),
                lng.tolist(),
                total_ram.tolist(),
                total_vram.tolist(),
                offered_ram.tolist(),
                reserved_ram.tolist(),
                reserved_vram.tolist(),
                bandwidth.tolist(),
                latency.tolist(),
                uptime.tolist(),
                price.tolist(),
                long_terms.tolist(),
                status.tolist(),
                expires.tolist(),
                strict=True,
            )
        )
    ]
    return tuple(nodes)


def make_requests(count: int, *, seed: int = 2, region: str | None = None) -> list[dict[str, Any]]:
    """`count` renter requests as keyword arguments of `engine.scoring.MatchRequest`."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        lat, lng = rng.choice(METROS)
        located = rng.random() < 0.85
        req: dict[str, Any] = dict(
            ram_gb=rng.choice([4, 8, 16, 32, 64, 128]),
            vram_gb=rng.choice([0, 0, 8, 12, 24]),
            max_price_pusd=rng.choice([800_000, 1_000_000, 1_500_000, 2_000_000]),
            duration_s=rng.choice([600, 3600, 3600, 14_400]),
            lat=lat + rng.uniform(-0.2, 0.2) if located else None,
            lng=lng + rng.uniform(-0.2, 0.2) if located else None,
            prefer_local=rng.random() < 0.8,
            region=region,
        )
        roll = rng.random()
        if roll < 0.2:
            req["max_distance_km"] = rng.choice([25.0, 100.0, 500.0])
        elif roll < 0.3:
            req["min_uptime_score"] = 95.0
        elif roll < 0.4:
            req["node_type"] = rng.choice(["datacenter", "edge_cluster", "mist_node"])
        out.append(req)
    return out


# ---------------------------------------------------------------------------------------------
# Summary of ratios (to a group's baseline) and tails


def _percentile(data: list[float], q: float) -> float:
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None)]
    if not benchmarks:
        return
    write = terminalreporter.write_line
    groups: dict[str, list[Any]] = {}
    for bench in benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    for group, members in groups.items():
        base = [b for b in members if b.extra_info.get("baseline")]
        if base:
            base_median = base[0].stats.median
            write(f"ratios to baseline [{group}] (median of the baseline / median of each):")
            for b in sorted(members, key=lambda b: b.stats.median):
                write(
                    f"  {b.name:<48} median {b.stats.median * 1e3:10.3f} ms   "
                    f"x{base_median / b.stats.median:10.1f} faster than {base[0].name}"
                )
    for bench in benchmarks:
        if bench.extra_info.get("tail"):
            data = list(bench.stats.data)
            write(
                f"tail [{bench.name}]: {len(data)} rounds, p50 {statistics.median(data) * 1e3:.3f} ms, "
                f"p99 {_percentile(data, 0.99) * 1e3:.3f} ms, max {max(data) * 1e3:.3f} ms"
            )


@pytest.fixture(scope="session")
def fleet_factory() -> Any:
    """`fleet_factory(n, seed=1, region="bench")` -> tuple of nodes (cached for the session)."""
    return make_fleet
