"""The engine's QuoteBook, fed the region's events, says what Market.quote says (real Redis)."""

from __future__ import annotations

import random
import uuid

import msgspec
import redis.asyncio as aioredis

from engine.errors import MarketError
from engine.keys import Keys
from engine.market import Market
from engine.quotes import QuoteBook
from engine.types import Bid, Heartbeat, Node, NodeChanges

R = "quote-east"
T0 = 1_700_000_000_000


def _node(rng: random.Random, now: int) -> Node:
    ram, vram = rng.choice([(0, 8), (16, 0), (32, 8), (64, 24)])
    return Node(
        node_id=uuid.uuid4().hex,
        owner_id="o",
        region=R,
        node_type=rng.choice(["datacenter", "edge_cluster", "mist_node"]),
        name="n",
        lat=40.0,
        lng=-74.0,
        total_ram_gb=ram,
        total_vram_gb=vram,
        offered_ram_gb=ram,
        offered_vram_gb=vram,
        price_pusd=rng.choice([500, 600, 600, 700, 800]),
        ask_expires_ms=rng.choice([0, 0, now + rng.randrange(1_000, 60_000)]),
        heartbeat_interval_s=3600.0,
    )


def _bid(rng: random.Random, now: int) -> Bid:
    return Bid(
        bid_id=uuid.uuid4().hex,
        region=R,
        client_id="c",
        user_id="u",
        ram_gb=rng.randint(0, 20),
        vram_gb=rng.randint(1, 6),
        duration_s=rng.choice([60, 600, 3600]),
        max_price_pusd=rng.choice([400, 550, 650, 750, 900]),
        allow_split=rng.random() < 0.5,
        min_fill_gb=rng.choice([0, 4]),
        expires_ms=rng.choice([0, 0, now + rng.randrange(1_000, 60_000)]),
    )


async def test_quote_book_matches_market_quote(redis: aioredis.Redis, keys: Keys) -> None:
    """After every change (register, update, heartbeat, bid, fill, split fill, settle, cancel,
    deactivate) and as time passes (ask and bid expiry, the 24 h window), the QuoteBook fed the
    region's events equals Market.quote."""
    market = Market(redis, keys)
    await market.load_scripts()
    rng = random.Random(random.getrandbits(32))
    book = QuoteBook(R)
    seen = 0
    now = T0
    nodes: list[Node] = []
    bids: list[Bid] = []
    contracts: list[str] = []

    async def check(at: int) -> None:
        nonlocal seen
        events = await market.read_events(R)
        for event in events[seen:]:
            book.apply(event)
        seen = len(events)
        expected = await market.quote(R, at)
        got = book.quote(at)
        assert msgspec.to_builtins(got) == msgspec.to_builtins(expected)

    for _step in range(120):
        now += rng.randrange(0, 4_000)
        op = rng.random()
        try:
            if op < 0.2 or not nodes:
                nodes.append(await market.register_node(_node(rng, now), now))
            elif op < 0.4:
                bids.append(await market.place_bid(_bid(rng, now), now))
            elif op < 0.6 and bids:
                b = rng.choice(bids)
                n = rng.choice(nodes)
                ram = min(b.ram_gb, rng.randint(0, b.ram_gb))
                vram = max(1, min(b.vram_gb, rng.randint(0, b.vram_gb)))
                c = await market.reserve(
                    node_id=n.node_id,
                    client_id="c",
                    user_id="u",
                    ram_gb=ram,
                    vram_gb=vram,
                    duration_s=b.duration_s,
                    max_price_pusd=b.max_price_pusd,
                    now_ms=now,
                    bid_id=b.bid_id if rng.random() < 0.7 else None,
                )
                contracts.append(c.contract_id)
            elif op < 0.7 and contracts:
                await market.settle(contracts.pop(rng.randrange(len(contracts))), 0.5, now)
            elif op < 0.8:
                n = rng.choice(nodes)
                beat = Heartbeat(
                    node_id=n.node_id,
                    available_ram_gb=rng.randint(0, n.total_ram_gb),
                    available_vram_gb=rng.randint(0, n.total_vram_gb),
                )
                await market.heartbeat("o", [beat], now, min_interval_ms=0)
            elif op < 0.87 and bids:
                await market.cancel_bid(rng.choice(bids).bid_id, now)
            elif op < 0.93:
                n = rng.choice(nodes)
                await market.update_node(
                    n.node_id,
                    NodeChanges(
                        price_pusd=rng.choice([450, 650, 850]),
                        ask_expires_ms=rng.choice([0, now + 5_000]),
                    ),
                    now,
                )
            elif op < 0.96:
                await market.deactivate_node(rng.choice(nodes).node_id, now)
            else:
                await market.expire_bids(R, now)
                await market.expire_asks(R, now)
        except MarketError:
            pass  # refusals are part of the mix; they change nothing
        await check(now)
        if rng.random() < 0.2:
            now += rng.randrange(1, 30_000)  # time passing alone (it never goes back)
            await check(now)
    await check(now + 86_400_000 + 60_000)  # every fill has left the 24 h window


async def test_summary_counts_active_nodes_and_listed_capacity() -> None:
    """The market summary: active nodes, free capacity of listed asks, cheapest listed ask."""
    book = QuoteBook(R)

    def node(price: int, ram: int, vram: int, **kw: object) -> Node:
        return Node(
            node_id=uuid.uuid4().hex,
            owner_id="o",
            region=R,
            node_type="datacenter",
            name="n",
            lat=0.0,
            lng=0.0,
            total_ram_gb=ram,
            total_vram_gb=vram,
            offered_ram_gb=ram,
            offered_vram_gb=vram,
            price_pusd=price,
            **kw,  # type: ignore[arg-type]
        )

    book.upsert_node(node(700, 10, 2))
    book.upsert_node(node(600, 4, 0, ask_expires_ms=T0 + 1000))
    full = node(500, 8, 0, reserved_ram_gb=8)
    book.upsert_node(full)
    book.upsert_node(node(400, 8, 0, status="maintenance"))
    assert book.summary(T0) == {
        "region": R,
        "nodes": 3,
        "available_ram_gb": 14,
        "available_vram_gb": 2,
        "best_ask_pusd": 600,
    }
    assert book.summary(T0 + 1000)["best_ask_pusd"] == 700  # the 600 ask expired
    assert book.set_reserved(full.node_id, 2, 0)  # capacity freed: a bid may now fill
    assert book.summary(T0 + 1000)["best_ask_pusd"] == 500
    assert not book.set_reserved(full.node_id, 5, 0)


def test_take_improved_bounds_the_asks_that_got_better() -> None:
    """Only asks that got better since the last call are reported, as bounds; worse ones not."""
    book = QuoteBook(R)
    a = Node(
        node_id="a",
        owner_id="o",
        region=R,
        node_type="datacenter",
        name="a",
        lat=0.0,
        lng=0.0,
        total_ram_gb=64,
        total_vram_gb=8,
        offered_ram_gb=16,
        offered_vram_gb=8,
        price_pusd=700,
    )
    assert book.upsert_node(a)
    assert book.take_improved(T0) == (700, 16, 8, 24)
    assert book.take_improved(T0) is None
    assert not book.set_reserved("a", 4, 0)  # less free: not better
    assert book.take_improved(T0) is None
    assert book.set_reserved("a", 0, 0)
    assert book.set_status("a", "offline") is False
    assert book.take_improved(T0) is None  # no longer listed
