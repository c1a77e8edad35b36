"""Postgres: the schema and its migrations, the journal (Redis Streams -> Postgres), history queries.

Postgres holds accounts (users, API keys, clients, idempotency records) and the full history of the
market; the live market itself is in Redis. Nothing here decides anything about the market. The
SQL that the gateway and the journal run lives in this package, in the module of its concept
(`accounts`, `idempotency`, `history`, `analytics`, `journal`); callers hand in the pool (or a
connection) and get rows or small records back.
"""

from __future__ import annotations

import asyncpg

__all__ = ["ping"]


async def ping(db: asyncpg.Pool | asyncpg.Connection) -> bool:
    """Whether Postgres answers a trivial query (the gateway's readiness probe)."""
    return bool(await db.fetchval("SELECT 1") == 1)
