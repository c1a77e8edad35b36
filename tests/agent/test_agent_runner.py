"""The single-node agent's pure parts: what it registers and which terms it pushes on restart."""

from __future__ import annotations

from agent.config import build_config
from agent.detect import GpuReading, MachineReading
from agent.runner import _terms_changes, registration_body
from tests.agent.test_agent_config import SPEC_CONFIG


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
