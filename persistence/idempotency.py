"""Idempotency records in Postgres (`idempotency_keys` of `migrations/001_accounts.sql`).

One row per (user, key): the request's fingerprint, then, once the first request has run, its
status code and stored response body. The rules (who waits, what is replayed, when a claim is
stale) are the gateway's (`gateway.idempotency`); these functions are its statements, each one
atomic on its own. Times are the database's clock, so every gateway process ages records alike.
"""

from __future__ import annotations

import asyncpg

__all__ = ["claim", "recorded", "release", "store_response", "sweep", "take_over"]

Db = asyncpg.Pool | asyncpg.Connection


async def claim(db: Db, user_id: str, key: str, request_hash: str) -> bool:
    """Take the key for a request with this fingerprint; False if the key is already taken."""
    row = await db.fetchrow(
        """
        INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, $2, $3)
        ON CONFLICT (user_id, key) DO NOTHING
        RETURNING 1
        """,
        user_id,
        key,
        request_hash,
    )
    return row is not None


async def recorded(
    db: Db, user_id: str, key: str, *, stale_after_s: float
) -> asyncpg.Record | None:
    """The key's record: request_hash, status_code and response_body (both None while the first
    request runs), and `stale` (claimed more than `stale_after_s` ago); None if there is none."""
    return await db.fetchrow(
        """
        SELECT request_hash, status_code, response_body,
               created_at < now() - make_interval(secs => $3) AS stale
        FROM idempotency_keys WHERE user_id = $1 AND key = $2
        """,
        user_id,
        key,
        stale_after_s,
    )


async def take_over(
    db: Db, user_id: str, key: str, request_hash: str, *, stale_after_s: float
) -> bool:
    """Claim afresh a key whose request (same fingerprint) has had no response for more than
    `stale_after_s`; False if it has one, is younger, or another process took it first."""
    row = await db.fetchrow(
        """
        UPDATE idempotency_keys SET created_at = now()
        WHERE user_id = $1 AND key = $2 AND request_hash = $3 AND status_code IS NULL
          AND created_at < now() - make_interval(secs => $4)
        RETURNING 1
        """,
        user_id,
        key,
        request_hash,
        stale_after_s,
    )
    return row is not None


async def store_response(db: Db, user_id: str, key: str, status_code: int, body: bytes) -> None:
    """Keep the response of the request that holds the key, for replays."""
    await db.execute(
        """
        UPDATE idempotency_keys SET status_code = $3, response_body = $4
        WHERE user_id = $1 AND key = $2
        """,
        user_id,
        key,
        status_code,
        body,
    )


async def release(db: Db, user_id: str, key: str) -> None:
    """Give the key up while it has no response, so that a retry runs afresh."""
    await db.execute(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND status_code IS NULL",
        user_id,
        key,
    )


async def sweep(db: Db, retention_s: float) -> int:
    """Delete records claimed more than `retention_s` ago; returns how many."""
    result = await db.execute(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
        float(retention_s),
    )
    return int(result.rsplit(" ", 1)[-1])
