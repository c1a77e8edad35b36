"""A fold written to its tables, inside the caller's transaction: whole rows by binary COPY
into temporary staging tables and set-based upserts, partial rows by one `unnest` UPDATE
per table and row shape, heartbeat metrics appended and rolled up per minute (`_flush`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg

from persistence import ledger
from persistence.journal.fold import (
    _BID_COLS,
    _CONTRACT_COLS,
    _METRIC_COLS,
    _NODE_COLS,
    _Fold,
    _Row,
    _Statement,
    _wire,
)


def _alias(col: str) -> str:
    if col.startswith("++"):
        return "add_" + col[2:]
    if col.startswith("+"):
        return "inc_" + col[1:]
    return col


class _Upsert:
    """Whole rows of one table, upserted by id: binary COPY into a temporary staging table
    (asyncpg encodes a record's values straight; an array parameter costs it an ABC isinstance
    check per element, a third of the worker's time on registrations and fills), then one
    INSERT ... SELECT ... ON CONFLICT, which needs no parameters and so rides in the flush's
    closing simple query."""

    def __init__(
        self, table: str, types: dict[str, str], *, keep_earliest: Sequence[str] = ()
    ) -> None:
        self.cols = tuple(types)
        self.staging = f"journal_{table}_staging"
        self.values = operator.itemgetter(*self.cols)
        wires = {c: _wire(types[c], f"u.{c}") for c in self.cols}
        self.create_sql = (
            f"CREATE TEMP TABLE IF NOT EXISTS {self.staging} ("
            + ", ".join(f"{c} {wires[c][0]}" for c in self.cols)
            + ") ON COMMIT DELETE ROWS"
        )
        select = ", ".join(
            f"coalesce(string_to_array(u.{c}, ','), '{{}}')::uuid[]"
            if c == "contract_ids"
            else wires[c][1]
            for c in self.cols
        )
        sets = ", ".join(
            f"{c} = least({table}.{c}, EXCLUDED.{c})"
            if c in keep_earliest
            else f"{c} = EXCLUDED.{c}"
            for c in self.cols
            if c != "id"
        )
        # Several flushes may share a transaction (one event at a time, when isolating a
        # refused event): each must see only its own rows, hence the DELETE.
        self.apply_sql = (
            f"INSERT INTO {table} ({', '.join(self.cols)}) "
            f"SELECT {select} FROM {self.staging} AS u "
            f"ON CONFLICT (id) DO UPDATE SET {sets}; DELETE FROM {self.staging}"
        )

    def records(self, rows: Iterable[_Row]) -> list[tuple[Any, ...]]:
        return list(map(self.values, rows))

    async def stage(self, conn: asyncpg.Connection, records: list[tuple[Any, ...]]) -> None:
        await conn.copy_records_to_table(self.staging, records=records, columns=self.cols)


_NODES = _Upsert("nodes", _NODE_COLS, keep_earliest=("created_at",))
_BIDS = _Upsert("bids", _BID_COLS)
_CONTRACTS = _Upsert("contracts", _CONTRACT_COLS)


def _patch(table: str, types: dict[str, str], patches: dict[str, _Row]) -> list[_Statement]:
    """The UPDATEs applying partial rows: one per table and set of columns (a shape), its
    values in arrays that `unnest` turns into rows."""
    out: list[_Statement] = []
    shapes: dict[tuple[str, ...], list[tuple[str, _Row]]] = {}
    for key, patch in patches.items():
        shapes.setdefault(tuple(sorted(patch)), []).append((key, patch))
    for shape, items in shapes.items():
        aliases = ["id", *(_alias(c) for c in shape)]
        array_types = ["uuid"]
        sets = []
        for col in shape:
            name = col.lstrip("+")
            if col.startswith("++"):
                array_types.append("text")
                sets.append(f"{name} = t.{name} || string_to_array(u.{_alias(col)}, ',')::uuid[]")
            elif col.startswith("+"):
                array_types.append(types[name])
                sets.append(f"{name} = t.{name} + u.{_alias(col)}")
            else:
                array_type, value = _wire(types[name], f"u.{name}")
                array_types.append(array_type)
                sets.append(f"{name} = {value}")
        unnest = ", ".join(f"${i}::{t}[]" for i, t in enumerate(array_types, 1))
        sql = (
            f"UPDATE {table} AS t SET {', '.join(sets)} "
            f"FROM unnest({unnest}) AS u({', '.join(aliases)}) WHERE t.id = u.id"
        )
        args: list[list[Any]] = [[key for key, _ in items]]
        for col in shape:
            if col.startswith("++"):
                args.append([",".join(p[col]) for _, p in items])
            else:
                args.append([p[col] for _, p in items])
        out.append((sql, args))
    return out


def _patches(fold: _Fold) -> list[_Statement]:
    """Every UPDATE of partial rows a fold needs (the clients' spend included)."""
    out = _patch("nodes", _NODE_COLS, fold.node_patches)
    out += _patch("bids", _BID_COLS, fold.bid_patches)
    out += _patch("contracts", _CONTRACT_COLS, fold.contract_patches)
    if fold.spend:
        out.append((_SPEND_SQL, [list(fold.spend), list(fold.spend.values())]))
    if fold.scores:
        columns = list(zip(*fold.scores.values(), strict=True))
        out.append((_SCORES_SQL, [list(c) for c in columns]))
    out += ledger.statements(fold.ledger)
    return out


_SCORES_SQL = """
INSERT INTO node_scores AS t (node_id, window_start, region, up_pct, uptime_score, notice)
SELECT u.node_id, 'epoch'::timestamptz + u.w_ms * interval '1 millisecond', u.region, u.up,
       u.centi * 0.01, u.notice
FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int2[], $5::int8[], $6::text[])
    AS u(node_id, w_ms, region, up, centi, notice)
ON CONFLICT (node_id, window_start) DO UPDATE SET
    up_pct = EXCLUDED.up_pct, uptime_score = EXCLUDED.uptime_score, notice = EXCLUDED.notice
"""


_SPEND_SQL = """
UPDATE clients AS c
SET current_spend_pusd = c.current_spend_pusd + u.amount,
    current_spend_usd = least(round((c.current_spend_pusd + u.amount) * 0.000000000001, 2),
                              99999999.99)
FROM unnest($1::uuid[], $2::numeric[]) AS u(id, amount)
WHERE c.id = u.id
"""

# Heartbeat metrics go through a temporary table: one COPY, then two set-based statements
# append them to the partitioned table and fold them into the per-minute rollup (so the worker
# does no per-row aggregation and sends no arrays for it). The sums are exact: of integers,
# scaled once per group. Every staging table is emptied at each commit (ON COMMIT DELETE ROWS,
# a truncation), and a TOAST table with its index makes that some three times dearer: bounded
# types (varchar(50), not text) keep this one, the busiest, without one.
_METRICS_STAGING_SQL = """
CREATE TEMP TABLE IF NOT EXISTS journal_metrics_staging (
    node_id uuid, region varchar(50), offered_ram_gb integer, offered_vram_gb integer,
    available_ram_gb integer, available_vram_gb integer, cpu_usage_pct integer,
    gpu_usage_pct integer, temperature_c integer, bandwidth_mbps integer, latitude integer,
    longitude integer, ts_ms bigint, minute_ms bigint, grouped boolean NOT NULL DEFAULT false
) ON COMMIT DELETE ROWS
"""
_METRICS_SQL = """
INSERT INTO node_metrics (
    node_id, region, offered_ram_gb, offered_vram_gb, available_ram_gb, available_vram_gb,
    cpu_usage_pct, gpu_usage_pct, temperature_c, bandwidth_mbps, latitude, longitude,
    "timestamp")
SELECT node_id, region, offered_ram_gb, offered_vram_gb, available_ram_gb, available_vram_gb,
       cpu_usage_pct * 0.01, gpu_usage_pct * 0.01, temperature_c, bandwidth_mbps,
       latitude * 0.000001, longitude * 0.000001,
       'epoch'::timestamptz + ts_ms * interval '1 millisecond'
FROM journal_metrics_staging
"""
_ROLLUP_INSERT = """
INSERT INTO node_metrics_1m AS t (
    node_id, minute, region, samples, sum_offered_ram_gb, sum_offered_vram_gb,
    sum_available_ram_gb, sum_available_vram_gb, min_available_ram_gb, max_available_ram_gb,
    min_available_vram_gb, max_available_vram_gb, cpu_samples, sum_cpu_usage_pct, gpu_samples,
    sum_gpu_usage_pct, max_temperature_c)
"""
_ROLLUP_SQL = (
    _ROLLUP_INSERT
    + """SELECT node_id, 'epoch'::timestamptz + minute_ms * interval '1 millisecond', min(region),
       count(*), sum(offered_ram_gb), sum(offered_vram_gb), sum(available_ram_gb),
       sum(available_vram_gb), min(available_ram_gb), max(available_ram_gb),
       min(available_vram_gb), max(available_vram_gb), count(cpu_usage_pct),
       coalesce(sum(cpu_usage_pct) * 0.01, 0), count(gpu_usage_pct),
       coalesce(sum(gpu_usage_pct) * 0.01, 0), max(temperature_c)
FROM journal_metrics_staging
WHERE grouped
GROUP BY node_id, minute_ms
ON CONFLICT (minute, node_id) DO UPDATE SET
    samples = t.samples + EXCLUDED.samples,
    sum_offered_ram_gb = t.sum_offered_ram_gb + EXCLUDED.sum_offered_ram_gb,
    sum_offered_vram_gb = t.sum_offered_vram_gb + EXCLUDED.sum_offered_vram_gb,
    sum_available_ram_gb = t.sum_available_ram_gb + EXCLUDED.sum_available_ram_gb,
    sum_available_vram_gb = t.sum_available_vram_gb + EXCLUDED.sum_available_vram_gb,
    min_available_ram_gb = least(t.min_available_ram_gb, EXCLUDED.min_available_ram_gb),
    max_available_ram_gb = greatest(t.max_available_ram_gb, EXCLUDED.max_available_ram_gb),
    min_available_vram_gb = least(t.min_available_vram_gb, EXCLUDED.min_available_vram_gb),
    max_available_vram_gb = greatest(t.max_available_vram_gb, EXCLUDED.max_available_vram_gb),
    cpu_samples = t.cpu_samples + EXCLUDED.cpu_samples,
    sum_cpu_usage_pct = t.sum_cpu_usage_pct + EXCLUDED.sum_cpu_usage_pct,
    gpu_samples = t.gpu_samples + EXCLUDED.gpu_samples,
    sum_gpu_usage_pct = t.sum_gpu_usage_pct + EXCLUDED.sum_gpu_usage_pct,
    max_temperature_c = greatest(t.max_temperature_c, EXCLUDED.max_temperature_c)
"""
)
# The same for the metrics whose (node, minute) has no other metric in the batch (the usual
# case: a node heartbeats every few seconds, a batch spans tens of milliseconds): each is its own
# group, and skipping the grouping saves ~1 us a row. The others (`grouped`) are summed first.
_ROLLUP_ROWS_SQL = (
    _ROLLUP_INSERT
    + """SELECT node_id, 'epoch'::timestamptz + minute_ms * interval '1 millisecond', region, 1,
       offered_ram_gb, offered_vram_gb, available_ram_gb, available_vram_gb, available_ram_gb,
       available_ram_gb, available_vram_gb, available_vram_gb, (cpu_usage_pct IS NOT NULL)::int,
       coalesce(cpu_usage_pct * 0.01, 0), (gpu_usage_pct IS NOT NULL)::int,
       coalesce(gpu_usage_pct * 0.01, 0), temperature_c
FROM journal_metrics_staging
WHERE NOT grouped
ON CONFLICT"""
    + _ROLLUP_SQL.split("ON CONFLICT", 1)[1]
)


async def _flush(
    conn: asyncpg.Connection, fold: _Fold, on_tail: Callable[[], None] | None = None
) -> None:
    # The foreign keys between these tables are deferred, so the order below does not matter;
    # they are checked at the end (SET CONSTRAINTS ... IMMEDIATE) so that a refusal is raised
    # here, inside the caller's savepoint, rather than at COMMIT. Statements without parameters
    # go together in one simple query: a round trip saved is a wake-up of each side saved, which
    # is what a busy machine makes slow. (A table's rows are in `fold` either whole or as
    # patches, never both, so patching before upserting changes nothing.)
    upserts = [(u, rows) for u, rows in _upserts(fold) if rows]
    head = ["SET CONSTRAINTS ALL DEFERRED", *(u.create_sql for u, _ in upserts)]
    if fold.metrics:
        head.append(_METRICS_STAGING_SQL)
    await conn.execute("; ".join(head))
    for upsert, rows in upserts:
        records = fold.staged[upsert.staging] if fold.staged is not None else upsert.records(rows)
        await upsert.stage(conn, records)
    for sql, args in fold.patches if fold.patches is not None else _patches(fold):
        await conn.execute(sql, *args)
    tail = [u.apply_sql for u, _ in upserts]
    if fold.metrics:
        repeats = fold.repeats
        records = fold.metrics
        if repeats:
            records = [m for i, m in enumerate(records) if i not in repeats]
            await conn.copy_records_to_table(
                "journal_metrics_staging",
                records=[(*fold.metrics[i], True) for i in sorted(repeats)],
                columns=(*_METRIC_COLS, "grouped"),
            )
            tail.append(_ROLLUP_SQL)
        if records:
            await conn.copy_records_to_table(
                "journal_metrics_staging", records=records, columns=_METRIC_COLS
            )
            tail.append(_ROLLUP_ROWS_SQL)
        tail += [_METRICS_SQL, "DELETE FROM journal_metrics_staging"]
    tail.append("SET CONSTRAINTS ALL IMMEDIATE")
    if on_tail is not None:
        on_tail()
    await conn.execute("; ".join(tail))


def _upserts(fold: _Fold) -> list[tuple[_Upsert, Sequence[_Row]]]:
    return [
        (_NODES, list(fold.nodes.values())),
        (_BIDS, list(fold.bids.values())),
        (_CONTRACTS, list(fold.contracts.values())),
    ]
