"""The engine process against a real Redis: crossing, expiry, settlement, failover, quotes,
notifications and the per-region lease. Market time comes from an injected clock; every wait is
bounded (a message on a channel, or a state reached, within a few seconds).

The crossing rules themselves are tested without Redis in test_book.py (engine/book.py); the
crossing tests here are integration tests of their adapter, `RegionWorker`: the same rules end to
end through the stream, the scripts and the notifications."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine import process
from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.process import Engine, run_engine
from engine.settings import Settings
from engine.types import Bid, Contract, Heartbeat, Node
from tests.conftest import node_client
from tests.engine.conftest import fund

R = "test-east"
T0 = 1_700_000_000_000
WAIT_S = 10.0


class FakeClock:
    """Market time the test moves by hand."""

    def __init__(self, now_ms: int = T0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> int:
        self.now_ms += ms
        return self.now_ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def market(redis: aioredis.Redis, keys: Keys) -> Market:
    m = Market(redis, keys)
    await m.load_scripts()
    for region in (R, "test-west"):
        await fund(m, "client-1", region)
    return m


class Inbox:
    """Messages received on some pub/sub channels, decoded, with bounded waits."""

    def __init__(self, pubsub: Any) -> None:
        self.pubsub = pubsub
        self.messages: list[tuple[str, dict[str, Any], float]] = []

    async def pump(self) -> None:
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and msg["type"] in ("message", "pmessage"):
                channel = msg["channel"].decode()
                self.messages.append((channel, json.loads(msg["data"]), time.monotonic()))

    async def wait_for(
        self, predicate: Callable[[str, dict[str, Any]], bool], within_s: float = WAIT_S
    ) -> dict[str, Any]:
        """The first message (seen so far or arriving) for which `predicate(channel, msg)`."""
        deadline = time.monotonic() + within_s
        while True:
            for channel, msg, _ in self.messages:
                if predicate(channel, msg):
                    return msg
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no matching message within {within_s}s; got {[m for _, m, _ in self.messages]}"
                )
            await asyncio.sleep(0.01)

    def on(self, channel: str) -> list[dict[str, Any]]:
        return [m for ch, m, _ in self.messages if ch == channel]


@pytest.fixture
async def inbox(redis_url: str, keys: Keys) -> AsyncIterator[Inbox]:
    client = node_client(redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{keys.prefix}*")
    box = Inbox(pubsub)
    pump = asyncio.create_task(box.pump())
    try:
        yield box
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()


async def eventually(check: Callable[[], Awaitable[Any]], within_s: float = WAIT_S) -> Any:
    """Poll `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + within_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {within_s}s (last: {result!r})")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running_engine(
    redis: aioredis.Redis, keys: Keys, clock: FakeClock, regions: list[str] | None = None
) -> AsyncIterator[Engine]:
    """An Engine serving `regions` (all regions when None), stopped and awaited on exit."""
    stop = asyncio.Event()
    engine = Engine(redis, keys, regions=regions or None, clock=clock)
    task = asyncio.create_task(engine.run(stop))
    try:
        if regions:
            await eventually(
                lambda: _true(
                    all(r in engine.workers and engine.workers[r].serving for r in regions)
                )
            )
        yield engine
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


async def _true(value: bool) -> bool:
    return value


def node(region: str = R, *, ram: int = 64, vram: int = 0, price: int = 700, **kw: Any) -> Node:
    fields: dict[str, Any] = dict(
        node_id=uuid.uuid4().hex,
        owner_id="owner-1",
        region=region,
        node_type="datacenter",
        name="n",
        lat=40.7,
        lng=-74.0,
        total_ram_gb=ram,
        total_vram_gb=vram,
        offered_ram_gb=ram,
        offered_vram_gb=vram,
        price_pusd=price,
        heartbeat_interval_s=60.0,
    )
    fields.update(kw)
    return Node(**fields)


def bid(region: str = R, *, ram: int = 16, vram: int = 0, cap: int = 1000, **kw: Any) -> Bid:
    fields: dict[str, Any] = dict(
        bid_id=uuid.uuid4().hex,
        region=region,
        client_id="client-1",
        user_id="user-1",
        ram_gb=ram,
        vram_gb=vram,
        duration_s=3600,
        max_price_pusd=cap,
    )
    fields.update(kw)
    return Bid(**fields)


def ws(channel: str) -> Callable[[str, dict[str, Any]], bool]:
    return lambda _ch, msg: msg["channel"] == channel


# ---------------------------------------------------------------------------------------------


async def test_resting_bid_fills_when_capacity_registers(
    redis: aioredis.Redis,
    redis_url: str,
    keys: Keys,
    market: Market,
    inbox: Inbox,
    clock: FakeClock,
) -> None:
    """A bid rests while nothing crosses; a provider's new node fills it at the ask's price, and
    the renter, the node and the trades channel hear of it."""
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix, jwt_secret="x" * 32)
    stop = asyncio.Event()
    task = asyncio.create_task(run_engine(settings, regions=[R], stop=stop, clock=clock))
    try:
        # serving: it publishes the region's market summary once it holds the region
        await inbox.wait_for(lambda ch, m: ch == keys.market_channel and m["data"]["region"] == R)
        b = await market.place_bid(bid(ram=16, cap=900), clock())
        user = keys.user_channel("user-1")
        # the engine saw the bid (it announced it) and left it resting: nothing crosses yet
        await inbox.wait_for(
            lambda ch, m: (
                ch == user
                and m["channel"] == "bids"
                and m["data"].get("bid", {}).get("bid_id") == b.bid_id
            )
        )
        too_expensive = await market.register_node(node(ram=64, price=950), clock())
        await inbox.wait_for(
            lambda ch, m: ch == keys.market_channel and m["data"]["best_ask_pusd"] == 950
        )
        assert (await market.get_bid(b.bid_id)).status == "open"  # type: ignore[union-attr]
        cheap = await market.register_node(node(ram=64, price=700), clock())
        fill = await inbox.wait_for(
            lambda ch, m: ch == user and m["channel"] == "fills" and m["data"]["bid_id"] == b.bid_id
        )
        contract = fill["data"]  # the contract itself (the gateway maps it to REST's shape)
        assert contract["node_id"] == cheap.node_id
        assert contract["price_pusd"] == 700  # the ask's price, not the bid's cap
        assert contract["ram_gb"] == 16 and contract["duration_s"] == 3600
        note = await inbox.wait_for(
            lambda ch, m: (
                ch == user and m["channel"] == "bids" and m["data"]["notice"] == "bid_filled"
            )
        )
        assert note["data"]["bid"]["status"] == "filled"
        assert note["data"]["contract"]["contract_id"] == contract["contract_id"]
        stored = await market.get_bid(b.bid_id)
        assert stored is not None and stored.status == "filled"
        assert stored.filled_ram_gb == 16 and stored.contract_ids == [contract["contract_id"]]
        started = await inbox.wait_for(ws(f"node:{cheap.node_id}"))
        assert started["data"]["notice"] == "contract_started"
        trade = await inbox.wait_for(ws(f"trades:{R}"))
        assert trade["data"]["contract_id"] == contract["contract_id"]
        assert trade["data"]["price_pusd"] == 700
        assert not inbox.on(keys.node_channel(too_expensive.node_id))
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


async def test_best_priced_bid_fills_first(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """When capacity for one bid appears, the highest-priced resting bid gets it (price-time
    priority), and the rest keep resting."""
    low = await market.place_bid(bid(ram=32, cap=800), clock())
    high = await market.place_bid(bid(ram=32, cap=1000), clock())
    late_high = await market.place_bid(bid(ram=32, cap=1000, user_id="user-2"), clock())
    async with running_engine(redis, keys, clock, [R]):
        n = await market.register_node(node(ram=32, price=600), clock())
        c = await inbox.wait_for(lambda _ch, m: m["channel"] == "fills")
        assert c["data"]["bid_id"] == high.bid_id  # best price; same as late_high but earlier
        assert c["data"]["node_id"] == n.node_id
        open_ids = {x.bid_id for x in await market.bids(R)}
        assert open_ids == {low.bid_id, late_high.bid_id}


async def test_split_bid_fills_across_nodes_respecting_min_fill(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """With allow_split a bid fills across several nodes, never in a piece below min_fill_gb,
    and filled + remaining == original at every step; the rest fills when more capacity comes."""
    small = await market.register_node(node(ram=10, price=500), clock())
    a = await market.register_node(node(ram=30, price=600), clock())
    b_node = await market.register_node(node(ram=50, price=650), clock())
    async with running_engine(redis, keys, clock, [R]) as engine:
        b = await market.place_bid(
            bid(ram=100, cap=1000, allow_split=True, min_fill_gb=20), clock()
        )

        async def filled_80() -> Bid | None:
            got = await market.get_bid(b.bid_id)
            return got if got is not None and got.filled_ram_gb == 80 else None

        got = await eventually(filled_80)
        assert got.status == "open" and got.remaining_ram_gb == 20
        contracts = [await market.get_contract(cid) for cid in got.contract_ids]
        assert sorted((c.node_id, c.ram_gb) for c in contracts if c) == sorted(
            [(a.node_id, 30), (b_node.node_id, 50)]
        )
        assert not await market.contracts(node_id=small.node_id)  # 10 GB < min_fill_gb
        more = await market.register_node(node(ram=40, price=700), clock())

        async def done() -> Bid | None:
            got = await market.get_bid(b.bid_id)
            return got if got is not None and got.status == "filled" else None

        final = await eventually(done)
        assert final.filled_ram_gb == 100 and final.remaining_ram_gb == 0
        last = await market.get_contract(final.contract_ids[-1])
        assert last is not None and last.node_id == more.node_id and last.ram_gb == 20
        assert engine.workers[R].fills == 3
        user = keys.user_channel("user-1")
        await inbox.wait_for(
            lambda ch, m: (
                ch == user
                and m["channel"] == "bids"
                and m["data"]["notice"] == "bid_filled"
                and m["data"]["bid"]["status"] == "filled"
            )
        )
        # counted once the last notice is in (on a cluster they arrive over the bus)
        fills = [m for m in inbox.on(user) if m["channel"] == "fills"]
        assert len(fills) >= 2


async def test_bids_expire_and_the_bidder_is_told(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """An open bid past its expires_ms leaves the book and the bidder gets a bid_expired."""
    b = await market.place_bid(bid(ram=8, expires_ms=T0 + 5_000), clock())
    keep = await market.place_bid(bid(ram=8), clock())
    async with running_engine(redis, keys, clock, [R]):
        clock.advance(4_000)
        await asyncio.sleep(3 * process.TICK_S)
        assert (await market.get_bid(b.bid_id)).status == "open"  # type: ignore[union-attr]
        clock.advance(1_000)
        msg = await inbox.wait_for(
            lambda _ch, m: m["channel"] == "bids" and m["data"]["notice"] == "bid_expired"
        )
        assert msg["data"]["bid"]["bid_id"] == b.bid_id
        assert msg["data"]["bid"]["status"] == "expired"
        assert (await market.get_bid(b.bid_id)).status == "expired"  # type: ignore[union-attr]
        assert [x.bid_id for x in await market.bids(R)] == [keep.bid_id]


async def _contract_on(
    market: Market, n: Node, clock: FakeClock, *, ram: int, duration_s: int, cap: int = 1000
) -> Contract:
    return await market.reserve(
        node_id=n.node_id,
        client_id="client-1",
        user_id="user-1",
        ram_gb=ram,
        vram_gb=0,
        duration_s=duration_s,
        max_price_pusd=cap,
        now_ms=clock(),
    )


async def test_contracts_past_their_end_settle_with_ending_notice_first(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """A contract gets a contract_ending notice >= 60 s before its end, then settles by itself
    (completed, full term billed, capacity back), and renter and node are told."""
    n = await market.register_node(node(ram=64, price=700, heartbeat_interval_s=3600.0), clock())
    async with running_engine(redis, keys, clock, [R]):
        c = await _contract_on(market, n, clock, ram=16, duration_s=600)
        node_ch = keys.node_channel(n.node_id)
        await inbox.wait_for(
            lambda ch, m: ch == node_ch and m["data"]["notice"] == "contract_started"
        )
        # 100 s before the end: the ending notice is out, at least 60 s ahead
        clock.now_ms = c.end_ms - 100_000
        await asyncio.sleep(3 * process.TICK_S)
        assert not [m for m in inbox.on(node_ch) if m["data"]["notice"] == "contract_ending"]
        clock.now_ms = c.end_ms - 64_000
        ending = await inbox.wait_for(
            lambda ch, m: ch == node_ch and m["data"]["notice"] == "contract_ending"
        )
        assert ending["data"]["contract"]["contract_id"] == c.contract_id
        assert (await market.get_contract(c.contract_id)).status == "active"  # type: ignore[union-attr]
        clock.now_ms = c.end_ms + 1_500
        ended = await inbox.wait_for(
            lambda ch, m: ch == node_ch and m["data"]["notice"] == "contract_ended"
        )
        assert ended["data"]["contract"]["status"] == "completed"
        settled = await market.get_contract(c.contract_id)
        assert settled is not None and settled.status == "completed"
        assert settled.used_s == 600 and settled.cost_pusd == 16 * 600 * 700
        assert (await market.get_node(n.node_id)).reserved_ram_gb == 0  # type: ignore[union-attr]
        renter = await inbox.wait_for(
            lambda ch, m: ch == keys.user_channel("user-1") and m["channel"] == "contracts"
        )
        assert renter["data"]["notice"] == "contract_ended"
        assert renter["data"]["contract"]["status"] == "completed"


async def test_silent_node_goes_offline_and_its_contract_fails_over(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """A node that misses 3 heartbeat intervals goes offline; its contract moves to the best
    other node within the price cap, for the remaining time; renter and both nodes are told."""
    dead = await market.register_node(node(ram=32, price=700), clock())
    pricey = await market.register_node(node(ram=64, price=1500), clock())
    spare = await market.register_node(node(ram=64, price=800, lat=40.8, lng=-74.1), clock())
    c = await _contract_on(market, dead, clock, ram=16, duration_s=3600, cap=1000)
    async with running_engine(redis, keys, clock, [R]):
        t1 = T0 + 3 * 60_000 + 1_000  # past the dead node's deadline (registration + 3 x 60 s)
        beats = [
            Heartbeat(node_id=x.node_id, available_ram_gb=64, available_vram_gb=0)
            for x in (pricey, spare)
        ]
        outcomes = await market.heartbeat("owner-1", beats, t1 - 500, min_interval_ms=0)
        assert {o.outcome for o in outcomes} == {"ok"}
        clock.now_ms = t1
        notice = await inbox.wait_for(
            lambda ch, m: (
                ch == keys.user_channel("user-1")
                and m["data"].get("notice") == "contract_failed_over"
            )
        )
        assert notice["data"]["contract"]["contract_id"] == c.contract_id
        started = await inbox.wait_for(
            lambda ch, m: (
                ch == keys.user_channel("user-1") and m["data"].get("notice") == "contract_started"
            )
        )
        successor = started["data"]["contract"]
        assert notice["data"]["contract"]["successor_id"] == successor["contract_id"]
        assert successor["node_id"] == spare.node_id
        assert successor["predecessor_id"] == c.contract_id
        assert successor["price_pusd"] == 800 and successor["ram_gb"] == 16
        assert successor["duration_s"] == 3600 - 181  # what was not yet billed
        old = await market.get_contract(c.contract_id)
        assert old is not None and old.status == "failed_over" and old.used_s == 181
        assert old.cost_pusd == 16 * 181 * 700
        assert (await market.get_node(dead.node_id)).status == "offline"  # type: ignore[union-attr]
        await inbox.wait_for(
            lambda ch, m: (
                ch == keys.node_channel(dead.node_id)
                and m["data"]["notice"] == "contract_failed_over"
            )
        )
        await inbox.wait_for(
            lambda ch, m: (
                ch == keys.node_channel(spare.node_id) and m["data"]["notice"] == "contract_started"
            )
        )
        assert not inbox.on(keys.node_channel(pricey.node_id))


async def test_silent_node_without_alternative_fails_its_contract_pro_rated(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """With no other node able to take it, the contract fails and only the time served is billed."""
    dead = await market.register_node(node(ram=32, price=700), clock())
    small = await market.register_node(node(ram=8, price=500), clock())
    c = await _contract_on(market, dead, clock, ram=16, duration_s=3600)
    async with running_engine(redis, keys, clock, [R]):
        t1 = T0 + 3 * 60_000 + 2_000
        await market.heartbeat(
            "owner-1",
            [Heartbeat(node_id=small.node_id, available_ram_gb=8, available_vram_gb=0)],
            t1 - 1,
            0,
        )
        clock.now_ms = t1
        settled = await inbox.wait_for(
            lambda ch, m: (
                ch == keys.user_channel("user-1") and m["data"].get("notice") == "contract_ended"
            )
        )
        assert settled["data"]["contract"]["status"] == "failed"
        failed = await market.get_contract(c.contract_id)
        assert failed is not None and failed.status == "failed"
        assert failed.used_s == 182 and failed.cost_pusd == 16 * 182 * 700
        ended = await inbox.wait_for(lambda ch, m: ch == keys.node_channel(dead.node_id))
        assert ended["data"]["notice"] == "contract_ended"


async def test_quotes_published_on_change_at_most_ten_a_second(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """Quotes reflect the book (best ask/bid, depth, last fill, volume), come at most 10 per
    second however fast the book changes, and stop when nothing changes."""
    await market.register_node(node(ram=100, price=900), clock())
    async with running_engine(redis, keys, clock, [R]):
        channel = keys.quotes_channel(R)
        start = time.monotonic()
        placed = 0
        while time.monotonic() - start < 2.0:
            await market.place_bid(bid(ram=1000, cap=100 + placed), clock())  # never crosses
            placed += 1
        q = await inbox.wait_for(
            lambda ch, m: ch == channel and m["data"]["best_bid_pusd"] == 100 + placed - 1
        )
        # received since the changes began, over the time since then (a quote published just
        # before `start` and delivered late is the +2's business)
        stamps = [t for ch, _, t in inbox.messages if ch == channel and t >= start]
        assert placed > 50
        assert 2 <= len(stamps) <= 10 * (stamps[-1] - start) + 2
        last = q["data"]
        assert last["best_ask_pusd"] == 900 and last["ask_depth"] == [[900, 100]]
        assert last["bid_depth"][0] == [100 + placed - 1, 1000]
        assert last["last_fill_pusd"] is None and last["volume_24h_gb_s"] == 0
        # a fill shows up as last fill price and volume
        await market.place_bid(bid(ram=10, cap=950, duration_s=60), clock())
        q = await inbox.wait_for(lambda ch, m: ch == channel and m["data"]["last_fill_pusd"] == 900)
        assert q["data"]["volume_24h_gb_s"] == 10 * 60
        # quiet book: no more quotes
        await asyncio.sleep(0.5)
        count = len(inbox.on(channel))
        await asyncio.sleep(1.5)
        assert len(inbox.on(channel)) == count


async def test_two_engines_never_serve_one_region_at_once(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """The region lease: one of two engines serves the region; when it stops, the other takes
    over and crosses."""
    await market.register_node(node(ram=1000, price=500), clock())
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    a = Engine(redis, keys, regions=[R], clock=clock)
    b = Engine(redis, keys, regions=[R], clock=clock)
    task_a = asyncio.create_task(a.run(stop_a))
    try:
        await eventually(lambda: _true(R in a.workers and a.workers[R].serving))
        task_b = asyncio.create_task(b.run(stop_b))
        try:
            await eventually(lambda: _true(R in b.workers))
            for _ in range(10):
                await market.place_bid(bid(ram=10), clock())
            await eventually(lambda: _true(a.workers[R].fills == 10))
            await asyncio.sleep(2 * process.LEASE_RETRY_S)
            assert not b.workers[R].serving and b.workers[R].fills == 0
            stop_a.set()
            await asyncio.wait_for(task_a, WAIT_S)
            await eventually(lambda: _true(b.workers[R].serving))
            late = await market.place_bid(bid(ram=10), clock())
            await inbox.wait_for(
                lambda _ch, m: m["channel"] == "fills" and m["data"]["bid_id"] == late.bid_id
            )
            assert b.workers[R].fills == 1 and a.workers[R].fills == 10
            # the new holder's quotes carry the fills made under the old one
            await inbox.wait_for(
                lambda ch, m: (
                    ch == keys.quotes_channel(R) and m["data"]["volume_24h_gb_s"] == 11 * 10 * 3600
                )
            )
        finally:
            stop_b.set()
            await asyncio.wait_for(task_b, WAIT_S)
    finally:
        stop_a.set()
        await asyncio.wait_for(task_a, WAIT_S)


async def test_engines_spread_the_regions_and_take_over_when_one_stops(
    redis: aioredis.Redis, keys: Keys, market: Market, clock: FakeClock
) -> None:
    """Two engines share four regions two and two (the first lets go of what the second may
    take); when one stops, the other serves all four."""
    regions = ["r1", "r2", "r3", "r4"]
    for region in regions:
        await market.register_node(node(region), clock())

    def serving(engine: Engine) -> set[str]:
        return {r for r, w in engine.workers.items() if w.serving}

    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    a = Engine(redis, keys, regions=regions, clock=clock)
    b = Engine(redis, keys, regions=regions, clock=clock)
    task_a = asyncio.create_task(a.run(stop_a))
    task_b: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: _true(serving(a) == set(regions)))
        task_b = asyncio.create_task(b.run(stop_b))
        await eventually(
            lambda: _true(len(serving(a)) == 2 and serving(a) | serving(b) == set(regions)),
            within_s=30,
        )
        assert not serving(a) & serving(b)
        stop_a.set()
        await asyncio.wait_for(task_a, WAIT_S)
        await eventually(lambda: _true(serving(b) == set(regions)), within_s=30)
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.wait_for(task_a, WAIT_S)
        if task_b is not None:
            await asyncio.wait_for(task_b, WAIT_S)


async def test_engine_discovers_new_regions_and_survives_a_bad_stream_entry(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """Without a region list the engine serves regions as they appear; a garbled stream entry
    is logged and skipped, and the region carries on."""
    async with running_engine(redis, keys, clock, None) as engine:
        other = "test-west"
        await market.register_node(node(other, ram=64, price=500), clock())
        await eventually(lambda: _true(other in engine.workers and engine.workers[other].serving))
        await redis.xadd(keys.events(other), {"e": b"{not json"})
        b = await market.place_bid(bid(other, ram=8), clock())
        await inbox.wait_for(
            lambda _ch, m: m["channel"] == "fills" and m["data"]["bid_id"] == b.bid_id
        )


async def test_resting_bid_fills_when_a_contract_ends_or_a_heartbeat_frees_memory(
    redis: aioredis.Redis, keys: Keys, market: Market, inbox: Inbox, clock: FakeClock
) -> None:
    """Capacity that frees up (a contract ending, a heartbeat reporting more free memory)
    crosses the resting bids it can serve, and only those."""
    full = await market.register_node(node(ram=32, price=600, heartbeat_interval_s=3600.0), clock())
    lean = await market.register_node(
        node(ram=64, price=650, offered_ram_gb=4, heartbeat_interval_s=3600.0), clock()
    )
    lease = await _contract_on(market, full, clock, ram=32, duration_s=60)
    async with running_engine(redis, keys, clock, [R]):
        first = await market.place_bid(bid(ram=24, cap=1000), clock())
        big = await market.place_bid(bid(ram=100, cap=1000, user_id="user-2"), clock())
        await inbox.wait_for(
            lambda _ch, m: (
                m["channel"] == "bids" and m["data"].get("bid", {}).get("bid_id") == big.bid_id
            )
        )
        assert {b.bid_id for b in await market.bids(R)} == {first.bid_id, big.bid_id}
        clock.advance(61_000)  # the lease ends, settles, and its 32 GB come back
        fill = await inbox.wait_for(lambda _ch, m: m["channel"] == "fills")
        assert fill["data"]["bid_id"] == first.bid_id
        assert fill["data"]["node_id"] == full.node_id
        ended = await market.get_contract(lease.contract_id)
        assert ended is not None and ended.status == "completed"
        second = await market.place_bid(bid(ram=40, cap=1000, user_id="user-3"), clock())
        await inbox.wait_for(
            lambda _ch, m: (
                m["channel"] == "bids" and m["data"].get("bid", {}).get("bid_id") == second.bid_id
            )
        )
        beat = Heartbeat(node_id=lean.node_id, available_ram_gb=64, available_vram_gb=0)
        assert (await market.heartbeat("owner-1", [beat], clock(), min_interval_ms=0))[
            0
        ].outcome == "ok"
        fill = await inbox.wait_for(
            lambda _ch, m: m["channel"] == "fills" and m["data"]["bid_id"] == second.bid_id
        )
        assert fill["data"]["node_id"] == lean.node_id
        assert [b.bid_id for b in await market.bids(R)] == [big.bid_id]  # 100 GB fits nowhere


async def test_publisher_delivers_every_message_intact_and_in_order(
    redis: aioredis.Redis, keys: Keys, inbox: Inbox
) -> None:
    """A batch goes out as one blob with the lengths beside it: channel names with spaces,
    commas, digits and non-ASCII letters, and payloads holding anything, arrive exactly and in
    order."""
    publisher = process.Publisher(redis)
    task = asyncio.create_task(publisher.run())
    channels = [f"{keys.prefix}user:{name}" for name in ("a b", "1,2", "\u00e9\u4e2d", "x")]
    sent = [
        (channels[i % 4], json.dumps({"i": i, "text": "," * (i % 3) + " 12,34 \u00e9"}).encode())
        for i in range(process.PUBLISH_BATCH + 7)
    ]
    try:
        publisher.publish(sent)
        await eventually(lambda: _true(len(inbox.messages) >= len(sent)))
    finally:
        await publisher.close(task)
    got = [(channel, json.dumps(msg).encode()) for channel, msg, _ in inbox.messages]
    assert got == sent
    assert (publisher.sent, publisher.dropped) == (len(sent), 0)


async def test_the_engine_finishes_transfers_left_half_done(
    redis: aioredis.Redis, keys: Keys, clock: FakeClock, market: Market
) -> None:
    """Money sent from the funding wallet by a process that died before crediting the region
    (issue 14: a transfer's first step only) is credited by the engine's repair loop, once."""
    await market.credit("client-2", 10**12, key="k", rail="operator", now_ms=clock())
    tid = await market.send_transfer(
        "client-2", from_slot=FUNDING, to_slot=R, amount_pusd=10**12, allow_pusd=0,
        now_ms=clock(),
    )  # fmt: skip
    assert tid is not None
    clock.advance(60_000)  # older than MNEMO_TRANSFER_REPAIR_AFTER_S
    async with running_engine(redis, keys, clock, [R]):

        async def credited() -> bool | None:
            wallet = await market.wallet(R, "client-2", clock())
            return wallet.avail_pusd == 10**12 and not await market.pending_transfers(FUNDING)

        await eventually(credited)
    assert (await market.wallet(FUNDING, "client-2", clock())).avail_pusd == 0
