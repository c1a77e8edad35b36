"""Fixtures and helpers of the persistence tests: a canonical digest of the journal's tables."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

# Every table the journal writes, with the columns that must be identical between two runs over
# the same events (surrogate keys and wall-clock stamps left out).
JOURNAL_TABLES: dict[str, str] = {
    "events": "*",
    "journal_positions": "region, applied_seq, applied_ts, skipped, error, error_seq",
    "nodes": "*",
    "offers": "*",
    "bids": "*",
    "contracts": "*",
    "node_metrics": (
        "node_id, region, offered_ram_gb, offered_vram_gb, available_ram_gb, available_vram_gb, "
        "cpu_usage_pct, gpu_usage_pct, temperature_c, bandwidth_mbps, latitude, longitude, "
        '"timestamp"'
    ),
    "node_metrics_1m": "*",
    "clusters": (
        "region, total_nodes, active_nodes, datacenter_nodes, edge_nodes, mist_nodes, "
        "total_ram_gb, available_ram_gb, total_vram_gb, available_vram_gb, offered_ram_gb, "
        "offered_vram_gb, reserved_ram_gb, reserved_vram_gb, avg_price_pusd, "
        "avg_price_per_gb_sec, center_latitude, center_longitude"
    ),
    "clients": "id, current_spend_pusd, current_spend_usd",
}


async def digest(conn: asyncpg.Connection) -> dict[str, tuple[int, str]]:
    """(row count, md5 of the sorted rows) of every journal table: equal digests, equal state."""
    out = {}
    for table, cols in JOURNAL_TABLES.items():
        out[table] = tuple(
            await conn.fetchrow(
                f"SELECT count(*), md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '')) "
                f"FROM (SELECT {cols} FROM {table}) AS x"
            )
        )
    return out


async def reset_journal(conn: asyncpg.Connection) -> None:
    """Empty every journal table (accounts stay; their spend returns to zero)."""
    await conn.execute(
        "TRUNCATE events, journal_positions, journal_rejects, bids, transactions, "
        "contracts, nodes, node_metrics, node_metrics_1m, clusters"
    )
    await conn.execute("UPDATE clients SET current_spend_pusd = 0, current_spend_usd = 0")


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as c:
        yield c
