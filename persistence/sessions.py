"""Sign-in sessions of the web app in Postgres (`migrations/011_web_sessions.sql`).

The gateway (`gateway.auth`, `gateway.web.session`) decides what a session may do; these
functions only store and find them. A session is found by the SHA-256 (hex) of its token, never
by the token itself, and only while it has not expired.
"""

from __future__ import annotations

import uuid

import asyncpg

__all__ = ["create", "delete", "find"]

Db = asyncpg.Pool | asyncpg.Connection


async def create(db: asyncpg.Pool, user_id: str, token_hash: str, ttl_s: int) -> asyncpg.Record:
    """A new session of the user lasting `ttl_s` seconds: id, created_at, expires_at. Sweeps the
    user's expired sessions in the same transaction."""
    user = uuid.UUID(user_id)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM web_sessions WHERE user_id = $1 AND expires_at <= now()", user
        )
        row = await conn.fetchrow(
            """
            INSERT INTO web_sessions (user_id, token_hash, expires_at)
            VALUES ($1, $2, now() + $3 * interval '1 second')
            RETURNING id, created_at, expires_at
            """,
            user,
            token_hash,
            ttl_s,
        )
    assert row is not None
    return row


async def find(db: Db, token_hash: str) -> asyncpg.Record | None:
    """The unexpired session with this token hash: its id, user_id, the user's role and
    expires_at; None if there is none."""
    return await db.fetchrow(
        """
        SELECT s.id, s.user_id, u.role, s.expires_at
        FROM web_sessions s JOIN users u ON u.id = s.user_id
        WHERE s.token_hash = $1 AND s.expires_at > now()
        """,
        token_hash,
    )


async def delete(db: Db, token_hash: str) -> bool:
    """End the session with this token hash; whether there was one."""
    status = await db.execute("DELETE FROM web_sessions WHERE token_hash = $1", token_hash)
    return status != "DELETE 0"
