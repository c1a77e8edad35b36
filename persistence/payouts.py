"""Provider payouts in Postgres: `connect_accounts` and `provider_payouts` of
`migrations/009_stripe.sql` (the Stripe Connect side; the money moves in the ledger).

Each function is one statement, or one transaction where it says so. The rules (who is paid,
how much, when Stripe is called) are `gateway.payments.stripe_payouts`'.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from persistence import ledger

__all__ = [
    "add_connect_account",
    "connect_account",
    "connect_accounts",
    "earned_pusd",
    "finish_payout",
    "payout",
    "payouts_for_period",
    "payouts_of",
    "post_payout",
    "reopen_payout",
    "set_account_state",
    "start_payout",
    "unfinished_payouts",
]

Conn = asyncpg.Connection | PoolConnectionProxy
Db = asyncpg.Pool | Conn


async def add_connect_account(db: Db, user_id: str, stripe_account_id: str) -> asyncpg.Record:
    """Keep a provider's Connect account; the one already kept if another request won."""
    row = await db.fetchrow(
        """
        INSERT INTO connect_accounts (user_id, stripe_account_id) VALUES ($1, $2)
        ON CONFLICT (user_id) DO NOTHING
        RETURNING *
        """,
        uuid.UUID(user_id),
        stripe_account_id,
    )
    if row is None:
        row = await connect_account(db, user_id)
        assert row is not None
    return row


async def connect_account(db: Db, user_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM connect_accounts WHERE user_id = $1", uuid.UUID(user_id)
    )


async def connect_accounts(db: Db) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM connect_accounts ORDER BY user_id")


async def set_account_state(
    db: Db, user_id: str, *, transfers_active: bool, details_submitted: bool
) -> asyncpg.Record:
    row = await db.fetchrow(
        """
        UPDATE connect_accounts
        SET transfers_active = $2, details_submitted = $3, updated_at = now()
        WHERE user_id = $1
        RETURNING *
        """,
        uuid.UUID(user_id),
        transfers_active,
        details_submitted,
    )
    assert row is not None
    return row


async def payout(db: Db, user_id: str, period: dt.date) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM provider_payouts WHERE user_id = $1 AND period = $2",
        uuid.UUID(user_id),
        period,
    )


async def start_payout(
    conn: Conn,
    *,
    user_id: str,
    period: dt.date,
    stripe_account_id: str,
    amount_cents: int,
    transfer_group: str,
) -> asyncpg.Record | None:
    """Write the period's payout ('pending', attempt 1) before Stripe is called; None if the
    provider already has one for the period (run inside the caller's transaction, which holds
    the provider's lock while it computes the amount)."""
    payout_id = uuid.uuid4()
    return await conn.fetchrow(
        """
        INSERT INTO provider_payouts (id, user_id, period, stripe_account_id, amount_cents,
                                      transfer_group, stripe_idempotency_key)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (user_id, period) DO NOTHING
        RETURNING *
        """,
        payout_id,
        uuid.UUID(user_id),
        period,
        stripe_account_id,
        amount_cents,
        transfer_group,
        f"mnemo-payout-{user_id}-{period.isoformat()}-1",
    )


async def reopen_payout(
    conn: Conn, payout_id: uuid.UUID, *, amount_cents: int, stripe_account_id: str
) -> asyncpg.Record:
    """A failed payout tried again as its next attempt (a new Stripe idempotency key: Stripe
    replays a key's refusal too), with the amount due now."""
    row = await conn.fetchrow(
        """
        UPDATE provider_payouts
        SET status = 'pending', attempt = attempt + 1, amount_cents = $2,
            stripe_account_id = $3, error_message = NULL,
            stripe_idempotency_key = 'mnemo-payout-' || user_id || '-' || period || '-'
                                     || (attempt + 1)
        WHERE id = $1 AND status = 'failed'
        RETURNING *
        """,
        payout_id,
        amount_cents,
        stripe_account_id,
    )
    assert row is not None
    return row


async def finish_payout(
    conn: Conn,
    payout_id: uuid.UUID,
    *,
    status: str,
    stripe_transfer_id: str | None = None,
    error_message: str | None = None,
) -> asyncpg.Record:
    """Mark a pending payout paid (with its transfer) or failed (run in the caller's
    transaction, beside the ledger movement of a paid one)."""
    row = await conn.fetchrow(
        """
        UPDATE provider_payouts
        SET status = $2::varchar, stripe_transfer_id = COALESCE($3, stripe_transfer_id),
            error_message = $4, paid_at = CASE WHEN $2::varchar = 'paid' THEN now() END
        WHERE id = $1 AND status = 'pending'
        RETURNING *
        """,
        payout_id,
        status,
        stripe_transfer_id,
        error_message,
    )
    assert row is not None, f"payout {payout_id} is not pending"
    return row


async def unfinished_payouts(db: Db) -> list[asyncpg.Record]:
    """Payouts written and not yet settled with Stripe (a run died, or Stripe did not answer)."""
    return await db.fetch(
        "SELECT * FROM provider_payouts WHERE status = 'pending' ORDER BY period, user_id"
    )


async def payouts_of(
    db: Db, user_id: str, *, since: dt.date | None = None, until: dt.date | None = None
) -> list[asyncpg.Record]:
    return await db.fetch(
        """
        SELECT * FROM provider_payouts
        WHERE user_id = $1 AND ($2::date IS NULL OR period >= $2)
          AND ($3::date IS NULL OR period < $3)
        ORDER BY period, created_at
        """,
        uuid.UUID(user_id),
        since,
        until,
    )


async def earned_pusd(db: Db, user_id: str, *, until: dt.datetime) -> int:
    """What the ledger credited the provider (net of the platform fee, and of any correction)
    before `until`, payouts left out."""
    value = await db.fetchval(
        """
        SELECT COALESCE(sum(e.amount_pusd), 0)
        FROM ledger_entries e JOIN ledger_movements m ON m.key = e.movement
        WHERE e.account = $1 AND m.cause <> 'payout' AND m.ts < $2
        """,
        ledger.provider(user_id).name,
        until,
    )
    return int(value)


async def post_payout(
    conn: Conn,
    *,
    key: str,
    user_id: str,
    amount_pusd: int,
    reference: str,
    reason: str,
    ts: dt.datetime,
) -> bool:
    """The payout's ledger movement (provider -> rail:stripe) and its `transactions` row, in
    the caller's transaction; False if the key is in the book already."""
    return await ledger.post_movement(
        conn,
        key,
        "payout",
        [(ledger.provider(user_id), -amount_pusd), (ledger.rail("stripe"), amount_pusd)],
        ts_ms=int(ts.timestamp() * 1000),
        reference=reference,
        reason=reason,
        payment=("payout", "stripe", amount_pusd),
    )


async def payouts_for_period(db: Db, period: dt.date) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM provider_payouts WHERE period = $1 ORDER BY user_id", period
    )
