"""Delivered leases in the live market (the scripts, with time as an argument): a RAM lease on a
node that delivers is pending until its node reports it ready, bills from then, takes its
meters from the node's heartbeats, closes in two steps and bills the measured egress; the
event stream replays to the same state."""

from __future__ import annotations

import msgspec
import pytest
import redis.asyncio as aioredis

from engine import core
from engine.errors import Conflict, NotFound
from engine.keys import Keys
from engine.market import Market
from engine.replay import region_snapshot
from engine.types import Contract, Heartbeat, LeaseChanged, LeaseMeter, Node
from tests.engine.conftest import fund
from tests.engine.test_replay import T0, a_node

R = "us-east-2"
GB = 10**9
DIGEST = "d" * 64


@pytest.fixture
async def market(redis: aioredis.Redis, keys: Keys) -> Market:
    m = Market(redis, keys)
    await m.load_scripts()
    await m.register_node(a_node("dn", delivers=True, egress_price_pusd=50_000_000_000), T0)
    await m.register_node(a_node("dn2", delivers=True, price_pusd=900_000), T0)
    await m.register_node(a_node("plain"), T0)
    await fund(m, "acme", R, now_ms=T0)  # contracts are paid for (issue 14)
    return m


async def _rent(m: Market, node_id: str = "dn", *, ram: int = 4, vram: int = 0, at: int = T0):
    return await m.reserve(
        node_id=node_id, client_id="acme", user_id="u-acme", ram_gb=ram, vram_gb=vram,
        duration_s=3600, max_price_pusd=2_000_000, now_ms=at,
    )  # fmt: skip


def _beat(node_id: str, *meters: tuple[str, int, int]) -> Heartbeat:
    return Heartbeat(
        node_id=node_id,
        available_ram_gb=40,
        available_vram_gb=10,
        leases=[
            LeaseMeter(contract_id=c, egress_bytes=e, peak_memory_bytes=p) for c, e, p in meters
        ],
    )


async def test_only_ram_on_a_delivering_node_is_delivered(market: Market, keys: Keys) -> None:
    """RAM on a node that delivers starts pending and is watched; VRAM alone, or any lease on a
    node that does not deliver, is reserved, not delivered."""
    delivered = await _rent(market)
    vram_only = await _rent(market, ram=0, vram=2)
    plain = await _rent(market, "plain")
    assert delivered.lease_state == "pending"
    assert (vram_only.lease_state, plain.lease_state) == ("none", "none")
    assert (await market.get_contract(delivered.contract_id)) == delivered
    assert await market.pending_leases(R, T0) == [delivered.contract_id]
    assert await market.pending_leases(R, T0 - 1) == []


async def test_billing_runs_from_the_ready_report_to_the_close_order(market: Market) -> None:
    """Ten seconds pending, then ready: settled two minutes after the close order, the lease
    bills the 60 s between ready and the close, and its measured egress (1 GB = 10**9 bytes),
    not the renter's own figure; the digest is in the settlement hash."""
    c = await _rent(market)
    ready = await market.lease_ready(
        c.contract_id, "dn", host="10.0.0.5", port=43001, tls=False, now_ms=T0 + 10_000
    )
    assert (ready.lease_state, ready.ready_ms, ready.lease_port) == ("ready", T0 + 10_000, 43001)
    assert core.accrued_cost_pusd(ready, T0 + 20_000) == 4 * 10 * c.price_pusd
    # the node restarted the server on another port: the endpoint moves, billing does not
    again = await market.lease_ready(
        c.contract_id, "dn", host="10.0.0.5", port=43002, tls=True, now_ms=T0 + 15_000
    )
    assert (again.ready_ms, again.lease_port, again.lease_tls) == (T0 + 10_000, 43002, True)

    closing = await market.close_lease(c.contract_id, T0 + 70_000, claimed_egress_gb=0.001)
    assert (closing.lease_state, closing.closing_ms) == ("closing", T0 + 70_000)
    assert closing.claimed_egress_mgb == 1
    with pytest.raises(Conflict, match="closing"):
        await market.extend(c.contract_id, 60, T0 + 71_000)
    node = await market.get_node("dn")
    assert node is not None and node.reserved_ram_gb == 4  # until it is settled

    _, recorded = await market.report_lease(
        c.contract_id, "dn", T0 + 190_000,
        egress_bytes=2 * GB + 499_999, peak_memory_bytes=3 * GB, digest=DIGEST,
    )  # fmt: skip
    assert recorded
    _, again_recorded = await market.report_lease(c.contract_id, "dn", T0 + 191_000)
    assert not again_recorded  # a repeat changes nothing
    settled = await market.settle_lease(c.contract_id, T0 + 190_000)
    assert settled.status == "completed" and settled.lease_state == "closed"
    assert settled.used_s == 60
    assert (settled.egress_bytes, settled.egress_mgb) == (2 * GB + 499_999, 2000)
    assert settled.cost_pusd == 4 * 60 * c.price_pusd + 2000 * c.egress_price_pusd // 1000
    assert settled.lease_digest == DIGEST and settled.claimed_egress_mgb == 1
    assert settled.settlement_hash == core.settlement_hash(settled)
    assert core.settlement_record(settled)["lease_digest"] == DIGEST
    node = await market.get_node("dn")
    assert node is not None and node.reserved_ram_gb == 0
    assert await market.closing_leases(R, T0 + 10**6) == []


async def test_heartbeats_meter_their_own_leases_and_a_restarted_counter_adds_up(
    market: Market,
) -> None:
    """A beat stores meters of its node's leases only; a counter that starts over (a new server)
    adds to what the old one had counted; without a closed report, the close timeout bills the
    heartbeats' meter and no digest."""
    c = await _rent(market)
    theirs = await _rent(market, "dn2")
    await market.lease_ready(c.contract_id, "dn", host="h", port=1, tls=False, now_ms=T0)
    beats = [(T0 + 1_000, 300), (T0 + 2_000, 500), (T0 + 3_000, 40), (T0 + 4_000, 90)]
    for at, egress in beats:
        await market.heartbeat(
            "alice",
            [_beat("dn", (c.contract_id, egress, 7), (theirs.contract_id, 10**12, 1))],
            at,
            0,
        )
    # two beats of the node in one call: applied in order
    await market.heartbeat(
        "alice", [_beat("dn", (c.contract_id, 100, 9)), _beat("dn", (c.contract_id, 20, 8))],
        T0 + 4_500, 0,
    )  # fmt: skip
    # an idle lease's meter, the same as the last: nothing stored, nothing in the event
    await market.heartbeat("alice", [_beat("dn", (c.contract_id, 20, 8))], T0 + 4_700, 0)
    events = await market.read_events(R)
    meters = [m for e in events if hasattr(e, "meters") for m in e.meters]  # type: ignore[attr-defined]
    assert {m.contract_id for m in meters} == {c.contract_id}
    assert [m.egress_bytes for m in meters] == [300, 500, 540, 590, 600, 620]
    await market.close_lease(c.contract_id, T0 + 5_000)
    settled = await market.settle_lease(c.contract_id, T0 + 20_000)
    assert (settled.egress_bytes, settled.peak_memory_bytes, settled.lease_digest) == (620, 9, None)
    assert settled.egress_mgb == 0  # 590 bytes round to no thousandth of a GB
    unmetered = await market.get_contract(theirs.contract_id)
    assert unmetered is not None and unmetered.egress_bytes == 0


async def test_reports_that_do_not_fit_are_refused(market: Market) -> None:
    """Ready for a contract of another node is not found; ready once the close was ordered, a
    closed report before it (and before the end), and any report for a lease that is not
    delivered are conflicts."""
    c = await _rent(market)
    plain = await _rent(market, "plain")
    with pytest.raises(NotFound):
        await market.lease_ready(c.contract_id, "dn2", host="h", port=1, tls=False, now_ms=T0)
    with pytest.raises(Conflict, match="not delivered"):
        await market.lease_ready(plain.contract_id, "plain", host="h", port=1, tls=False, now_ms=T0)
    with pytest.raises(Conflict, match="not been closed"):
        await market.report_lease(c.contract_id, "dn", T0 + 1_000, egress_bytes=1)
    # past its end the node may close a lease on its own
    late = await _rent(market, at=T0)
    await market.lease_ready(late.contract_id, "dn", host="h", port=2, tls=False, now_ms=T0)
    closed, _ = await market.report_lease(late.contract_id, "dn", T0 + 3_600_500, egress_bytes=5)
    assert closed.lease_state == "closing" and closed.reported_ms == T0 + 3_600_500
    settled = await market.settle_lease(late.contract_id, T0 + 3_600_600)
    assert settled.used_s == 3600
    await market.close_lease(c.contract_id, T0 + 2_000)
    with pytest.raises(Conflict, match="closing"):
        await market.lease_ready(c.contract_id, "dn", host="h", port=1, tls=False, now_ms=T0)


async def test_a_failover_bills_up_to_the_stop_and_its_successor_is_pending(
    market: Market,
) -> None:
    """A ready lease whose node died moves to a node that delivers: the old one bills its
    delivered seconds up to the node's last heartbeat, no egress; the successor is pending on
    the new node, for the seconds not billed."""
    c = await _rent(market)
    await market.lease_ready(c.contract_id, "dn", host="h", port=1, tls=False, now_ms=T0 + 1_000)
    old, new = await market.failover(c.contract_id, "dn2", T0 + 100_000, stop_ms=T0 + 31_000)
    assert (old.status, old.lease_state, old.used_s, old.egress_mgb) == (
        "failed_over", "failed", 30, 0
    )  # fmt: skip
    assert old.settlement_hash == core.settlement_hash(old)
    assert (new.node_id, new.lease_state, new.duration_s) == ("dn2", "pending", 3570)
    assert await market.pending_leases(R, T0 + 10**6) == [new.contract_id]
    never = await _rent(market, "dn2")
    failed = await market.fail_contract(never.contract_id, T0 + 50_000)
    assert (failed.lease_state, failed.used_s, failed.cost_pusd) == ("failed", 0, 0)


async def test_the_stream_replays_to_the_same_delivery_state(
    market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    """Pending, ready, closing, reported and settled leases, meters included, rebuild from the
    events to exactly the keys the scripts left."""
    leases = [await _rent(market) for _ in range(4)]
    for c in leases[1:]:
        await market.lease_ready(c.contract_id, "dn", host="h", port=9, tls=False, now_ms=T0 + 1)
    await market.heartbeat(
        "alice", [_beat("dn", *((c.contract_id, 100, 10) for c in leases))], T0 + 2, 0
    )
    await market.heartbeat(
        "alice", [_beat("dn", *((c.contract_id, 50, 20) for c in leases))], T0 + 3, 0
    )
    await market.close_lease(leases[2].contract_id, T0 + 4)
    await market.close_lease(leases[3].contract_id, T0 + 4)
    await market.report_lease(leases[3].contract_id, "dn", T0 + 5, egress_bytes=70)
    await market.close_lease(leases[1].contract_id, T0 + 6)
    await market.settle_lease(leases[1].contract_id, T0 + 7)
    events = await market.read_events(R)
    assert any(isinstance(e, LeaseChanged) and e.change == "reported" for e in events)
    elsewhere = Keys(keys.prefix + "replayed:")
    try:
        await Market(redis, elsewhere).replay(events)
        original = await region_snapshot(redis, keys, R)
        rebuilt = await region_snapshot(redis, elsewhere, R)
        assert rebuilt == original
        assert {"lease-pending", "lease-closing", "lease-meters"} <= set(original)
    finally:
        found = [k async for k in redis.scan_iter(match=f"{elsewhere.prefix}*")]
        if found:
            await redis.unlink(*found)


def test_hashes_of_contracts_that_were_not_delivered_are_unchanged() -> None:
    """The settlement record of a contract without delivery has no delivery field, so its hash
    is what it was before delivery existed."""
    c = Contract(
        contract_id="c", region=R, client_id="k", user_id="u", node_id="n", owner_id="o",
        ram_gb=1, vram_gb=0, duration_s=60, start_ms=T0, end_ms=T0 + 60_000, price_pusd=5,
    )  # fmt: skip
    record = core.settlement_record(c)
    assert not set(core.LEASE_FIELDS) & set(record)
    delivered = msgspec.structs.replace(c, lease_state="closed", egress_bytes=3)
    assert set(core.LEASE_FIELDS) <= set(core.settlement_record(delivered))


def test_egress_bytes_round_half_to_even_to_thousandths_of_a_gb() -> None:
    assert core.egress_mgb_of_bytes(1_499_999) == 1
    assert core.egress_mgb_of_bytes(1_500_000) == 2
    assert core.egress_mgb_of_bytes(2_500_000) == 2
    assert core.egress_mgb_of_bytes(2_500_001) == 3
    assert core.egress_mgb_of_bytes(10**20) == core.MAX_EGRESS_MGB
    price = 10**15  # 1,000 USD per GB: a million USD of egress is 1,000 GB
    assert core.egress_mgb_of_bytes(10**15, price) == 1_000_000


def test_nodes_remember_whether_they_deliver() -> None:
    node = a_node("x", delivers=True)
    assert core.to_fields(node)["delivers"] == "true"
    assert core.from_fields(Node, core.to_fields(node)).delivers is True
