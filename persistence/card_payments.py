"""Card payments in Postgres: `card_payments`, `card_refunds` and `stripe_events` of
`migrations/009_stripe.sql`, the Stripe side of the ledger's card movements.

Each function is one statement (or one short transaction where it says so); the rules (when to
call Stripe, when to credit, what to answer) are `gateway.payments.stripe_cards`'. Rows come
back as `asyncpg.Record` with the table's columns; ids are taken as `uuid.UUID` or text.
A lost race for a unique key is a normal result (None or False), not an exception.
"""

from __future__ import annotations

import uuid

import asyncpg

__all__ = [
    "claim_event",
    "finish_event",
    "ledger_gaps",
    "mark_credited",
    "mark_debited",
    "mark_reversed",
    "open_payment",
    "open_refund",
    "paid_for_contract",
    "payment",
    "payment_by_checkout",
    "payment_by_intent",
    "payment_by_key",
    "payments_to_check",
    "pending_refunds",
    "recent_payments",
    "record_checkout",
    "record_intent",
    "record_refund",
    "refund",
    "refund_by_key",
    "refund_by_stripe_id",
    "refunds_of",
    "release_attempt",
    "take_attempt",
    "unexplained_movements",
]

Db = asyncpg.Pool | asyncpg.Connection


async def open_payment(
    db: Db,
    *,
    payment_id: uuid.UUID,
    user_id: str,
    client_id: str,
    contract_id: str | None,
    idempotency_key: str,
    request_hash: str,
    stripe_idempotency_key: str,
    amount_cents: int,
) -> asyncpg.Record | None:
    """Write a new payment ('creating'); None if the user already used this idempotency key."""
    return await db.fetchrow(
        """
        INSERT INTO card_payments (id, user_id, client_id, contract_id, idempotency_key,
                                   request_hash, stripe_idempotency_key, amount_cents)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (user_id, idempotency_key) DO NOTHING
        RETURNING *
        """,
        payment_id,
        user_id,
        client_id,
        contract_id,
        idempotency_key,
        request_hash,
        stripe_idempotency_key,
        amount_cents,
    )


async def payment_by_key(db: Db, user_id: str, idempotency_key: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM card_payments WHERE user_id = $1 AND idempotency_key = $2",
        user_id,
        idempotency_key,
    )


async def payment(db: Db, payment_id: str | uuid.UUID) -> asyncpg.Record | None:
    try:
        pid = payment_id if isinstance(payment_id, uuid.UUID) else uuid.UUID(payment_id)
    except ValueError:
        return None
    return await db.fetchrow("SELECT * FROM card_payments WHERE id = $1", pid)


async def payment_by_intent(db: Db, payment_intent_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM card_payments WHERE payment_intent_id = $1", payment_intent_id
    )


async def take_attempt(db: Db, payment_id: uuid.UUID, *, stale_after_s: float) -> bool:
    """Claim the next attempt at Stripe for a payment still 'creating' whose last attempt began
    more than `stale_after_s` ago (its process died, or Stripe never answered); False if another
    attempt is younger or the payment has moved on."""
    row = await db.fetchrow(
        """
        UPDATE card_payments SET attempt_at = now()
        WHERE id = $1 AND status = 'creating'
          AND attempt_at < now() - make_interval(secs => $2)
        RETURNING 1
        """,
        payment_id,
        stale_after_s,
    )
    return row is not None


async def release_attempt(db: Db, payment_id: uuid.UUID) -> None:
    """An attempt that ended without Stripe's answer: the next retry may try at once."""
    await db.execute(
        "UPDATE card_payments SET attempt_at = '-infinity' WHERE id = $1 AND status = 'creating'",
        payment_id,
    )


async def record_intent(
    db: Db,
    payment_id: uuid.UUID,
    *,
    payment_intent_id: str | None,
    status: str,
    error_code: str | None = None,
    error_message: str | None = None,
) -> asyncpg.Record:
    """Keep what Stripe said of the payment. A final status ('succeeded', 'canceled', 'failed')
    is never replaced by an earlier one that arrives late."""
    row = await db.fetchrow(
        """
        UPDATE card_payments
        SET payment_intent_id = COALESCE($2, payment_intent_id),
            status = CASE WHEN status IN ('succeeded', 'canceled') THEN status ELSE $3 END,
            error_code = $4, error_message = $5, updated_at = now()
        WHERE id = $1
        RETURNING *
        """,
        payment_id,
        payment_intent_id,
        status,
        error_code,
        error_message,
    )
    assert row is not None
    return row


async def record_checkout(
    db: Db, payment_id: uuid.UUID, *, session_id: str, url: str | None, status: str
) -> asyncpg.Record:
    """Keep the Checkout Session made for a payment (and what Stripe says of its payment)."""
    row = await db.fetchrow(
        """
        UPDATE card_payments
        SET checkout_session_id = $2, checkout_url = COALESCE($3, checkout_url),
            status = CASE WHEN status IN ('succeeded', 'canceled') THEN status ELSE $4 END,
            updated_at = now()
        WHERE id = $1
        RETURNING *
        """,
        payment_id,
        session_id,
        url,
        status,
    )
    assert row is not None
    return row


async def payment_by_checkout(db: Db, session_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM card_payments WHERE checkout_session_id = $1", session_id
    )


async def mark_credited(db: Db, payment_id: uuid.UUID) -> None:
    await db.execute(
        "UPDATE card_payments SET credited_at = COALESCE(credited_at, now()) WHERE id = $1",
        payment_id,
    )


async def paid_for_contract(db: Db, contract_id: str) -> int:
    """Cents paid or being paid by card for a contract (failed and canceled payments and
    refunds not counted)."""
    value = await db.fetchval(
        """
        SELECT COALESCE(sum(amount_cents - refunded_cents), 0) FROM card_payments
        WHERE contract_id = $1 AND status NOT IN ('failed', 'canceled', 'requires_payment_method')
        """,
        contract_id,
    )
    return int(value)


async def payments_to_check(db: Db, *, older_than_s: float) -> list[asyncpg.Record]:
    """Payments not final (or succeeded and not yet credited) whose last change is older than
    `older_than_s`: what reconciliation asks Stripe about again."""
    return await db.fetch(
        """
        SELECT * FROM card_payments
        WHERE (status NOT IN ('succeeded', 'canceled', 'failed')
               OR (status = 'succeeded' AND credited_at IS NULL))
          AND updated_at < now() - make_interval(secs => $1)
        ORDER BY created_at
        """,
        older_than_s,
    )


# -- refunds -------------------------------------------------------------------------------------


async def open_refund(
    pool: asyncpg.Pool,
    *,
    refund_id: uuid.UUID,
    payment_id: uuid.UUID,
    requested_by: str | None,
    idempotency_key: str | None,
    request_hash: str | None,
    amount_cents: int,
    reason: str,
    stripe_refund_id: str | None = None,
    status: str = "pending",
) -> tuple[asyncpg.Record | None, int]:
    """Write a refund row if the payment can still give back `amount_cents`, in one transaction
    that locks the payment (two refunds at once cannot exceed it). Returns (row, refundable
    cents before it); row None: not enough left (nothing written), or the Stripe refund or
    idempotency key is already recorded."""
    async with pool.acquire() as conn, conn.transaction():
        paid = await conn.fetchrow(
            "SELECT amount_cents FROM card_payments WHERE id = $1 FOR UPDATE", payment_id
        )
        assert paid is not None
        taken = await conn.fetchval(
            """
            SELECT COALESCE(sum(amount_cents), 0) FROM card_refunds
            WHERE payment_id = $1 AND status NOT IN ('failed', 'canceled')
            """,
            payment_id,
        )
        left = int(paid["amount_cents"]) - int(taken)
        if amount_cents > left and stripe_refund_id is None:
            return None, left
        row = await conn.fetchrow(
            """
            INSERT INTO card_refunds (id, payment_id, requested_by, idempotency_key, request_hash,
                                      amount_cents, reason, stripe_refund_id, status)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT DO NOTHING
            RETURNING *
            """,
            refund_id,
            payment_id,
            requested_by,
            idempotency_key,
            request_hash,
            amount_cents,
            reason,
            stripe_refund_id,
            status,
        )
        return row, left


async def refund(db: Db, refund_id: uuid.UUID) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM card_refunds WHERE id = $1", refund_id)


async def refund_by_key(db: Db, user_id: str, idempotency_key: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM card_refunds WHERE requested_by = $1 AND idempotency_key = $2",
        user_id,
        idempotency_key,
    )


async def refund_by_stripe_id(db: Db, stripe_refund_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM card_refunds WHERE stripe_refund_id = $1", stripe_refund_id
    )


async def refunds_of(db: Db, payment_id: uuid.UUID) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM card_refunds WHERE payment_id = $1 ORDER BY created_at, id", payment_id
    )


async def record_refund(
    pool: asyncpg.Pool,
    refund_id: uuid.UUID,
    *,
    stripe_refund_id: str | None,
    status: str,
    error_message: str | None = None,
) -> asyncpg.Record:
    """Keep what Stripe said of a refund, and the payment's `refunded_cents` (the sum of its
    succeeded refunds), in one transaction. 'succeeded', 'failed' and 'canceled' are final."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE card_refunds
            SET stripe_refund_id = COALESCE($2, stripe_refund_id),
                status = CASE WHEN status IN ('succeeded', 'failed', 'canceled') THEN status
                              ELSE $3 END,
                error_message = COALESCE($4, error_message), updated_at = now()
            WHERE id = $1
            RETURNING *
            """,
            refund_id,
            stripe_refund_id,
            status,
            error_message,
        )
        assert row is not None
        await conn.execute(
            """
            UPDATE card_payments SET refunded_cents = (
                SELECT COALESCE(sum(amount_cents), 0) FROM card_refunds
                WHERE payment_id = $1 AND status = 'succeeded'), updated_at = now()
            WHERE id = $1
            """,
            row["payment_id"],
        )
        return row


async def mark_debited(db: Db, refund_id: uuid.UUID) -> None:
    await db.execute(
        "UPDATE card_refunds SET debited_at = COALESCE(debited_at, now()) WHERE id = $1",
        refund_id,
    )


async def mark_reversed(db: Db, refund_id: uuid.UUID) -> None:
    await db.execute(
        "UPDATE card_refunds SET reversed_at = COALESCE(reversed_at, now()) WHERE id = $1",
        refund_id,
    )


# -- webhook events ------------------------------------------------------------------------------


async def claim_event(db: Db, event_id: str, event_type: str, object_id: str) -> bool:
    """Take in a webhook event: True if it is new or was taken in but not finished (a delivery
    that failed half-way is done again: every step it takes is idempotent), False if it was
    processed already (a redelivery: nothing to do)."""
    row = await db.fetchrow(
        """
        INSERT INTO stripe_events (event_id, type, object_id) VALUES ($1, $2, $3)
        ON CONFLICT (event_id) DO UPDATE SET received_at = stripe_events.received_at
        RETURNING processed_at
        """,
        event_id,
        event_type,
        object_id,
    )
    assert row is not None
    return row["processed_at"] is None


async def finish_event(db: Db, event_id: str, outcome: str) -> None:
    await db.execute(
        "UPDATE stripe_events SET processed_at = now(), outcome = $2 WHERE event_id = $1",
        event_id,
        outcome,
    )


# -- reconciliation ------------------------------------------------------------------------------


async def pending_refunds(db: Db, *, older_than_s: float) -> list[asyncpg.Record]:
    """Refunds not final whose last change is older than `older_than_s`."""
    return await db.fetch(
        """
        SELECT * FROM card_refunds
        WHERE status IN ('pending', 'requires_action')
          AND updated_at < now() - make_interval(secs => $1)
        ORDER BY created_at
        """,
        older_than_s,
    )


async def recent_payments(db: Db, *, days: int) -> list[asyncpg.Record]:
    """Card payments with a PaymentIntent made in the last `days` days."""
    return await db.fetch(
        """
        SELECT * FROM card_payments
        WHERE payment_intent_id IS NOT NULL AND created_at > now() - make_interval(days => $1)
        ORDER BY created_at
        """,
        days,
    )


async def ledger_gaps(db: Db, *, older_than_s: float) -> list[asyncpg.Record]:
    """Every Stripe movement our rows say was made (more than `older_than_s` ago, so the
    journal has had time) whose ledger movement is missing or of another amount: `what`, `id`,
    `key` (the ledger key expected), `expected_pusd` (to the rail) and `found_pusd` (NULL:
    missing)."""
    return await db.fetch(
        """
        WITH expected (what, id, key, expected_pusd) AS (
            SELECT 'card payment', p.id::text, 'credit:stripe:pi:' || p.payment_intent_id,
                   -p.amount_pusd
            FROM card_payments p
            WHERE p.credited_at < now() - make_interval(secs => $1)
            UNION ALL
            SELECT 'card refund', r.id::text, 'debit:stripe:refund:' || replace(r.id::text, '-', ''),
                   r.amount_pusd
            FROM card_refunds r
            WHERE r.debited_at < now() - make_interval(secs => $1)
            UNION ALL
            SELECT 'card refund reversal', r.id::text,
                   'credit:stripe:refund-reversal:' || replace(r.id::text, '-', ''), -r.amount_pusd
            FROM card_refunds r
            WHERE r.reversed_at < now() - make_interval(secs => $1)
            UNION ALL
            SELECT 'payout', o.id::text, 'payout:' || replace(o.id::text, '-', ''), o.amount_pusd
            FROM provider_payouts o WHERE o.status = 'paid'
        )
        SELECT x.what, replace(x.id, '-', '') AS id, x.key, x.expected_pusd,
               e.amount_pusd AS found_pusd
        FROM expected x
        LEFT JOIN ledger_entries e ON e.movement = x.key AND e.account = 'rail:stripe'
        WHERE e.amount_pusd IS DISTINCT FROM x.expected_pusd
        ORDER BY x.what, x.id
        """,
        older_than_s,
    )


async def unexplained_movements(db: Db, *, days: int) -> list[asyncpg.Record]:
    """Ledger movements through `rail:stripe` of the last `days` days that no card payment,
    refund or payout of ours accounts for: key, cause, ts, amount_pusd."""
    return await db.fetch(
        """
        SELECT m.key, m.cause, m.ts, e.amount_pusd
        FROM ledger_movements m JOIN ledger_entries e
          ON e.movement = m.key AND e.account = 'rail:stripe'
        WHERE m.ts > now() - make_interval(days => $1)
          AND NOT EXISTS (SELECT 1 FROM card_payments p
                          WHERE m.key = 'credit:stripe:pi:' || p.payment_intent_id)
          AND NOT EXISTS (SELECT 1 FROM card_refunds r
                          WHERE m.key IN ('debit:stripe:refund:' || replace(r.id::text, '-', ''),
                                          'credit:stripe:refund-reversal:'
                                              || replace(r.id::text, '-', '')))
          AND NOT EXISTS (SELECT 1 FROM provider_payouts o
                          WHERE m.key = 'payout:' || replace(o.id::text, '-', ''))
        ORDER BY m.ts, m.key
        """,
        days,
    )
