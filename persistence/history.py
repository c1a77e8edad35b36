"""The market's history as the journal keeps it in Postgres, read for the API's listings.

Nodes, bids and contracts (tables of `migrations/002_market.sql`), written by the journal from the
event streams: these rows trail the live market by the journal's lag (normally well under a
second). Functions take the pool (or a connection) and return rows (`asyncpg.Record`, columns as
in the table) or small typed records; the gateway maps rows to its wire types and decides who may
see what. Ids given as text by a caller (a path parameter) match nothing when they are not uuids;
ids that come from the live market are uuid hex.

Pages are `(total_count, rows)`: the count of every matching row, then one page of them in a
fixed order. Page sizes and offsets are ints checked by the caller; they are written into the
statement, which is built per combination of filters anyway.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg

__all__ = [
    "NodeSettled",
    "bids_page",
    "closed_contracts",
    "contract",
    "node_owner",
    "node_settled",
    "nodes_page",
    "provider_active_contracts",
]

Db = asyncpg.Pool | asyncpg.Connection
Page = tuple[int, list[asyncpg.Record]]


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


class _Where:
    """Conditions joined by AND; `?` in a condition becomes the next parameter's `$n` (every `?`
    of one condition names the same parameter)."""

    def __init__(self, *fixed: str) -> None:
        self.clauses: list[str] = list(fixed)
        self.args: list[Any] = []

    def add(self, sql: str, value: Any) -> None:
        self.args.append(value)
        self.clauses.append(sql.replace("?", f"${len(self.args)}"))

    def __str__(self) -> str:
        return " AND ".join(self.clauses) or "true"


async def _page(db: Db, table: str, where: _Where, order: str, limit: int, offset: int) -> Page:
    total = await db.fetchval(f"SELECT count(*) FROM {table} WHERE {where}", *where.args)
    rows = await db.fetch(
        f"SELECT * FROM {table} WHERE {where} ORDER BY {order} "
        f"LIMIT {int(limit)} OFFSET {int(offset)}",
        *where.args,
    )
    return total, rows


# ---------------------------------------------------------------------------------------------
# Nodes


async def nodes_page(
    db: Db,
    *,
    node_type: str | None = None,
    region: str | None = None,
    status: str | None = None,
    min_ram_gb: int | None = None,
    min_vram_gb: int | None = None,
    limit: int,
    offset: int,
) -> Page:
    """Nodes matching every filter given (available capacity at least `min_*`), in arrival
    order (created_at, then id)."""
    where = _Where()
    if node_type is not None:
        where.add("node_type = ?", node_type)
    if region is not None:
        where.add("region = ?", region)
    if status is not None:
        where.add("status = ?", status)
    if min_ram_gb is not None:
        where.add("available_ram_gb >= ?", min_ram_gb)
    if min_vram_gb is not None:
        where.add("available_vram_gb >= ?", min_vram_gb)
    return await _page(db, "nodes", where, "created_at, id", limit, offset)


async def node_owner(db: Db, node_id: str) -> str | None:
    """The owner's user id (uuid hex) of a node the journal knows, else None."""
    parsed = _uuid(node_id)
    if parsed is None:
        return None
    owner: uuid.UUID | None = await db.fetchval("SELECT owner_id FROM nodes WHERE id = $1", parsed)
    return None if owner is None else owner.hex


class NodeSettled(NamedTuple):
    """What a node's closed contracts (completed, failed, failed over) were charged in all."""

    total_pusd: int
    contracts: int


async def node_settled(db: Db, node_id: str) -> NodeSettled:
    """The total cost and number of a node's closed contracts (`node_id` from the market)."""
    row = await db.fetchrow(
        """
        SELECT coalesce(sum(total_cost_pusd), 0) AS total, count(*) AS n FROM contracts
        WHERE node_id = $1 AND status <> 'active'
        """,
        uuid.UUID(node_id),
    )
    assert row is not None  # an aggregate without GROUP BY yields one row
    return NodeSettled(total_pusd=int(row["total"]), contracts=int(row["n"]))


# ---------------------------------------------------------------------------------------------
# Contracts


async def provider_active_contracts(db: Db, owner_id: str) -> list[asyncpg.Record]:
    """The active contracts on any node of the provider (one indexed query, however many nodes
    the provider has)."""
    return await db.fetch(
        "SELECT * FROM contracts WHERE owner_id = $1 AND status = 'active'", uuid.UUID(owner_id)
    )


async def closed_contracts(
    db: Db,
    *,
    status: str | None = None,
    client_id: str | None = None,
    node_id: str | None = None,
    party_id: str | None = None,
    limit: int,
    offset: int,
) -> Page:
    """Contracts no longer active, newest first (start_time, then id).

    Scope: one client's (`client_id`), else one node's (`node_id`), else those the user
    `party_id` is a party to, as renter or as the node's provider; none of them: every one.
    `status` narrows to one closed status. The page is read only when it can hold a row
    (`limit > 0` and `offset` below the count).
    """
    where = _Where("status <> 'active'")
    if status is not None:
        where.add("status = ?", status)
    if client_id is not None:
        where.add("client_id = ?", uuid.UUID(client_id))
    elif node_id is not None:
        where.add("node_id = ?", uuid.UUID(node_id))
    elif party_id is not None:
        where.add("(user_id = ? OR owner_id = ?)", uuid.UUID(party_id))
    total = await db.fetchval(f"SELECT count(*) FROM contracts WHERE {where}", *where.args)
    if limit <= 0 or offset >= total:
        return total, []
    rows = await db.fetch(
        f"SELECT * FROM contracts WHERE {where} "
        f"ORDER BY start_time DESC, id LIMIT {int(limit)} OFFSET {int(offset)}",
        *where.args,
    )
    return total, rows


async def contract(db: Db, contract_id: str) -> asyncpg.Record | None:
    """One contract, in any status."""
    parsed = _uuid(contract_id)
    if parsed is None:
        return None
    return await db.fetchrow("SELECT * FROM contracts WHERE id = $1", parsed)


# ---------------------------------------------------------------------------------------------
# Bids


async def bids_page(
    db: Db,
    *,
    client_id: str | None = None,
    client_ids: Sequence[str] | None = None,
    region: str | None = None,
    status: str | None = None,
    limit: int,
    offset: int,
) -> Page:
    """Bids in any status, newest first (created_at, then id): one client's (`client_id`), else
    those of any of `client_ids`, else every bid; narrowed by region and status."""
    where = _Where()
    if client_id is not None:
        where.add("client_id = ?", uuid.UUID(client_id))
    elif client_ids is not None:
        where.add("client_id = ANY(?)", [uuid.UUID(c) for c in client_ids])
    if region is not None:
        where.add("region = ?", region)
    if status is not None:
        where.add("status = ?", status)
    return await _page(db, "bids", where, "created_at DESC, id", limit, offset)


# ---------------------------------------------------------------------------------------------
# Trust: each node's uptime windows (engine.trust)


class ScoredWindow(NamedTuple):
    window_start: Any
    up_pct: int | None
    uptime_score: float
    notice: str | None


async def node_scores(db: Db, node_id: str, start: Any, end: Any) -> list[ScoredWindow]:
    """The node's closed uptime windows that start in [start, end), oldest first: each one's up
    share (None: not counted), the 30-day score once it closed and a change of standing."""
    parsed = _uuid(node_id)
    if parsed is None:
        return []
    rows = await db.fetch(
        """
        SELECT window_start, up_pct, uptime_score, notice FROM node_scores
        WHERE node_id = $1 AND window_start >= $2 AND window_start < $3
        ORDER BY window_start
        """,
        parsed,
        start,
        end,
    )
    return [
        ScoredWindow(r["window_start"], r["up_pct"], float(r["uptime_score"]), r["notice"])
        for r in rows
    ]
