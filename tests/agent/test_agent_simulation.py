"""The simulation model (`agent.simulation.Fleet`) stepped by hand: a fixed instant and seed, no
gateway, no clock, no sockets."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from agent.population import VirtualNode, make_fleet
from agent.simulation import Fleet
from gateway.protocol import Beat, LeaseMeter
from tests.agent.test_agent_leases import contract

# Fixed instants, read in each node's zone: New York is UTC-5 in January and UTC-4 in July.
_JAN_NOON_NY = datetime(2026, 1, 14, 17, 0, tzinfo=UTC)  # 12:00 New York, 02:00 Tokyo
_JAN_1AM_NY = datetime(2026, 1, 14, 6, 0, tzinfo=UTC)  # 01:00 New York, 15:00 Tokyo
_JAN_430PM_NY = datetime(2026, 1, 14, 21, 30, tzinfo=UTC)  # 16:30 New York (EST)
_JUL_530PM_NY = datetime(2026, 7, 15, 21, 30, tzinfo=UTC)  # 17:30 New York (EDT)


_NODE = VirtualNode(
    node_type="mist_node",
    name="Alice_RTX4090_0",
    region="us-east-2",
    latitude=40.73,
    longitude=-73.79,
    total_ram_gb=64,
    total_vram_gb=24,
    bandwidth_mbps=1000,
    base_latency_ms=1.0,
    price_per_gb_sec=8e-7,
    idle_schedule="always",
    timezone="America/New_York",
    gpu_model="RTX 4090",
    reliability=0.99,
    mean_free=0.6,
)


def _node(
    schedule: str = "always", tz: str = "America/New_York", reliability: float = 0.99
) -> VirtualNode:
    return msgspec.structs.replace(
        _NODE, idle_schedule=schedule, timezone=tz, reliability=reliability
    )


def _ids(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(n)]


def _step(fleet: Fleet, now: datetime) -> list[Beat | None]:
    """One interval for every node, as the heartbeat shards step it."""
    idle = fleet.idle_now(now)
    return [fleet.beat(i, idle[fleet.group[i]]) for i in range(len(fleet.ids))]


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
    fleet.apply_notice(fleet.ids[i], "contract_started", contract("c1", 8))
    fleet.free[i] = 1.0
    after = fleet.beat(i, True)
    assert before is not None and after is not None
    assert after.available_ram_gb <= nodes[i].total_ram_gb - 8
    fleet.apply_notice(fleet.ids[i], "contract_ended", contract("c1", 8, status="completed"))
    assert fleet.leased_ram[i] == 0 and not fleet.books


def test_outages_match_reliability() -> None:
    """With churn, a node falls silent about (1 - reliability) of the time, in spells."""
    nodes = make_fleet(400, seed=6)
    fleet = Fleet(nodes, [f"{i:032x}" for i in range(400)], seed=6, churn=True)
    silent = sum(fleet.beat(i, True) is None for _ in range(100) for i in range(400))
    expected = sum(1 - n.reliability for n in nodes) * 100
    assert 0.5 * expected < silent < 1.8 * expected


def test_the_same_seed_and_instant_give_the_same_beats() -> None:
    """The model reads no clock and no global random state: two fleets with one seed, stepped at
    the same instants, report the same beats; another seed reports others."""
    nodes = make_fleet(300, seed=12)

    def run(seed: int) -> list[list[Beat | None]]:
        fleet = Fleet(nodes, _ids(300), seed=seed, churn=True, reprice_per_beat=0.05)
        return [_step(fleet, _JAN_NOON_NY) for _ in range(20)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_reported_capacity_stays_within_the_machine() -> None:
    """Whatever the walk does, a beat offers between 0 and the machine's total of each memory
    (no VRAM without a GPU), never what is leased, and a CPU load within 0-100 %."""
    nodes = make_fleet(300, seed=8)
    fleet = Fleet(nodes, _ids(300), seed=8, churn=True)
    leased = 0
    for i in range(300):
        # A lease on every tenth node with the memory for it.
        if i % 10 == 0 and nodes[i].total_ram_gb >= 16:
            fleet.apply_notice(fleet.ids[i], "contract_started", contract(f"c{i}", 16))
            leased += 1
    assert leased > 20
    for now in (_JAN_NOON_NY, _JAN_1AM_NY) * 50:
        for i, beat in enumerate(_step(fleet, now)):
            if beat is None:
                continue
            node = nodes[i]
            assert beat.node_id == fleet.ids[i]
            assert 0 <= beat.available_ram_gb <= node.total_ram_gb - fleet.leased_ram[i]
            assert 0 <= beat.available_vram_gb <= node.total_vram_gb
            if node.gpu_model is None:
                assert beat.available_vram_gb == 0
            assert 0.0 <= beat.cpu_usage_pct <= 100.0


def test_idle_schedules_are_read_in_each_nodes_time_zone() -> None:
    """A node lends only inside its schedule, read at the given instant in its own zone (daylight
    saving included); outside it offers nothing."""
    nodes = [
        _node("9am-5pm"),
        _node("11pm-7am"),
        _node("always"),
        _node("9am-5pm", "Asia/Tokyo"),
    ]
    fleet = Fleet(nodes, _ids(4), seed=1, churn=False)

    def lending(now: datetime) -> list[bool]:
        idle = fleet.idle_now(now)
        return [idle[fleet.group[i]] for i in range(4)]

    assert lending(_JAN_NOON_NY) == [True, False, True, False]
    assert lending(_JAN_1AM_NY) == [False, True, True, True]
    # The same UTC time of day, either side of daylight saving: 16:30 EST is open, 17:30 EDT not.
    assert lending(_JAN_430PM_NY)[0] and not lending(_JUL_530PM_NY)[0]
    for now in (_JAN_NOON_NY, _JAN_1AM_NY):
        for _ in range(10):
            for beat, open_ in zip(_step(fleet, now), lending(now), strict=True):
                assert beat is not None
                offered = (beat.available_ram_gb, beat.available_vram_gb)
                if open_:
                    assert offered != (0, 0)
                else:
                    assert offered == (0, 0)


@pytest.mark.parametrize("steps", [1, 200])
def test_repricing_moves_an_ask_within_ten_percent_and_queues_it(steps: int) -> None:
    """A repricing node moves its ask by at most 10 % a step, quoted to a pico-dollar, stays a
    price the gateway takes (above 0, at most 1 USD per GB-second), and is queued once per change
    for the repricer; without repricing nothing moves."""
    nodes = make_fleet(200, seed=2)
    fleet = Fleet(nodes, _ids(200), seed=2, churn=False, reprice_per_beat=1.0)
    for _ in range(steps):
        before = list(fleet.price)
        fleet.repricing.clear()
        _step(fleet, _JAN_NOON_NY)
        assert sorted(fleet.repricing) == list(range(200))
        for old, new in zip(before, fleet.price, strict=True):
            assert 0.9 * old - 1e-12 <= new <= 1.1 * old + 1e-12
            assert round(new, 12) == new
            assert 0 < new <= 1.0
    still = Fleet(nodes, _ids(200), seed=2, churn=False, reprice_per_beat=0.0)
    for _ in range(steps):
        _step(still, _JAN_NOON_NY)
    assert still.price == [n.price_per_gb_sec for n in nodes] and not still.repricing


def test_an_outage_lasts_long_enough_for_the_engine_to_notice() -> None:
    """A node falls silent for whole spells of `OUTAGE_BEATS` intervals, more than the engine's
    3 missed heartbeats, so it goes offline and its contracts fail over; then it comes back."""
    assert Fleet.OUTAGE_BEATS > 3
    nodes = [_node(reliability=0.8) for _ in range(20)]
    fleet = Fleet(nodes, _ids(20), seed=3, churn=True)
    series = [_step(fleet, _JAN_NOON_NY) for _ in range(400)]
    spells = 0
    for i in range(20):
        silent = 0
        for beats in series:
            if beats[i] is None:
                silent += 1
            elif silent:
                assert silent % Fleet.OUTAGE_BEATS == 0, (i, silent)
                spells += 1
                silent = 0
    assert spells > 20


def test_beats_carry_the_lease_meters_of_their_node() -> None:
    """What the fleet's delivery measured on a node's lease servers goes out in its beats."""
    nodes = make_fleet(3, seed=5)
    fleet = Fleet(nodes, ["n0", "n1", "n2"], seed=5, churn=False)
    meter = LeaseMeter(contract_id="c1", egress_bytes=123, peak_memory_bytes=456)
    fleet.lease_meters = {1: [meter]}
    beats = [fleet.beat(i, True) for i in range(3)]
    assert [b.leases if b else None for b in beats] == [None, [meter], None]
