"""The pure core: pricing, settlement hash, bid priority and fills, terms, stored form."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import core, trust
from engine.errors import CapacityTaken, Conflict, InvalidRequest, Unavailable
from engine.types import Bid, Contract, Heartbeat, Node

T0 = 1_700_000_000_000


def node(**kw: object) -> Node:
    fields: dict = dict(
        node_id="n1", owner_id="o", region="r", node_type="mist_node", name="n", lat=1.0,
        lng=2.0, total_ram_gb=64, total_vram_gb=24, offered_ram_gb=32, offered_vram_gb=8,
        price_pusd=1000, min_duration_s=60, max_duration_s=3600,
    )  # fmt: skip
    fields.update(kw)
    return Node(**fields)


def bid(**kw: object) -> Bid:
    fields: dict = dict(
        bid_id="b1", region="r", client_id="c", user_id="u", ram_gb=10, vram_gb=4,
        duration_s=600, max_price_pusd=2000,
    )  # fmt: skip
    fields.update(kw)
    return Bid(**fields)


def contract(**kw: object) -> Contract:
    fields: dict = dict(
        contract_id="k1", region="r", client_id="c", user_id="u", node_id="n1", owner_id="o",
        ram_gb=32, vram_gb=12, duration_s=3600, start_ms=T0, end_ms=T0 + 3_600_000,
        price_pusd=800_000, egress_price_pusd=50_000_000_000, max_price_pusd=10**6, version=3,
    )  # fmt: skip
    fields.update(kw)
    return Contract(**fields)


# -- pricing ------------------------------------------------------------------------------------


def test_cost_is_the_documented_formula() -> None:
    assert core.contract_cost_pusd(
        ram_gb=32, vram_gb=12, used_s=3600, price_pusd=800_000, egress_mgb=2400,
        egress_price_pusd=50_000_000_000,
    ) == 44 * 3600 * 800_000 + 2400 * 50_000_000_000 // 1000  # fmt: skip
    # The spec's example: 44 GB for an hour at 0.0000008 USD/GB-s is 0.12672 USD.
    assert core.contract_cost_pusd(ram_gb=32, vram_gb=12, used_s=3600, price_pusd=800_000) == (
        126_720_000_000
    )


def test_egress_rounds_down_to_a_pico_dollar() -> None:
    assert (
        core.contract_cost_pusd(
            ram_gb=0, vram_gb=1, used_s=0, price_pusd=1, egress_mgb=1, egress_price_pusd=999
        )
        == 0
    )


@given(
    st.integers(0, core.MAX_GB), st.integers(0, core.MAX_GB), st.integers(0, core.MAX_DURATION_S),
    st.integers(1, core.MAX_PRICE_PUSD),
)  # fmt: skip
def test_cost_is_exact_at_any_size(ram: int, vram: int, used: int, price: int) -> None:
    cost = core.contract_cost_pusd(ram_gb=ram, vram_gb=vram, used_s=used, price_pusd=price)
    assert cost == (ram + vram) * used * price
    assert isinstance(cost, int)


@pytest.mark.parametrize(
    ("start", "now", "duration", "used"),
    [
        (T0, T0, 60, 0),
        (T0, T0 + 1, 60, 1),
        (T0, T0 + 1000, 60, 1),
        (T0, T0 + 1001, 60, 2),
        (T0, T0 + 59_999, 60, 60),
        (T0, T0 + 10**9, 60, 60),
        (T0, T0 - 5000, 60, 0),
    ],
)
def test_used_seconds_counts_started_seconds_within_the_term(
    start: int, now: int, duration: int, used: int
) -> None:
    assert core.used_seconds(start, now, duration) == used


@pytest.mark.parametrize("elapsed_ms", [-5000, 0, 1, 1000, 1001, 1_800_000, 3_600_000, 10**9])
def test_accrued_cost_is_what_settling_now_would_charge_for_time(elapsed_ms: int) -> None:
    """The live view's accrued cost is the settlement's cost at that instant, less egress."""
    c = contract()
    now = T0 + elapsed_ms
    closed = core.close_contract(c, now_ms=now, status="completed", egress_mgb=2400)
    egress = 2400 * c.egress_price_pusd // 1000
    assert core.accrued_cost_pusd(c, now) == closed.cost_pusd - egress
    assert core.accrued_cost_pusd(c, now) == 44 * core.used_seconds(T0, now, 3600) * 800_000


@pytest.mark.parametrize(
    ("given", "mgb"),
    [(0, 0), (2.4, 2400), ("2.4", 2400), (0.0005, 0), (0.0015, 2), (0.0025, 2), (1e3, 10**6)],
)
def test_egress_in_thousandths_of_a_gb(given: object, mgb: int) -> None:
    assert core.egress_mgb(given) == mgb  # type: ignore[arg-type]


@pytest.mark.parametrize("given", [-0.001, float("nan"), float("inf"), "lots"])
def test_egress_must_be_a_non_negative_number(given: object) -> None:
    with pytest.raises(InvalidRequest) as refused:
        core.egress_mgb(given)  # type: ignore[arg-type]
    assert refused.value.field == "egress_gb"


# -- settlement ---------------------------------------------------------------------------------


def test_close_contract_prices_and_stamps() -> None:
    closed = core.close_contract(
        contract(), now_ms=T0 + 90_500, status="completed", egress_mgb=2400
    )
    assert (closed.status, closed.used_s, closed.completed_ms, closed.version) == (
        "completed", 91, T0 + 90_500, 4,
    )  # fmt: skip
    assert closed.cost_pusd == 44 * 91 * 800_000 + 2400 * 50_000_000_000 // 1000
    assert closed.settlement_hash == core.settlement_hash(closed)


def test_settlement_hash_is_sha256_of_the_canonical_record() -> None:
    """Every field but the hash and the version; a contract that was not delivered has no
    delivery field in it (its hash is what it was before delivery existed)."""
    closed = core.close_contract(contract(), now_ms=T0 + 1000, status="completed")
    record = {
        k: v
        for k, v in msgspec.structs.asdict(closed).items()
        if k not in ("settlement_hash", "version", "hold_pusd", "hold_month", *core.LEASE_FIELDS)
    }
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    assert closed.settlement_hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert '"cost_pusd":35200000,' in canonical  # 44 GB x 1 s x 800,000


def test_settlement_hash_covers_every_field_but_version_and_the_hold() -> None:
    base = core.settlement_hash(contract())
    assert core.settlement_hash(contract(version=99)) == base
    assert core.settlement_hash(contract(settlement_hash="x")) == base
    for change in ({"cost_pusd": 1}, {"used_s": 1}, {"client_id": "d"}, {"successor_id": "s"}):
        assert core.settlement_hash(contract(**change)) != base
    # how the lease was paid for (the money held for it) is not part of its record
    assert core.settlement_hash(contract(hold_pusd=5, hold_month="2024-01")) == base
    delivered = core.settlement_hash(contract(lease_state="closed"))
    assert delivered != base
    for change in ({"lease_digest": "ab" * 32}, {"egress_bytes": 1}, {"ready_ms": 1}):
        assert core.settlement_hash(contract(lease_state="closed", **change)) != delivered


def test_successor_gets_the_unbilled_seconds() -> None:
    c = contract(duration_s=3600)
    assert core.successor_duration_s(c, T0 + 180_000) == 3420
    assert core.successor_duration_s(c, T0 + 180_001) == 3419
    assert core.successor_duration_s(c, T0 + 3_600_000) == 0


# -- asks and heartbeats ----------------------------------------------------------------------


def test_ask_listing_rule() -> None:
    assert core.ask_listed(node(), T0)
    assert not core.ask_listed(node(status="maintenance"), T0)
    assert not core.ask_listed(node(offered_ram_gb=0, offered_vram_gb=0), T0)
    assert not core.ask_listed(node(reserved_ram_gb=32, reserved_vram_gb=8), T0)
    assert core.ask_listed(node(reserved_ram_gb=32), T0)
    assert core.ask_listed(node(ask_expires_ms=T0 + 1), T0)
    assert not core.ask_listed(node(ask_expires_ms=T0), T0)


@given(st.integers(0, 100), st.integers(0, 150), st.integers(0, 100))
def test_heartbeat_offer_never_revokes_a_lease(total: int, available: int, reserved: int) -> None:
    reserved = min(reserved, total)
    offered = core.offered_after_heartbeat(total, available, reserved)
    assert reserved <= offered <= total
    assert offered - reserved == min(available, total - reserved)


def test_offline_deadline() -> None:
    assert core.hb_deadline_ms(T0, 60.0, 3) == T0 + 180_000
    assert core.hb_deadline_ms(T0, 0.1, 3) == T0 + 300  # 0.30000000000000004 s -> 300 ms


def test_reserve_refusal_order() -> None:
    ok = dict(ram_gb=1, vram_gb=0, duration_s=60, max_price_pusd=1000, now_ms=T0)
    assert core.reserve_refusal(node(), **ok) is None
    cases = [
        (node(status="offline"), ok, Unavailable, "node is offline"),
        (node(ask_expires_ms=T0), ok, Unavailable, "ask expired"),
        (node(), {**ok, "duration_s": 59}, CapacityTaken, "duration outside the node's terms"),
        (node(), {**ok, "max_price_pusd": 999}, CapacityTaken, "price above cap"),
        (node(), {**ok, "ram_gb": 33}, CapacityTaken, "capacity taken"),
        (node(status="offline", price_pusd=5000), {**ok, "ram_gb": 99}, Unavailable, "offline"),
    ]
    for n, kw, error, message in cases:
        refusal = core.reserve_refusal(n, **kw)  # type: ignore[arg-type]
        assert isinstance(refusal, error) and message in str(refusal)


# -- bids ---------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 10**6)), unique_by=lambda t: t[1]))
def test_book_order_is_price_then_time(entries: list[tuple[int, int]]) -> None:
    """Sorted-set order (score, then member bytes) equals bid priority."""
    bids = [bid(bid_id=f"b{seq}", max_price_pusd=price, seq=seq) for price, seq in entries]
    by_zset = sorted(bids, key=lambda b: (core.bid_score(b.max_price_pusd),
                                          core.bid_member(b.seq, b.bid_id).encode()))  # fmt: skip
    assert by_zset == sorted(bids, key=core.bid_priority)
    for b in bids:
        assert core.parse_bid_member(core.bid_member(b.seq, b.bid_id)) == (b.seq, b.bid_id)


def test_fill_rules() -> None:
    whole = bid(allow_split=False)
    assert core.fill_refusal(whole, 10, 4) is None
    assert isinstance(core.fill_refusal(whole, 5, 4), InvalidRequest)
    assert isinstance(core.fill_refusal(whole, 11, 4), Conflict)
    split = bid(allow_split=True, min_fill_gb=5)
    assert core.fill_refusal(split, 5, 0) is None
    assert isinstance(core.fill_refusal(split, 3, 1), InvalidRequest)
    rest = bid(allow_split=True, min_fill_gb=5, filled_ram_gb=8, filled_vram_gb=4)
    assert core.fill_refusal(rest, 2, 0) is None  # the whole rest, though under the minimum


@given(
    st.integers(0, 20), st.integers(0, 20), st.booleans(), st.integers(0, 12),
    st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15)), max_size=8),
)  # fmt: skip
def test_fills_conserve_the_bid(
    ram: int, vram: int, split: bool, min_fill: int, nodes: list[tuple[int, int]]
) -> None:
    """Filled + remaining == original through any sequence of allowed fills."""
    if ram + vram == 0:
        return
    b = bid(ram_gb=ram, vram_gb=vram, allow_split=split, min_fill_gb=min_fill)
    for i, (free_ram, free_vram) in enumerate(nodes):
        size = core.fill_size(b, free_ram, free_vram)
        if size is None:
            continue
        assert size[0] <= free_ram and size[1] <= free_vram
        assert core.fill_refusal(b, *size) is None
        b = core.apply_fill(b, *size, f"k{i}")
        assert b.filled_ram_gb + b.remaining_ram_gb == ram
        assert b.filled_vram_gb + b.remaining_vram_gb == vram
        assert b.remaining_ram_gb >= 0 and b.remaining_vram_gb >= 0
        if not split:
            assert b.status == "filled"
    assert (b.status == "filled") == (b.remaining_ram_gb == b.remaining_vram_gb == 0)


def test_plan_fills_takes_the_best_eligible_candidates() -> None:
    candidates = [
        node(node_id="a", price_pusd=5000),  # above the cap
        node(node_id="b", status="maintenance"),
        node(node_id="c", offered_ram_gb=6, offered_vram_gb=0),
        node(node_id="d", min_duration_s=3600),  # terms
        node(node_id="e", price_pusd=1500),
        node(node_id="f"),
    ]
    whole = bid(ram_gb=10, vram_gb=4)
    assert [f.node_id for f in core.plan_fills(whole, candidates, T0)] == ["e"]
    split = bid(ram_gb=10, vram_gb=4, allow_split=True, min_fill_gb=2)
    fills = core.plan_fills(split, candidates, T0)
    assert [(f.node_id, f.ram_gb, f.vram_gb, f.price_pusd) for f in fills] == [
        ("c", 6, 0, 1000), ("e", 4, 4, 1500),
    ]  # fmt: skip
    assert core.plan_fills(bid(status="cancelled"), candidates, T0) == []
    assert core.plan_fills(bid(expires_ms=T0), candidates, T0) == []


# -- validation and stored form ---------------------------------------------------------------


def test_new_node_normalises() -> None:
    stored = core.new_node(node(offered_ram_gb=100, reserved_ram_gb=5, status="offline", lat=1), T0)
    assert (stored.offered_ram_gb, stored.reserved_ram_gb, stored.status) == (64, 0, "active")
    assert (stored.created_ms, stored.last_heartbeat_ms, stored.lat) == (T0, 0, 1.0)
    assert isinstance(stored.lat, float)


@pytest.mark.parametrize(
    ("beat", "field"),
    [
        (Heartbeat(node_id="n", available_ram_gb=-1, available_vram_gb=0), "available_ram_gb"),
        (Heartbeat(node_id="n", available_ram_gb=0, available_vram_gb=0, lat=1.0), "lat"),
        (Heartbeat(node_id="n", available_ram_gb=0, available_vram_gb=0, cpu_usage_pct=101.0),
         "cpu_usage_pct"),
        (Heartbeat(node_id="", available_ram_gb=0, available_vram_gb=0), "node_id"),
    ],
)  # fmt: skip
def test_heartbeat_validation(beat: Heartbeat, field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        core.validate_heartbeat(beat)
    assert refused.value.field == field


def _beat_outcome(check: Any, beat: Any) -> Any:
    try:
        out = check(beat)
    except InvalidRequest as exc:
        return ("refused", exc.field, str(exc))
    return ("ok", out, [type(getattr(out, f)) for f in out.__struct_fields__])


_odd = st.one_of(
    st.none(), st.booleans(), st.integers(-200, 2_000_000), st.floats(), st.text(max_size=3)
)


@given(
    node_id=st.one_of(st.sampled_from(["n1", ""]), st.integers(0, 3)),
    ram=st.one_of(st.integers(-1, 1_000_001), _odd),
    vram=st.one_of(st.integers(0, 8), _odd),
    cpu=st.one_of(st.none(), st.floats(-1.0, 101.0), _odd),
    gpu=st.one_of(st.none(), st.floats(0.0, 100.0), _odd),
    temp=st.one_of(st.none(), st.integers(-101, 301), _odd),
    bandwidth=st.one_of(st.none(), st.integers(0, 10)),
    place=st.sampled_from([(None, None), (40.0, -74.0), (40, -74), (None, 1.0)]),
)
def test_heartbeat_fast_check_agrees_with_the_full_checks(
    node_id: Any, ram: Any, vram: Any, cpu: Any, gpu: Any, temp: Any, bandwidth: Any, place: Any
) -> None:
    """validate_heartbeat's one-expression path for common beats accepts exactly what the full
    field-by-field checks accept, unchanged, and refuses the rest the same way."""
    beat = Heartbeat(
        node_id=node_id, available_ram_gb=ram, available_vram_gb=vram, cpu_usage_pct=cpu,
        gpu_usage_pct=gpu, temperature_c=temp, bandwidth_mbps=bandwidth, lat=place[0],
        lng=place[1],
    )  # fmt: skip
    assert _beat_outcome(core.validate_heartbeat, beat) == _beat_outcome(
        core._validate_heartbeat_fully, beat
    )


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(
    lat=st.floats(-90, 90), lng=st.floats(-180, 180), uptime=st.floats(0, 100),
    interval=finite.filter(lambda x: x > 0), name=st.text(min_size=1),
    metadata=st.dictionaries(st.text(), st.text(), max_size=3),
)  # fmt: skip
def test_stored_form_round_trips(lat, lng, uptime, interval, name, metadata) -> None:  # fmt: skip
    n = node(lat=lat, lng=lng, uptime_score=uptime, heartbeat_interval_s=interval, name=name,
             metadata=metadata)  # fmt: skip
    fields = core.to_fields(n)
    assert all(isinstance(v, str) for v in fields.values())
    assert core.from_fields(Node, fields) == n
    b = bid(lat=lat, lng=lng, contract_ids=["k1", "k2"], node_type="datacenter")
    assert core.from_fields(Bid, core.to_fields(b)) == b
    c = contract(cost_pusd=10**30, settlement_hash="ab")
    assert core.from_fields(Contract, core.to_fields(c)) == c


def test_lua_constants_match_the_core() -> None:
    lib = (Path(core.__file__).with_name("lua") / "_lib.lua").read_text()
    assert f"FILLS_WINDOW_MS = {core.FILLS_WINDOW_MS}" in lib
    assert f"GEO_LAT_LIMIT = {core.GEO_LAT_LIMIT}" in lib
    # Every refusal message the scripts use is one the core (and the model) uses too.
    scripts = "".join(p.read_text() for p in Path(core.__file__).with_name("lua").glob("*.lua"))
    messages = set(re.findall(r"refuse\('[a-z_]+', \"([^\"]+)\"", scripts))
    messages |= set(re.findall(r"refuse\('[a-z_]+', '([^']+)'", scripts))
    assert len(messages) >= 15
    known = {
        v
        for module in (core, trust)
        for k, v in vars(module).items()
        if k.isupper() and isinstance(v, str)
    }
    prefixes = ("node is", "bid is", "contract is", "lease is ")
    assert {m for m in messages if not m.startswith(prefixes) or m in known} <= known
