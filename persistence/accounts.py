"""Accounts in Postgres: users, their API keys, and their renter profiles (clients).

Tables of `migrations/001_accounts.sql`. Functions take the pool (or a connection) and return
rows (`asyncpg.Record`, columns as in the table) or None where nothing matches; the gateway maps
rows to its wire types. Ids are taken as text: one that is not a uuid matches nothing, so callers
answer a malformed id exactly as an unknown one.

A lost race for a unique value (an email already taken) is a normal result (None), not an
exception. Decisions (who may see what, which status code) are the gateway's.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg

__all__ = [
    "add_api_key",
    "add_client",
    "api_keys",
    "client",
    "client_ids",
    "clients",
    "create_user",
    "first_client",
    "record_login",
    "revoke_api_key",
    "set_credit_line",
    "use_api_key",
    "user",
    "user_for_login",
]

Db = asyncpg.Pool | asyncpg.Connection


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _inserted(row: asyncpg.Record | None) -> asyncpg.Record:
    # INSERT ... RETURNING without ON CONFLICT yields its row or raises.
    assert row is not None
    return row


# ---------------------------------------------------------------------------------------------
# Users


async def create_user(
    pool: asyncpg.Pool,
    *,
    email: str,
    password_hash: str,
    role: str,
    full_name: str | None,
    organization: str | None,
    key_prefix: str,
    key_hash: str,
    key_name: str,
) -> tuple[asyncpg.Record, asyncpg.Record] | None:
    """A new user and its first API key, in one transaction: (user row, key row), or None when
    the email is taken (whatever its case).

    User row: id, email, role, full_name, organization, created_at. Key row: id, prefix, name,
    created_at.
    """
    try:
        async with pool.acquire() as conn, conn.transaction():
            user_row = await conn.fetchrow(
                """
                INSERT INTO users (email, password_hash, role, full_name, organization)
                VALUES ($1, $2, $3, $4, $5)
                RETURNING id, email, role, full_name, organization, created_at
                """,
                email,
                password_hash,
                role,
                full_name,
                organization,
            )
            key_row = await conn.fetchrow(
                """
                INSERT INTO api_keys (user_id, prefix, key_hash, name) VALUES ($1, $2, $3, $4)
                RETURNING id, prefix, name, created_at
                """,
                _inserted(user_row)["id"],
                key_prefix,
                key_hash,
                key_name,
            )
    except asyncpg.UniqueViolationError:
        return None
    return _inserted(user_row), _inserted(key_row)


async def user_for_login(db: Db, email: str) -> asyncpg.Record | None:
    """id, role, password_hash of the user whose email is `email` (already lowercased)."""
    return await db.fetchrow(
        "SELECT id, role, password_hash FROM users WHERE lower(email) = $1", email
    )


async def record_login(db: Db, user_id: str, new_password_hash: str | None) -> None:
    """Stamp a successful login; `new_password_hash` replaces the stored hash when given."""
    await db.execute(
        "UPDATE users SET last_login = now(), password_hash = coalesce($2, password_hash) WHERE id = $1",
        uuid.UUID(user_id),
        new_password_hash,
    )


async def user(db: Db, user_id: str) -> asyncpg.Record | None:
    """id, email, role, full_name, organization, created_at of a user."""
    return await db.fetchrow(
        "SELECT id, email, role, full_name, organization, created_at FROM users WHERE id = $1",
        uuid.UUID(user_id),
    )


# ---------------------------------------------------------------------------------------------
# API keys


async def add_api_key(
    db: Db, user_id: str, *, prefix: str, key_hash: str, name: str | None
) -> asyncpg.Record:
    """A new key of the user: id, prefix, name, created_at."""
    row = await db.fetchrow(
        """
        INSERT INTO api_keys (user_id, prefix, key_hash, name) VALUES ($1, $2, $3, $4)
        RETURNING id, prefix, name, created_at
        """,
        uuid.UUID(user_id),
        prefix,
        key_hash,
        name,
    )
    return _inserted(row)


async def api_keys(db: Db, user_id: str) -> list[asyncpg.Record]:
    """The user's keys, oldest first: id, prefix, name, created_at, last_used_at, revoked_at."""
    return await db.fetch(
        """
        SELECT id, prefix, name, created_at, last_used_at, revoked_at FROM api_keys
        WHERE user_id = $1 ORDER BY created_at, id
        """,
        uuid.UUID(user_id),
    )


async def revoke_api_key(db: Db, key_id: str, user_id: str) -> asyncpg.Record | None:
    """Revoke one of the user's keys (again: keeps the first revocation time); the key's row with
    its `key_hash`, or None if the user has no such key."""
    parsed = _uuid(key_id)
    if parsed is None:
        return None
    return await db.fetchrow(
        """
        UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
        WHERE id = $1 AND user_id = $2
        RETURNING id, prefix, name, created_at, last_used_at, revoked_at, key_hash
        """,
        parsed,
        uuid.UUID(user_id),
    )


async def use_api_key(db: Db, key_hash: str) -> asyncpg.Record | None:
    """The unrevoked key with this hash, stamped as used now: its id, user_id and the user's role;
    None if there is none. One statement both authenticates and stamps."""
    return await db.fetchrow(
        """
        UPDATE api_keys AS k SET last_used_at = now()
        FROM users AS u
        WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND u.id = k.user_id
        RETURNING k.id, k.user_id, u.role
        """,
        key_hash,
    )


# ---------------------------------------------------------------------------------------------
# Clients (renter profiles)


def _decimal(value: float | None, places: int) -> Decimal | None:
    # From the float's shortest repr (what the caller wrote), rounded to the column's scale: the
    # stored value is the decimal that was sent, not its binary approximation.
    if value is None:
        return None
    return Decimal(repr(value)).quantize(Decimal(1).scaleb(-places))


async def add_client(
    db: Db,
    user_id: str,
    *,
    org_name: str,
    default_region: str | None,
    latitude: float | None,
    longitude: float | None,
    budget_monthly_usd: float | None,
    prefer_local: bool,
    max_latency_ms: float | None,
    min_reliability: float | None,
) -> asyncpg.Record:
    """A new renter profile of the user (the whole row)."""
    row = await db.fetchrow(
        """
        INSERT INTO clients (user_id, org_name, default_region, latitude, longitude,
                             budget_monthly_usd, prefer_local, max_latency_ms, min_reliability)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        RETURNING *
        """,
        uuid.UUID(user_id),
        org_name,
        default_region,
        _decimal(latitude, 6),
        _decimal(longitude, 6),
        _decimal(budget_monthly_usd, 2),
        prefer_local,
        _decimal(max_latency_ms, 3),
        _decimal(min_reliability, 2),
    )
    return _inserted(row)


async def client(db: Db, client_id: str) -> asyncpg.Record | None:
    """One renter profile (the whole row), whoever it belongs to."""
    parsed = _uuid(client_id)
    if parsed is None:
        return None
    return await db.fetchrow("SELECT * FROM clients WHERE id = $1", parsed)


async def clients(db: Db, user_id: str) -> list[asyncpg.Record]:
    """The user's renter profiles (whole rows), oldest first."""
    return await db.fetch(
        "SELECT * FROM clients WHERE user_id = $1 ORDER BY created_at, id", uuid.UUID(user_id)
    )


async def first_client(db: Db, user_id: str) -> asyncpg.Record | None:
    """The user's oldest renter profile (whole row), if any."""
    return await db.fetchrow(
        "SELECT * FROM clients WHERE user_id = $1 ORDER BY created_at, id LIMIT 1",
        uuid.UUID(user_id),
    )


async def client_ids(db: Db, user_id: str) -> list[str]:
    """The ids (uuid text) of the user's renter profiles, in no particular order."""
    rows = await db.fetch("SELECT id FROM clients WHERE user_id = $1", uuid.UUID(user_id))
    return [str(r["id"]) for r in rows]


async def set_credit_line(db: Db, client_id: str, credit_line_pusd: int) -> asyncpg.Record | None:
    """Set a renter's credit line (issue 14: how far its balance may go below zero); the row,
    or None for an unknown client."""
    parsed = _uuid(client_id)
    if parsed is None:
        return None
    return await db.fetchrow(
        "UPDATE clients SET credit_line_pusd = $2 WHERE id = $1 RETURNING *",
        parsed,
        credit_line_pusd,
    )
