"""The gateway's side of renters' money (issue 14): one balance, moved where it is needed.

A renter's money lives in the live market (`engine.market`, "money"): a funding wallet where
credits land and a wallet per region from which the region's scripts hold. Before a contract,
a bid or an extension the gateway moves what the region's wallet lacks from the funding wallet
(`Market.fund_region`, a transfer with an outbox), passing the renter's terms from Postgres:
its credit line (how far the funding wallet may go below zero) and its monthly budget (how much
allowance may be granted to regions this month). The hold itself is taken inside the script
that reserves: if the price moved in between and the hold is refused, the shortfall is moved
and the call tried once more. So the renter sees one balance: the funding wallet and every
region's together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar

import asyncpg

from engine import core
from engine.errors import BudgetExceeded, InsufficientFunds
from engine.keys import FUNDING
from engine.market import Market
from engine.types import pusd
from gateway.schemas import BalanceOut, RegionBalance, to_usd

__all__ = ["balance_of", "budget_pusd", "paying"]

_T = TypeVar("_T")


def budget_pusd(client: asyncpg.Record) -> int | None:
    """The client's monthly budget in pico-USD (`budget_monthly_usd`), None without one."""
    budget: Decimal | None = client["budget_monthly_usd"]
    return None if budget is None else pusd(budget)


PAYING_ATTEMPTS = 8
"""How many times `paying` tries a call whose hold the region's wallet could not cover."""


async def paying(
    market: Market,
    client: asyncpg.Record,
    region: str,
    need_pusd: int,
    now_ms: int,
    attempt: Callable[[bool], Awaitable[_T]],
) -> _T:
    """Run `attempt(budgeted)` (a market call that holds money in `region`) once the region's
    wallet can hold `need_pusd`; if the script still finds the wallet short (a price moved, or
    the renter's concurrent calls took what was moved), move the difference and attempt again,
    up to `PAYING_ATTEMPTS` times: each round either moves money or is refused by the funding
    wallet. Refusals: 402 `insufficient_funds` / `budget_exceeded` with what the whole balance
    lacks."""
    client_id = str(client["id"])
    budget = budget_pusd(client)
    credit_line = int(client["credit_line_pusd"])
    await market.fund_region(
        client_id,
        region,
        need_pusd,
        now_ms=now_ms,
        credit_line_pusd=credit_line,
        budget_pusd=budget,
    )
    for _ in range(PAYING_ATTEMPTS - 1):
        try:
            return await attempt(budget is not None)
        except (InsufficientFunds, BudgetExceeded) as refused:
            wallet = await market.wallet(region, client_id, now_ms)
            have = (
                wallet.avail_pusd if isinstance(refused, InsufficientFunds) else wallet.allow_pusd
            )
            hold = max(have, 0) + refused.shortfall_pusd
            await market.fund_region(
                client_id,
                region,
                hold,
                now_ms=now_ms,
                credit_line_pusd=credit_line,
                budget_pusd=budget,
            )
    return await attempt(budget is not None)


async def balance_of(market: Market, client: asyncpg.Record, now_ms: int) -> BalanceOut:
    """The client's balance as `GET /api/clients/{id}/balance` shows it."""
    client_id = str(client["id"])
    wallets = await market.wallets(client_id, now_ms)
    funding = wallets.pop(FUNDING)
    regions = [
        RegionBalance(
            region=region,
            available_usd=to_usd(w.avail_pusd),
            available_pusd=w.avail_pusd,
            held_usd=to_usd(w.held_pusd),
            held_pusd=w.held_pusd,
        )
        for region, w in sorted(wallets.items())
    ]
    transit = await market.in_transit(client_id, [FUNDING, *wallets])
    available = funding.avail_pusd + sum(r.available_pusd for r in regions)
    held = sum(r.held_pusd for r in regions)
    # This month's spend: the allowance the funding wallet granted the regions, less what the
    # regions have left of it (holds taken and charges made this month, net of releases).
    spend = funding.allow_pusd - sum(w.allow_pusd for w in wallets.values())
    budget = client["budget_monthly_usd"]
    credit_line = int(client["credit_line_pusd"])
    return BalanceOut(
        client_id=client_id,
        available_usd=to_usd(available),
        available_pusd=available,
        held_usd=to_usd(held),
        held_pusd=held,
        funding_usd=to_usd(funding.avail_pusd),
        funding_pusd=funding.avail_pusd,
        regions=regions,
        in_transit_pusd=transit,
        credit_line_usd=to_usd(credit_line),
        credit_line_pusd=credit_line,
        budget_monthly_usd=None if budget is None else float(budget),
        month=core.month_of(now_ms),
        month_spend_usd=to_usd(spend),
        month_spend_pusd=spend,
    )
