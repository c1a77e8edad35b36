"""Generating a fleet: N virtual nodes, deterministic for a seed.

Nodes cluster around the metros of `agent.metros`, picked by weight. Mist nodes scatter over a
metro (tens of km), edge clusters less, datacenters sit on a few campus sites. Types, sizes,
prices and reliability follow the node type; mist nodes mostly lend on idle schedules read in
their metro's time zone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import msgspec

from agent.metros import METROS, Metro

__all__ = ["VirtualNode", "make_fleet"]

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
