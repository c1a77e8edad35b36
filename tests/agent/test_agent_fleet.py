"""The simulated fleet's pure parts: geography, mix, availability over time, lease totals."""

from __future__ import annotations

import math
import random
from collections import Counter

import msgspec

from agent.client import Backoff, Beat, ws_url
from agent.config import build_config
from agent.detect import GpuReading, MachineReading
from agent.metros import METROS
from agent.population import make_fleet
from agent.runner import _terms_changes, registration_body
from agent.simulation import Fleet
from tests.agent.test_agent_config import SPEC_CONFIG


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


def test_availability_changes_and_respects_schedule_and_leases() -> None:
    """Free memory wanders over time; outside its schedule a node offers nothing; leased memory
    from notices is not offered again."""
    nodes = make_fleet(200, seed=4)
    fleet = Fleet(nodes, [f"{i:032x}" for i in range(200)], seed=4, churn=False)
    series = [fleet.beat(0, True) for _ in range(50)]
    assert all(isinstance(b, Beat) for b in series)
    assert len({b.available_ram_gb for b in series if b}) > 3
    closed = fleet.beat(1, False)
    assert closed is not None and (closed.available_ram_gb, closed.available_vram_gb) == (0, 0)
    i = max(range(200), key=lambda k: nodes[k].total_ram_gb)
    fleet.free[i] = fleet.mean_free[i] = 1.0
    before = fleet.beat(i, True)
    fleet.apply_notice(
        fleet.ids[i], "contract_started", {"contract_id": "c1", "ram_gb": 8, "vram_gb": 0}
    )
    fleet.free[i] = 1.0
    after = fleet.beat(i, True)
    assert before is not None and after is not None
    assert after.available_ram_gb <= nodes[i].total_ram_gb - 8
    fleet.apply_notice(
        fleet.ids[i], "contract_ended", {"contract_id": "c1", "ram_gb": 8, "vram_gb": 0}
    )
    assert fleet.leased_ram[i] == 0 and not fleet.books


def test_outages_match_reliability() -> None:
    """With churn, a node falls silent about (1 - reliability) of the time, in spells."""
    nodes = make_fleet(400, seed=6)
    fleet = Fleet(nodes, [f"{i:032x}" for i in range(400)], seed=6, churn=True)
    silent = sum(fleet.beat(i, True) is None for _ in range(100) for i in range(400))
    expected = sum(1 - n.reliability for n in nodes) * 100
    assert 0.5 * expected < silent < 1.8 * expected


def test_backoff_is_capped_full_jitter() -> None:
    """Delays grow exponentially within [floor, cap] and start over after reset()."""
    backoff = Backoff(1.0, 8.0, rng=random.Random(1))
    for n in range(12):
        delay = backoff.next_delay()
        assert 0.1 <= delay <= min(8.0, 2**n)
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_ws_url() -> None:
    """The socket lives at /ws under the API URL, ws:// or wss://."""
    assert ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/ws"
    assert ws_url("https://api.mnemo.io/") == "wss://api.mnemo.io/ws"
    assert ws_url("https://x.example/mnemo") == "wss://x.example/mnemo/ws"


def test_registration_body_and_terms_changes() -> None:
    """The agent registers detected totals with the owner's limits (capped by the totals) and,
    on restart, pushes only the terms that changed."""
    config = build_config(SPEC_CONFIG | {"max_ram_gb": 512, "max_vram_gb": 8}, source="t", env={})
    machine = MachineReading(
        total_ram_gb=64,
        free_ram_gb=40,
        cpu_usage_pct=3.0,
        gpu=GpuReading(
            count=1, model="RTX 4090", total_vram_bytes=24 << 30, free_vram_bytes=20 << 30
        ),
    )
    body = registration_body(config, machine)
    assert (body["total_ram_gb"], body["total_vram_gb"]) == (64, 24)
    assert (body["max_ram_gb"], body["max_vram_gb"]) == (64, 8)
    assert body["metadata"]["gpu_model"] == "RTX 4090"
    assert body["metadata"]["idle_schedule"] == "9am-5pm, 11pm-7am"
    node = {
        k: body[k]
        for k in (
            "name",
            "price_per_gb_sec",
            "bandwidth_mbps",
            "base_latency_ms",
            "latitude",
            "longitude",
            "metadata",
        )
    }
    assert _terms_changes(config, node) == {}
    node["price_per_gb_sec"] = 0.0000009
    node["metadata"] = {"idle_schedule": "always", "os": "Linux"}
    changes = _terms_changes(config, node)
    assert changes["price_per_gb_sec"] == 0.0000008
    assert changes["metadata"] == {"idle_schedule": "9am-5pm, 11pm-7am", "os": "Linux"}
