"""MarketView against a real Redis: snapshot, tail, new regions, gaps, ranking across regions.

Every change is made through `engine.market.Market` (the scripts write the events the view
reads); every wait is bounded (`view.sync()` or a short poll).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine.keys import Keys
from engine.market import Market
from engine.scoring import MatchRequest, rank_reference
from engine.types import Heartbeat, Node, NodeChanges
from engine.view import MarketView
from tests.engine.conftest import fund

T0 = 1_700_000_000_000
EAST, WEST = "view-east", "view-west"


def new_node(region: str, **kw: Any) -> Node:
    base: dict[str, Any] = dict(
        node_id=uuid.uuid4().hex,
        owner_id="owner-1",
        region=region,
        node_type="edge_cluster",
        name="edge",
        lat=40.7,
        lng=-74.0,
        total_ram_gb=64,
        total_vram_gb=24,
        offered_ram_gb=64,
        offered_vram_gb=24,
        price_pusd=1_000_000,
    )
    base.update(kw)
    return Node(**base)


@pytest.fixture
async def market(redis: aioredis.Redis, keys: Keys) -> Market:
    m = Market(redis, keys)
    await m.load_scripts()
    for region in (EAST, WEST):
        await fund(m, "client-1", region)
    return m


@pytest.fixture
async def view(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[MarketView]:
    v = MarketView(redis, keys, block_ms=200, regions_poll_s=0.05)
    try:
        yield v
    finally:
        await v.stop()


async def assert_view_equals_redis(view: MarketView, market: Market, node_ids: list[str]) -> None:
    """Every node as the view's book holds it equals the node hash in Redis."""
    for node_id in node_ids:
        stored = await market.get_node(node_id)
        assert stored is not None
        book = view.book(stored.region)
        assert book is not None
        assert book.node(node_id) == stored


async def test_snapshot_then_tail_follows_every_kind_of_change(
    view: MarketView, market: Market
) -> None:
    """Nodes present at start come from the snapshot; registration, terms, heartbeats, reserves,
    settlements, deactivation and going offline afterwards come from the stream."""
    a = await market.register_node(new_node(EAST, price_pusd=900_000), T0)
    b = await market.register_node(new_node(WEST, lat=37.7, lng=-122.4), T0)
    await view.start()
    assert view.regions() == [EAST, WEST]
    await assert_view_equals_redis(view, market, [a.node_id, b.node_id])

    now = T0 + 1000
    c = await market.register_node(new_node(EAST, node_type="mist_node", name="mist"), now)
    await market.update_node(a.node_id, NodeChanges(price_pusd=800_000, max_duration_s=7200), now)
    await market.heartbeat(
        "owner-1",
        [
            Heartbeat(
                node_id=a.node_id, available_ram_gb=40, available_vram_gb=20, lat=40.8, lng=-73.9
            ),
            Heartbeat(
                node_id=b.node_id, available_ram_gb=10, available_vram_gb=0, bandwidth_mbps=400
            ),
        ],
        now,
        min_interval_ms=0,
    )
    contract = await market.reserve(
        node_id=a.node_id,
        client_id="client-1",
        user_id="user-1",
        ram_gb=16,
        vram_gb=8,
        duration_s=600,
        max_price_pusd=1_000_000,
        now_ms=now,
    )
    await market.reserve(
        node_id=c.node_id,
        client_id="client-1",
        user_id="user-1",
        ram_gb=64,
        vram_gb=0,
        duration_s=600,
        max_price_pusd=1_000_000,
        now_ms=now,
    )
    await view.sync()
    await assert_view_equals_redis(view, market, [a.node_id, b.node_id, c.node_id])
    east = view.book(EAST)
    assert east is not None
    node_a = east.node(a.node_id)
    assert node_a is not None and (node_a.available_ram_gb, node_a.available_vram_gb) == (24, 12)

    await market.settle(contract.contract_id, 0.0, now + 60_000)
    await market.deactivate_node(c.node_id, now + 60_000)
    late = T0 + 10 * 60 * 60_000  # far past b's heartbeat deadline
    await market.mark_offline(b.node_id, late)
    await view.sync()
    await assert_view_equals_redis(view, market, [a.node_id, b.node_id, c.node_id])

    # ranking reads the books: the offline and deactivated nodes are out, a is back to 40/20 free
    req = MatchRequest(ram_gb=8, vram_gb=0, max_price_pusd=2_000_000, lat=40.7, lng=-74.0)
    got = view.rank_all(req, late)
    assert [m.node_id for m in got] == [a.node_id]
    assert (got[0].available_ram_gb, got[0].available_vram_gb) == (40, 20)
    everything = await market.nodes()
    assert got == rank_reference(everything, req, late)


async def test_new_region_is_discovered_by_the_tail(view: MarketView, market: Market) -> None:
    """A region whose first node registers after start appears without any call to sync()."""
    await market.register_node(new_node(EAST), T0)
    await view.start()
    fresh = await market.register_node(new_node("view-north", lat=60.0, lng=10.0), T0 + 1)
    deadline = time.monotonic() + 5.0
    while view.book("view-north") is None or fresh.node_id not in view.book("view-north"):  # type: ignore[operator]
        assert time.monotonic() < deadline, "new region not discovered within 5 s"
        await asyncio.sleep(0.01)
    req = MatchRequest(ram_gb=1, vram_gb=0, max_price_pusd=2_000_000, region="view-north")
    assert [m.node_id for m in view.rank_all(req, T0 + 2)] == [fresh.node_id]


async def test_events_trimmed_before_read_trigger_a_resnapshot(
    view: MarketView, market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    """If entries vanish before the view read them (stream trimmed while it was away), the
    sequence gap is noticed and the region re-read: the book still ends equal to Redis."""
    a = await market.register_node(new_node(EAST), T0)
    await view.start()
    await view.stop()
    snapshots = view.snapshots
    b = await market.register_node(new_node(EAST, name="b"), T0 + 1)
    await market.update_node(a.node_id, NodeChanges(price_pusd=700_000), T0 + 2)
    await market.heartbeat(
        "owner-1",
        [Heartbeat(node_id=b.node_id, available_ram_gb=5, available_vram_gb=5)],
        T0 + 3,
        min_interval_ms=0,
    )
    await redis.xtrim(keys.events(EAST), maxlen=1, approximate=False)
    await view.start()
    await view.sync()
    assert view.snapshots > snapshots
    await assert_view_equals_redis(view, market, [a.node_id, b.node_id])


async def test_rank_all_merges_regions_and_respects_region_filter(
    view: MarketView, market: Market
) -> None:
    """Across regions the best matches win whatever their region; `region` narrows to one."""
    cheap_west = await market.register_node(new_node(WEST, price_pusd=100_000), T0)
    east = [
        await market.register_node(new_node(EAST, price_pusd=p), T0) for p in (300_000, 200_000)
    ]
    await view.start()
    req = MatchRequest(ram_gb=4, vram_gb=0, max_price_pusd=1_000_000, limit=2)
    assert [m.node_id for m in view.rank_all(req, T0)] == [cheap_west.node_id, east[1].node_id]
    only_east = MatchRequest(ram_gb=4, vram_gb=0, max_price_pusd=1_000_000, region=EAST)
    assert [m.node_id for m in view.rank_all(only_east, T0)] == [east[1].node_id, east[0].node_id]
    assert (
        view.rank_all(MatchRequest(ram_gb=4, vram_gb=0, max_price_pusd=1, region="nowhere"), T0)
        == []
    )


async def test_a_region_rebuilt_under_the_view_is_read_again(
    view: MarketView, market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    """The region's keys wiped and written anew (sequence restarting at 1): the view notices the
    sequence going backwards and re-reads the region instead of ignoring the new events."""
    old = await market.register_node(new_node(EAST), T0)
    await market.register_node(new_node(EAST, name="second"), T0)
    await view.start()
    async for key in redis.scan_iter(match=f"{keys.tag(EAST)}*"):
        await redis.delete(key)
    fresh = await market.register_node(new_node(EAST, name="fresh"), T0 + 5)
    await view.sync()
    book = view.book(EAST)
    assert book is not None
    assert book.node_ids() == [fresh.node_id] and old.node_id not in book
    await assert_view_equals_redis(view, market, [fresh.node_id])


async def test_changes_during_the_snapshot_converge(
    market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    """Writes racing with the snapshot (read in small chunks) end up in the books exactly."""
    nodes = [await market.register_node(new_node(EAST, name=f"n{i}"), T0) for i in range(300)]
    view = MarketView(redis, keys, block_ms=200, regions_poll_s=0.05, snapshot_chunk=7)
    try:
        starting = asyncio.create_task(view.start())
        now = T0
        while not starting.done() or now < T0 + 40:
            now += 1
            target = nodes[now % len(nodes)]
            if now % 2:
                await market.update_node(
                    target.node_id, NodeChanges(price_pusd=500_000 + now % 997), now
                )
            else:
                beat = Heartbeat(
                    node_id=target.node_id, available_ram_gb=now % 60, available_vram_gb=now % 20
                )
                await market.heartbeat("owner-1", [beat], now, min_interval_ms=0)
        await starting
        await view.sync()
        await assert_view_equals_redis(view, market, [n.node_id for n in nodes])
    finally:
        await view.stop()
