"""Scoring: the Numba kernel against the spec's `match_nodes` (the oracle) and its plain twin.

Hypothesis example counts are modest by default; set MNEMO_HYPOTHESIS_EXAMPLES for a longer run.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequest
from engine.scoring import (
    AskBook,
    Match,
    MatchRequest,
    browse,
    haversine_km,
    merge_matches,
    rank,
    rank_reference,
    warm_up,
)
from engine.types import (
    NODE_TYPES,
    Contract,
    ContractCreated,
    ContractSettled,
    HeartbeatEntry,
    HeartbeatsApplied,
    Node,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
)
from tests.engine.oracle import Client, match_nodes

EXAMPLES = int(os.environ.get("MNEMO_HYPOTHESIS_EXAMPLES", "40"))
NOW = 5_000_000
R = "us-east-2"
SCORE_TOL = 1e-9

hsettings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    warm_up()


def node(i: int, **kw: Any) -> Node:
    base: dict[str, Any] = dict(
        node_id=f"n{i}",
        owner_id="o",
        region=R,
        node_type="datacenter",
        name=f"node {i}",
        lat=40.0,
        lng=-74.0,
        total_ram_gb=64,
        total_vram_gb=24,
        offered_ram_gb=64,
        offered_vram_gb=24,
        price_pusd=1000,
        uptime_score=99.0,
        arrival_seq=i,
    )
    base.update(kw)
    return Node(**base)


def book_of(nodes: list[Node], region: str = R) -> AskBook:
    book = AskBook(region, capacity=16)
    for n in nodes:
        book.upsert(n)
    return book


# ---------------------------------------------------------------------------------------------
# The oracle, with this exchange's extra hard filters and tie-break applied around it


def oracle_rank(nodes: list[Node], req: MatchRequest, now_ms: int, k: int) -> list[dict[str, Any]]:
    """The spec's match_nodes over the nodes passing the offer-term and request filters it lacks,
    ordered by its score, then (documented tie-break) lower price, earlier arrival."""
    eligible = [
        n
        for n in nodes
        if (n.ask_expires_ms == 0 or n.ask_expires_ms > now_ms)
        and n.min_duration_s <= req.duration_s <= n.max_duration_s
        and n.uptime_score >= req.min_uptime_score
        and (req.node_type is None or n.node_type == req.node_type)
        and (req.region is None or n.region == req.region)
    ]
    requirements: dict[str, Any] = {
        "ram_gb": req.ram_gb,
        "vram_gb": req.vram_gb,
        "max_price_per_gb_sec": req.max_price_pusd,
        "prefer_local": req.prefer_local,
        "duration_sec": req.duration_s,
    }
    if req.max_distance_km is not None:
        requirements["max_distance_km"] = req.max_distance_km
    by_id = {n.node_id: n for n in eligible}
    out = match_nodes(Client(req.lat, req.lng), requirements, eligible)
    out.sort(
        key=lambda m: (
            -m["match_score"],
            by_id[m["node_id"]].price_pusd,
            by_id[m["node_id"]].arrival_seq,
        )
    )
    return out[:k]


def assert_matches_oracle(got: list[Match], want: list[dict[str, Any]]) -> None:
    assert [m.node_id for m in got] == [w["node_id"] for w in want], (
        [(m.node_id, m.match_score) for m in got],
        [(w["node_id"], w["match_score"]) for w in want],
    )
    for m, w in zip(got, want, strict=True):
        assert m.match_score == pytest.approx(w["match_score"], abs=SCORE_TOL)
        breakdown = w["score_breakdown"]
        assert m.price_score == pytest.approx(breakdown["price"], abs=SCORE_TOL)
        assert m.reliability_score == pytest.approx(breakdown["reliability"], abs=SCORE_TOL)
        assert m.capacity_score == pytest.approx(breakdown["capacity"], abs=SCORE_TOL)
        if w["distance_km"] is None:
            assert m.distance_km is None
            assert m.proximity_score == 0.0
        else:
            assert m.distance_km == pytest.approx(w["distance_km"], abs=SCORE_TOL)
            assert m.proximity_score == pytest.approx(breakdown["proximity"], abs=SCORE_TOL)
        assert m.estimated_cost_pusd == w["estimated_cost"]
        assert m.estimated_latency_ms == w["estimated_latency_ms"]
        assert m.type_bonus == (20.0 if m.node_type == "mist_node" else 0.0)


def check_all(
    nodes: list[Node], book: AskBook, req: MatchRequest, now_ms: int, k: int
) -> list[Match]:
    got = rank(book, req, now_ms, k)
    assert_matches_oracle(got, oracle_rank(nodes, req, now_ms, k))
    assert got == rank_reference(nodes, req, now_ms, k)
    return got


# ---------------------------------------------------------------------------------------------
# Strategies: small value sets make ties, boundaries and duplicates likely

PLACES = [(40.71, -74.0), (40.73, -73.99), (0.0, 0.0), (0.0, 179.9), (0.0, -179.9), (89.9, 10.0),
          (-33.9, 151.2), (51.5, -0.12), (-40.71, 106.0)]  # fmt: skip

lats = st.one_of(st.sampled_from([p[0] for p in PLACES]), st.floats(-90, 90))
lngs = st.one_of(st.sampled_from([p[1] for p in PLACES]), st.floats(-180, 180))
small_gb = st.integers(0, 40)


@st.composite
def nodes_st(draw: st.DrawFn, max_size: int = 30) -> list[Node]:
    count = draw(st.integers(0, max_size))
    arrivals = draw(st.permutations(range(count)))
    out = []
    for i in range(count):
        offered_ram = draw(small_gb)
        offered_vram = draw(small_gb)
        if draw(st.booleans()):
            lat, lng = draw(st.sampled_from(PLACES))
        else:
            lat, lng = draw(lats), draw(lngs)
        out.append(
            node(
                i,
                node_type=draw(st.sampled_from(NODE_TYPES)),
                lat=lat,
                lng=lng,
                total_ram_gb=offered_ram,
                total_vram_gb=offered_vram,
                offered_ram_gb=offered_ram,
                offered_vram_gb=offered_vram,
                reserved_ram_gb=draw(st.one_of(st.just(0), st.integers(0, offered_ram))),
                reserved_vram_gb=draw(st.one_of(st.just(0), st.integers(0, offered_vram))),
                price_pusd=draw(
                    st.one_of(st.sampled_from([1, 500, 999, 1000]), st.integers(1, 3000))
                ),
                uptime_score=draw(
                    st.one_of(st.sampled_from([0.0, 50.0, 99.0, 100.0]), st.floats(0, 100))
                ),
                status=draw(
                    st.sampled_from(["active", "active", "active", "offline", "maintenance"])
                ),
                ask_expires_ms=draw(st.sampled_from([0, 0, NOW - 1, NOW, NOW + 1])),
                min_duration_s=draw(st.sampled_from([1, 60, 60, 3600])),
                max_duration_s=draw(st.sampled_from([3600, 86_400])),
                base_latency_ms=draw(st.sampled_from([0.5, 1.0, 12.0])),
                arrival_seq=arrivals[i],
            )
        )
    return out


@st.composite
def requests_st(draw: st.DrawFn) -> MatchRequest:
    """Mostly permissive (so most examples have matches to order), sometimes sharp filters."""
    sharp = draw(st.integers(0, 3)) == 0
    ram = draw(st.integers(0, 40 if sharp else 12))
    vram = draw(st.integers(0 if ram > 0 else 1, 40 if sharp else 12))
    lat = lng = None
    if draw(st.integers(0, 3)) > 0:
        if draw(st.booleans()):
            lat, lng = draw(st.sampled_from(PLACES))
        else:
            lat, lng = draw(lats), draw(lngs)
    if sharp:
        max_distance: Any = draw(
            st.one_of(
                st.none(),
                st.sampled_from([0.0, 1.0, 2.5, 1000.0, 20_000.0, math.inf]),
                st.floats(0, 25_000),
            )
        )
        min_uptime = draw(st.one_of(st.sampled_from([0.0, 50.0, 99.0]), st.floats(0, 100)))
        node_type = draw(st.one_of(st.none(), st.sampled_from(NODE_TYPES)))
        region = draw(st.sampled_from([None, R, "eu-west-1"]))
        duration = draw(st.sampled_from([1, 60, 3600, 7200, 100_000]))
    else:
        max_distance = draw(st.sampled_from([None, None, 20_000.0, 5000.0]))
        min_uptime, node_type, region = 0.0, None, draw(st.sampled_from([None, R]))
        duration = draw(st.sampled_from([60, 3600]))
    return MatchRequest(
        ram_gb=ram,
        vram_gb=vram,
        max_price_pusd=draw(
            st.one_of(st.just(3000), st.sampled_from([1, 999, 1000]), st.integers(1, 3000))
        ),
        duration_s=duration,
        lat=lat,
        lng=lng,
        prefer_local=draw(st.booleans()),
        max_distance_km=max_distance,
        min_uptime_score=min_uptime,
        node_type=node_type,
        region=region,
    ).validate()


@hsettings
@given(nodes=nodes_st(), req=requests_st(), k=st.integers(1, 12))
def test_rank_equals_oracle_small_fleets(nodes: list[Node], req: MatchRequest, k: int) -> None:
    """Top-K ids, order and scores equal the spec's match_nodes (+ filters and tie-break)."""
    got = check_all(nodes, book_of(nodes), req, NOW, k)
    event("matches: none" if not got else "matches: some")


@st.composite
def big_fleet_st(draw: st.DrawFn) -> list[Node]:
    """Hundreds of nodes (several kernel blocks) from a seeded generator whose shape Hypothesis
    picks: how spread the places, prices and sizes are decides how hard pruning works."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    count = draw(st.integers(200, 1200))
    spread_deg = draw(st.sampled_from([0.05, 2.0, 30.0, 180.0]))
    centre = draw(st.sampled_from(PLACES))
    price_levels = draw(st.sampled_from([3, 50, 100_000]))
    dup_places = draw(st.booleans())
    places = [centre] * 5 if dup_places else []
    out = []
    for i in range(count):
        if places and rng.random() < 0.3:
            lat, lng = rng.choice(places)
        else:
            lat = max(-90.0, min(90.0, centre[0] + rng.uniform(-spread_deg, spread_deg) / 2))
            lng = (centre[1] + rng.uniform(-spread_deg, spread_deg) + 180.0) % 360.0 - 180.0
        ram = rng.choice([0, 8, 16, 64, 256])
        vram = rng.choice([0, 0, 8, 24, 80])
        out.append(
            node(
                i,
                node_type=rng.choice(NODE_TYPES),
                lat=lat,
                lng=lng,
                total_ram_gb=ram,
                total_vram_gb=vram,
                offered_ram_gb=ram,
                offered_vram_gb=vram,
                reserved_ram_gb=rng.randint(0, ram),
                reserved_vram_gb=rng.randint(0, vram),
                price_pusd=1 + rng.randrange(price_levels) * 3000 // price_levels,
                uptime_score=rng.choice([90.0, 99.0, rng.uniform(0, 100)]),
                status="active" if rng.random() < 0.9 else "offline",
                ask_expires_ms=0 if rng.random() < 0.9 else NOW + rng.randint(-10, 10),
                max_duration_s=86_400 if rng.random() < 0.95 else 600,
                arrival_seq=i,
            )
        )
    return out


@hsettings
@given(
    nodes=big_fleet_st(),
    req=requests_st(),
    k=st.sampled_from([1, 10, 40]),
    churn=st.integers(0, 2**16),
)
def test_rank_equals_oracle_big_fleets(
    nodes: list[Node], req: MatchRequest, k: int, churn: int
) -> None:
    """Same, over several blocks, after removals and re-inserts have reordered the rows."""
    rng = random.Random(churn)
    book = book_of(nodes)
    for n in rng.sample(nodes, len(nodes) // 4):
        assert book.remove(n.node_id)
    for n in rng.sample(nodes, len(nodes) // 8):
        book.upsert(n)
    live = [n for n in nodes if n.node_id in book]
    assert len(book) == len(live)
    got = check_all(live, book, req, NOW, k)
    event("matches: none" if not got else "matches: some")
    event("located" if req.has_location else "no location")


def test_rank_seeded_large_fleet() -> None:
    """10k nodes around a city: the kernel's bound pass never drops a true top-10 node."""
    rng = random.Random(7)
    nodes = [
        node(
            i,
            node_type=rng.choice(NODE_TYPES),
            lat=40.7 + rng.gauss(0, 3),
            lng=-74.0 + rng.gauss(0, 3),
            offered_ram_gb=(ram := rng.choice([16, 32, 64, 128])),
            offered_vram_gb=(vram := rng.choice([0, 8, 24, 48])),
            total_ram_gb=ram,
            total_vram_gb=vram,
            reserved_ram_gb=rng.randint(0, ram),
            price_pusd=rng.randint(100_000, 3_000_000),
            uptime_score=rng.uniform(80, 100),
            arrival_seq=i,
        )
        for i in range(10_000)
    ]
    book = book_of(nodes)
    for req in [
        MatchRequest(ram_gb=16, vram_gb=8, max_price_pusd=2_000_000, lat=40.7, lng=-74.0),
        MatchRequest(ram_gb=16, vram_gb=8, max_price_pusd=2_000_000),
        MatchRequest(
            ram_gb=32, vram_gb=0, max_price_pusd=900_000, lat=41.0, lng=-70.0, prefer_local=False
        ),
        MatchRequest(
            ram_gb=1, vram_gb=1, max_price_pusd=3_000_000, lat=40.7, lng=-74.0, max_distance_km=20
        ),
        MatchRequest(ram_gb=64, vram_gb=48, max_price_pusd=150_000, node_type="mist_node"),
    ]:
        check_all(nodes, book, req, NOW, 10)


# ---------------------------------------------------------------------------------------------
# The rules, one by one


def test_ties_break_by_lower_price_then_earlier_arrival() -> None:
    """Equal scores: the cheaper node first; equal price too: the one that arrived first."""
    # n3 is cheaper but less reliable: price +12.5, reliability -12.5, exactly (binary fractions)
    a = node(1, price_pusd=512, arrival_seq=9)
    b = node(2, price_pusd=512, arrival_seq=3)
    c = node(3, price_pusd=256, uptime_score=74.0, arrival_seq=5)
    req = MatchRequest(ram_gb=10, vram_gb=0, max_price_pusd=1024)
    got = rank(book_of([a, b, c]), req, NOW)
    assert [m.node_id for m in got] == ["n3", "n2", "n1"]
    assert got == rank_reference([a, b, c], req, NOW)
    assert got[0].match_score == got[1].match_score == got[2].match_score


def test_score_breakdown_is_the_spec_formula() -> None:
    """Proximity x3 when local, price, reliability, capacity (capped at 30), mist bonus."""
    n = node(1, node_type="mist_node", lat=40.0, lng=-74.0, price_pusd=250, uptime_score=90.0)
    req = MatchRequest(ram_gb=8, vram_gb=0, max_price_pusd=1000, lat=40.0, lng=-74.1, duration_s=60)
    (m,) = rank(book_of([n]), req, NOW)
    d = haversine_km(40.0, -74.1, 40.0, -74.0)
    assert m.distance_km == d
    assert m.proximity_score == 100 - d / 10
    assert m.price_score == 37.5
    assert m.reliability_score == 45.0
    assert m.capacity_score == 30.0  # 88 free / 8 asked * 10 > 30
    assert m.type_bonus == 20.0
    assert m.match_score == pytest.approx(3 * (100 - d / 10) + 37.5 + 45 + 30 + 20, abs=1e-12)
    assert m.estimated_cost_pusd == 8 * 60 * 250
    (m1,) = rank(book_of([n]), msgspec.structs.replace(req, prefer_local=False), NOW)
    assert m1.match_score == pytest.approx(m.match_score - 2 * m.proximity_score, abs=1e-12)


def test_without_location_no_proximity_and_no_distance_limit() -> None:
    """A request without lat/lng scores no proximity and reaches nodes anywhere."""
    far = node(1, lat=-33.9, lng=151.2)
    req = MatchRequest(ram_gb=1, vram_gb=0, max_price_pusd=1000, max_distance_km=1.0)
    (m,) = rank(book_of([far]), req, NOW)
    assert m.distance_km is None and m.proximity_score == 0.0


def test_zero_coordinates_are_a_location() -> None:
    """lat 0 / lng 0 is a place (the spec's sketch tested truthiness)."""
    here = node(1, lat=0.0, lng=0.0)
    far = node(2, lat=0.0, lng=90.0)
    req = MatchRequest(ram_gb=1, vram_gb=0, max_price_pusd=2000, lat=0.0, lng=0.0)
    got = rank(book_of([far, here]), req, NOW)
    assert [m.node_id for m in got] == ["n1"]  # n2 is ~10,000 km away: beyond the default limit
    assert got[0].distance_km == 0.0 and got[0].proximity_score == 100.0


def test_max_distance_boundary_is_inclusive() -> None:
    """A node exactly at max_distance_km passes; one metre further does not."""
    n = node(1, lat=10.0, lng=20.0)
    d = haversine_km(10.0, 20.3, 10.0, 20.0)
    req = MatchRequest(
        ram_gb=1, vram_gb=0, max_price_pusd=2000, lat=10.0, lng=20.3, max_distance_km=d
    )
    assert len(rank(book_of([n]), req, NOW)) == 1
    req2 = msgspec.structs.replace(req, max_distance_km=math.nextafter(d, 0.0))
    assert rank(book_of([n]), req2, NOW) == []


@pytest.mark.parametrize(
    ("change", "matches"),
    [
        ({}, True),
        ({"status": "offline"}, False),
        ({"status": "maintenance"}, False),
        ({"ask_expires_ms": NOW}, False),
        ({"ask_expires_ms": NOW + 1}, True),
        ({"min_duration_s": 3601}, False),
        ({"max_duration_s": 3599}, False),
        ({"max_duration_s": 3600, "min_duration_s": 3600}, True),
        ({"price_pusd": 1001}, False),
        ({"price_pusd": 1000}, True),
        ({"reserved_ram_gb": 57}, False),
        ({"reserved_ram_gb": 56}, True),
        ({"uptime_score": 94.9}, False),
        ({"node_type": "mist_node"}, False),
        ({"region": "eu-west-1"}, False),
    ],
)
def test_hard_filters(change: dict[str, Any], matches: bool) -> None:
    """Each hard filter (capacity, cap, status, ask expiry, duration terms, uptime, type, region)."""
    n = node(1, **change)
    req = MatchRequest(
        ram_gb=8,
        vram_gb=4,
        max_price_pusd=1000,
        duration_s=3600,
        min_uptime_score=95.0,
        node_type="datacenter",
        region=R,
    )
    book = book_of([n], region=n.region)
    assert bool(rank(book, req, NOW)) is matches
    assert bool(rank_reference([n], req, NOW)) is matches


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"ram_gb": 0, "vram_gb": 0}, "ram_gb"),
        ({"ram_gb": -1}, "ram_gb"),
        ({"vram_gb": -1}, "vram_gb"),
        ({"ram_gb": 1.5}, "ram_gb"),
        ({"max_price_pusd": 0}, "max_price_pusd"),
        ({"max_price_pusd": -5}, "max_price_pusd"),
        ({"duration_s": 0}, "duration_s"),
        ({"lat": 91.0, "lng": 0.0}, "lat"),
        ({"lat": -90.5, "lng": 0.0}, "lat"),
        ({"lat": 0.0, "lng": 180.01}, "lng"),
        ({"lat": math.nan, "lng": 0.0}, "lat"),
        ({"lat": 0.0, "lng": math.inf}, "lng"),
        ({"lat": 10.0}, "lng"),
        ({"lng": 10.0}, "lat"),
        ({"max_distance_km": -1.0}, "max_distance_km"),
        ({"max_distance_km": math.nan}, "max_distance_km"),
        ({"min_uptime_score": -0.1}, "min_uptime_score"),
        ({"min_uptime_score": math.nan}, "min_uptime_score"),
        ({"limit": 0}, "limit"),
        ({"node_type": "mainframe"}, "node_type"),
    ],
)
def test_invalid_requests_are_rejected(fields: dict[str, Any], field: str) -> None:
    """Bad input raises InvalidRequest naming the field, from validate() and from rank()."""
    base: dict[str, Any] = dict(ram_gb=8, vram_gb=4, max_price_pusd=1000)
    base.update(fields)
    req = MatchRequest(**base)
    with pytest.raises(InvalidRequest) as err:
        req.validate()
    assert err.value.field == field
    with pytest.raises(InvalidRequest):
        rank(book_of([node(1)]), req, NOW)
    with pytest.raises(InvalidRequest):
        rank_reference([node(1)], req, NOW)


def test_edge_requests_need_no_division_by_zero() -> None:
    """Only-VRAM and only-RAM requests, a cap of 1 pico-USD, a node with nothing free."""
    nodes = [node(1, price_pusd=1), node(2, offered_ram_gb=0, offered_vram_gb=0)]
    for req in [
        MatchRequest(ram_gb=0, vram_gb=1, max_price_pusd=1),
        MatchRequest(ram_gb=1, vram_gb=0, max_price_pusd=1, lat=90.0, lng=180.0),
        MatchRequest(
            ram_gb=0, vram_gb=1, max_price_pusd=1, lat=-90.0, lng=-180.0, max_distance_km=0.0
        ),
    ]:
        check_all(nodes, book_of(nodes), req, NOW, 10)


def test_antipodes_do_not_break_the_distance() -> None:
    """Points half a world apart: a finite distance of about pi * R, no domain error."""
    n = node(1, lat=45.0, lng=-170.0)
    req = MatchRequest(
        ram_gb=1, vram_gb=0, max_price_pusd=1000, lat=-45.0, lng=10.0, max_distance_km=math.inf
    )
    check_all([n], book_of([n]), req, NOW, 1)
    (m,) = rank(book_of([n]), req, NOW)
    assert m.distance_km == pytest.approx(math.pi * 6371.0, rel=1e-12)


def test_merge_matches_orders_across_regions() -> None:
    """rank_all's merge: score, then price, arrival, region."""
    req = MatchRequest(ram_gb=1, vram_gb=0, max_price_pusd=100)
    a = rank(book_of([node(1, region="a", price_pusd=10)], "a"), req, NOW)
    b = rank(book_of([node(1, region="b", price_pusd=10)], "b"), req, NOW)
    c = rank(book_of([node(2, region="c", price_pusd=5)], "c"), req, NOW)
    assert [m.region for m in merge_matches([b, a, c], 5)] == ["c", "a", "b"]
    assert [m.region for m in merge_matches([b, a, c], 2)] == ["c", "a"]


# ---------------------------------------------------------------------------------------------
# The book


def test_book_upsert_remove_grow_keep_rows_consistent() -> None:
    """Swap-remove and growth keep every id on its own row; remove of an absent id is False."""
    book = AskBook(R, capacity=16)
    nodes = {
        f"n{i}": node(i, price_pusd=100 + i, metadata={"gpu": f"g{i}"} if i % 2 else {})
        for i in range(100)
    }
    for n in nodes.values():
        book.upsert(n)
    for i in range(0, 100, 3):
        assert book.remove(f"n{i}")
        del nodes[f"n{i}"]
    assert not book.remove("n0")
    book.upsert(node(0, price_pusd=7))
    nodes["n0"] = node(0, price_pusd=7)
    assert sorted(book.node_ids()) == sorted(nodes)
    for node_id, n in nodes.items():
        assert book.node(node_id) == n
    req = MatchRequest(ram_gb=1, vram_gb=0, max_price_pusd=1000, limit=200)
    assert rank(book, req, NOW) == rank_reference(list(nodes.values()), req, NOW)


def test_book_applies_events() -> None:
    """Registered/updated upsert; heartbeats set capacity, status, place; contracts set reserved;
    offline/deactivated set status; unknown nodes are ignored."""
    book = AskBook(R)
    n = node(1, offered_ram_gb=32, offered_vram_gb=8, total_ram_gb=64, total_vram_gb=24)
    ev: dict[str, Any] = dict(region=R, ts_ms=NOW)
    book.apply(NodeRegistered(event_id=f"{R}:1", node=n, **ev))
    assert book.node("n1") == n
    book.apply(
        HeartbeatsApplied(
            event_id=f"{R}:2",
            entries=[
                HeartbeatEntry(
                    node_id="n1",
                    offered_ram_gb=40,
                    offered_vram_gb=8,
                    available_ram_gb=30,
                    available_vram_gb=8,
                    lat=41.0,
                    lng=-73.0,
                    bandwidth_mbps=500,
                ),
                HeartbeatEntry(
                    node_id="ghost",
                    offered_ram_gb=1,
                    offered_vram_gb=1,
                    available_ram_gb=1,
                    available_vram_gb=1,
                ),
            ],
            **ev,
        )
    )
    got = book.node("n1")
    assert got is not None
    assert (got.offered_ram_gb, got.reserved_ram_gb, got.available_ram_gb) == (40, 10, 30)
    assert (got.lat, got.lng, got.bandwidth_mbps, got.last_heartbeat_ms) == (41.0, -73.0, 500, NOW)
    contract = Contract(
        contract_id="c1", region=R, client_id="c", user_id="u", node_id="n1", owner_id="o",
        ram_gb=20, vram_gb=8, duration_s=60, start_ms=NOW, end_ms=NOW + 60_000, price_pusd=1000,
    )  # fmt: skip
    book.apply(
        ContractCreated(
            event_id=f"{R}:3",
            contract=contract,
            node_reserved_ram_gb=30,
            node_reserved_vram_gb=8,
            **ev,
        )
    )
    req = MatchRequest(ram_gb=10, vram_gb=0, max_price_pusd=1000)
    (m,) = rank(book, req, NOW)
    assert (m.available_ram_gb, m.available_vram_gb) == (10, 0)
    assert rank(book, MatchRequest(ram_gb=11, vram_gb=0, max_price_pusd=1000), NOW) == []
    book.apply(
        ContractSettled(
            event_id=f"{R}:4",
            contract_id="c1",
            node_id="n1",
            client_id="c",
            ram_gb=20,
            vram_gb=8,
            status="completed",
            used_s=60,
            egress_mgb=0,
            cost_pusd=1,
            settlement_hash="h",
            completed_ms=NOW,
            node_reserved_ram_gb=10,
            node_reserved_vram_gb=0,
            **ev,
        )
    )
    assert rank(book, MatchRequest(ram_gb=30, vram_gb=8, max_price_pusd=1000), NOW)
    book.apply(NodeOffline(event_id=f"{R}:5", node_id="n1", last_heartbeat_ms=NOW, **ev))
    assert rank(book, req, NOW) == [] and book.node("n1").status == "offline"  # type: ignore[union-attr]
    book.apply(
        NodeUpdated(event_id=f"{R}:6", node=msgspec.structs.replace(n, price_pusd=900), **ev)
    )
    (m,) = rank(book, req, NOW)
    assert m.price_pusd == 900 and m.available_ram_gb == 32  # the whole node replaced
    book.apply(NodeDeactivated(event_id=f"{R}:7", node_id="n1", **ev))
    assert rank(book, req, NOW) == [] and len(book) == 1


def test_book_rejects_a_node_of_another_region() -> None:
    with pytest.raises(ValueError):
        AskBook("eu-west-1").upsert(node(1))


# ---------------------------------------------------------------------------------------------
# Browse


def test_browse_filters_orders_and_pages() -> None:
    """Cheapest first (ties: earlier arrival), total before paging, live asks with free memory."""
    nodes = [
        node(1, price_pusd=300, arrival_seq=5),
        node(2, price_pusd=100, node_type="mist_node"),
        node(3, price_pusd=300, arrival_seq=1),
        node(4, price_pusd=50, status="offline"),
        node(5, price_pusd=60, reserved_ram_gb=64, reserved_vram_gb=24),  # nothing free
        node(6, price_pusd=70, ask_expires_ms=NOW),  # expired
        node(7, price_pusd=80, lat=-33.9, lng=151.2, uptime_score=90.0),
    ]
    book = book_of(nodes)
    offers, total = browse(book, now_ms=NOW)
    assert [o.node_id for o in offers] == ["n7", "n2", "n3", "n1"] and total == 4
    offers, total = browse(book, now_ms=NOW, offset=1, limit=2)
    assert [o.node_id for o in offers] == ["n2", "n3"] and total == 4
    offers, total = browse(book, now_ms=NOW, lat=40.0, lng=-74.0, max_distance_km=100.0)
    assert [o.node_id for o in offers] == ["n2", "n3", "n1"] and total == 3
    assert offers[0].distance_km == 0.0
    assert browse(book, now_ms=NOW, node_type="mist_node")[1] == 1
    assert browse(book, now_ms=NOW, min_uptime_score=95.0)[1] == 3
    assert browse(book, now_ms=NOW, max_price_pusd=100)[1] == 2
    assert browse(book, now_ms=NOW, min_ram_gb=65)[1] == 0
    assert browse(book, now_ms=NOW, region="eu-west-1") == ([], 0)
    other = book_of([node(8, region="eu-west-1", price_pusd=100, arrival_seq=0)], "eu-west-1")
    offers, total = browse([book, other], now_ms=NOW, limit=3)
    assert [o.node_id for o in offers] == ["n7", "n8", "n2"] and total == 5
    with pytest.raises(InvalidRequest):
        browse(book, now_ms=NOW, lat=100.0, lng=0.0)


def test_magnitudes_float32_cannot_tell_apart_are_decided_exactly() -> None:
    """Real timestamps (ms), prices up to 1e15 pico-USD, 1M GB, ten-year terms: neighbours that
    float32 rounds together (expiry now +-1 ms, price cap +-1) are still told apart exactly."""
    now = 1_700_000_000_123
    rng = random.Random(3)
    nodes = []
    for i in range(900):
        price = rng.choice([10**15, 10**15 - 1, 10**12 + 1, 10**12, 7])
        nodes.append(
            node(
                i,
                lat=rng.choice([0.0, 10.0, 10.0000001]),
                lng=rng.choice([0.0, 0.0000001]),
                total_ram_gb=1_000_000,
                offered_ram_gb=rng.choice([1_000_000, 999_999]),
                price_pusd=price,
                ask_expires_ms=rng.choice([0, now - 1, now, now + 1]),
                min_duration_s=rng.choice([1, 315_000_000, 315_000_001]),
                max_duration_s=316_224_000,
                uptime_score=rng.choice([99.99999, 100.0]),
                arrival_seq=i,
            )
        )
    book = book_of(nodes)
    for req in [
        MatchRequest(ram_gb=1_000_000, vram_gb=0, max_price_pusd=10**12, duration_s=315_000_000),
        MatchRequest(ram_gb=999_999, vram_gb=1, max_price_pusd=10**15 - 1, duration_s=315_000_001),
        MatchRequest(
            ram_gb=1, vram_gb=0, max_price_pusd=10**15, lat=10.0, lng=0.0, max_distance_km=0.0
        ),
        MatchRequest(ram_gb=1, vram_gb=0, max_price_pusd=10**15, min_uptime_score=100.0, limit=40),
        MatchRequest(
            ram_gb=1, vram_gb=0, max_price_pusd=10**15, lat=0.0, lng=0.0, max_distance_km=0.012
        ),
    ]:
        check_all(nodes, book, req, now, req.limit)


def test_huge_limits_allocate_nothing_huge() -> None:
    """A limit or page far beyond the book is bounded by the book's size."""
    nodes = [node(i) for i in range(3)]
    req = MatchRequest(ram_gb=1, vram_gb=0, max_price_pusd=1000, limit=10**12)
    assert len(rank(book_of(nodes), req, NOW)) == 3
    offers, total = browse(book_of(nodes), now_ms=NOW, offset=1, limit=10**12)
    assert (len(offers), total) == (2, 3)
