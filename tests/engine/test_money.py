"""Money in the live market (issue 14): wallets, credits and debits, transfers between slots,
holds taken and released by the market's scripts, budgets and caps, exact beyond 2**53."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine import core
from engine.errors import BudgetExceeded, InsufficientFunds, InvalidRequest
from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.types import Bid, Node, WalletCredited
from tests.engine.conftest import fund

T0 = 1_700_000_000_000  # 2023-11-14
PRICE = 800_000
USD = 10**12


def a_node(node_id: str = "n1", **kw: Any) -> Node:
    fields: dict[str, Any] = dict(
        node_id=node_id, owner_id="alice", region="us-east-2", node_type="mist_node",
        name=f"Alice {node_id}", lat=40.7282, lng=-73.7949, total_ram_gb=64, total_vram_gb=24,
        offered_ram_gb=48, offered_vram_gb=18, price_pusd=PRICE, egress_price_pusd=50_000_000_000,
    )  # fmt: skip
    fields.update(kw)
    return Node(**fields)


def take(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        node_id="n1", client_id="acme", user_id="u-acme", ram_gb=8, vram_gb=2,
        duration_s=3600, max_price_pusd=1_000_000, now_ms=T0,
    )  # fmt: skip
    args.update(kw)
    return args


@pytest.fixture
async def market(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Market]:
    m = Market(redis, keys, platform_fee_bps=1000)
    await m.load_scripts()
    yield m


async def test_credit_is_applied_once_per_key_and_logged(market: Market) -> None:
    """A credit lands in the funding wallet once per key; a retry answers the balance."""
    first = await market.credit(
        "acme", 5 * USD, key="k1", rail="operator", reason="trial", now_ms=T0
    )
    again = await market.credit("acme", 5 * USD, key="k1", rail="operator", now_ms=T0 + 1)
    assert first.applied and not again.applied
    assert first.balance_pusd == again.balance_pusd == 5 * USD
    assert again.event_id == first.event_id
    [event] = await market.read_events(FUNDING)
    assert isinstance(event, WalletCredited)
    assert (event.amount_pusd, event.rail, event.reason, event.wallet.avail_pusd) == (
        5 * USD, "operator", "trial", 5 * USD,
    )  # fmt: skip


async def test_amounts_beyond_double_precision_stay_exact(market: Market) -> None:
    """Balances past 2**53 pico-USD (about 9,007 USD) add and subtract exactly."""
    big = 2**53 + 1
    await market.credit("acme", big, key="a", rail="operator", now_ms=T0)
    await market.credit("acme", big, key="b", rail="operator", now_ms=T0)
    result = await market.debit("acme", 3, key="c", rail="operator", now_ms=T0)
    assert result.balance_pusd == 2 * big - 3
    w = await market.wallet(FUNDING, "acme", T0)
    assert w.avail_pusd == 2 * big - 3


async def test_debit_beyond_the_balance_is_refused_unless_allowed_negative(market: Market) -> None:
    """A debit the funding balance cannot cover is refused with what is missing; a refund of
    money already spent may take it negative."""
    await market.credit("acme", 10 * USD, key="in", rail="stripe", now_ms=T0)
    with pytest.raises(InsufficientFunds) as refused:
        await market.debit("acme", 12 * USD, key="out", rail="stripe", now_ms=T0)
    assert refused.value.shortfall_pusd == 2 * USD
    owed = await market.debit(
        "acme", 12 * USD, key="out", rail="stripe", now_ms=T0, allow_negative=True
    )
    assert owed.balance_pusd == -2 * USD


async def test_credit_validates_its_inputs(market: Market) -> None:
    """Bad amounts, rails, keys and accounts are refused before any script runs."""
    for kw, field in [
        ({"amount_pusd": 0}, "amount_pusd"),
        ({"rail": "paypal"}, "rail"),
        ({"key": ""}, "key"),
        ({"account_id": "a b"}, "account_id"),
    ]:
        args: dict[str, Any] = {
            "account_id": "acme",
            "amount_pusd": 1,
            "key": "k",
            "rail": "operator",
        }
        args.update(kw)
        with pytest.raises(InvalidRequest) as refused:
            await market.credit(args.pop("account_id"), args.pop("amount_pusd"), now_ms=T0, **args)
        assert refused.value.field == field


async def test_transfer_moves_money_and_allowance_once(market: Market) -> None:
    """A transfer debits the funding wallet, credits the region's, clears its outbox; its
    steps repeated change nothing."""
    await market.credit("acme", 10 * USD, key="in", rail="operator", now_ms=T0)
    tid = await market.transfer(
        "acme",
        from_slot=FUNDING,
        to_slot="us-east-2",
        amount_pusd=4 * USD,
        allow_pusd=USD,
        now_ms=T0,
    )
    assert tid is not None
    assert await market.pending_transfers(FUNDING) == {}
    funding = await market.wallet(FUNDING, "acme", T0)
    region = await market.wallet("us-east-2", "acme", T0)
    assert (funding.avail_pusd, funding.allow_pusd) == (6 * USD, USD)
    assert (region.avail_pusd, region.allow_pusd) == (4 * USD, USD)


async def test_a_transfer_interrupted_after_its_first_step_is_completed_by_repair(
    market: Market,
) -> None:
    """The money of a transfer whose sender died after step 1 is in the outbox (in transit);
    the repair loop credits it exactly once."""
    await market.credit("acme", 10 * USD, key="in", rail="operator", now_ms=T0)
    tid = await market.send_transfer(
        "acme", from_slot=FUNDING, to_slot="us-east-2", amount_pusd=3 * USD, allow_pusd=0, now_ms=T0
    )
    assert tid is not None
    pending = await market.pending_transfers(FUNDING)
    assert list(pending) == [tid] and pending[tid].amount_pusd == 3 * USD
    assert await market.complete_transfers(T0 + 1000, older_than_ms=5000) == 0  # too young
    assert await market.complete_transfers(T0 + 6000, older_than_ms=5000) == 1
    # a late step 2 from the original sender changes nothing
    assert not await market.receive_transfer(FUNDING, tid, pending[tid], T0 + 7000)
    assert (await market.wallet("us-east-2", "acme", T0)).avail_pusd == 3 * USD
    assert (await market.wallet(FUNDING, "acme", T0)).avail_pusd == 7 * USD


async def test_funding_goes_negative_only_within_the_credit_line(market: Market) -> None:
    """A transfer from the funding wallet may use the credit line, no more."""
    with pytest.raises(InsufficientFunds) as refused:
        await market.transfer(
            "acme", from_slot=FUNDING, to_slot="us-east-2", amount_pusd=5 * USD, now_ms=T0,
            credit_line_pusd=3 * USD,
        )  # fmt: skip
    assert refused.value.shortfall_pusd == 2 * USD
    await market.transfer(
        "acme", from_slot=FUNDING, to_slot="us-east-2", amount_pusd=3 * USD, now_ms=T0,
        credit_line_pusd=3 * USD,
    )  # fmt: skip
    assert (await market.wallet(FUNDING, "acme", T0)).avail_pusd == -3 * USD


async def test_reserve_holds_the_cost_and_settle_captures_it(market: Market) -> None:
    """A contract holds size x duration x price; settling captures what was used (the fee is
    the platform's), releases the rest."""
    await market.register_node(a_node(), T0)
    await fund(market, "acme", usd=100)
    c = await market.reserve(**take())
    hold = core.hold_pusd(10, 3600, PRICE)
    assert c.hold_pusd == hold
    w = await market.wallet("us-east-2", "acme", T0)
    assert (w.avail_pusd, w.held_pusd) == (100 * USD - hold, hold)
    settled = await market.settle(c.contract_id, 0, T0 + 600_000)
    cost = core.hold_pusd(10, 600, PRICE)
    assert settled.cost_pusd == cost and settled.hold_pusd == 0
    w = await market.wallet("us-east-2", "acme", T0 + 600_000)
    assert (w.avail_pusd, w.held_pusd) == (100 * USD - cost, 0)
    [*_, event] = await market.read_events("us-east-2")
    assert event.type == "contract_settled" if hasattr(event, "type") else True
    assert event.fee_pusd == cost // 10 and event.released_pusd == hold - cost


async def test_reserve_refuses_what_the_wallet_cannot_hold_before_reserving(market: Market) -> None:
    """An unfunded contract is refused with the shortfall, and nothing is reserved."""
    await market.register_node(a_node(), T0)
    await fund(market, "acme", pusd=10**10)
    with pytest.raises(InsufficientFunds) as refused:
        await market.reserve(**take())
    assert refused.value.shortfall_pusd == core.hold_pusd(10, 3600, PRICE) - 10**10
    node = await market.get_node("n1")
    assert node is not None and node.reserved_ram_gb == 0
    assert await market.contracts() == []


def a_bid(bid_id: str = "b1", **kw: Any) -> Bid:
    fields: dict[str, Any] = dict(
        bid_id=bid_id, region="us-east-2", client_id="acme", user_id="u-acme", ram_gb=8,
        vram_gb=0, duration_s=600, max_price_pusd=2 * PRICE, allow_split=True, min_fill_gb=2,
    )  # fmt: skip
    fields.update(kw)
    return Bid(**fields)


async def wallet(market: Market) -> tuple[int, int]:
    w = await market.wallet("us-east-2", "acme", T0)
    return w.avail_pusd, w.held_pusd


async def test_a_fill_converts_the_bids_hold_at_the_ask_price(market: Market) -> None:
    """A bid holds size x duration x cap; a fill holds the contract's cost at the ask's price
    out of it and releases the difference; cancelling releases what is left."""
    await market.register_node(a_node(), T0)
    await fund(market, "acme", usd=1)
    bid = await market.place_bid(a_bid(), T0)
    assert bid.hold_pusd == core.hold_pusd(8, 600, 2 * PRICE)
    assert await wallet(market) == (USD - bid.hold_pusd, bid.hold_pusd)
    fill = await market.reserve(**take(ram_gb=2, vram_gb=0, duration_s=600,
                                       max_price_pusd=2 * PRICE, bid_id="b1"))  # fmt: skip
    assert fill.hold_pusd == core.hold_pusd(2, 600, PRICE)
    rest = core.hold_pusd(6, 600, 2 * PRICE)
    assert (await market.get_bid("b1")).hold_pusd == rest  # type: ignore[union-attr]
    assert await wallet(market) == (USD - rest - fill.hold_pusd, rest + fill.hold_pusd)
    await market.cancel_bid("b1", T0 + 1)
    assert await wallet(market) == (USD - fill.hold_pusd, fill.hold_pusd)


async def test_an_extension_holds_its_cost_or_is_refused(market: Market) -> None:
    """Extending holds size x extra seconds x the contract's price; unfunded, 402 and the
    contract is unchanged."""
    await market.register_node(a_node(), T0)
    hold = core.hold_pusd(10, 3600, PRICE)
    await fund(market, "acme", pusd=hold + core.hold_pusd(10, 60, PRICE))
    c = await market.reserve(**take())
    extended = await market.extend(c.contract_id, 60, T0 + 1)
    assert extended.hold_pusd == hold + core.hold_pusd(10, 60, PRICE)
    assert await wallet(market) == (0, extended.hold_pusd)
    with pytest.raises(InsufficientFunds) as refused:
        await market.extend(c.contract_id, 60, T0 + 2)
    assert refused.value.field == "extra_s"
    assert (await market.get_contract(c.contract_id)).duration_s == 3660  # type: ignore[union-attr]


async def test_egress_beyond_the_hold_leaves_a_debt(market: Market) -> None:
    """Egress is not held: what the hold cannot pay is charged to the wallet, below zero."""
    await market.register_node(a_node(), T0)
    hold = core.hold_pusd(10, 3600, PRICE)
    await fund(market, "acme", pusd=hold)
    c = await market.reserve(**take())
    settled = await market.settle(c.contract_id, 10, T0 + 3_600_000)  # 10 GB at 0.05 USD/GB
    assert settled.cost_pusd == hold + USD // 2
    assert await wallet(market) == (-USD // 2, 0)


async def test_a_failover_moves_what_is_left_of_the_hold(market: Market) -> None:
    """The old contract's hold pays the time served; the rest becomes the successor's."""
    await market.register_node(a_node(), T0)
    await market.register_node(a_node("n2"), T0)
    await fund(market, "acme", usd=1)
    c = await market.reserve(**take())
    old, new = await market.failover(c.contract_id, "n2", T0 + 600_000)
    assert new.hold_pusd == c.hold_pusd - old.cost_pusd and old.hold_pusd == 0
    assert await wallet(market) == (USD - c.hold_pusd, new.hold_pusd)


async def test_the_budget_allowance_is_monthly(market: Market) -> None:
    """With a budget, holds need the month's allowance (granted from the funding slot up to
    the budget); what is released in the month refills it; a new month starts with none, and
    releasing last month's hold refills nothing."""
    await market.register_node(a_node(), T0)
    await market.credit("acme", USD, key="in", rail="operator", now_ms=T0)
    hold = core.hold_pusd(10, 3600, PRICE)
    await market.fund_region("acme", "us-east-2", hold, now_ms=T0, budget_pusd=hold)
    c = await market.reserve(**take(budgeted=True))
    with pytest.raises(BudgetExceeded):  # the month's budget is spent (held)
        await market.fund_region("acme", "us-east-2", 2 * hold, now_ms=T0, budget_pusd=hold)
    await market.transfer(  # money without allowance: the balance could pay, the budget not
        "acme", from_slot=FUNDING, to_slot="us-east-2", amount_pusd=hold, now_ms=T0
    )
    with pytest.raises(BudgetExceeded) as refused:
        await market.reserve(**take(budgeted=True))
    assert refused.value.shortfall_pusd == hold
    settled = await market.settle(c.contract_id, 0, T0 + 1_000)  # 1 s used, the rest released
    w = await market.wallet("us-east-2", "acme", T0)
    assert w.allow_pusd == hold - settled.cost_pusd
    bid = await market.place_bid(a_bid(max_price_pusd=PRICE, ram_gb=2), T0 + 2_000, budgeted=True)
    next_month = T0 + 31 * 86_400_000
    assert core.month_of(next_month) != core.month_of(T0)
    await market.cancel_bid(bid.bid_id, next_month)
    w = await market.wallet("us-east-2", "acme", next_month)
    assert w.allow_pusd == 0 and w.avail_pusd == 2 * hold - settled.cost_pusd  # no budget back
    with pytest.raises(BudgetExceeded):
        await market.reserve(**take(budgeted=True, ram_gb=1, now_ms=next_month))
    await market.fund_region("acme", "us-east-2", hold, now_ms=next_month, budget_pusd=hold)
    await market.reserve(**take(budgeted=True, now_ms=next_month))


def test_months_are_utc_calendar_months() -> None:
    """`month_of` (the scripts compute the same) names the UTC month of an instant."""
    for year, month in [(1970, 1), (2000, 2), (2024, 2), (2024, 12), (2100, 3), (9999, 12)]:
        start = int(datetime(year, month, 1, tzinfo=UTC).timestamp() * 1000)
        assert core.month_of(start) == f"{year:04d}-{month:02d}"
        assert core.month_of(start - 1) != f"{year:04d}-{month:02d}"


async def test_the_scripts_and_the_core_agree_on_months(market: Market) -> None:
    """The Lua `month_of` and `engine.core.month_of` name the same month (the wallet's month
    after a credit at instants around month ends)."""
    for ms in (0, 951_868_799_999, 951_868_800_000, 1_709_251_199_999, 4_102_444_800_000):
        await market.transfer("acme", from_slot=FUNDING, to_slot="us-east-2", amount_pusd=0,
                              allow_pusd=1, now_ms=ms, credit_line_pusd=0)  # fmt: skip
        raw = await market.redis.hget(market.keys.wallets("us-east-2"), "acme:m")
        assert raw.decode() == core.month_of(ms), ms
