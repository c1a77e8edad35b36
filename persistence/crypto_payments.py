"""On-chain payments in Postgres: rates, payment requests and the transfers that pay them.

Tables of `migrations/010_crypto_payments.sql`. The gateway's crypto rail (gateway.payments)
decides; this module only reads and writes rows. The rules the tables enforce:
- one transfer, one row: (network, tx_id, log_index) is the primary key in every state, so a
  transfer recorded for one request can never be recorded for another;
- one live payment per request (a partial unique index), so a request is credited once;
- a row reaches `confirmed` (final, verified) before the market is asked to credit it, and
  `credited` after; a process that dies in between leaves a `confirmed` row that the re-check
  loop credits again under the same idempotency key.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "add_rate",
    "claim_due",
    "create_request",
    "latest_rate",
    "latest_rates",
    "mark_credited",
    "payment",
    "payment_for_request",
    "payments_of_tx",
    "record_payment",
    "request",
    "update_payment",
]

Db = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy

_PAYMENT_COLUMNS = (
    "network, tx_id, log_index, request_id, status, amount_base, payer, block_number, "
    "block_hash, confirmations, error_code, error_message, credit_key, first_seen_at, "
    "updated_at, credited_at"
)


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Rates


async def add_rate(db: Db, asset: str, usd_per_unit: Decimal, set_by: str | None) -> asyncpg.Record:
    """Record an operator-set rate; the row (asset, usd_per_unit, set_at)."""
    row = await db.fetchrow(
        """
        INSERT INTO crypto_rates (asset, usd_per_unit, set_by) VALUES ($1, $2, $3)
        RETURNING asset, usd_per_unit, set_at
        """,
        asset,
        usd_per_unit,
        None if set_by is None else _uuid(set_by),
    )
    assert row is not None
    return row


async def latest_rate(db: Db, asset: str) -> asyncpg.Record | None:
    """The newest rate of `asset` (asset, usd_per_unit, set_at), if any was ever set."""
    return await db.fetchrow(
        """
        SELECT asset, usd_per_unit, set_at FROM crypto_rates WHERE asset = $1
        ORDER BY set_at DESC, id DESC LIMIT 1
        """,
        asset,
    )


async def latest_rates(db: Db) -> list[asyncpg.Record]:
    """The newest rate of every asset ever set."""
    return await db.fetch(
        """
        SELECT DISTINCT ON (asset) asset, usd_per_unit, set_at FROM crypto_rates
        ORDER BY asset, set_at DESC, id DESC
        """
    )


# ---------------------------------------------------------------------------------------------
# Requests


async def next_derivation_index(db: Db) -> int:
    value = await db.fetchval("SELECT nextval('crypto_derivation_index')")
    return int(value)


async def create_request(db: Db, **values: Any) -> asyncpg.Record:
    """Insert a payment request (the columns of `crypto_requests` by name); its row."""
    names = list(values)
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    row = await db.fetchrow(
        f"INSERT INTO crypto_requests ({', '.join(names)}) VALUES ({placeholders}) RETURNING *",
        *values.values(),
    )
    assert row is not None
    return row


async def request(db: Db, request_id: str) -> asyncpg.Record | None:
    """A payment request by id (None for an unknown or malformed id)."""
    rid = _uuid(request_id)
    if rid is None:
        return None
    return await db.fetchrow("SELECT * FROM crypto_requests WHERE id = $1", rid)


async def requests_of_client(
    db: Db, client_id: uuid.UUID, status: str | None, limit: int
) -> list[asyncpg.Record]:
    """A client's payment requests (of one status, if given), newest first."""
    return await db.fetch(
        "SELECT * FROM crypto_requests WHERE client_id = $1 AND ($2::text IS NULL OR status = $2) "
        "ORDER BY created_at DESC, id LIMIT $3",
        client_id,
        status,
        limit,
    )


async def payments_for_requests(
    db: Db, request_ids: list[uuid.UUID]
) -> dict[uuid.UUID, asyncpg.Record]:
    """Each request's live payment, else its latest failed one (requests without any: absent)."""
    rows = await db.fetch(
        f"SELECT DISTINCT ON (request_id) {_PAYMENT_COLUMNS} FROM crypto_payments "
        "WHERE request_id = ANY($1) ORDER BY request_id, (status = 'failed'), updated_at DESC",
        request_ids,
    )
    return {row["request_id"]: row for row in rows}


async def requests_of(db: Db, request_ids: list[uuid.UUID]) -> dict[uuid.UUID, asyncpg.Record]:
    rows = await db.fetch("SELECT * FROM crypto_requests WHERE id = ANY($1)", request_ids)
    return {row["id"]: row for row in rows}


# ---------------------------------------------------------------------------------------------
# Payments


async def payments_of_tx(db: Db, network: str, tx_id: str) -> list[asyncpg.Record]:
    """Every recorded transfer of one transaction."""
    return await db.fetch(
        f"SELECT {_PAYMENT_COLUMNS} FROM crypto_payments WHERE network = $1 AND tx_id = $2",
        network,
        tx_id,
    )


async def payment(db: Db, network: str, tx_id: str, log_index: int) -> asyncpg.Record | None:
    return await db.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM crypto_payments "
        "WHERE network = $1 AND tx_id = $2 AND log_index = $3",
        network,
        tx_id,
        log_index,
    )


async def payment_for_request(db: Db, request_id: uuid.UUID) -> asyncpg.Record | None:
    """The request's live payment (not failed), else its latest failed one, else None."""
    return await db.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM crypto_payments WHERE request_id = $1 "
        "ORDER BY (status = 'failed'), updated_at DESC LIMIT 1",
        request_id,
    )


class PaymentTaken(Exception):
    """The row could not be written: the transfer is recorded already (`which` = "transfer"), or
    the request has a live payment already (`which` = "request")."""

    def __init__(self, which: str) -> None:
        super().__init__(which)
        self.which = which


async def record_payment(db: Db, **values: Any) -> asyncpg.Record:
    """Insert a payment row (columns by name); raises `PaymentTaken` on either unique rule."""
    names = list(values)
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    try:
        row = await db.fetchrow(
            f"INSERT INTO crypto_payments ({', '.join(names)}) VALUES ({placeholders}) "
            f"RETURNING {_PAYMENT_COLUMNS}",
            *values.values(),
        )
    except asyncpg.UniqueViolationError as exc:
        which = (
            "request" if exc.constraint_name == "crypto_payments_one_per_request" else "transfer"
        )
        raise PaymentTaken(which) from None
    assert row is not None
    if values.get("status") in ("pending", "confirmed"):
        await db.execute(
            "UPDATE crypto_requests SET status = 'pending' WHERE id = $1 AND status = 'open'",
            values["request_id"],
        )
    return row


async def update_payment(db: Db, key: tuple[str, str, int], /, **values: Any) -> asyncpg.Record:
    """Change the columns of the payment row whose key is (network, tx_id, log_index), and its
    `updated_at`; raises `PaymentTaken` when a new `log_index` or a revived status collides
    with another row."""
    names = list(values)
    sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=4))
    try:
        row = await db.fetchrow(
            f"UPDATE crypto_payments SET {sets}, updated_at = now() "
            "WHERE network = $1 AND tx_id = $2 AND log_index = $3 "
            f"RETURNING {_PAYMENT_COLUMNS}",
            *key,
            *values.values(),
        )
    except asyncpg.UniqueViolationError as exc:
        which = (
            "request" if exc.constraint_name == "crypto_payments_one_per_request" else "transfer"
        )
        raise PaymentTaken(which) from None
    assert row is not None
    return row


async def mark_credited(
    pool: asyncpg.Pool, network: str, tx_id: str, log_index: int
) -> asyncpg.Record:
    """The payment and its request are credited (one transaction); the payment row."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE crypto_payments SET status = 'credited', credited_at = coalesce(credited_at, now()), "
            "updated_at = now(), error_code = NULL, error_message = NULL "
            "WHERE network = $1 AND tx_id = $2 AND log_index = $3 "
            f"RETURNING {_PAYMENT_COLUMNS}",
            network,
            tx_id,
            log_index,
        )
        assert row is not None
        await conn.execute(
            "UPDATE crypto_requests SET status = 'credited', credited_at = coalesce(credited_at, now()) "
            "WHERE id = $1",
            row["request_id"],
        )
    return row


async def fail_request_payment(db: Db, request_id: uuid.UUID) -> None:
    """A request whose payment failed is open again (it may be paid by another transfer)."""
    await db.execute(
        "UPDATE crypto_requests SET status = 'open' WHERE id = $1 AND status = 'pending'",
        request_id,
    )


async def claim_due(pool: asyncpg.Pool, *, limit: int, lease_s: float) -> list[asyncpg.Record]:
    """Payments awaiting finality or their credit whose re-check is due, each leased for
    `lease_s` (another process's loop skips them until then)."""
    return await pool.fetch(
        f"""
        UPDATE crypto_payments SET next_check_at = now() + make_interval(secs => $2)
        WHERE (network, tx_id, log_index) IN (
            SELECT network, tx_id, log_index FROM crypto_payments
            WHERE status IN ('pending', 'confirmed') AND next_check_at <= now()
            ORDER BY next_check_at LIMIT $1 FOR UPDATE SKIP LOCKED
        )
        RETURNING {_PAYMENT_COLUMNS}
        """,
        limit,
        lease_s,
    )
