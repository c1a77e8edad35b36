"""What an invoice or a provider statement reads: the journal's contracts and the ledger's
movements (`migrations/002_market.sql`, `008_ledger.sql`) and the payouts (`009_stripe.sql`),
over a half-open period [start, end).

A renter's money, per the ledger: every movement that changes the sum of the client's own
accounts (funding, region wallets, holds, transit) is a payment (`credit`), a refund or clawback
(`debit`), a charge (`settle`) or another adjustment; moves between the client's own accounts
(holds, transfers) sum to zero there and are left out. So closing = opening + the movements'
amounts, exactly. A provider's money: its `provider:<user>` account (earnings credited at
settlement, net of the platform fee; payouts debited).
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

__all__ = [
    "client_balance",
    "client_contracts",
    "client_movements",
    "provider_balance",
    "provider_contracts",
    "provider_movements",
]

Db = asyncpg.Pool | asyncpg.Connection

_CLIENT_ACCOUNTS = (
    "SELECT account FROM ledger_accounts WHERE owner_id = $1 AND kind LIKE 'client\\_%'"
)


async def client_contracts(
    db: Db, client_id: str, start: dt.datetime, end: dt.datetime
) -> list[asyncpg.Record]:
    """The client's contracts closed (settled, failed or failed over) in the period."""
    return await db.fetch(
        """
        SELECT * FROM contracts
        WHERE client_id = $1 AND completed_at >= $2 AND completed_at < $3
        ORDER BY completed_at, id
        """,
        uuid.UUID(client_id),
        start,
        end,
    )


async def client_balance(db: Db, client_id: str, at: dt.datetime) -> int:
    """The client's money in the ledger (all its accounts) at `at` (movements before it)."""
    value = await db.fetchval(
        f"""
        SELECT COALESCE(sum(e.amount_pusd), 0)
        FROM ledger_entries e JOIN ledger_movements m ON m.key = e.movement
        WHERE m.client_id = $1 AND m.ts < $2 AND e.account IN ({_CLIENT_ACCOUNTS})
        """,
        client_id,
        at,
    )
    return int(value)


async def client_movements(
    db: Db, client_id: str, start: dt.datetime, end: dt.datetime
) -> list[asyncpg.Record]:
    """The movements of the period that change the client's money: key, cause, ts, reference,
    reason, contract_id, `amount_pusd` (the change to the client's accounts), `fee_pusd` (the
    platform's fee in it), `rail` (the external rail, e.g. `stripe`, if any)."""
    return await db.fetch(
        f"""
        SELECT m.key, m.cause, m.ts, m.reference, m.reason, m.contract_id,
               sum(e.amount_pusd) FILTER (WHERE e.account IN ({_CLIENT_ACCOUNTS})) AS amount_pusd,
               COALESCE(sum(e.amount_pusd) FILTER (WHERE e.account = 'platform:fee'), 0)
                   AS fee_pusd,
               substr(max(e.account) FILTER (WHERE e.account LIKE 'rail:%'), 6) AS rail
        FROM ledger_movements m JOIN ledger_entries e ON e.movement = m.key
        WHERE m.client_id = $1 AND m.ts >= $2 AND m.ts < $3
        GROUP BY m.key
        HAVING COALESCE(sum(e.amount_pusd) FILTER (WHERE e.account IN ({_CLIENT_ACCOUNTS})), 0)
               <> 0
        ORDER BY m.ts, m.key
        """,
        client_id,
        start,
        end,
    )


async def provider_contracts(
    db: Db, user_id: str, start: dt.datetime, end: dt.datetime
) -> list[asyncpg.Record]:
    """Per node of the provider: contracts closed in the period, their GB-seconds and what
    renters paid for them (gross, before the platform fee)."""
    return await db.fetch(
        """
        SELECT c.node_id, n.name, n.region, count(*) AS contracts,
               sum((c.ram_gb + c.vram_gb)::bigint * c.used_sec) AS gb_sec,
               sum(c.total_cost_pusd)::numeric AS gross_pusd
        FROM contracts c LEFT JOIN nodes n ON n.id = c.node_id
        WHERE c.owner_id = $1 AND c.completed_at >= $2 AND c.completed_at < $3
        GROUP BY c.node_id, n.name, n.region
        ORDER BY n.name, c.node_id
        """,
        uuid.UUID(user_id),
        start,
        end,
    )


async def provider_balance(db: Db, user_id: str, at: dt.datetime | None = None) -> int:
    """What the platform owes the provider (its ledger account) at `at` (None: now)."""
    value = await db.fetchval(
        """
        SELECT COALESCE(sum(e.amount_pusd), 0)
        FROM ledger_entries e JOIN ledger_movements m ON m.key = e.movement
        WHERE e.account = $1 AND ($2::timestamptz IS NULL OR m.ts < $2)
        """,
        f"provider:{user_id}",
        at,
    )
    return int(value)


async def provider_movements(
    db: Db, user_id: str, start: dt.datetime, end: dt.datetime
) -> list[asyncpg.Record]:
    """The movements of the provider's account in the period: key, cause, ts, contract_id,
    reference, `amount_pusd` (to the provider: + earnings, - payouts), and `fee_pusd` (the
    platform's fee taken in the same movement: a settlement's)."""
    return await db.fetch(
        """
        SELECT m.key, m.cause, m.ts, m.contract_id, m.reference,
               sum(e.amount_pusd) FILTER (WHERE e.account = $1) AS amount_pusd,
               COALESCE(sum(e.amount_pusd) FILTER (WHERE e.account = 'platform:fee'), 0)
                   AS fee_pusd
        FROM ledger_movements m JOIN ledger_entries e ON e.movement = m.key
        WHERE m.key IN (SELECT movement FROM ledger_entries WHERE account = $1)
          AND m.ts >= $2 AND m.ts < $3
        GROUP BY m.key
        ORDER BY m.ts, m.key
        """,
        f"provider:{user_id}",
        start,
        end,
    )
