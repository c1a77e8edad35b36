"""A stake lock out of a provider's earnings (engine.trust), the ledger's half of it.

A provider's earnings live in the ledger alone (`provider:<user>`, paid out by the payout runs),
the stake in the live market (the node's `stake_pusd`, which the reserve script checks). A lock
is two steps, each idempotent on the lock's key:
1. here, in one transaction serialised with the provider's payouts (the same advisory lock):
   refused unless the provider's earnings not yet paid out cover the amount; else the movement
   `stake_lock:<key>` takes it from `provider:<user>` into `stake_transit:<node>`;
2. `engine.market.Market.lock_stake(..., key)` adds it to the node's stake; the journal books
   its event from `stake_transit:<node>` into `stake:<node>`.
A lock whose second step did not run (the gateway died between them) shows as money in
`stake_transit:<node>`; repeating the lock with the same key finishes it (step 1 writes nothing
the second time, step 2 applies once).
"""

from __future__ import annotations

import uuid

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from persistence import ledger

__all__ = ["earnings_free_pusd", "reserve_lock"]


async def earnings_free_pusd(conn: asyncpg.Connection | PoolConnectionProxy, user_id: str) -> int:
    """The provider's earnings neither paid out nor promised to a pending payout."""
    earned = int(
        await conn.fetchval(
            "SELECT coalesce(sum(amount_pusd), 0)::numeric FROM ledger_entries WHERE account = $1",
            ledger.provider(user_id).name,
        )
    )
    pending = await conn.fetchval(
        "SELECT coalesce(sum(amount_pusd), 0) FROM provider_payouts "
        "WHERE user_id = $1 AND status = 'pending'",
        uuid.UUID(user_id),
    )
    return earned - int(pending)


async def reserve_lock(
    pool: asyncpg.Pool, user_id: str, node_id: str, amount_pusd: int, key: str
) -> bool:
    """Step 1 of a lock: True once the amount is in `stake_transit:<node>` under `key` (now or
    before); False when the provider's free earnings do not cover it (nothing written)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 14))", f"payout:{user_id}"
        )
        done = await conn.fetchval(
            "SELECT 1 FROM ledger_movements WHERE key = $1", f"stake_lock:{key}"
        )
        if done:
            return True
        if await earnings_free_pusd(conn, user_id) < amount_pusd:
            return False
        await ledger.post_movement(
            conn,
            f"stake_lock:{key}",
            "stake_lock_out",
            [
                (ledger.provider(user_id), -amount_pusd),
                (ledger.stake_transit(node_id, user_id), amount_pusd),
            ],
        )
        return True
