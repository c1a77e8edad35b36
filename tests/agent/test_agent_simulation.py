"""The simulation model (`agent.simulation.Fleet`) stepped by hand: no gateway, no sockets."""

from __future__ import annotations

from agent.client import Beat
from agent.population import make_fleet
from agent.simulation import Fleet


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
