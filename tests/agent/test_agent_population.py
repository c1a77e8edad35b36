"""Generating a simulated fleet: geography, mix, prices, registration bodies."""

from __future__ import annotations

import math
from collections import Counter

import msgspec

from agent.metros import METROS
from agent.population import make_fleet


def _km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371 * math.asin(math.sqrt(a))


def test_fleet_is_deterministic_and_clusters_around_metros() -> None:
    """Same seed, same fleet; every node lies near a metro of its region; us-east-2 is the
    biggest region and sits around Long Island / NYC; the type mix is mostly mist nodes."""
    a, b = make_fleet(3000, seed=42), make_fleet(3000, seed=42)
    assert a == b
    assert make_fleet(50, seed=1) != make_fleet(50, seed=2)
    for node in a:
        nearest = min(
            _km(node.latitude, node.longitude, m.lat, m.lng)
            for m in METROS
            if m.region == node.region
        )
        assert nearest < 200, node
    regions = Counter(n.region for n in a)
    assert regions.most_common(1)[0][0] == "us-east-2"
    nyc = [n for n in a if n.region == "us-east-2"]
    assert all(_km(n.latitude, n.longitude, 40.73, -73.79) < 250 for n in nyc)
    types = Counter(n.node_type for n in a)
    assert types["mist_node"] > types["edge_cluster"] > types["datacenter"] > 0
    assert len({n.price_per_gb_sec for n in a}) > 2500  # prices vary
    assert {n.idle_schedule for n in a if n.node_type == "mist_node"} > {"always"}
    only = make_fleet(100, seed=3, regions=["eu-west-1"])
    assert {n.region for n in only} == {"eu-west-1"}


def test_registration_bodies_are_valid_wire_values() -> None:
    """Bodies carry the spec's fields with string metadata and positive prices."""
    for node in make_fleet(500, seed=9):
        body = node.registration_body()
        assert body["total_ram_gb"] + body["total_vram_gb"] > 0
        assert 0 < body["price_per_gb_sec"] < 1e-5
        assert all(isinstance(v, str) for v in body["metadata"].values())
        msgspec.json.encode(body)
