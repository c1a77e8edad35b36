"""`mnemo payments reconcile`: finish what Stripe finished, then compare Stripe, our records
and the ledger, and say every difference.

1. Finish: card payments not final (or succeeded and not credited) are asked of Stripe again
   and applied (a missed webhook's credit lands now, once: the market's keys; one whose
   PaymentIntent was never recorded is listed as a difference); refunds still
   pending likewise (ours that Stripe never answered are asked again with their own key);
   payouts left pending are finished (`stripe_payouts`, their own key).
2. Our records against the ledger: every credited payment, debited or reversed refund and paid
   payout has its ledger movement through `rail:stripe` for its exact amount, and every such
   movement of the last days is one of ours.
3. Stripe against our records, for the last `days` days: each card payment's PaymentIntent (its
   status, amount and refunds) and each day's transfers (`transfer_group`) against our payouts.
Exit status 0 when everything agrees, 1 with the differences listed (one line each).
"""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg

from engine.connection import open_redis
from engine.keys import Keys
from engine.market import Market
from engine.settings import Settings
from gateway.errors import ApiError
from gateway.payments import stripe_payouts
from gateway.payments.stripe_cards import FINAL, CardPayments
from gateway.payments.stripe_rail import StripeRail
from persistence import card_payments as cards_db
from persistence import payouts as payouts_db

__all__ = ["Reconciliation", "main", "reconcile"]

SETTLE_S = 60.0
"""How long a step may take before reconciliation calls it unfinished (the journal's lag, a
webhook on its way)."""


class Reconciliation:
    """What a reconciliation did (`finished`) and found (`differences`)."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.differences: list[str] = []

    def lines(self) -> list[str]:
        out = [f"finished: {line}" for line in self.finished]
        out += [f"DIFFERENCE: {line}" for line in self.differences]
        out.append(
            f"{len(self.differences)} difference(s)" if self.differences else "all in agreement"
        )
        return out


async def reconcile(
    pool: asyncpg.Pool, cards: CardPayments, *, days: int, settle_s: float = SETTLE_S
) -> Reconciliation:
    out = Reconciliation()
    rail = cards.rail
    # 1. finish
    for row in await cards_db.payments_to_check(pool, older_than_s=settle_s):
        if row["payment_intent_id"] is None:
            # Stripe's answer was never recorded (a crash, or Stripe unreachable): only the
            # caller's retry with its Idempotency-Key (same card, same Stripe key) can ask again.
            out.differences.append(
                f"card payment {row['id'].hex} has no PaymentIntent recorded since "
                f"{row['attempt_at']:%Y-%m-%d %H:%M:%S} UTC: look it up in Stripe by metadata "
                f"mnemo_payment_id={row['id'].hex} (the client's retry with its key finishes it)"
            )
            continue
        try:
            after = await cards.refresh(row)
        except ApiError as exc:
            out.differences.append(f"card payment {row['id'].hex}: {exc.message}")
            continue
        if (after["status"], after["credited_at"]) != (row["status"], row["credited_at"]):
            out.finished.append(f"card payment {row['id'].hex}: {after['status']}")
    for row in await cards_db.pending_refunds(pool, older_than_s=settle_s):
        payment = await cards_db.payment(pool, row["payment_id"])
        assert payment is not None
        try:
            if row["stripe_refund_id"] is not None:
                done = await cards.apply_refund(await rail.refund_by_id(row["stripe_refund_id"]))
            else:
                done = await cards.drive_refund(row, payment)
        except ApiError as exc:
            out.differences.append(f"card refund {row['id'].hex}: {exc.message}")
            continue
        if done is not None and done["status"] != row["status"]:
            out.finished.append(f"card refund {row['id'].hex}: {done['status']}")
    report = stripe_payouts.PayoutReport(dt.datetime.now(dt.UTC).date())
    for row in await payouts_db.unfinished_payouts(pool):
        await stripe_payouts.drive(pool, rail, row, report)
    out.finished += [f"payout of {user}: {words}" for user, words in report.paid.items()]
    out.differences += [f"payout of {user}: {words}" for user, words in report.failed.items()]
    # 2. our records against the ledger
    for gap in await cards_db.ledger_gaps(pool, older_than_s=settle_s):
        found = "missing" if gap["found_pusd"] is None else f"{gap['found_pusd']} pico-USD"
        out.differences.append(
            f"{gap['what']} {gap['id']}: ledger {gap['key']} is {found}, "
            f"expected {gap['expected_pusd']} pico-USD"
        )
    for move in await cards_db.unexplained_movements(pool, days=days):
        out.differences.append(
            f"ledger {move['key']} ({move['cause']}, {move['amount_pusd']} pico-USD through "
            "rail:stripe) matches no card payment, refund or payout"
        )
    # 3. Stripe against our records
    for row in await cards_db.recent_payments(pool, days=days):
        try:
            pi = await rail.payment_intent(row["payment_intent_id"])
            refunds = await rail.refunds_of(pi.id) if pi.status == "succeeded" else []
        except ApiError as exc:
            out.differences.append(f"card payment {row['id'].hex}: {exc.message}")
            continue
        refunded = sum(r.amount_cents for r in refunds if r.status == "succeeded")
        if pi.amount_cents != row["amount_cents"]:
            out.differences.append(
                f"card payment {row['id'].hex}: Stripe has {pi.amount_cents} cents, "
                f"we have {row['amount_cents']}"
            )
        if (pi.status == "succeeded") != (row["credited_at"] is not None):
            out.differences.append(
                f"card payment {row['id'].hex}: Stripe says {pi.status}, credited: "
                f"{row['credited_at'] is not None}"
            )
        elif pi.status in FINAL and row["status"] != pi.status:
            out.differences.append(
                f"card payment {row['id'].hex}: Stripe says {pi.status}, we have {row['status']}"
            )
        if refunded != row["refunded_cents"]:
            out.differences.append(
                f"card payment {row['id'].hex}: Stripe refunded {refunded} cents, "
                f"we have {row['refunded_cents']}"
            )
    today = dt.datetime.now(dt.UTC).date()
    for back in range(days + 1):
        period = today - dt.timedelta(days=back)
        group = stripe_payouts.transfer_group(period)
        try:
            transfers = {t.id: t for t in await rail.transfers(transfer_group=group)}
        except ApiError as exc:
            out.differences.append(f"transfers of {group}: {exc.message}")
            continue
        paid = {
            r["stripe_transfer_id"]: r
            for r in await payouts_db.payouts_for_period(pool, period)
            if r["status"] == "paid"
        }
        for tid in sorted(set(transfers) - set(paid)):
            out.differences.append(f"transfer {tid} ({group}) is not one of our paid payouts")
        for tid in sorted(set(paid) - set(transfers)):
            out.differences.append(f"payout transfer {tid} ({group}) is not at Stripe")
        for tid in sorted(set(paid) & set(transfers)):
            t, r = transfers[tid], paid[tid]
            if (t.amount_cents, t.destination) != (r["amount_cents"], r["stripe_account_id"]):
                out.differences.append(
                    f"transfer {tid}: Stripe has {t.amount_cents} cents to {t.destination}, "
                    f"we have {r['amount_cents']} to {r['stripe_account_id']}"
                )
    return out


async def main(settings: Settings, *, days: int = 2) -> int:
    """`mnemo payments reconcile`: prints what it finished and found; 1 on any difference."""
    assert settings.database_url is not None and settings.redis_url is not None
    rail = StripeRail(settings)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    redis = open_redis(settings.redis_url)
    try:
        market = Market(redis, Keys(settings.key_prefix))
        await market.load_scripts()
        found = await reconcile(pool, CardPayments(pool, rail, market), days=days)
    finally:
        await asyncio.shield(redis.aclose())
        await pool.close()
        await rail.aclose()
    for line in found.lines():
        print(line)
    return 1 if found.differences else 0
