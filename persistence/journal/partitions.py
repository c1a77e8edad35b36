"""The `node_metrics` partitions, one a day (UTC): which exist, and creating those a batch
needs (the worker also keeps days ahead and drops those past the retention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import date, datetime

import asyncpg

__all__ = ["ensure_partitions", "metrics_partitions"]


async def metrics_partitions(conn: asyncpg.Connection) -> set[date]:
    """The days (UTC) that have a `node_metrics` partition."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'node_metrics'::regclass"
    )
    days = set()
    for (name,) in rows:
        with contextlib.suppress(ValueError):
            days.add(datetime.strptime(name[-8:], "%Y%m%d").date())
    return days


async def ensure_partitions(
    conn: asyncpg.Connection, days: Iterable[date], known: set[date] | None = None
) -> None:
    """Create the `node_metrics` partitions of `days` that do not exist yet (`known`, when
    given, is the caller's cache of existing ones and is updated)."""
    if known is None:
        known = await metrics_partitions(conn)
    for day in sorted(set(days) - known):
        await conn.fetchval("SELECT mnemo_ensure_metrics_partitions($1, $1)", day)
        known.add(day)
