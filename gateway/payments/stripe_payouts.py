"""Provider payouts: one Stripe Connect transfer per provider and settlement period (a UTC
day), grouped by `transfer_group` per period (`mnemo payouts run [--period YYYY-MM-DD]`); and
each provider's statement (`GET /api/payments/statement`).

What is paid: a provider's earnings in the ledger (what settled contracts paid it, net of the
platform fee: its `provider:<user>` account) credited before the period's end, less every
payout already made or under way, in whole cents (what is under a cent waits for the next
period). Only providers whose Connect account Stripe reports able to take transfers are paid;
the others' earnings wait in the ledger.

Exactly once, per provider and period:
1. in one transaction holding the provider's lock, the amount is computed and the payout row
   written ('pending', with the Stripe idempotency key `mnemo-payout-<user>-<period>-<attempt>`);
2. Stripe is asked for the transfer with that key;
3. in one transaction, the row is marked 'paid' with the transfer's id and the ledger movement
   `payout:<payout id>` (provider -> rail:stripe) is posted.
A crash or a lost answer between 2 and 3 leaves the row 'pending': every run first finishes the
pending rows with their own key, and Stripe answers the transfer it already made; a second run
for the same period finds the row and pays nothing more. A transfer Stripe refuses marks the row
'failed' (no money moved); the next run tries it again as a new attempt.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import uuid
from dataclasses import dataclass, field

import asyncpg
from msgspec import Struct

from engine import trust
from engine.settings import Settings
from gateway.errors import ApiError, ValidationFailed
from gateway.operations import Call, Operation, route
from gateway.payments.stripe_rail import PUSD_PER_CENT, StripeRail, StripeUnavailable
from gateway.routes.nodes import PROVIDERS
from gateway.schemas import to_usd
from persistence import invoices as q
from persistence import payouts

__all__ = [
    "OPERATIONS",
    "PayoutReport",
    "Statement",
    "default_period",
    "drive",
    "pay_providers",
    "routes",
    "run_payouts",
    "transfer_group",
]

log = logging.getLogger("mnemo.payments.payouts")


def default_period(now: dt.datetime) -> dt.date:
    """The last whole settlement period (UTC day) before `now`: yesterday."""
    return now.astimezone(dt.UTC).date() - dt.timedelta(days=1)


def period_end(period: dt.date) -> dt.datetime:
    return dt.datetime(period.year, period.month, period.day, tzinfo=dt.UTC) + dt.timedelta(days=1)


def transfer_group(period: dt.date) -> str:
    return f"mnemo-payouts-{period.isoformat()}"


@dataclass
class PayoutReport:
    """What one run did, provider by provider (user id -> words)."""

    period: dt.date
    paid: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"payouts for {self.period.isoformat()} ({transfer_group(self.period)}):"]
        for title, found in (
            ("paid", self.paid),
            ("failed", self.failed),
            ("skipped", self.skipped),
        ):
            out += [f"  {title:7} {user}: {words}" for user, words in sorted(found.items())]
        return out


async def _lock(conn: payouts.Conn, user_id: str) -> None:
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 14))", f"payout:{user_id}"
    )


async def _due_cents(conn: payouts.Conn, user_id: str, period: dt.date) -> int:
    earned = await payouts.earned_pusd(conn, user_id, until=period_end(period))
    paid = sum(
        r["amount_cents"]
        for r in await payouts.payouts_of(conn, user_id)
        if r["status"] != "failed"
    )
    return max(0, (earned - paid * PUSD_PER_CENT) // PUSD_PER_CENT)


async def drive(
    pool: asyncpg.Pool, rail: StripeRail, row: asyncpg.Record, report: PayoutReport
) -> None:
    """Steps 2 and 3 (see the module docstring) for a pending payout row."""
    user = str(row["user_id"])
    try:
        transfer = await rail.transfer(
            amount_cents=row["amount_cents"],
            destination=row["stripe_account_id"],
            transfer_group=row["transfer_group"],
            idempotency_key=row["stripe_idempotency_key"],
            metadata={
                "mnemo_payout_id": row["id"].hex,
                "mnemo_user_id": user,
                "period": row["period"].isoformat(),
            },
        )
    except StripeUnavailable as exc:
        report.failed[user] = f"Stripe did not answer ({exc.message}); the next run finishes it"
        return
    except ApiError as exc:
        async with pool.acquire() as conn, conn.transaction():
            await payouts.finish_payout(conn, row["id"], status="failed", error_message=exc.message)
        report.failed[user] = f"Stripe refused the transfer: {exc.message}"
        return
    if (
        transfer.amount_cents != row["amount_cents"]
        or transfer.destination != row["stripe_account_id"]
    ):
        log.error("transfer %s does not match payout %s; left pending", transfer.id, row["id"])
        report.failed[user] = f"transfer {transfer.id} does not match the payout: left pending"
        return
    async with pool.acquire() as conn, conn.transaction():
        paid = await payouts.finish_payout(
            conn, row["id"], status="paid", stripe_transfer_id=transfer.id
        )
        await payouts.post_payout(
            conn,
            key=f"payout:{row['id'].hex}",
            user_id=user,
            amount_pusd=paid["amount_pusd"],
            reference=transfer.id,
            reason=f"payout for {row['period'].isoformat()} ({row['transfer_group']})",
            ts=paid["paid_at"],
        )
    report.paid[user] = f"{row['amount_cents'] / 100:.2f} USD, transfer {transfer.id}"


async def pay_providers(
    pool: asyncpg.Pool, rail: StripeRail, period: dt.date, *, now: dt.datetime | None = None
) -> PayoutReport:
    """One payout run for `period` (see the module docstring); what it did."""
    now = now or dt.datetime.now(dt.UTC)
    if period_end(period) > now:
        raise ApiError(f"the period {period.isoformat()} has not ended yet", code="period_open")
    report = PayoutReport(period)
    for row in await payouts.unfinished_payouts(pool):
        await drive(pool, rail, row, report)
    for account in await payouts.connect_accounts(pool):
        user = str(account["user_id"])
        if user in report.paid or user in report.failed:
            continue
        try:
            state = await rail.account(account["stripe_account_id"])
        except ApiError as exc:
            report.failed[user] = f"cannot read the Stripe account: {exc.message}"
            continue
        await payouts.set_account_state(
            pool,
            user,
            transfers_active=state.transfers_active,
            details_submitted=state.details_submitted,
        )
        if not state.transfers_active:
            report.skipped[user] = "Stripe account cannot take transfers yet (onboarding)"
            continue
        async with pool.acquire() as conn, conn.transaction():
            await _lock(conn, user)
            existing = await payouts.payout(conn, user, period)
            if existing is not None and existing["status"] == "paid":
                report.skipped[user] = f"paid already ({existing['stripe_transfer_id']})"
                continue
            if existing is not None and existing["status"] == "pending":
                row = existing  # finished above unless Stripe was down: try again
            else:
                due = await _due_cents(conn, user, period)
                if due < 1:
                    report.skipped[user] = "nothing due"
                    continue
                if existing is not None:
                    row = await payouts.reopen_payout(
                        conn,
                        existing["id"],
                        amount_cents=due,
                        stripe_account_id=account["stripe_account_id"],
                    )
                else:
                    started = await payouts.start_payout(
                        conn,
                        user_id=user,
                        period=period,
                        stripe_account_id=account["stripe_account_id"],
                        amount_cents=due,
                        transfer_group=transfer_group(period),
                    )
                    assert started is not None  # the lock is held
                    row = started
        await drive(pool, rail, row, report)
    return report


async def run_payouts(settings: Settings, period: dt.date | None = None) -> PayoutReport:
    """One run against the configured database and Stripe (see `pay_providers`)."""
    assert settings.database_url is not None
    period = period or default_period(dt.datetime.now(dt.UTC))
    rail = StripeRail(settings)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        return await pay_providers(pool, rail, period)
    finally:
        await pool.close()
        await rail.aclose()


async def main(settings: Settings, period: dt.date | None = None) -> int:
    """`mnemo payouts run`: prints what it did; exit status 1 if a payout failed or is left
    unfinished (run it again: nothing is paid twice), 2 if the period has not ended."""
    try:
        report = await run_payouts(settings, period)
    except ApiError as exc:
        print(f"mnemo: error: {exc.message}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 1 if report.failed else 0


# -- the statement -------------------------------------------------------------------------------


class StatementNode(Struct, kw_only=True):
    node_id: str
    name: str | None
    region: str | None
    contracts: int
    gb_sec: int
    gross_usd: float
    gross_pusd: int
    """What renters paid for its contracts closed in the range (before the platform fee)."""
    stake_usd: float = 0.0
    stake_pusd: int = 0
    """The stake locked for the node now (engine.trust; from the journal's copy)."""
    stake_held_usd: float = 0.0
    stake_held_pusd: int = 0
    """The part of it held back from earnings."""
    uptime_score: float | None = None
    """The node's measured uptime (engine.trust; from the journal's copy; null: not there)."""
    uptime_new: bool = False
    """Fewer than 7 days of measured history (see `GET /api/nodes/{id}`)."""
    reputation_score: int | None = None
    suspended: bool = False
    """Suspended from new leases (its score stayed below 60 past the grace)."""
    suspension_due_ms: int = 0
    """Warned: suspended at this instant unless the score is back at 60 by then (0: no warning)."""


class StatementLine(Struct, kw_only=True):
    at: dt.datetime
    kind: str
    """earning (a settlement, net of the fee, less what was held back into the node's stake),
    payout, stake_locked (moved out of the earnings into a node's stake), stake_released (back
    from a node's stake), or adjustment."""
    contract_id: str | None
    reference: str | None
    amount_usd: float
    amount_pusd: int
    fee_usd: float
    fee_pusd: int


class StatementPayout(Struct, kw_only=True):
    period: dt.date
    status: str
    amount_usd: float
    amount_pusd: int
    transfer_group: str
    stripe_transfer_id: str | None
    paid_at: dt.datetime | None
    error_message: str | None


class Statement(Struct, kw_only=True):
    user_id: str
    start: dt.datetime
    end: dt.datetime
    nodes: list[StatementNode]
    earnings_usd: float
    earnings_pusd: int
    """Net earnings credited in the range (gross less fees)."""
    fees_usd: float
    fees_pusd: int
    payouts_usd: float
    payouts_pusd: int
    opening_balance_usd: float
    opening_balance_pusd: int
    balance_usd: float
    balance_pusd: int
    """Owed to the provider at `end`: opening + earnings - payouts (+ adjustments)."""
    lines: list[StatementLine]
    payouts: list[StatementPayout]
    stripe_account_id: str | None
    transfers_active: bool
    stake_usd: float = 0.0
    stake_pusd: int = 0
    """The stake locked for the provider's nodes now (engine.trust), not part of `balance`."""
    stake_held_usd: float = 0.0
    stake_held_pusd: int = 0
    """The part of it held back from earnings."""


class StatementQuery(Struct, forbid_unknown_fields=True, kw_only=True):
    start: dt.date | None = None
    """First day (UTC) of the range; default 30 days before `end`."""
    end: dt.date | None = None
    """Day after the range (UTC); default tomorrow (the range includes today)."""


def _statement_node(r: asyncpg.Record, node: asyncpg.Record | None) -> StatementNode:
    """A node's row of the statement: its contracts in the range (`r`), its stake and trust
    now (`node`, the journal's copy; None: not there)."""
    out = StatementNode(
        node_id=r["node_id"].hex,
        name=r["name"],
        region=r["region"],
        contracts=r["contracts"],
        gb_sec=int(r["gb_sec"] or 0),
        gross_usd=to_usd(int(r["gross_pusd"])),
        gross_pusd=int(r["gross_pusd"]),
    )
    if node is None:
        return out
    due = node["suspend_at"]
    out.stake_pusd, out.stake_held_pusd = int(node["stake_pusd"]), int(node["stake_held_pusd"])
    out.stake_usd, out.stake_held_usd = to_usd(out.stake_pusd), to_usd(out.stake_held_pusd)
    up, rep = node["uptime_score"], node["reputation_score"]
    out.uptime_score = float(up) if up is not None else trust.NEW_NODE_SCORE
    out.uptime_new = int(node["uptime_windows"]) < trust.MIN_WINDOWS
    out.reputation_score = rep if rep is not None else 100
    out.suspended = node["suspended_at"] is not None
    out.suspension_due_ms = 0 if due is None else round(due.timestamp() * 1000)
    return out


async def statement(call: Call) -> Statement:
    query: StatementQuery = call.query
    pool = call.state.pool
    user = call.user.user_id
    today = dt.datetime.now(dt.UTC).date()
    end_day = query.end or today + dt.timedelta(days=1)
    start_day = query.start or end_day - dt.timedelta(days=30)
    if start_day >= end_day or (end_day - start_day).days > 366:
        raise ValidationFailed("start must be before end, at most 366 days apart", field="start")
    start = dt.datetime(start_day.year, start_day.month, start_day.day, tzinfo=dt.UTC)
    end = dt.datetime(end_day.year, end_day.month, end_day.day, tzinfo=dt.UTC)
    owned = {
        r["id"].hex: r
        for r in await pool.fetch(
            "SELECT id, stake_pusd, stake_held_pusd, uptime_score, uptime_windows, "
            "reputation_score, suspend_at, suspended_at FROM nodes WHERE owner_id = $1",
            uuid.UUID(user),
        )
    }
    staked = {k: (int(r["stake_pusd"]), int(r["stake_held_pusd"])) for k, r in owned.items()}
    nodes = [
        _statement_node(r, owned.get(r["node_id"].hex))
        for r in await q.provider_contracts(pool, user, start, end)
    ]
    stake_total = sum(v[0] for v in staked.values())
    held_total = sum(v[1] for v in staked.values())
    lines: list[StatementLine] = []
    earnings = fees = paid = 0
    for r in await q.provider_movements(pool, user, start, end):
        amount, fee = int(r["amount_pusd"]), int(r["fee_pusd"])
        kind = {
            "settle": "earning",
            "payout": "payout",
            "stake_lock_out": "stake_locked",
            "stake_release": "stake_released",
        }.get(r["cause"], "adjustment")
        if kind == "earning":
            earnings += amount
            fees += fee
        elif kind == "payout":
            paid -= amount
        lines.append(
            StatementLine(
                at=r["ts"],
                kind=kind,
                contract_id=r["contract_id"],
                reference=r["reference"],
                amount_usd=to_usd(amount),
                amount_pusd=amount,
                fee_usd=to_usd(fee),
                fee_pusd=fee,
            )
        )
    account = await payouts.connect_account(pool, user)
    rows = await payouts.payouts_of(pool, user, since=start_day, until=end_day)
    opening = await q.provider_balance(pool, user, start)
    balance = await q.provider_balance(pool, user, end)
    return Statement(
        user_id=user,
        start=start,
        end=end,
        nodes=nodes,
        earnings_usd=to_usd(earnings),
        earnings_pusd=earnings,
        fees_usd=to_usd(fees),
        fees_pusd=fees,
        payouts_usd=to_usd(paid),
        payouts_pusd=paid,
        opening_balance_usd=to_usd(opening),
        opening_balance_pusd=opening,
        balance_usd=to_usd(balance),
        balance_pusd=balance,
        lines=lines,
        payouts=[
            StatementPayout(
                period=p["period"],
                status=p["status"],
                amount_usd=to_usd(p["amount_pusd"]),
                amount_pusd=p["amount_pusd"],
                transfer_group=p["transfer_group"],
                stripe_transfer_id=p["stripe_transfer_id"],
                paid_at=p["paid_at"],
                error_message=p["error_message"],
            )
            for p in rows
        ],
        stripe_account_id=account["stripe_account_id"] if account else None,
        transfers_active=bool(account and account["transfers_active"]),
        stake_usd=to_usd(stake_total),
        stake_pusd=stake_total,
        stake_held_usd=to_usd(held_total),
        stake_held_pusd=held_total,
    )


OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/api/payments/statement",
        statement,
        name="provider_statement",
        summary="The caller's provider statement: earnings per node, fees, payouts, balance",
        tag="payments",
        query=StatementQuery,
        response=Statement,
        roles=PROVIDERS,
        description="Over all of the caller's nodes, for the days [start, end) (UTC; default "
        "the last 30 days and today). Payouts are made per UTC day by `mnemo payouts run`.",
    ),
]

routes = [route(op) for op in OPERATIONS]
