"""One batch: ONE transaction that stores the events, applies each region's contiguous run and
advances its position (`write_batch`); written the fast way, then carefully if that raises,
setting aside with the reason every event that cannot be stored or applied (`write`).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, NamedTuple

import asyncpg
import msgspec

from persistence.journal.fold import _Fold
from persistence.journal.partitions import ensure_partitions
from persistence.journal.rows import _flush, _patches, _upserts
from persistence.journal.stored import StoredEvent, decode_entry

__all__ = ["Batch", "BatchResult", "Reject", "prepare", "write", "write_batch"]

log = logging.getLogger("mnemo.journal")

_MAX_APPLY = 20_000  # events applied per region per transaction (bounds a catch-up's transaction)

_CHUNK = 250  # events decoded, folded or dropped between two yields to the event loop

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1)


def _ts(ms: int) -> datetime:
    return _EPOCH + timedelta(0, 0, 0, ms)


def _pg_transient(exc: BaseException) -> bool:
    """Errors that say "Postgres is not reachable right now", as opposed to "this data is bad"."""
    return isinstance(
        exc,
        (
            OSError,
            asyncio.TimeoutError,
            asyncpg.InterfaceError,
            # A connection cut in the middle of a COPY is left in a state asyncpg refuses.
            asyncpg.exceptions.InternalClientError,
            asyncpg.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,
            asyncpg.exceptions.InsufficientResourcesError,
            asyncpg.exceptions.TransactionRollbackError,
        ),
    )


class BatchResult(msgspec.Struct, kw_only=True):
    """What one transaction did. `waiting` lists regions with stored events left unapplied
    (a gap before them, or more than one transaction's worth); `rejected` counts the events it
    set aside (see `Reject`)."""

    stored: int = 0
    applied: int = 0
    rejected: int = 0
    node_regions: list[str] = []
    waiting: list[str] = []


class Reject(NamedTuple):
    """An event set aside: at `stage` `store` (the `events` table refused it) or `apply` (its
    fold or its rows raised), with the reason. Its region's position moves past it."""

    stored: StoredEvent
    stage: Literal["store", "apply"]
    problem: str


def _problem(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


# Events reach `events` by one binary COPY straight into the table: the usual batch holds no
# event stored before, and COPY is the cheapest way in (no staging pass, no per-row conflict
# probe). It runs in a savepoint; when it meets an event stored already (a redelivery), the
# batch goes through a temporary staging table and INSERT ... ON CONFLICT DO NOTHING instead.
# That table is dropped at commit: kept in the session, it would be truncated at every later
# commit (see _METRICS_STAGING_SQL) for the sake of a rare redelivery.
_EVENT_COLS = ("event_id", "region", "seq", "type", "ts", "payload")
_STAGING_SQL = """
CREATE TEMP TABLE IF NOT EXISTS journal_staging (
    event_id text, region text, seq bigint, type text, ts_ms bigint, payload text
) ON COMMIT DROP
"""
_STAGING_COLS = ("event_id", "region", "seq", "type", "ts_ms", "payload")
_INSERT_EVENTS_SQL = """
INSERT INTO events (event_id, region, seq, type, ts, payload)
SELECT event_id, region, seq, type, 'epoch'::timestamptz + ts_ms * interval '1 millisecond',
       payload::json
FROM journal_staging
ON CONFLICT DO NOTHING
"""

# The stored events after each region's `after` seq (its applied position, or the end of the
# run the batch itself holds), in order: a gap this batch fills may release events waiting in
# `events`, and a region applied by no new event (catch-up) finds its whole run here.
_RUNS_SQL = """
SELECT p.region, e.seq
FROM unnest($1::text[], $2::int8[]) AS p(region, after)
CROSS JOIN LATERAL (
    SELECT seq FROM events e WHERE e.region = p.region AND e.seq > p.after
    ORDER BY seq LIMIT $3
) AS e
ORDER BY p.region, e.seq
"""


def _event_record(e: StoredEvent) -> tuple[Any, ...]:
    return (e[0], e[1], e[2], e[3], _ts(e[4]), e[5])


async def _store(
    conn: asyncpg.Connection,
    events: Sequence[StoredEvent],
    records: list[tuple[Any, ...]] | None = None,
) -> int:
    if not events:
        return 0
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "events",
                records=records if records is not None else list(map(_event_record, events)),
                columns=_EVENT_COLS,
            )
        return len(events)
    except asyncpg.UniqueViolationError:
        pass  # some were stored before: keep the others, ignore those
    await conn.execute(_STAGING_SQL)
    await conn.copy_records_to_table(
        "journal_staging", records=[e[:6] for e in events], columns=_STAGING_COLS
    )
    status = await conn.execute(_INSERT_EVENTS_SQL)
    return int(status.rsplit(" ", 1)[1])


async def _store_carefully(
    conn: asyncpg.Connection, events: Sequence[StoredEvent]
) -> tuple[int, list[Reject]]:
    """`_store`, and when it raises, each event in a savepoint of its own: those `events`
    refuses are set aside (a gap their rejects fill, see `_Worker._check_gaps`)."""
    try:
        async with conn.transaction():
            return await _store(conn, events), []
    except Exception as e:
        if _pg_transient(e):
            raise
    stored, rejects = 0, []
    for one in events:
        try:
            async with conn.transaction():
                stored += await _store(conn, [one])
        except Exception as exc:
            if _pg_transient(exc):
                raise
            rejects.append(Reject(one, "store", _problem(exc)))
    return stored, rejects


async def _runs(
    conn: asyncpg.Connection,
    regions: Sequence[str],
    mine: dict[str, list[StoredEvent]],
    memory: dict[tuple[str, int], StoredEvent],
    *,
    max_apply: int,
) -> tuple[dict[str, list[StoredEvent]], set[str]]:
    """Lock the regions' positions and find each one's contiguous run of unapplied events.

    Returns (runs, waiting). Must run inside a transaction: the row locks serialise workers per
    region until commit (taken in region order, so workers cannot deadlock on them).
    """
    regions = sorted(set(regions))
    await conn.execute(
        "INSERT INTO journal_positions (region) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        regions,
    )
    rows = await conn.fetch(
        "SELECT region, applied_seq FROM journal_positions "
        "WHERE region = ANY($1::text[]) ORDER BY region FOR UPDATE",
        regions,
    )
    if not rows:
        return {}, set()
    applied = {r["region"]: r["applied_seq"] for r in rows}
    # The run starts with the batch's own events, read from `events` only past them.
    heads = {r: _head(mine.get(r, ()), seq, max_apply) for r, seq in applied.items()}
    found = await conn.fetch(
        _RUNS_SQL,
        list(applied),
        [applied[r] + len(heads[r]) for r in applied],
        max_apply + 1,
    )
    waiting: set[str] = set()
    tails: dict[str, list[int]] = {}
    for region, seq in found:
        tail = tails.setdefault(region, [])
        done = len(heads[region]) + len(tail)
        if seq == applied[region] + done + 1 and done < max_apply:
            tail.append(seq)
        else:
            waiting.add(region)
    missing = [(r, s) for r, seqs in tails.items() for s in seqs if (r, s) not in memory]
    if missing:
        fetched = await conn.fetch(
            "SELECT payload::text FROM events WHERE (region, seq) IN "
            "(SELECT * FROM unnest($1::text[], $2::int8[]))",
            [r for r, _ in missing],
            [s for _, s in missing],
        )
        memory = dict(memory)
        for (payload,) in fetched:
            stored = decode_entry(payload, lenient=True)
            memory[(stored.region, stored.seq)] = stored
    runs = {}
    for region, head in heads.items():
        if region in tails:
            head = head + [memory[(region, s)] for s in tails[region]]
        if head:
            runs[region] = head
    return runs, waiting


def _seq(e: StoredEvent) -> int:
    return e.seq


def _head(mine: Sequence[StoredEvent], applied: int, max_apply: int) -> list[StoredEvent]:
    """The run `applied + 1, + 2, ...` (at most `max_apply` long) at the start of `mine`, a
    region's events in sequence order without duplicates, once those applied are passed."""
    lo = bisect.bisect_right(mine, applied, key=_seq)
    if lo == len(mine) or mine[lo].seq != applied + 1:
        return []
    hi = min(len(mine), lo + max_apply)
    if mine[hi - 1].seq - mine[lo].seq != hi - 1 - lo:  # a gap: the run ends before it
        hi = lo + 1
        while mine[hi].seq == mine[hi - 1].seq + 1:
            hi += 1
    return list(mine[lo:hi])


async def _advance(conn: asyncpg.Connection, runs: dict[str, list[StoredEvent]]) -> None:
    if not runs:
        return
    await conn.execute(
        "UPDATE journal_positions AS p SET applied_seq = u.seq, applied_ts = u.ts, "
        "updated_at = now() "
        "FROM unnest($1::text[], $2::int8[], $3::timestamptz[]) AS u(region, seq, ts) "
        "WHERE p.region = u.region",
        list(runs),
        [run[-1].seq for run in runs.values()],
        [_ts(run[-1].ts_ms) for run in runs.values()],
    )


def _fold(runs: dict[str, list[StoredEvent]]) -> _Fold:
    fold = _Fold()
    for run in runs.values():
        for stored in run:
            fold.apply(stored)
    return fold


async def _apply_carefully(
    conn: asyncpg.Connection,
    runs: dict[str, list[StoredEvent]],
    prune: Callable[[_Fold], None] | None = None,
) -> tuple[set[str], list[Reject]]:
    """Apply the runs so that an event that raises anything (its fold, its rows, a constraint)
    is set aside and every other one is applied, in order: halves of the events in savepoints
    of their own, a failing half halved again down to its culprits (about 2 log2(n) flushes for
    one culprit among n). `prune` trims each fold before it is written (a replay's). Returns the
    regions whose nodes changed, and the rejects."""
    node_regions: set[str] = set()
    rejects: list[Reject] = []
    todo: collections.deque[list[StoredEvent]] = collections.deque(
        [[e for run in runs.values() for e in run]]
    )
    while todo:
        chunk = todo.popleft()
        if not chunk:
            continue
        try:
            fold = _Fold()
            for stored in chunk:
                fold.apply(stored)
            if prune is not None:
                prune(fold)
            async with conn.transaction():
                await _flush(conn, fold)
        except Exception as exc:
            if _pg_transient(exc):
                raise
            if len(chunk) == 1:
                rejects.append(Reject(chunk[0], "apply", _problem(exc)))
            else:
                half = len(chunk) // 2
                todo.appendleft(chunk[half:])
                todo.appendleft(chunk[:half])
            continue
        node_regions |= fold.node_regions
    return node_regions, rejects


async def _record_rejects(conn: asyncpg.Connection, rejects: Sequence[Reject]) -> None:
    for r in rejects:
        log.error(
            "journal: event %s (%s) set aside at %s: %s; its region goes on without it "
            "(`mnemo journal-status`, `mnemo journal-replay`)",
            r.stored.event_id,
            r.stored.type,
            r.stage,
            r.problem,
        )
    await conn.executemany(
        "INSERT INTO journal_rejects (region, seq, event_type, raw, problem, stage) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (region, seq) WHERE region IS NOT NULL "
        "DO UPDATE SET problem = EXCLUDED.problem, stage = EXCLUDED.stage, "
        "received_at = now(), replayed_at = NULL",
        [
            (
                r.stored.region,
                r.stored.seq,
                r.stored.type,
                r.stored.payload.encode(),
                r.problem,
                r.stage,
            )
            for r in rejects
        ],
    )


_REGION_SEQ = operator.itemgetter(1, 2)


class Batch:
    """Events deduplicated, ordered and folded ahead of their transaction (`prepare`), so that
    a worker can do this CPU work while the previous batch is being written. `fold` is None
    when folding raised (an event the fold cannot take): `write_batch` then applies carefully."""

    __slots__ = ("days", "events", "fold", "memory", "records", "runs")

    def __init__(self, events: Iterable[StoredEvent], *, fold: bool = True) -> None:
        self.memory: dict[tuple[str, int], StoredEvent] = {}
        for e in events:
            self.memory.setdefault((e.region, e.seq), e)
        self.events = sorted(self.memory.values(), key=_REGION_SEQ)
        self.runs: dict[str, list[StoredEvent]] = {}
        for e in self.events:
            run = self.runs.get(e.region)
            if run is None:
                self.runs[e.region] = [e]
            else:
                run.append(e)
        # Folded on the guess that these events are exactly the runs to apply (the usual case:
        # in-order delivery, nothing waiting); write_batch checks the guess and refolds if not.
        self.fold: _Fold | None = _Fold()
        if fold:
            try:
                for e in self.events:
                    self.fold.apply(e)
            except Exception:
                self.fold = None
        self.days = {
            _EPOCH_DAY + timedelta(days=d)
            for d in {e.ts_ms // 86_400_000 for e in self.events if e.type == "heartbeats"}
        }
        # The events' COPY records, made ahead with the fold by `fold_stepwise`.
        self.records: list[tuple[Any, ...]] | None = None

    async def fold_stepwise(self) -> None:
        """Fold the events (`fold=False` above) and make their COPY records and the fold's
        (`_Fold.staged`, `_Fold.patches`), yielding to the event loop every `_CHUNK` events so
        that the batch being written meanwhile gets its turns promptly. An event that makes
        any of this raise leaves `fold` None (and the records to `write_batch`)."""
        fold = self.fold
        assert fold is not None
        try:
            apply = fold.apply
            records: list[tuple[Any, ...]] = []
            events = self.events
            for i in range(0, len(events), _CHUNK):
                for e in events[i : i + _CHUNK]:
                    apply(e)
                records += map(_event_record, events[i : i + _CHUNK])
                await asyncio.sleep(0)
            staged = {}
            for upsert, rows in _upserts(fold):
                staged[upsert.staging] = upsert.records(rows)
                await asyncio.sleep(0)
            fold.staged = staged
            fold.patches = _patches(fold)
        except Exception as exc:
            log.warning(
                "journal: a batch did not fold (%s); it is applied carefully", _problem(exc)
            )
            self.fold = None
            return
        self.records = records

    async def discard_stepwise(self) -> None:
        """Drop the batch's objects a slice at a time (freeing some hundred thousand objects
        takes milliseconds), for the same reason."""
        self.memory.clear()
        self.runs.clear()
        self.records = None
        events = self.events
        while events:
            del events[-_CHUNK:]
            await asyncio.sleep(0)
        if self.fold is not None:
            metrics = self.fold.metrics
            while metrics:
                del metrics[-4 * _CHUNK :]
                await asyncio.sleep(0)
        self.fold = None


def prepare(events: Iterable[StoredEvent]) -> Batch:
    """Decoded events -> a `Batch` for `write_batch`."""
    return Batch(events)


async def write_batch(
    conn: asyncpg.Connection,
    events: Sequence[StoredEvent] | Batch,
    *,
    regions: Iterable[str] = (),
    max_apply: int = _MAX_APPLY,
    partitions: set[date] | None = None,
    on_tail: Callable[[], None] | None = None,
    careful: bool = False,
) -> BatchResult:
    """Store `events` and apply every region's contiguous run, in ONE transaction.

    Idempotent: any delivery of any events, any number of times, in any order, ends in the same
    tables once every event has been delivered at least once. `regions` adds regions to apply
    without new events (catch-up). `partitions` caches the days that have a `node_metrics`
    partition (the catalog is read when it is None); missing ones are created first, in their
    own transaction. `on_tail` is called when the batch's last and longest statement (the
    set-based upserts) goes to Postgres.

    The fast way (`careful=False`) folds the whole batch into one set of statements: anything
    raised rolls the transaction back and propagates. `careful=True` sets aside, with the
    reason, every event that makes anything raise, and applies the others (see `Reject`,
    `_apply_carefully`); only connection errors propagate. `write` does the one, then the other.
    """
    batch = events if isinstance(events, Batch) else Batch(events, fold=not careful)
    all_regions = sorted({*batch.runs, *regions})
    result = BatchResult()
    if not all_regions:
        return result
    if batch.days:
        await ensure_partitions(conn, batch.days, partitions)
    async with conn.transaction():
        rejects: list[Reject] = []
        mine = batch.runs
        if careful:
            result.stored, rejects = await _store_carefully(conn, batch.events)
            if rejects:
                refused = {(r.stored.region, r.stored.seq) for r in rejects}
                mine = {
                    region: [e for e in run if (region, e.seq) not in refused]
                    for region, run in mine.items()
                }
        else:
            result.stored = await _store(conn, batch.events, batch.records)
        runs, waiting = await _runs(conn, all_regions, mine, batch.memory, max_apply=max_apply)
        if careful:
            node_regions, applying = await _apply_carefully(conn, runs)
            rejects += applying
        else:
            fold = batch.fold if batch.fold is not None and runs == batch.runs else _fold(runs)
            await _flush(conn, fold, on_tail)
            node_regions = fold.node_regions
        await _advance(conn, runs)
        if rejects:
            await _record_rejects(conn, rejects)
    result.applied = sum(len(r) for r in runs.values()) - sum(r.stage == "apply" for r in rejects)
    result.rejected = len(rejects)
    result.node_regions = sorted(node_regions)
    result.waiting = sorted(waiting)
    return result


async def write(
    conn: asyncpg.Connection,
    events: Sequence[StoredEvent] | Batch,
    **options: Any,
) -> BatchResult:
    """`write_batch` the fast way and, if that raises anything but a connection error, again
    carefully: no event, however malformed, stops the journal or holds back another."""
    try:
        return await write_batch(conn, events, **options)
    except Exception as exc:
        if _pg_transient(exc):
            raise
        n = len(events.events if isinstance(events, Batch) else events)
        log.error(
            "journal: a batch of %d events failed (%s); applying it carefully to set the "
            "culprits aside",
            n,
            _problem(exc),
        )
    options.pop("on_tail", None)
    return await write_batch(conn, events, careful=True, **options)
