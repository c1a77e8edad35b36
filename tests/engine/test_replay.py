"""Replaying a region's event stream into an empty key space reproduces its live state."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from engine.errors import CapacityTaken
from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.replay import RegionImage, region_snapshot, snapshot_digest
from engine.types import Bid, Heartbeat, Node, NodeChanges, NodeDeactivated
from tests.engine.conftest import fund

T0 = 1_700_000_000_000


def a_node(node_id: str, region: str = "us-east-2", **kw: object) -> Node:
    fields: dict = dict(
        node_id=node_id, owner_id="alice", region=region, node_type="edge_cluster",
        name=f"node {node_id}", lat=40.7282, lng=-73.7949, total_ram_gb=64, total_vram_gb=24,
        offered_ram_gb=48, offered_vram_gb=18, price_pusd=800_000, egress_price_pusd=9,
        heartbeat_interval_s=10.0, metadata={"z": "last", "a": "first"},
    )  # fmt: skip
    fields.update(kw)
    return Node(**fields)


def a_bid(bid_id: str, **kw: object) -> Bid:
    fields: dict = dict(
        bid_id=bid_id, region="us-east-2", client_id="bot", user_id="u-bot", ram_gb=8,
        vram_gb=4, duration_s=600, max_price_pusd=1_000_000, lat=40.0, lng=-74.0,
    )  # fmt: skip
    fields.update(kw)
    return Bid(**fields)


@pytest.fixture
async def market(redis: aioredis.Redis, keys: Keys) -> Market:
    m = Market(redis, keys)
    await m.load_scripts()
    return m


@pytest.fixture
async def elsewhere(redis: aioredis.Redis) -> AsyncIterator[Keys]:
    """A second, empty key space for the replay (deleted afterwards)."""
    k = Keys(f"t{uuid.uuid4().hex[:12]}:")
    try:
        yield k
    finally:
        found = [key async for key in redis.scan_iter(match=f"{k.prefix}*", count=1000)]
        if found:
            await redis.unlink(*found)


async def busy_market(m: Market) -> None:
    """Every kind of change, in two regions."""
    fill = dict(client_id="bot", user_id="u-bot", duration_s=600, max_price_pusd=1_000_000)
    await fund(m, "bot")
    await fund(m, "acme")
    await fund(m, "acme", "eu-west-1")
    await m.register_node(a_node("n1"), T0)
    await m.register_node(a_node("n2", price_pusd=900_000, ask_expires_ms=T0 + 50_000), T0)
    await m.register_node(a_node("n3", lat=89.7, price_pusd=700_000), T0)
    await m.register_node(a_node("e1", region="eu-west-1"), T0)
    await m.heartbeat(
        "alice",
        [Heartbeat(node_id="n1", available_ram_gb=30, available_vram_gb=10, cpu_usage_pct=3.5,
                   lat=40.8, lng=-73.9, bandwidth_mbps=500),
         Heartbeat(node_id="e1", available_ram_gb=64, available_vram_gb=0)],
        T0 + 1000, 30_000,
    )  # fmt: skip
    await m.update_node("n3", NodeChanges(price_pusd=750_000, metadata={"b": "2"}), T0 + 2000)
    await m.place_bid(a_bid("b1"), T0 + 3000)
    await m.place_bid(a_bid("b2", allow_split=True, min_fill_gb=2, ram_gb=20), T0 + 3000)
    await m.place_bid(a_bid("b3", expires_ms=T0 + 10_000), T0 + 3000)
    await m.place_bid(a_bid("b4", max_price_pusd=500_000), T0 + 3000)
    await m.reserve(node_id="n1", ram_gb=8, vram_gb=4, bid_id="b1", now_ms=T0 + 4000, **fill)
    await m.reserve(node_id="n3", ram_gb=10, vram_gb=0, bid_id="b2", now_ms=T0 + 4000, **fill)
    plain = await m.reserve(
        node_id="n1", client_id="acme", user_id="u-acme", ram_gb=4, vram_gb=2,
        duration_s=3600, max_price_pusd=2_000_000, now_ms=T0 + 5000,
    )  # fmt: skip
    other = await m.reserve(
        node_id="n2", client_id="acme", user_id="u-acme", ram_gb=2, vram_gb=0,
        duration_s=3600, max_price_pusd=2_000_000, now_ms=T0 + 5000,
    )  # fmt: skip
    eu = await m.reserve(
        node_id="e1", client_id="acme", user_id="u-acme", ram_gb=60, vram_gb=0,
        duration_s=600, max_price_pusd=2_000_000, now_ms=T0 + 5000,
    )  # fmt: skip
    await m.extend(plain.contract_id, 600, T0 + 6000)
    await m.cancel_bid("b4", T0 + 7000)
    await m.expire_bids("us-east-2", T0 + 10_000)
    await m.settle(eu.contract_id, 1.25, T0 + 20_000)
    await m.fail_contract(other.contract_id, T0 + 21_000)
    await m.mark_offline("n1", T0 + 40_000)
    await m.failover(plain.contract_id, "n3", T0 + 41_000)
    await m.deactivate_node("n2", T0 + 42_000)
    await m.register_node(a_node("n4", ask_expires_ms=T0 + 45_000), T0 + 43_000)
    await m.expire_asks("us-east-2", T0 + 50_000)
    await m.heartbeat(
        "alice", [Heartbeat(node_id="n1", available_ram_gb=0, available_vram_gb=0)],
        T0 + 60_000, 30_000,
    )  # fmt: skip
    await m.register_node(a_node("n5", ask_expires_ms=T0 + 10**7), T0 + 61_000)
    await m.gather("acme", T0 + 62_000)  # a transfer from the regions back to funding
    await m.debit("acme", 10**12, key="refund", rail="stripe", now_ms=T0 + 63_000)
    # a transfer interrupted after its first step: still in the outbox when replayed
    await m.send_transfer(
        "bot", from_slot=FUNDING, to_slot="eu-west-1", amount_pusd=5, allow_pusd=0, credit_line_pusd=5,
        now_ms=T0 + 64_000,
    )  # fmt: skip


async def test_replay_reproduces_the_live_state(
    market: Market, redis: aioredis.Redis, keys: Keys, elsewhere: Keys
) -> None:
    """Every key of both regions (found by SCAN) has the same contents after a replay."""
    await busy_market(market)
    slots = [FUNDING, *await market.regions()]
    events = [e for r in slots for e in await market.read_events(r)]
    assert {type(e).__name__ for e in events} == {
        "NodeRegistered", "NodeUpdated", "NodeDeactivated", "HeartbeatsApplied", "NodeOffline",
        "BidPlaced", "BidCancelled", "BidExpired", "ContractCreated", "ContractExtended",
        "ContractSettled", "WalletCredited", "WalletDebited", "TransferSent", "TransferReceived",
    }  # fmt: skip
    await Market(redis, elsewhere).replay(events)
    seen = {}
    for region in ("us-east-2", "eu-west-1", FUNDING):
        original = seen[region] = await region_snapshot(redis, keys, region)
        rebuilt = await region_snapshot(redis, elsewhere, region)
        assert rebuilt == original
        assert snapshot_digest(rebuilt) == snapshot_digest(original)
        if region != FUNDING:
            assert {"geo", "fills", "seq", "arrival", "wallets"} <= set(original)
    us = set(seen["us-east-2"])
    assert {
        "node:n1",
        "node:n1:contracts",
        "client:bot:contracts",
        "bids",
        "ends",
        "hb",
        "ask-exp",
    } <= us
    assert await redis.pttl(elsewhere.bid("us-east-2", "b4")) > 0  # closed: retention again
    assert await redis.pttl(elsewhere.node("us-east-2", "n1")) == -1


async def test_a_replayed_market_carries_on(
    market: Market, redis: aioredis.Redis, elsewhere: Keys
) -> None:
    """After a rebuild the market continues where it was: same answers, same numbering."""
    await busy_market(market)
    rebuilt = Market(redis, elsewhere)
    await rebuilt.load_scripts()
    await rebuilt.replay(await market.read_events("us-east-2"))
    for m in (market, rebuilt):
        await fund(m, "z", now_ms=T0 + 70_000)
        c = await m.reserve(
            node_id="n3", client_id="z", user_id="u-z", ram_gb=1, vram_gb=0, duration_s=60,
            max_price_pusd=2_000_000, now_ms=T0 + 70_000,
        )  # fmt: skip
        assert c.price_pusd == 750_000
        with pytest.raises(CapacityTaken):
            await m.reserve(
                node_id="n3", client_id="z", user_id="u-z", ram_gb=64, vram_gb=0,
                duration_s=60, max_price_pusd=2_000_000, now_ms=T0 + 70_000,
            )  # fmt: skip
    original = await market.read_events("us-east-2")
    [funded, continued] = await rebuilt.read_events("us-east-2")
    assert (funded.event_id, continued.event_id) == (original[-2].event_id, original[-1].event_id)
    assert await rebuilt.quote("us-east-2", T0 + 70_000) == await market.quote(
        "us-east-2", T0 + 70_000
    )


async def test_digest_notices_any_difference(
    market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    await busy_market(market)
    before = snapshot_digest(await region_snapshot(redis, keys, "us-east-2"))
    await redis.hset(keys.node("us-east-2", "n3"), "name", "renamed")
    assert snapshot_digest(await region_snapshot(redis, keys, "us-east-2")) != before


def test_an_image_takes_only_its_region() -> None:
    image = RegionImage("us-east-2")
    with pytest.raises(ValueError, match="not of region"):
        image.apply(NodeDeactivated(event_id="eu:1", region="eu", ts_ms=T0, node_id="x"))
