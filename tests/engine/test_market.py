"""The Market adapter against a real Redis: each method's effect and each refusal."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from engine import core, trust
from engine import market as market_module
from engine.connection import open_redis
from engine.errors import (
    CapacityTaken,
    Conflict,
    InvalidRequest,
    NotFound,
    OutsideTerms,
    Unavailable,
)
from engine.keys import Keys, mint_id
from engine.market import HEARTBEAT_BATCH, HeartbeatOutcome, Market, ReserveRequest
from engine.types import (
    Bid,
    BidPlaced,
    ContractCreated,
    ContractSettled,
    Heartbeat,
    HeartbeatsApplied,
    Node,
    NodeChanges,
    NodeRegistered,
)
from tests.engine.conftest import fund

T0 = 1_700_000_000_000
PRICE = 800_000  # 0.0000008 USD per GB-second, the spec's example


def a_node(node_id: str = "n1", **kw: Any) -> Node:
    fields: dict[str, Any] = dict(
        node_id=node_id, owner_id="alice", region="us-east-2", node_type="mist_node",
        name=f"Alice {node_id}", lat=40.7282, lng=-73.7949, total_ram_gb=64, total_vram_gb=24,
        offered_ram_gb=48, offered_vram_gb=18, price_pusd=PRICE, egress_price_pusd=50_000_000_000,
        metadata={"gpu_model": "RTX 4090"},
    )  # fmt: skip
    fields.update(kw)
    return Node(**fields)


def a_bid(bid_id: str = "b1", **kw: Any) -> Bid:
    fields: dict[str, Any] = dict(
        bid_id=bid_id, region="us-east-2", client_id="bot", user_id="u-bot", ram_gb=8,
        vram_gb=4, duration_s=600, max_price_pusd=1_000_000,
    )  # fmt: skip
    fields.update(kw)
    return Bid(**fields)


def take(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        node_id="n1", client_id="acme", user_id="u-acme", ram_gb=8, vram_gb=2,
        duration_s=3600, max_price_pusd=1_000_000, now_ms=T0,
    )  # fmt: skip
    args.update(kw)
    return args


@pytest.fixture
async def market(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Market]:
    m = Market(redis, keys)
    await m.load_scripts()
    yield m


async def seq(market: Market, region: str = "us-east-2") -> int:
    return int(await market.redis.get(market.keys.seq(region)) or 0)


# -- nodes -------------------------------------------------------------------------------------


async def test_register_stores_the_node_and_lists_its_ask(market: Market) -> None:
    """Registration caps the offer at the total, lists the ask, indexes it, logs one event."""
    node = await market.register_node(a_node(offered_ram_gb=100), T0)
    assert (node.offered_ram_gb, node.offered_vram_gb) == (64, 18)
    assert (node.status, node.arrival_seq, node.created_ms, node.last_heartbeat_ms) == (
        "active", 1, T0, 0,
    )  # fmt: skip
    assert await market.get_node("n1") == node
    r, k = market.redis, market.keys
    assert await r.zscore(k.asks("us-east-2"), "n1") == PRICE
    assert await r.zscore(k.heartbeats("us-east-2"), "n1") == T0 + 3 * 60_000
    assert await r.geopos(k.geo("us-east-2"), "n1") != [None]
    assert await market.region_of("n1") == "us-east-2"
    assert await market.regions() == ["us-east-2"]
    assert await market.nodes("us-east-2") == [node] == await market.nodes()
    [event] = await market.read_events("us-east-2")
    assert isinstance(event, NodeRegistered)
    assert (event.event_id, event.ts_ms, event.node) == ("us-east-2:1", T0, node)


async def test_register_without_offer_is_not_an_ask(market: Market) -> None:
    """A node offering nothing yet is registered but not listed."""
    await market.register_node(a_node(offered_ram_gb=0, offered_vram_gb=0), T0)
    assert await market.redis.zscore(market.keys.asks("us-east-2"), "n1") is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"total_ram_gb": 0, "total_vram_gb": 0}, "total_ram_gb"),
        ({"total_ram_gb": -1}, "total_ram_gb"),
        ({"region": "us{east}"}, "region"),
        ({"node_id": "a:b"}, "node_id"),
        ({"lat": 91.0}, "lat"),
        ({"lng": float("nan")}, "lng"),
        ({"price_pusd": 0}, "price_pusd"),
        ({"price_pusd": core.MAX_PRICE_PUSD + 1}, "price_pusd"),
        ({"min_duration_s": 600, "max_duration_s": 60}, "min_duration_s"),
        ({"node_type": "mainframe"}, "node_type"),
        ({"total_ram_gb": "64"}, "total_ram_gb"),
    ],
)
async def test_register_refuses_bad_input(market: Market, change: dict, field: str) -> None:
    """Malformed nodes are refused with the offending field named, and nothing is written."""
    with pytest.raises(InvalidRequest) as refused:
        await market.register_node(a_node(**change), T0)
    assert refused.value.field == field
    assert await seq(market) == 0


async def test_register_refuses_an_id_in_use(market: Market) -> None:
    """An id names one node, in one region (ids without a region tag are claimed in the
    directory; a minted id carries its region's)."""
    await fund(market, "bot")
    await market.register_node(a_node(), T0)
    await market.place_bid(a_bid("b1"), T0)
    tagged = await market.register_node(a_node(mint_id("us-east-2")), T0)
    for node in (a_node(), a_node(region="eu-west-1"), a_node(tagged.node_id)):
        with pytest.raises(Conflict, match="id already in use"):
            await market.register_node(node, T0)
    with pytest.raises(InvalidRequest, match="minted for another region"):
        await market.register_node(a_node(mint_id("us-east-2"), region="eu-west-1"), T0)
    assert await seq(market) == 4  # the funding, the node, the bid, the tagged node


async def test_node_near_the_pole_is_indexed(market: Market) -> None:
    """GEO cannot index beyond 85.05°; the index clamps, the node keeps its latitude."""
    node = await market.register_node(a_node(lat=89.9), T0)
    assert node.lat == 89.9
    [(_lng, lat)] = await market.redis.geopos(market.keys.geo("us-east-2"), "n1")
    assert lat == pytest.approx(core.GEO_LAT_LIMIT, abs=1e-5)


# -- batched registration ------------------------------------------------------------------------


async def _snapshot(redis: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under `prefix` (named without it) with its content; stream entries by value
    (their ids are server time)."""
    out: dict[str, Any] = {}
    async for raw in redis.scan_iter(match=f"{prefix}*", count=1000):
        key = raw.decode()
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            value: Any = await redis.hgetall(key)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = await redis.smembers(key)
        elif kind == "stream":
            value = [fields for _, fields in await redis.xrange(key)]
            value = [msgspec.json.decode(f[b"e"]) for f in value]
        else:
            value = await redis.get(key)
        out[key.removeprefix(prefix)] = value
    return out


def _mixed_nodes() -> list[Node]:
    """Nodes of two regions covering what registration treats differently."""
    return [
        a_node("m1"),
        a_node("m2", region="eu-west-1", lat=51.5, lng=-0.12, metadata={}),
        a_node("m3", offered_ram_gb=0, offered_vram_gb=0),  # offers nothing: no ask
        a_node("m4", ask_expires_ms=T0 + 60_000, price_pusd=700_000),  # expiring ask
        a_node("m5", ask_expires_ms=T0 - 1),  # ask already expired: not listed
        a_node("m6", lat=89.9, heartbeat_interval_s=12.5, metadata={"note": 'ä \\"q\\" {}'}),
        a_node("m7", region="eu-west-1", node_type="datacenter", total_vram_gb=0),
    ]


async def test_register_many_writes_what_one_by_one_registration_writes(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A batch leaves the same keys, indexes and events as registering its nodes one by one."""
    batch = Market(redis, Keys(keys.prefix + "a:"))
    single = Market(redis, Keys(keys.prefix + "b:"))
    await batch.load_scripts()
    nodes = _mixed_nodes()
    stored = await batch.register_many(nodes, T0)
    one_by_one = [await single.register_node(n, T0) for n in nodes]
    assert stored == one_by_one
    assert [n.arrival_seq for n in stored] == [1, 1, 2, 3, 4, 5, 2]
    a, b = await _snapshot(redis, batch.keys.prefix), await _snapshot(redis, single.keys.prefix)
    assert a.keys() == b.keys() and a == b
    events = await batch.read_events("us-east-2")
    assert all(isinstance(e, NodeRegistered) for e in events)
    assert [(e.event_id, e.node) for e in events] == [
        (f"us-east-2:{i}", n)
        for i, n in enumerate((s for s in stored if s.region == "us-east-2"), 1)
    ]
    assert await batch.get_node("m7") == stored[6]


@given(
    lat=st.floats(-90, 90),
    lng=st.floats(-180, 180),
    latency=st.floats(0, 1e9),
    interval=st.floats(0.001, 86_400),
    ram=st.integers(0, core.MAX_GB - 1),
    price=st.integers(1, core.MAX_PRICE_PUSD),
    metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
    name=st.text(min_size=1, max_size=20),
)
def test_stored_fields_are_the_plain_texts_of_the_values(
    lat: float,
    lng: float,
    latency: float,
    interval: float,
    ram: int,
    price: int,
    metadata: dict[str, str],
    name: str,
) -> None:
    """`core.to_fields`' fast paths (exact types first, metadata through msgspec) give the
    documented text of every value: decimal ints, repr floats, json.dumps metadata (sorted keys,
    compact, unescaped), None absent."""
    node = core.new_node(
        a_node(lat=lat, lng=lng, base_latency_ms=latency, heartbeat_interval_s=interval,
               total_ram_gb=ram + 1, price_pusd=price, metadata=metadata, name=name),
        T0,
    )  # fmt: skip
    plain: dict[str, str] = {}
    for field in node.__struct_fields__:
        value = getattr(node, field)
        if value is None:
            continue
        if isinstance(value, bool):
            plain[field] = "true" if value else "false"
        elif isinstance(value, float):
            plain[field] = repr(value)
        elif isinstance(value, dict):
            plain[field] = json.dumps(
                value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
        else:
            plain[field] = str(value)
    assert core.to_fields(node) == plain


async def test_register_many_is_all_or_nothing(market: Market) -> None:
    """A bad node, an id in use or an id given twice refuses the whole batch, naming the node."""
    await market.register_node(a_node("taken", region="eu-west-1"), T0)
    before = await seq(market, "eu-west-1")
    cases: list[tuple[list[Node], type[Exception], str]] = [
        ([a_node("x1"), a_node("x2"), a_node("x3", lat=91.0)], InvalidRequest, "nodes[2].lat"),
        ([a_node("x1"), a_node("taken")], Conflict, "nodes[1].node_id"),
        ([a_node("x1"), a_node("x2", region="eu-west-1"), a_node("x1")], Conflict,
         "nodes[2].node_id"),
    ]  # fmt: skip
    for nodes, error, field in cases:
        with pytest.raises(error) as refused:
            await market.register_many(nodes, T0)
        assert refused.value.field == field
    assert await seq(market) == 0 and await seq(market, "eu-west-1") == before
    assert await market.get_node("x1") is None and await market.nodes("us-east-2") == []
    assert await market.register_many([], T0) == []


async def test_register_many_script_checks_ids_atomically(market: Market) -> None:
    """The script itself refuses a batch holding an id in use, before writing anything (the
    adapter's earlier check can be overtaken by a concurrent registration)."""
    await market.register_node(a_node("taken"), T0)
    fields = [core.to_fields(core.new_node(a_node(i), T0)) for i in ("y1", "taken", "y2")]
    k = market.keys
    result = await market._eval(
        "register_many",
        [
            *market._creating("us-east-2"),
            *market._node_indexes("us-east-2"),
            *(k.node("us-east-2", i) for i in ("y1", "taken", "y2")),
        ],
        [*market._head("us-east-2", T0), 3, msgspec.json.encode(fields)],
    )
    assert result[:2] == [0, b"conflict"] and result[4] == 2
    assert await seq(market) == 1
    assert await market.redis.zcard(k.asks("us-east-2")) == 1
    assert await market.get_node("y1") is None


async def test_register_many_splits_big_batches(
    market: Market, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch bigger than one script call is several calls; arrival order and events follow
    the batch, and a full-size call fits the server's limits."""
    nodes = [
        a_node(f"z{i}", price_pusd=PRICE + i) for i in range(2 * market_module.REGISTER_BATCH + 7)
    ]
    stored = await market.register_many(nodes, T0)
    assert [n.arrival_seq for n in stored] == list(range(1, len(nodes) + 1))
    assert await market.redis.zcard(market.keys.asks("us-east-2")) == len(nodes)
    monkeypatch.setattr(market_module, "REGISTER_BATCH", 3)
    more = await market.register_many([a_node(f"w{i}") for i in range(7)], T0 + 1)
    assert [n.arrival_seq for n in more] == list(range(len(nodes) + 1, len(nodes) + 8))
    events = await market.read_events("us-east-2", count=len(nodes) + 10)
    assert [e.node.node_id for e in events if isinstance(e, NodeRegistered)] == [
        n.node_id for n in [*nodes, *more]
    ]
    assert events[-1].event_id == f"us-east-2:{len(nodes) + 7}"


async def test_update_changes_terms_and_relists(market: Market) -> None:
    """Price moves the ask; maintenance delists; an expired ask is delisted; leases keep terms."""
    await fund(market, "acme")
    await market.register_node(a_node(), T0)
    contract = await market.reserve(**take())
    asks = market.keys.asks("us-east-2")
    node = await market.update_node("n1", NodeChanges(price_pusd=900_000), T0 + 1)
    assert node.price_pusd == 900_000 and await market.redis.zscore(asks, "n1") == 900_000
    assert (await market.get_contract(contract.contract_id)).price_pusd == PRICE
    await market.update_node("n1", NodeChanges(status="maintenance"), T0 + 2)
    assert await market.redis.zscore(asks, "n1") is None
    await market.update_node("n1", NodeChanges(status="active"), T0 + 3)
    assert await market.redis.zscore(asks, "n1") == 900_000
    await market.update_node("n1", NodeChanges(ask_expires_ms=T0 + 3), T0 + 3)
    assert await market.redis.zscore(asks, "n1") is None
    node = await market.update_node(
        "n1", NodeChanges(lat=51.5, lng=-0.12, metadata={"b": "2", "a": "1"}), T0 + 4
    )
    assert (node.lat, node.lng, node.metadata) == (51.5, -0.12, {"a": "1", "b": "2"})


async def test_update_refusals(market: Market) -> None:
    await market.register_node(a_node(), T0)
    with pytest.raises(NotFound):
        await market.update_node("nope", NodeChanges(price_pusd=1), T0)
    with pytest.raises(InvalidRequest) as refused:
        await market.update_node("n1", NodeChanges(price_pusd=-5), T0)
    assert refused.value.field == "price_pusd"
    with pytest.raises(InvalidRequest, match="min_duration_s exceeds max_duration_s"):
        await market.update_node("n1", NodeChanges(min_duration_s=100_000), T0)
    await market.mark_offline("n1", T0 + 180_000)
    with pytest.raises(Conflict, match="node is offline"):
        await market.update_node("n1", NodeChanges(status="active"), T0 + 180_001)
    await market.deactivate_node("n1", T0 + 180_002)
    with pytest.raises(Conflict, match="node is deactivated"):
        await market.update_node("n1", NodeChanges(price_pusd=1), T0 + 180_003)


async def test_deactivate_keeps_running_leases(market: Market) -> None:
    """A deactivated node takes no new leases or beats; its contracts run and settle."""
    await fund(market, "acme")
    await market.register_node(a_node(), T0)
    contract = await market.reserve(**take())
    node = await market.deactivate_node("n1", T0 + 1000)
    assert node.status == "deactivated"
    k = market.keys
    for key in (k.asks("us-east-2"), k.geo("us-east-2"), k.heartbeats("us-east-2")):
        assert await market.redis.zscore(key, "n1") is None
    assert await market.nodes("us-east-2") == []
    assert (await market.get_node("n1")).status == "deactivated"
    with pytest.raises(Unavailable, match="node is deactivated"):
        await market.reserve(**take(now_ms=T0 + 2000))
    assert await market.heartbeat("alice", [Heartbeat(node_id="n1", available_ram_gb=1,
                                  available_vram_gb=0)], T0 + 3000, 0) == [
        HeartbeatOutcome("n1", "deactivated")
    ]  # fmt: skip
    with pytest.raises(Conflict):
        await market.deactivate_node("n1", T0 + 4000)
    settled = await market.settle(contract.contract_id, 0, T0 + 5000)
    assert settled.status == "completed"
    assert (await market.get_node("n1")).reserved_ram_gb == 0


# -- heartbeats ---------------------------------------------------------------------------------


async def test_heartbeat_batch_outcomes(market: Market) -> None:
    """One call, an outcome per beat: ok, not_found, forbidden, too_soon (with the wait)."""
    await market.register_node(a_node("n1"), T0)
    await market.register_node(a_node("n2"), T0)
    await market.register_node(a_node("n3", owner_id="bob", region="eu-west-1"), T0)
    beat = {"available_ram_gb": 10, "available_vram_gb": 5}
    first = await market.heartbeat(
        "alice",
        [Heartbeat(node_id=n, **beat) for n in ("n1", "ghost", "n3", "n2")],
        T0 + 1000,
        30_000,
    )
    assert first == [
        HeartbeatOutcome("n1", "ok"),
        HeartbeatOutcome("ghost", "not_found"),
        HeartbeatOutcome("n3", "forbidden"),
        HeartbeatOutcome("n2", "ok"),
    ]
    again = await market.heartbeat("alice", [Heartbeat(node_id="n1", **beat)], T0 + 11_000, 30_000)
    assert again == [HeartbeatOutcome("n1", "too_soon", 20_000)]
    events = await market.read_events("us-east-2")
    assert isinstance(events[-1], HeartbeatsApplied)
    assert [e.node_id for e in events[-1].entries] == ["n1", "n2"]
    assert len(await market.read_events("eu-west-1")) == 1  # n3's beat was refused: no event


async def test_heartbeat_counts_leases_once(market: Market) -> None:
    """`available` in a beat excludes Mnemo's leases: offered = min(total, available + reserved)."""
    await fund(market, "acme")
    await market.register_node(a_node(total_ram_gb=64, total_vram_gb=24), T0)
    await market.reserve(**take(ram_gb=16, vram_gb=4))

    async def beat(ram: int, vram: int, at: int) -> Node:
        [outcome] = await market.heartbeat(
            "alice", [Heartbeat(node_id="n1", available_ram_gb=ram, available_vram_gb=vram)],
            at, 0,
        )  # fmt: skip
        assert outcome.outcome == "ok"
        node = await market.get_node("n1")
        assert node is not None
        return node

    node = await beat(40, 10, T0 + 1)
    assert (node.offered_ram_gb, node.reserved_ram_gb, node.available_ram_gb) == (56, 16, 40)
    assert (node.offered_vram_gb, node.available_vram_gb) == (14, 10)
    node = await beat(0, 0, T0 + 2)
    assert (node.offered_ram_gb, node.available_ram_gb, node.available_vram_gb) == (16, 0, 0)
    assert await market.redis.zscore(market.keys.asks("us-east-2"), "n1") is None
    node = await beat(500, 500, T0 + 3)
    assert (node.offered_ram_gb, node.offered_vram_gb) == (64, 24)
    assert (node.available_ram_gb, node.available_vram_gb) == (48, 20)


async def test_heartbeat_moves_the_node_and_its_deadline(market: Market) -> None:
    await market.register_node(a_node(heartbeat_interval_s=10.0), T0)
    await market.heartbeat(
        "alice",
        [Heartbeat(node_id="n1", available_ram_gb=1, available_vram_gb=0, lat=48.85, lng=2.35,
                   bandwidth_mbps=250, cpu_usage_pct=12.5, temperature_c=41)],
        T0 + 5000, 30_000,
    )  # fmt: skip
    node = await market.get_node("n1")
    assert (node.lat, node.lng, node.bandwidth_mbps, node.last_heartbeat_ms) == (
        48.85, 2.35, 250, T0 + 5000,
    )  # fmt: skip
    assert await market.stale_nodes("us-east-2", T0 + 34_999) == []
    assert await market.stale_nodes("us-east-2", T0 + 35_000) == ["n1"]
    entry = (await market.read_events("us-east-2"))[-1].entries[0]
    assert (entry.cpu_usage_pct, entry.temperature_c, entry.lat) == (12.5, 41, 48.85)


async def test_heartbeat_batch_larger_than_one_call(market: Market) -> None:
    """Beats beyond HEARTBEAT_BATCH go in further calls of the same pipeline."""
    count = HEARTBEAT_BATCH + 7
    for i in range(count):
        await market.register_node(a_node(f"n{i}"), T0)
    outcomes = await market.heartbeat(
        "alice",
        [Heartbeat(node_id=f"n{i}", available_ram_gb=i % 60, available_vram_gb=1)
         for i in range(count)],
        T0 + 1, 0,
    )  # fmt: skip
    assert [o.outcome for o in outcomes] == ["ok"] * count
    assert (await market.get_node(f"n{count - 1}")).offered_ram_gb == (count - 1) % 60
    assert await seq(market) == count + 2


async def test_malformed_heartbeat_refuses_the_batch(market: Market) -> None:
    await market.register_node(a_node(), T0)
    with pytest.raises(InvalidRequest) as refused:
        await market.heartbeat(
            "alice",
            [Heartbeat(node_id="n1", available_ram_gb=1, available_vram_gb=0),
             Heartbeat(node_id="n1", available_ram_gb=-1, available_vram_gb=0)],
            T0, 0,
        )  # fmt: skip
    assert refused.value.field == "available_ram_gb"
    assert await seq(market) == 1


async def test_missed_heartbeats_take_a_node_offline_and_a_beat_brings_it_back(
    market: Market,
) -> None:
    await fund(market, "acme")
    await market.register_node(a_node(heartbeat_interval_s=60.0), T0)
    contract = await market.reserve(**take())
    deadline = T0 + 180_000
    assert await market.stale_nodes("us-east-2", deadline - 1) == []
    with pytest.raises(Conflict, match="heartbeat deadline has not passed"):
        await market.mark_offline("n1", deadline - 1)
    assert await market.stale_nodes("us-east-2", deadline) == ["n1"]
    assert await market.mark_offline("n1", deadline) == [contract]
    node = await market.get_node("n1")
    assert node.status == "offline"
    assert await market.redis.zscore(market.keys.asks("us-east-2"), "n1") is None
    assert await market.stale_nodes("us-east-2", deadline + 10**9) == []
    with pytest.raises(Conflict, match="node is offline"):
        await market.mark_offline("n1", deadline + 1)
    with pytest.raises(Unavailable, match="node is offline"):
        await market.reserve(**take(now_ms=deadline + 1))
    await market.heartbeat(
        "alice", [Heartbeat(node_id="n1", available_ram_gb=10, available_vram_gb=0)],
        deadline + 2, 30_000,
    )  # fmt: skip
    node = await market.get_node("n1")
    assert node.status == "active"
    assert await market.redis.zscore(market.keys.asks("us-east-2"), "n1") == PRICE


# -- reserve ------------------------------------------------------------------------------------


async def test_reserve_creates_a_contract_at_the_ask_price(market: Market) -> None:
    await fund(market, "acme")
    await fund(market, "other")
    await market.register_node(a_node(), T0)
    c = await market.reserve(**take(max_price_pusd=5_000_000))
    assert (c.price_pusd, c.max_price_pusd, c.status, c.version) == (PRICE, 5_000_000, "active", 1)
    assert (c.start_ms, c.end_ms, c.owner_id, c.region) == (
        T0, T0 + 3_600_000, "alice", "us-east-2",
    )  # fmt: skip
    assert await market.get_contract(c.contract_id) == c
    node = await market.get_node("n1")
    assert (node.reserved_ram_gb, node.reserved_vram_gb) == (8, 2)
    assert (node.available_ram_gb, node.available_vram_gb) == (40, 16)
    assert await market.contracts(client_id="acme") == [c]
    assert await market.contracts(node_id="n1") == [c]
    assert await market.contracts(region="us-east-2") == [c] == await market.contracts()
    assert await market.contracts(client_id="other") == []
    assert await market.due_contracts("us-east-2", T0 + 3_600_000) == [c.contract_id]
    assert await market.due_contracts("us-east-2", T0 + 3_599_999) == []
    event = (await market.read_events("us-east-2"))[-1]
    assert isinstance(event, ContractCreated)
    assert (event.contract, event.node_reserved_ram_gb, event.node_reserved_vram_gb) == (c, 8, 2)


async def test_contracts_keep_any_user_and_owner_text(market: Market) -> None:
    """User and owner ids holding quotes, backslashes, control characters and non-ASCII text
    survive the stored contract and its events unchanged, through extend, failover and settle."""
    await fund(market, "acme")
    owner, user = 'o"w\\ner\n\u00e9', 'u\t"\u4e2d\\/x'
    await market.register_node(a_node(owner_id=owner), T0)
    await market.register_node(a_node("n2", owner_id="bob"), T0)
    c = await market.reserve(**take(user_id=user))
    assert (c.owner_id, c.user_id) == (owner, user)
    assert await market.get_contract(c.contract_id) == c
    extended = await market.extend(c.contract_id, 60, T0 + 1_000)
    assert (extended.user_id, extended.owner_id, extended.duration_s) == (user, owner, 3660)
    old, new = await market.failover(c.contract_id, "n2", T0 + 2_000)
    assert (old.user_id, old.owner_id, new.user_id, new.owner_id) == (user, owner, user, "bob")
    assert await market.contracts(client_id="acme") == [new]
    settled = await market.settle(new.contract_id, 0, T0 + 3_000)
    assert settled.user_id == user and await market.get_contract(new.contract_id) == settled
    created = [e for e in await market.read_events("us-east-2") if isinstance(e, ContractCreated)]
    assert [e.contract.contract_id for e in created] == [c.contract_id, new.contract_id]
    assert created[0].contract == c and created[1].contract == new


async def test_a_contract_stored_as_a_hash_by_an_older_version_still_works(
    market: Market,
) -> None:
    """After an upgrade, contracts left in Redis as hashes (the storage before JSON) are read,
    listed, extended and settled like the others, and written back as JSON."""
    await fund(market, "acme")
    await market.register_node(a_node(), T0)
    c = await market.reserve(**take())
    key = market.keys.contract("us-east-2", c.contract_id)
    await market.redis.delete(key)
    await market.redis.hset(key, mapping=core.to_fields(c))
    assert await market.get_contract(c.contract_id) == c
    assert await market.contracts(client_id="acme") == [c] == await market.contracts()
    extended = await market.extend(c.contract_id, 60, T0 + 1)
    assert extended.duration_s == 3660 and await market.redis.type(key) == b"string"
    await market.redis.delete(key)
    await market.redis.hset(key, mapping=core.to_fields(extended))
    settled = await market.settle(c.contract_id, 0, T0 + 2_000)
    assert (settled.status, settled.used_s, settled.version) == ("completed", 2, 3)
    assert await market.get_contract(c.contract_id) == settled


@pytest.mark.parametrize(
    ("node_kw", "take_kw", "error", "message"),
    [
        ({}, {"node_id": "ghost"}, NotFound, "node not found"),
        ({}, {"max_price_pusd": PRICE - 1}, CapacityTaken, "price above cap"),
        ({}, {"duration_s": 10}, CapacityTaken, "duration outside the node's terms"),
        ({}, {"duration_s": 86_401}, CapacityTaken, "duration outside the node's terms"),
        ({}, {"ram_gb": 49}, CapacityTaken, "capacity taken"),
        ({}, {"vram_gb": 19}, CapacityTaken, "capacity taken"),
        ({"ask_expires_ms": T0}, {}, Unavailable, "ask expired"),
        ({}, {"ram_gb": 0, "vram_gb": 0}, InvalidRequest, "must be positive"),
        ({}, {"max_price_pusd": 0}, InvalidRequest, "between"),
        ({}, {"duration_s": 0}, InvalidRequest, "between"),
    ],
)
async def test_reserve_refusals(
    market: Market, node_kw: dict, take_kw: dict, error: type, message: str
) -> None:
    """Each precondition refuses with its own error and message; nothing is written."""
    await market.register_node(a_node(**node_kw), T0 - 1)
    with pytest.raises(error, match=message):
        await market.reserve(**take(**take_kw))
    assert await seq(market) == 1
    assert (await market.get_node("n1")).reserved_ram_gb == 0


async def test_reserve_refuses_a_node_in_maintenance(market: Market) -> None:
    await market.register_node(a_node(), T0)
    await market.update_node("n1", NodeChanges(status="maintenance"), T0)
    with pytest.raises(Unavailable, match="node is maintenance"):
        await market.reserve(**take())


async def test_reserve_many_keeps_order_and_reports_each(market: Market) -> None:
    """Pipelined reserves: each slot holds its contract or its refusal, in request order."""
    await fund(market, "acme")
    await market.register_node(a_node(offered_ram_gb=20, offered_vram_gb=0), T0)
    req = ReserveRequest(
        node_id="n1", client_id="acme", user_id="u", ram_gb=8, vram_gb=0, duration_s=60,
        max_price_pusd=PRICE,
    )  # fmt: skip
    bad = msgspec.structs.replace(req, node_id="ghost")
    out = await market.reserve_many([req, bad, req, req], T0)
    assert [type(x).__name__ for x in out] == [
        "Contract", "NotFound", "Contract", "CapacityTaken",
    ]  # fmt: skip
    assert (await market.get_node("n1")).available_ram_gb == 4


# -- bids ---------------------------------------------------------------------------------------


async def test_bids_rest_in_price_time_priority(market: Market) -> None:
    await fund(market, "bot")
    placed = [
        await market.place_bid(a_bid("b1", max_price_pusd=900_000), T0),
        await market.place_bid(a_bid("b2", max_price_pusd=1_200_000), T0 + 1),
        await market.place_bid(a_bid("b3", max_price_pusd=900_000), T0 + 2),
        await market.place_bid(a_bid("b4", max_price_pusd=1_200_000), T0 + 3),
    ]
    assert [b.seq for b in placed] == [1, 2, 3, 4]
    assert [b.bid_id for b in await market.bids("us-east-2")] == ["b2", "b4", "b1", "b3"]
    assert await market.get_bid("b1") == placed[0]
    event = (await market.read_events("us-east-2"))[1]  # after the funding
    assert isinstance(event, BidPlaced) and event.bid == placed[0]


async def test_place_bid_refusals(market: Market) -> None:
    await fund(market, "acme")
    await fund(market, "bot")
    await market.place_bid(a_bid("b1"), T0)
    with pytest.raises(Conflict, match="id already in use"):
        await market.place_bid(a_bid("b1"), T0)
    for change, field in (
        ({"expires_ms": T0}, "expires_ms"),
        ({"ram_gb": 0, "vram_gb": 0}, "ram_gb"),
        ({"max_price_pusd": 0}, "max_price_pusd"),
        ({"lat": 10.0}, "lat"),
        ({"client_id": "a b"}, "client_id"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            await market.place_bid(a_bid("b2", **change), T0)
        assert refused.value.field == field


async def test_bids_placed_together_share_a_call_and_keep_call_order(
    market: Market, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent place_bid calls go out as one script call and apply one by one in call order:
    priority follows the calls, an id used twice is refused the second time, each caller gets
    its own bid (or refusal), and every placed bid has its own event."""
    await fund(market, "acme")
    await fund(market, "bot")
    calls = []
    real_eval = market._eval

    async def counting(name: str, keys: Any, args: Any) -> Any:
        calls.append(name)
        return await real_eval(name, keys, args)

    monkeypatch.setattr(market, "_eval", counting)
    bids = [a_bid(f"b{i}", max_price_pusd=900_000, expires_ms=T0 + 10 * (i + 1)) for i in range(6)]
    bids.insert(3, a_bid("b1"))
    out = await asyncio.gather(*(market.place_bid(b, T0) for b in bids), return_exceptions=True)
    assert calls == ["place_bid"]
    assert [type(x).__name__ for x in out] == ["Bid"] * 3 + ["Conflict"] + ["Bid"] * 3
    placed = [b for b in out if isinstance(b, Bid)]
    assert [b.seq for b in placed] == [1, 2, 3, 4, 5, 6]
    assert await market.bids("us-east-2") == placed
    events = await market.read_events("us-east-2")
    assert [e.bid for e in events if isinstance(e, BidPlaced)] == placed
    assert [b.bid_id for b in await market.expire_bids("us-east-2", T0 + 30)] == [
        "b0", "b1", "b2",
    ]  # fmt: skip


async def test_a_failed_batch_call_fails_each_of_its_bids(
    market: Market, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the shared script call fails (the server went away), every caller of the batch gets
    the error, and later calls work again."""
    await fund(market, "acme")
    await fund(market, "bot")

    async def broken(name: str, keys: Any, args: Any) -> Any:
        raise ConnectionError("gone")

    real_eval = market._eval
    monkeypatch.setattr(market, "_eval", broken)
    out = await asyncio.gather(
        *(market.place_bid(a_bid(f"b{i}"), T0) for i in range(3)), return_exceptions=True
    )
    assert [type(x) for x in out] == [ConnectionError] * 3
    monkeypatch.setattr(market, "_eval", real_eval)
    assert (await market.place_bid(a_bid("b0"), T0)).seq == 1


async def test_cancel_and_expire_bids(market: Market) -> None:
    await fund(market, "acme")
    await fund(market, "bot")
    await market.place_bid(a_bid("b1"), T0)
    await market.place_bid(a_bid("b2", expires_ms=T0 + 5000), T0)
    await market.place_bid(a_bid("b3", expires_ms=T0 + 1000), T0)
    cancelled = await market.cancel_bid("b1", T0 + 1)
    assert cancelled.status == "cancelled"
    with pytest.raises(Conflict, match="bid is cancelled"):
        await market.cancel_bid("b1", T0 + 2)
    with pytest.raises(NotFound, match="bid not found"):
        await market.cancel_bid("ghost", T0 + 2)
    assert await market.expire_bids("us-east-2", T0 + 999) == []
    [b3] = await market.expire_bids("us-east-2", T0 + 5000, limit=1)
    assert (b3.bid_id, b3.status) == ("b3", "expired")
    [b2] = await market.expire_bids("us-east-2", T0 + 5000)
    assert b2.bid_id == "b2"
    assert await market.bids("us-east-2") == []
    assert (await market.get_bid("b1")).status == "cancelled"
    assert 0 < await market.redis.pttl(market.keys.bid("us-east-2", "b1")) <= 86_400_000


async def test_reserve_fills_a_whole_bid(market: Market) -> None:
    """A fill is the reserve and the bid's fill state in one step; a filled bid leaves the book."""
    await fund(market, "bot")
    await market.register_node(a_node(), T0)
    await market.place_bid(a_bid("b1"), T0)
    c = await market.reserve(**take(client_id="bot", user_id="u-bot", ram_gb=8, vram_gb=4,
                                    duration_s=600, max_price_pusd=1_000_000, bid_id="b1"))  # fmt: skip
    assert (c.bid_id, c.price_pusd) == ("b1", PRICE)
    bid = await market.get_bid("b1")
    assert (bid.status, bid.filled_ram_gb, bid.filled_vram_gb, bid.contract_ids) == (
        "filled", 8, 4, [c.contract_id],
    )  # fmt: skip
    assert await market.bids("us-east-2") == []
    event = (await market.read_events("us-east-2"))[-1]
    assert (event.bid_id, event.bid_status, event.bid_filled_ram_gb) == ("b1", "filled", 8)
    with pytest.raises(Conflict, match="bid is filled"):
        await market.reserve(**take(client_id="bot", user_id="u-bot", ram_gb=8, vram_gb=4,
                                    duration_s=600, max_price_pusd=1_000_000, bid_id="b1"))  # fmt: skip


async def test_split_bid_fills_across_nodes(market: Market) -> None:
    """With allow_split, fills of at least min_fill_gb (or the whole rest); filled + rest = size."""
    await fund(market, "bot")
    await market.register_node(a_node("n1", offered_ram_gb=5, offered_vram_gb=0), T0)
    await market.register_node(a_node("n2"), T0)
    await market.place_bid(a_bid("b1", ram_gb=8, vram_gb=4, allow_split=True, min_fill_gb=3), T0)
    fill = dict(client_id="bot", user_id="u-bot", duration_s=600, max_price_pusd=1_000_000,
                bid_id="b1")  # fmt: skip
    with pytest.raises(InvalidRequest, match="fill below the bid's minimum size"):
        await market.reserve(**take(node_id="n1", ram_gb=2, vram_gb=0, **fill))
    await market.reserve(**take(node_id="n1", ram_gb=5, vram_gb=0, **fill))
    bid = await market.get_bid("b1")
    assert (bid.status, bid.remaining_ram_gb, bid.remaining_vram_gb) == ("open", 3, 4)
    with pytest.raises(Conflict, match="fill exceeds the bid's remaining size"):
        await market.reserve(**take(node_id="n2", ram_gb=4, vram_gb=4, **fill))
    await market.reserve(**take(node_id="n2", ram_gb=3, vram_gb=4, **fill))
    bid = await market.get_bid("b1")
    assert (bid.status, bid.filled_ram_gb + bid.remaining_ram_gb, len(bid.contract_ids)) == (
        "filled", 8, 2,
    )  # fmt: skip


async def test_bid_fill_refusals(market: Market) -> None:
    await fund(market, "bot")
    await fund(market, "other")
    await market.register_node(a_node(), T0)
    await market.register_node(a_node("e1", region="eu-west-1"), T0)
    await market.place_bid(a_bid("b1"), T0)
    await market.place_bid(a_bid("b2", expires_ms=T0 + 10), T0)
    fill = dict(client_id="bot", user_id="u-bot", ram_gb=8, vram_gb=4, duration_s=600,
                max_price_pusd=1_000_000)  # fmt: skip
    with pytest.raises(InvalidRequest, match="does not allow split fills"):
        await market.reserve(**take(**{**fill, "ram_gb": 4}, bid_id="b1"))
    with pytest.raises(InvalidRequest, match="reserve does not match the bid"):
        await market.reserve(**take(**{**fill, "client_id": "other"}, bid_id="b1"))
    with pytest.raises(InvalidRequest, match="different regions"):
        await market.reserve(**take(**fill, node_id="e1", bid_id="b1"))
    with pytest.raises(NotFound, match="bid not found"):
        await market.reserve(**take(**fill, bid_id="ghost"))
    with pytest.raises(Conflict, match="bid expired"):
        await market.reserve(**take(**fill, bid_id="b2", now_ms=T0 + 10))
    assert (await market.get_node("n1")).reserved_ram_gb == 0


# -- extend, settle, fail, failover ----------------------------------------------------------


async def test_extend(market: Market) -> None:
    await fund(market, "acme")
    await market.register_node(a_node(max_duration_s=7200), T0)
    c = await market.reserve(**take())
    longer = await market.extend(c.contract_id, 1800, T0 + 1000)
    assert (longer.duration_s, longer.end_ms, longer.extensions, longer.version) == (
        5400, T0 + 5_400_000, 1, 2,
    )  # fmt: skip
    assert await market.due_contracts("us-east-2", T0 + 3_600_000) == []
    with pytest.raises(
        OutsideTerms, match="would last 7201 s, over the node's max_duration_sec of 7200 s"
    ):
        await market.extend(c.contract_id, 1801, T0 + 2000)
    with pytest.raises(InvalidRequest):
        await market.extend(c.contract_id, 0, T0 + 2000)
    with pytest.raises(NotFound):
        await market.extend("ghost", 10, T0 + 2000)
    with pytest.raises(Conflict, match="contract has ended"):
        await market.extend(c.contract_id, 10, T0 + 5_400_000)
    await market.update_node("n1", NodeChanges(status="maintenance"), T0 + 3000)
    with pytest.raises(Unavailable, match="node is maintenance"):
        await market.extend(c.contract_id, 10, T0 + 3000)


async def test_settle_prices_exactly_and_frees_the_capacity(market: Market) -> None:
    """cost = (ram+vram) * used_s * price + egress_mgb * egress_price // 1000; hash of record."""
    await fund(market, "acme")
    await market.register_node(a_node(), T0)
    c = await market.reserve(**take(ram_gb=32, vram_gb=12))
    s = await market.settle(c.contract_id, 2.4, T0 + 90_500)
    assert (s.status, s.used_s, s.egress_mgb, s.completed_ms, s.version) == (
        "completed", 91, 2400, T0 + 90_500, 2,
    )  # fmt: skip
    assert s.cost_pusd == 44 * 91 * PRICE + 2400 * 50_000_000_000 // 1000
    assert s.settlement_hash == core.settlement_hash(s)
    record = core.settlement_record(s)
    canonical = msgspec.json.encode(dict(sorted(record.items())))
    assert s.settlement_hash == hashlib.sha256(canonical).hexdigest()
    assert await market.get_contract(c.contract_id) == s
    node = await market.get_node("n1")
    assert (node.reserved_ram_gb, node.reserved_vram_gb) == (0, 0)
    assert await market.contracts() == []
    event = (await market.read_events("us-east-2"))[-1]
    assert isinstance(event, ContractSettled) and event.cost_pusd == s.cost_pusd
    with pytest.raises(Conflict, match="contract is completed"):
        await market.settle(c.contract_id, 0, T0 + 100_000)
    with pytest.raises(NotFound, match="contract not found"):
        await market.settle("ghost", 0, T0)
    with pytest.raises(InvalidRequest):
        await market.settle(c.contract_id, -1, T0)


async def test_settlement_money_beyond_double_precision_is_exact(market: Market) -> None:
    """Amounts past 2**53 pico-USD stay exact end to end (computed in Python, carried as text):
    a lease worth just under the bound, at an odd price near the highest, and nearly the most
    egress a contract may bill."""
    await fund(market, "acme")
    price = core.MAX_PRICE_PUSD - 23
    egress_price = core.MAX_EGRESS_PRICE_PUSD - 7
    await market.register_node(
        a_node(
            total_ram_gb=5000,
            offered_ram_gb=5000,
            price_pusd=price,
            egress_price_pusd=egress_price,
            max_duration_s=10**6,
        ),
        T0,
    )
    stake = trust.required_stake(1000 * 1000 * price)  # engine.trust: the lease needs a stake
    await market.lock_stake("n1", "alice", stake, "stake-n1", T0)
    c = await market.reserve(
        **take(ram_gb=999, vram_gb=1, duration_s=1000, max_price_pusd=core.MAX_PRICE_PUSD)
    )
    with pytest.raises(InvalidRequest, match="egress one contract may bill"):
        await market.settle(c.contract_id, "1000.001", T0 + 10**9)
    s = await market.settle(c.contract_id, "999.999", T0 + 10**9)
    expected = 1000 * 1000 * price + 999_999 * egress_price // 1000
    assert 2**53 < expected <= core.MAX_LEASE_VALUE_PUSD + core.MAX_EGRESS_VALUE_PUSD < 2**63 // 4
    assert s.cost_pusd == expected
    assert (await market.read_events("us-east-2"))[-1].cost_pusd == expected


async def test_settle_after_the_end_bills_the_term_only(market: Market) -> None:
    await fund(market, "acme")
    await market.register_node(a_node(), T0)
    c = await market.reserve(**take(ram_gb=1, vram_gb=0, duration_s=60))
    s = await market.settle(c.contract_id, 0, T0 + 10**7)
    assert (s.used_s, s.cost_pusd) == (60, 60 * PRICE)


async def test_settle_and_extend_race_stays_consistent(market: Market) -> None:
    """Concurrent extend and settle: whichever wins, the record and its hash agree."""
    await fund(market, "acme")
    await market.register_node(a_node(max_duration_s=86_400), T0)
    for i in range(20):
        c = await market.reserve(**take(ram_gb=1, vram_gb=0))
        results = await asyncio.gather(
            market.extend(c.contract_id, 60, T0 + 1000),
            market.settle(c.contract_id, 0, T0 + 2000 + i),
            return_exceptions=True,
        )
        final = await market.get_contract(c.contract_id)
        assert final.status == "completed"
        assert final.settlement_hash == core.settlement_hash(final)
        assert final.duration_s in (3600, 3660)
        extended = not isinstance(results[0], Exception)
        assert final.duration_s == (3660 if extended else 3600)
    assert (await market.get_node("n1")).reserved_ram_gb == 0


async def test_fail_contract_bills_time_served(market: Market) -> None:
    await fund(market, "acme")
    await market.register_node(a_node(), T0)
    c = await market.reserve(**take(ram_gb=2, vram_gb=0))
    f = await market.fail_contract(c.contract_id, T0 + 10_001)
    assert (f.status, f.used_s, f.cost_pusd) == ("failed", 11, 2 * 11 * PRICE)
    assert f.settlement_hash == core.settlement_hash(f)


async def test_failover_moves_the_rest_of_the_term(market: Market) -> None:
    await fund(market, "acme")
    await market.register_node(a_node("n1"), T0)
    await market.register_node(a_node("n2", price_pusd=900_000), T0)
    c = await market.reserve(**take(ram_gb=8, vram_gb=2, duration_s=3600))
    await market.mark_offline("n1", T0 + 180_000)
    old, new = await market.failover(c.contract_id, "n2", T0 + 180_000)
    assert (old.status, old.used_s, old.successor_id) == ("failed_over", 180, new.contract_id)
    assert old.cost_pusd == 10 * 180 * PRICE
    assert old.settlement_hash == core.settlement_hash(old)
    assert (new.node_id, new.price_pusd, new.duration_s, new.predecessor_id) == (
        "n2", 900_000, 3420, c.contract_id,
    )  # fmt: skip
    assert (new.start_ms, new.end_ms, new.client_id, new.max_price_pusd) == (
        T0 + 180_000, T0 + 3_600_000, "acme", 1_000_000,
    )  # fmt: skip
    assert (await market.get_node("n1")).reserved_ram_gb == 0
    assert (await market.get_node("n2")).reserved_ram_gb == 8
    assert await market.contracts(client_id="acme") == [new]
    types = [type(e).__name__ for e in (await market.read_events("us-east-2"))[-2:]]
    assert types == ["ContractSettled", "ContractCreated"]
    assert await market.get_contract(new.contract_id) == new


async def test_failover_refusals(market: Market) -> None:
    await fund(market, "acme")
    await market.register_node(a_node("n1"), T0)
    await market.register_node(a_node("n2", price_pusd=2_000_000), T0)
    await market.register_node(a_node("n3", offered_ram_gb=1), T0)
    await market.register_node(a_node("e1", region="eu-west-1"), T0)
    c = await market.reserve(**take(duration_s=3600))
    with pytest.raises(CapacityTaken, match="price above cap"):
        await market.failover(c.contract_id, "n2", T0 + 1000)
    with pytest.raises(CapacityTaken, match="capacity taken"):
        await market.failover(c.contract_id, "n3", T0 + 1000)
    with pytest.raises(InvalidRequest, match="another node"):
        await market.failover(c.contract_id, "n1", T0 + 1000)
    with pytest.raises(InvalidRequest, match="region"):
        await market.failover(c.contract_id, "e1", T0 + 1000)
    with pytest.raises(NotFound, match="node not found"):
        await market.failover(c.contract_id, "ghost", T0 + 1000)
    with pytest.raises(Conflict, match="contract has ended"):
        await market.failover(c.contract_id, "n3", T0 + 3_599_001)
    assert (await market.get_contract(c.contract_id)).status == "active"


# -- reads and scripts ------------------------------------------------------------------------


async def test_quote(market: Market) -> None:
    """Top of book by price level, last fill, 24 h volume."""
    await fund(market, "acme")
    await fund(market, "bot")
    await market.register_node(a_node("n1", offered_ram_gb=10, offered_vram_gb=0), T0)
    await market.register_node(a_node("n2", offered_ram_gb=6, offered_vram_gb=2), T0)
    await market.register_node(a_node("n3", price_pusd=700_000, offered_vram_gb=0,
                                      offered_ram_gb=4), T0)  # fmt: skip
    await market.place_bid(a_bid("b1", max_price_pusd=600_000), T0)
    await market.place_bid(a_bid("b2", max_price_pusd=600_000, ram_gb=1, vram_gb=0), T0)
    await market.place_bid(a_bid("b3", max_price_pusd=500_000), T0)
    await market.reserve(**take(node_id="n3", ram_gb=1, vram_gb=0, duration_s=100))
    quote = await market.quote("us-east-2", T0 + 1)
    assert quote.best_ask_pusd == 700_000 and quote.best_bid_pusd == 600_000
    assert quote.ask_depth == [(700_000, 3), (PRICE, 18)]
    assert quote.bid_depth == [(600_000, 13), (500_000, 12)]
    assert (quote.last_fill_pusd, quote.volume_24h_gb_s) == (700_000, 100)
    later = await market.quote("us-east-2", T0 + core.FILLS_WINDOW_MS + 1)
    assert (later.last_fill_pusd, later.volume_24h_gb_s) == (700_000, 0)
    empty = await market.quote("eu-west-1", T0)
    assert (empty.best_ask_pusd, empty.ask_depth, empty.last_fill_pusd) == (None, [], None)


async def test_expire_asks(market: Market) -> None:
    await market.register_node(a_node("n1", ask_expires_ms=T0 + 1000), T0)
    await market.register_node(a_node("n2"), T0)
    assert await market.expire_asks("us-east-2", T0 + 999) == []
    [node] = await market.expire_asks("us-east-2", T0 + 1000)
    assert node.node_id == "n1"
    assert await market.redis.zrange(market.keys.asks("us-east-2"), 0, -1) == [b"n2"]


async def test_events_are_numbered_per_region_and_decode(market: Market) -> None:
    await fund(market, "acme")
    await fund(market, "bot")
    await market.register_node(a_node("n1"), T0)
    await market.register_node(a_node("e1", region="eu-west-1"), T0)
    await market.place_bid(a_bid("b1"), T0)
    c = await market.reserve(**take())
    await market.extend(c.contract_id, 60, T0 + 1)
    await market.settle(c.contract_id, 0, T0 + 2)
    us = await market.read_events("us-east-2")
    assert [e.event_id for e in us] == [f"us-east-2:{i}" for i in range(1, 8)]
    assert [e.event_id for e in await market.read_events("eu-west-1")] == ["eu-west-1:1"]


async def test_scripts_reload_after_noscript(
    market: Market, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that does not know a script (restart, SCRIPT FLUSH) gets it again by itself."""
    await fund(market, "acme")
    original = market_module._source
    marker = uuid.uuid4().hex

    def source(name: str) -> str:
        return original(name) + f"\n-- {marker}"

    monkeypatch.setattr(market_module, "_source", source)
    monkeypatch.setattr(
        market_module, "_sha", lambda name: hashlib.sha1(source(name).encode()).hexdigest()
    )
    node = await market.register_node(a_node(), T0)
    assert node.node_id == "n1"
    out = await market.reserve_many(
        [ReserveRequest(node_id="n1", client_id="acme", user_id="u", ram_gb=1, vram_gb=0,
                        duration_s=60, max_price_pusd=PRICE)],
        T0,
    )  # fmt: skip
    assert out[0].node_id == "n1"


async def test_works_with_a_decoding_client(redis_url: str, keys: Keys) -> None:
    """The adapter accepts clients created with decode_responses=True too."""
    client = open_redis(redis_url, decode_responses=True)
    try:
        m = Market(client, keys)
        await m.load_scripts()
        await fund(m, "acme")
        await m.register_node(a_node(), T0)
        c = await m.reserve(**take())
        assert (await m.settle(c.contract_id, 0, T0 + 1000)).used_s == 1
        assert len(await m.read_events("us-east-2")) == 4
    finally:
        await client.aclose()
