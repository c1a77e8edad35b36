"""Concurrent takers: the atomic reserve never double-books (real Redis, real concurrency)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from engine.connection import open_redis
from engine.errors import CapacityTaken, Conflict, InvalidRequest, MarketError
from engine.keys import Keys
from engine.market import Market, ReserveRequest
from engine.types import Bid, Contract, Node
from tests.engine.conftest import fund

T0 = 1_700_000_000_000


async def _takers(redis_url: str, keys: Keys, count: int) -> list[Market]:
    """`count` markets, each with its own client: no connection or state is shared."""
    markets = []
    for _ in range(count):
        m = Market(open_redis(redis_url), keys)
        await m.load_scripts()
        markets.append(m)
    return markets


async def _close(markets: list[Market]) -> None:
    for m in markets:
        await m.redis.aclose()


async def test_fifty_takers_for_ten_leases(
    redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """50 concurrent takers, room for exactly 10: 10 contracts, 40 CapacityTaken, nothing left."""
    owner = Market(redis, keys)
    await owner.load_scripts()
    await owner.register_node(
        Node(node_id="n1", owner_id="alice", region="us-east-2", node_type="mist_node",
             name="n1", lat=40.7, lng=-73.9, total_ram_gb=40, total_vram_gb=10,
             offered_ram_gb=40, offered_vram_gb=10, price_pusd=800_000),
        T0,
    )  # fmt: skip
    markets = await _takers(redis_url, keys, 50)
    for i in range(50):
        await fund(owner, f"c{i}")
    start = asyncio.Event()

    async def taker(i: int, m: Market) -> Contract | MarketError:
        await start.wait()
        try:
            return await m.reserve(
                node_id="n1", client_id=f"c{i}", user_id=f"u{i}", ram_gb=4, vram_gb=1,
                duration_s=600, max_price_pusd=1_000_000, now_ms=T0 + 1,
            )  # fmt: skip
        except MarketError as exc:
            return exc

    try:
        tasks = [asyncio.create_task(taker(i, m)) for i, m in enumerate(markets)]
        await asyncio.sleep(0)
        start.set()
        results = await asyncio.gather(*tasks)
    finally:
        await _close(markets)

    won = [r for r in results if isinstance(r, Contract)]
    lost = [r for r in results if isinstance(r, MarketError)]
    assert len(won) == 10 and len(lost) == 40
    assert all(isinstance(e, CapacityTaken) and str(e) == "capacity taken (node_id)" for e in lost)
    assert len({c.contract_id for c in won}) == 10
    node = await owner.get_node("n1")
    assert node is not None
    assert (node.available_ram_gb, node.available_vram_gb) == (0, 0)
    assert (node.reserved_ram_gb, node.reserved_vram_gb) == (40, 10)
    assert sorted(c.contract_id for c in await owner.contracts(node_id="n1")) == sorted(
        c.contract_id for c in won
    )
    assert await redis.zscore(keys.asks("us-east-2"), "n1") is None
    events = await owner.read_events("us-east-2")
    # the registration, the 50 takers' funding, one event per contract, none for refusals
    assert len(events) == 61


async def test_concurrent_fills_never_overfill_a_split_bid(
    redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """Ten engines fill one split bid at once across nodes: filled + remaining == size, always."""
    owner = Market(redis, keys)
    await owner.load_scripts()
    for i in range(10):
        await owner.register_node(
            Node(node_id=f"n{i}", owner_id="o", region="eu", node_type="datacenter",
                 name=f"n{i}", lat=50.1, lng=8.7, total_ram_gb=8, total_vram_gb=0,
                 offered_ram_gb=8, offered_vram_gb=0, price_pusd=100),
            T0,
        )  # fmt: skip
    await fund(owner, "bot", "eu")
    await owner.place_bid(
        Bid(bid_id="b1", region="eu", client_id="bot", user_id="u", ram_gb=30, vram_gb=0,
            duration_s=60, max_price_pusd=100, allow_split=True, min_fill_gb=2),
        T0,
    )  # fmt: skip
    markets = await _takers(redis_url, keys, 10)

    async def engine(i: int, m: Market) -> list[Any]:
        out: list[Any] = []
        for size in (8, 5, 3, 2, 1):
            try:
                out.append(
                    await m.reserve(
                        node_id=f"n{i}",
                        client_id="bot",
                        user_id="u",
                        ram_gb=size,
                        vram_gb=0,
                        duration_s=60,
                        max_price_pusd=100,
                        now_ms=T0 + 1,
                        bid_id="b1",
                    )
                )
            except MarketError as exc:
                out.append(exc)
        return out

    try:
        batches = await asyncio.gather(*(engine(i, m) for i, m in enumerate(markets)))
    finally:
        await _close(markets)
    results = [r for batch in batches for r in batch]
    fills = [r for r in results if isinstance(r, Contract)]
    assert all(isinstance(r, (Conflict, CapacityTaken, InvalidRequest)) for r in results
               if not isinstance(r, Contract))  # fmt: skip
    bid = await owner.get_bid("b1")
    assert bid is not None
    assert sum(c.ram_gb for c in fills) == bid.filled_ram_gb <= 30
    assert bid.filled_ram_gb + bid.remaining_ram_gb == 30
    assert (bid.status == "filled") == (bid.remaining_ram_gb == 0)
    small = [c for c in fills if c.ram_gb < 2]  # below min_fill_gb: only as the whole rest
    assert len(small) <= 1 and (not small or bid.status == "filled")
    assert sorted(bid.contract_ids) == sorted(c.contract_id for c in fills)
    for node in await owner.nodes("eu"):
        held = await owner.contracts(node_id=node.node_id)
        assert node.reserved_ram_gb == sum(c.ram_gb for c in held) <= node.offered_ram_gb


async def test_pipelined_batches_race_too(
    redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """Five clients each pipelining 20 reserves for a node with room for 37: exactly 37 win."""
    owner = Market(redis, keys)
    await owner.load_scripts()
    await owner.register_node(
        Node(node_id="n1", owner_id="o", region="ap", node_type="edge_cluster", name="n1",
             lat=35.7, lng=139.7, total_ram_gb=37, total_vram_gb=0, offered_ram_gb=37,
             price_pusd=10),
        T0,
    )  # fmt: skip
    markets = await _takers(redis_url, keys, 5)
    await fund(owner, "c", "ap")
    req = ReserveRequest(node_id="n1", client_id="c", user_id="u", ram_gb=1, vram_gb=0,
                         duration_s=60, max_price_pusd=10)  # fmt: skip
    try:
        batches = await asyncio.gather(*(m.reserve_many([req] * 20, T0) for m in markets))
    finally:
        await _close(markets)
    outcomes = [r for batch in batches for r in batch]
    assert sum(isinstance(r, Contract) for r in outcomes) == 37
    assert sum(isinstance(r, CapacityTaken) for r in outcomes) == 63
    assert (await owner.get_node("n1")).available_ram_gb == 0
