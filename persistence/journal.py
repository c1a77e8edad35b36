"""The journal: every region's event stream in Redis -> the market's history in Postgres.

Rules (DESIGN.md, "State and the atomic core"):

- **At least once in, exactly once applied.** Workers read every region's stream with one consumer
  group (`journal`; several workers may share it). Each batch is ONE Postgres transaction that
  stores the events in `events` (`ON CONFLICT (region, seq) DO NOTHING`) and applies them to the
  tables; it commits, and only then are the entries acknowledged (`XACK`). A crash anywhere before
  the commit leaves the entries pending, to be read again by the restarted worker (its own pending
  list) or claimed by another (`XAUTOCLAIM` after `claim_idle_s`).
- **Applied in sequence, per region.** `journal_positions.applied_seq` says how far a region's
  events have been applied; a batch applies the contiguous run `applied_seq + 1, + 2, ...` of the
  events it can see (its own and any stored earlier), under that row's lock. So a redelivered
  event (seq <= applied_seq) changes nothing, and an event delivered before an earlier one (a dead
  worker's entries claimed after newer entries were committed) is stored, acknowledged, and waits
  in `events` until the gap is filled. Every write is then a plain state transition taken in the
  order the scripts made them: the final tables do not depend on batching, redelivery or order of
  delivery.
- **Lost events are given up only when provably gone**: a gap is skipped (and counted in
  `journal_positions.skipped`) only when the group has nothing pending and everything in the stream
  has been delivered, i.e. no entry anywhere can still fill it (stream trimmed, Redis lost).
- **No event stops the journal or holds back another.** A batch is written the fast way (one fold,
  set-based statements); if that raises anything but a lost connection, the batch is written
  again carefully (`write`): an event that cannot be decoded, stored or applied (an unknown type,
  a value out of a column's range, a foreign key to a missing row, a bug in the fold) is set
  aside in `journal_rejects` with the reason and the stage, logged, counted in
  `mnemo journal-status` and `/metrics`, and its region's later events are applied as usual.
  Once the cause is mended, `mnemo journal-replay` applies the region's history again (see
  `replay_region`).
- **The journal trims the streams** (nothing else does): entries acknowledged, so stored in
  Postgres, and older than `stream_keep_s` (slack for the other readers) are removed; an entry
  still pending is never removed.
- **Postgres going away** (connection lost, server restarting, `pg_terminate_backend`) is retried
  at the connection edge with backoff and a logged countdown; nothing is acknowledged before it
  has been committed.

Throughput: events are decoded once (msgspec) and folded in memory per row (a node's ten
heartbeats in a batch are one UPDATE); the next batch is read, decoded and folded (with its
COPY records and UPDATE arrays) in slices during this one's set-based upserts, so neither this
process nor Postgres waits on the other for long (one batch is read ahead). In the transaction, the events reach `events` by one binary COPY straight into the
table (a savepoint catches a redelivered event and falls back to staging + ON CONFLICT DO
NOTHING); whole node, bid and contract rows and the heartbeat metrics by binary COPY into
temporary staging tables, applied by set-based statements that share one simple query with the
metrics' append and per-minute rollup; partial rows (patches) by one `unnest` UPDATE per table
and row shape. Fixed-point numerics and times travel as integers (units, ms) and are converted
in SQL. One region's events are applied by one worker at a time (its position row is locked),
so more workers add throughput across regions, not within one: `shard` (`mnemo journal --shard
K/N`) gives each of N worker processes its own share of the regions (`shard_regions`).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import gc
import logging
import operator
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, NamedTuple, get_args

import asyncpg
import hiredis
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.core import MAX_TIME_MS
from engine.keys import Keys
from engine.settings import ConfigError, Settings
from engine.types import (
    EVENT_DECODER,
    BidCancelled,
    BidExpired,
    BidPlaced,
    ContractCreated,
    ContractExtended,
    ContractSettled,
    Event,
    HeartbeatsApplied,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
)

__all__ = [
    "BATCH_SIZE",
    "GROUP",
    "Batch",
    "BatchResult",
    "JournalLag",
    "RegionLag",
    "Reject",
    "RejectedEvent",
    "ReplayResult",
    "StoredEvent",
    "Unreadable",
    "decode_entry",
    "ensure_partitions",
    "journal_lag",
    "metrics_partitions",
    "positions",
    "prepare",
    "print_status",
    "refresh_clusters",
    "rejected_counts",
    "rejected_events",
    "replay",
    "replay_region",
    "run_journal",
    "shard_regions",
    "status",
    "write",
    "write_batch",
]

log = logging.getLogger("mnemo.journal")

GROUP = "journal"
"""The consumer group every journal worker joins on every region's stream."""
_GROUP_B = GROUP.encode()

_MAX_APPLY = 20_000  # events applied per region per transaction (bounds a catch-up's transaction)
BATCH_SIZE = 20_000
"""Stream entries a batch (a transaction) takes at most. A batch holds what arrived since the
last one, up to this: larger ones come only when the journal is behind, and they catch up
faster, each node's heartbeats and each contract's changes being folded into one row write per
batch (the default mix: 14 us of Postgres CPU an event at 20k, 17.6 at 5k). A 20k-event batch
is about 50 MB of decoded events in the worker."""
_CLUSTER_REFRESH_S = 1.0
_REGIONS_REFRESH_S = 1.0
_GAP_CHECK_S = 5.0
_PARTITIONS_EVERY_S = 3600.0
_PARTITION_DAYS_AHEAD = 2
_BACKOFF_MAX_S = 10.0
_TRIM_EVERY_S = 10.0
_GC_EVERY_S = 5.0
_CHUNK = 250  # events decoded, folded or dropped between two yields to the event loop
_LAG_COUNT_MAX = 100_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1)


# ---------------------------------------------------------------------------------------------
# Stored events


class Unreadable(NamedTuple):
    """In place of an event whose envelope (id, region, type, time) is sound but whose body this
    journal cannot read (a type it does not know, a field of the wrong shape): it is stored like
    any event and set aside when applied, so a newer engine's event waits for a newer journal
    (`mnemo journal-replay`) instead of stopping this one."""

    problem: str


class StoredEvent(NamedTuple):
    """One decoded event with its JSON as the script wrote it (stored verbatim in `events`)."""

    event_id: str
    region: str
    seq: int
    type: str
    ts_ms: int
    payload: str
    event: Event | Unreadable


class _Envelope(msgspec.Struct):
    event_id: str
    region: str
    ts_ms: int
    type: str


_TAGS: dict[type, str] = {cls: str(cls.__struct_config__.tag) for cls in get_args(Event)}
_new_tuple = tuple.__new__
_ENVELOPE_DECODER = msgspec.json.Decoder(_Envelope)
_REGION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_TYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_SEQ = 2**63 - 1


def decode_entry(raw: bytes | str, *, lenient: bool = False) -> StoredEvent:
    """Decode a stream entry's `e` field. Raises `ValueError` for anything not a valid event;
    with `lenient`, an event whose envelope is sound but whose body is not (see `Unreadable`)
    comes back with an `Unreadable` as its event instead."""
    try:
        event = EVENT_DECODER.decode(raw)
    except msgspec.DecodeError as e:
        problem = f"not an event: {e}"
        if not lenient:
            raise ValueError(problem) from None
        return _unreadable(raw, problem)
    event_id = event.event_id
    region, sep, seq_text = event_id.rpartition(":")
    if (
        not sep
        or not seq_text.isdigit()
        or region != event.region
        or seq_text[0] == "0"
        or len(seq_text) > 18
        or not 0 <= event.ts_ms <= MAX_TIME_MS
    ):
        _envelope(event_id, event.region, event.ts_ms)  # raises, naming what is wrong
    payload = raw.decode() if isinstance(raw, bytes) else raw
    # tuple.__new__ skips the NamedTuple's Python-level __new__ (the hot path: every event).
    return _new_tuple(  # type: ignore[no-any-return]
        StoredEvent,
        (event_id, region, int(seq_text), _TAGS[type(event)], event.ts_ms, payload, event),
    )


def _envelope(event_id: str, region: str, ts_ms: int) -> int:
    """The seq of a sound envelope, else ValueError: an id spelling `<region>:<seq>` exactly (the
    `events` table checks it), a region name as the market makes them, a seq and a time that
    Postgres and Python can both hold."""
    prefix, sep, seq_text = event_id.rpartition(":")
    if (
        not sep
        or prefix != region
        or not _REGION_NAME.fullmatch(region)
        or not seq_text.isdigit()
        or seq_text != str(int(seq_text))
        or not 0 < int(seq_text) <= _MAX_SEQ
    ):
        raise ValueError(f"malformed event id {event_id!r} for region {region!r}")
    if not 0 <= ts_ms <= MAX_TIME_MS:
        raise ValueError(f"event {event_id}: ts_ms {ts_ms} is not a time")
    return int(seq_text)


def _unreadable(raw: bytes | str, problem: str) -> StoredEvent:
    try:
        env = _ENVELOPE_DECODER.decode(raw)
    except msgspec.DecodeError:
        raise ValueError(problem) from None
    seq = _envelope(env.event_id, env.region, env.ts_ms)
    if not _TYPE_NAME.fullmatch(env.type):
        raise ValueError(f"{problem} (type {env.type[:64]!r})")
    payload = raw.decode() if isinstance(raw, bytes) else raw
    return StoredEvent(
        env.event_id, env.region, seq, env.type, env.ts_ms, payload, Unreadable(problem)
    )


def _ts(ms: int) -> datetime:
    return _EPOCH + timedelta(0, 0, 0, ms)


def _units_of(places: int, limit: int) -> Callable[[float | None], int | None]:
    """A function taking a float to integer units of a column's last decimal place (`places`;
    half-even, clamped to +-`limit`, the column's range), None for None, NaN or infinity. The
    journal rounds here, once, so that the stored value and every sum of it (rollups) are exact
    and do not depend on how events were batched."""
    scale = 10**places

    def units(x: float | None) -> int | None:
        if x is None:
            return None
        try:
            v = round(x * scale)
        except (OverflowError, ValueError):  # infinity, NaN
            return None
        return v if -limit <= v <= limit else (limit if v > 0 else -limit)

    return units


_u2 = _units_of(2, 99_999)  # numeric(5, 2)
_u3 = _units_of(3, 9_999_999_999)  # numeric(10, 3)
_u6 = _units_of(6, 999_999_999)  # numeric(9, 6)


def _int4(x: int | None) -> int | None:
    if x is None or not -(2**31) <= x < 2**31:
        return None
    return x


# ---------------------------------------------------------------------------------------------
# The fold: ordered events -> row changes (pure; no I/O)

# Row values travel to Postgres as integers where the column is not: a fixed-point numeric as
# integer units of its last decimal place (`u2`, `u3`, `u6`; see `_units_of`), a time as
# milliseconds since the epoch (`ms`, as events carry it). SQL turns them into the column's type
# exactly (an integer times 0.01 is a numeric of scale 2; the interval product is exact to
# microseconds). asyncpg encodes an integer in nanoseconds, a float as a numeric or a datetime
# in about a microsecond each, and the worker's CPU is half of the journal's throughput.
_WIRE: dict[str, tuple[str, str]] = {
    "u2": ("int8", "({} * 0.01)"),
    "u3": ("int8", "({} * 0.001)"),
    "u6": ("int8", "({} * 0.000001)"),
    "ms": ("int8", "('epoch'::timestamptz + {} * interval '1 millisecond')"),
}


def _wire(kind: str, value: str) -> tuple[str, str]:
    """(Postgres type of the array a column travels in, SQL that reads `value` of it)."""
    array_type, expr = _WIRE.get(kind, (kind, "{}"))
    return array_type, expr.format(value)


# Column -> how its values travel: a Postgres type, or a `_WIRE` kind.
_NODE_COLS: dict[str, str] = {
    "id": "uuid",
    "node_type": "text",
    "name": "text",
    "owner_id": "uuid",
    "region": "text",
    "latitude": "u6",
    "longitude": "u6",
    "total_ram_gb": "int4",
    "total_vram_gb": "int4",
    "offered_ram_gb": "int4",
    "offered_vram_gb": "int4",
    "reserved_ram_gb": "int4",
    "reserved_vram_gb": "int4",
    "bandwidth_mbps": "int4",
    "base_latency_ms": "u3",
    "uptime_score": "u2",
    "reputation_score": "int4",
    "price_pusd": "int8",
    "egress_price_pusd": "int8",
    "min_duration_sec": "int4",
    "max_duration_sec": "int4",
    "ask_expires_at": "ms",
    "metadata": "jsonb",
    "status": "text",
    "heartbeat_interval_s": "float8",
    "last_heartbeat": "ms",
    "arrival_seq": "int8",
    "created_at": "ms",
    "updated_at": "ms",
}
_BID_COLS: dict[str, str] = {
    "id": "uuid",
    "region": "text",
    "client_id": "uuid",
    "user_id": "uuid",
    "ram_gb": "int4",
    "vram_gb": "int4",
    "duration_sec": "int4",
    "max_price_pusd": "int8",
    "latitude": "u6",
    "longitude": "u6",
    "max_distance_km": "float8",
    "min_uptime_score": "u2",
    "prefer_local": "bool",
    "node_type": "text",
    "allow_split": "bool",
    "min_fill_gb": "int4",
    "filled_ram_gb": "int4",
    "filled_vram_gb": "int4",
    "status": "text",
    "seq": "int8",
    "contract_ids": "text",  # comma-joined in transit (unnest flattens arrays of arrays)
    "created_at": "ms",
    "expires_at": "ms",
    "updated_at": "ms",
}
# Text travels as the column's own varchar(n) where the staging table can then do without a
# TOAST table (see _METRICS_STAGING_SQL); nodes' metadata and bids' contract ids cannot.
_CONTRACT_COLS: dict[str, str] = {
    "id": "uuid",
    "client_id": "uuid",
    "node_id": "uuid",
    "user_id": "uuid",
    "owner_id": "uuid",
    "region": "varchar(50)",
    "ram_gb": "int4",
    "vram_gb": "int4",
    "duration_sec": "int4",
    "initial_duration_sec": "int4",
    "start_time": "ms",
    "end_time": "ms",
    "extensions": "int4",
    "price_pusd": "int8",
    "egress_price_pusd": "int8",
    "max_price_pusd": "int8",
    "total_cost_pusd": "int8",
    "egress_mgb": "int8",
    "used_sec": "int4",
    "status": "varchar(20)",
    "settlement_hash": "varchar(128)",
    "bid_id": "uuid",
    "predecessor_id": "uuid",
    "successor_id": "uuid",
    "version": "int4",
    "created_seq": "int8",
    "created_at": "ms",
    "completed_at": "ms",
    "updated_at": "ms",
}
# Heartbeat entries, as they travel (see `_WIRE`): percentages in hundredths, coordinates in
# millionths of a degree, times (and the start of their minute) in ms since the epoch.
_METRIC_COLS = (
    "node_id",
    "region",
    "offered_ram_gb",
    "offered_vram_gb",
    "available_ram_gb",
    "available_vram_gb",
    "cpu_usage_pct",
    "gpu_usage_pct",
    "temperature_c",
    "bandwidth_mbps",
    "latitude",
    "longitude",
    "ts_ms",
    "minute_ms",
)

# Patch keys with a prefix are not assignments: "+col" adds to the column, "++col" appends ids.
_Row = dict[str, Any]


def _merge(full: dict[str, _Row], patches: dict[str, _Row], key: str, values: _Row) -> None:
    row = full.get(key)
    if row is None:
        row = patches.get(key)
        if row is None:
            patches[key] = dict(values)
            return
        if not any(col[0] == "+" for col in values):
            row.update(values)  # the common case (heartbeats): plain assignments
            return
        for col, value in values.items():
            if col.startswith("++"):
                row[col] = row.get(col, ()) + tuple(value)
            elif col.startswith("+"):
                row[col] = row.get(col, 0) + value
            else:
                row[col] = value
        return
    for col, value in values.items():
        if col.startswith("++"):
            name = col[2:]
            row[name] = ",".join(filter(None, (row[name], *value)))
        elif col.startswith("+"):
            row[col[1:]] += value
        else:
            row[col] = value


class _Fold:
    """The row changes of a run of events, each region's events in sequence order."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Row] = {}
        self.node_patches: dict[str, _Row] = {}
        self.bids: dict[str, _Row] = {}
        self.bid_patches: dict[str, _Row] = {}
        self.contracts: dict[str, _Row] = {}
        self.contract_patches: dict[str, _Row] = {}
        self.spend: dict[str, int] = {}
        self.metrics: list[tuple[Any, ...]] = []
        # Index in `metrics` of each (node, minute)'s first metric, and of every metric whose
        # (node, minute) has several in this fold: those are summed by a grouping statement,
        # all others go to the rollup one row each.
        self.metric_minutes: dict[tuple[str, int], int] = {}
        self.repeats: set[int] = set()
        self.node_regions: set[str] = set()
        # The COPY records of the whole rows (by staging table) and the UPDATEs of the patches,
        # made ahead of the transaction by `Batch.fold_stepwise` once the fold is complete;
        # None: `_flush` makes them.
        self.staged: dict[str, list[tuple[Any, ...]]] | None = None
        self.patches: list[_Statement] | None = None

    def apply(self, stored: StoredEvent) -> None:
        ev = stored.event
        at = stored.ts_ms
        match ev:
            case HeartbeatsApplied():
                self._heartbeats(ev, at)
            case NodeRegistered() | NodeUpdated():
                n = ev.node
                row: _Row = {
                    "id": n.node_id,
                    "node_type": n.node_type,
                    "name": n.name,
                    "owner_id": n.owner_id,
                    "region": n.region,
                    "latitude": _u6(n.lat),
                    "longitude": _u6(n.lng),
                    "total_ram_gb": n.total_ram_gb,
                    "total_vram_gb": n.total_vram_gb,
                    "offered_ram_gb": n.offered_ram_gb,
                    "offered_vram_gb": n.offered_vram_gb,
                    "reserved_ram_gb": n.reserved_ram_gb,
                    "reserved_vram_gb": n.reserved_vram_gb,
                    "bandwidth_mbps": n.bandwidth_mbps,
                    "base_latency_ms": _u3(n.base_latency_ms),
                    "uptime_score": _u2(n.uptime_score),
                    "reputation_score": n.reputation_score,
                    "price_pusd": n.price_pusd,
                    "egress_price_pusd": n.egress_price_pusd,
                    "min_duration_sec": n.min_duration_s,
                    "max_duration_sec": n.max_duration_s,
                    "ask_expires_at": n.ask_expires_ms or None,
                    "metadata": msgspec.json.encode(n.metadata).decode(),
                    "status": n.status,
                    "heartbeat_interval_s": float(n.heartbeat_interval_s),
                    "last_heartbeat": n.last_heartbeat_ms or None,
                    "arrival_seq": n.arrival_seq,
                    "created_at": n.created_ms or at,
                    "updated_at": at,
                }
                # A whole-node event replaces everything before it in this run, except the
                # creation time (an update that does not carry it must not move it).
                before = self.nodes.get(n.node_id)
                if before is not None:
                    row["created_at"] = min(row["created_at"], before["created_at"])
                self.nodes[n.node_id] = row
                self.node_patches.pop(n.node_id, None)
                self.node_regions.add(ev.region)
            case NodeDeactivated():
                self._node(ev.node_id, ev.region, {"status": "deactivated", "updated_at": at})
            case NodeOffline():
                self._node(
                    ev.node_id,
                    ev.region,
                    {
                        "status": "offline",
                        "last_heartbeat": ev.last_heartbeat_ms or None,
                        "updated_at": at,
                    },
                )
            case BidPlaced():
                b = ev.bid
                self.bids[b.bid_id] = {
                    "id": b.bid_id,
                    "region": b.region,
                    "client_id": b.client_id,
                    "user_id": b.user_id,
                    "ram_gb": b.ram_gb,
                    "vram_gb": b.vram_gb,
                    "duration_sec": b.duration_s,
                    "max_price_pusd": b.max_price_pusd,
                    "latitude": _u6(b.lat),
                    "longitude": _u6(b.lng),
                    "max_distance_km": b.max_distance_km,
                    "min_uptime_score": _u2(b.min_uptime_score),
                    "prefer_local": b.prefer_local,
                    "node_type": b.node_type,
                    "allow_split": b.allow_split,
                    "min_fill_gb": b.min_fill_gb,
                    "filled_ram_gb": b.filled_ram_gb,
                    "filled_vram_gb": b.filled_vram_gb,
                    "status": b.status,
                    "seq": b.seq,
                    "contract_ids": ",".join(b.contract_ids),
                    "created_at": b.created_ms or at,
                    "expires_at": b.expires_ms or None,
                    "updated_at": at,
                }
                self.bid_patches.pop(b.bid_id, None)
            case BidCancelled():
                _merge(
                    self.bids,
                    self.bid_patches,
                    ev.bid_id,
                    {"status": "cancelled", "updated_at": at},
                )
            case BidExpired():
                _merge(
                    self.bids, self.bid_patches, ev.bid_id, {"status": "expired", "updated_at": at}
                )
            case ContractCreated():
                c = ev.contract
                self.contracts[c.contract_id] = {
                    "id": c.contract_id,
                    "client_id": c.client_id,
                    "node_id": c.node_id,
                    "user_id": c.user_id,
                    "owner_id": c.owner_id,
                    "region": c.region,
                    "ram_gb": c.ram_gb,
                    "vram_gb": c.vram_gb,
                    "duration_sec": c.duration_s,
                    "initial_duration_sec": c.duration_s,
                    "start_time": c.start_ms,
                    "end_time": c.end_ms,
                    "extensions": c.extensions,
                    "price_pusd": c.price_pusd,
                    "egress_price_pusd": c.egress_price_pusd,
                    "max_price_pusd": c.max_price_pusd,
                    "total_cost_pusd": c.cost_pusd,
                    "egress_mgb": c.egress_mgb,
                    "used_sec": c.used_s,
                    "status": c.status,
                    "settlement_hash": c.settlement_hash,
                    "bid_id": c.bid_id,
                    "predecessor_id": c.predecessor_id,
                    "successor_id": c.successor_id,
                    "version": c.version,
                    "created_seq": stored.seq,
                    "created_at": at,
                    "completed_at": c.completed_ms or None,
                    "updated_at": at,
                }
                self.contract_patches.pop(c.contract_id, None)
                self._node(
                    c.node_id,
                    ev.region,
                    {
                        "reserved_ram_gb": ev.node_reserved_ram_gb,
                        "reserved_vram_gb": ev.node_reserved_vram_gb,
                        "updated_at": at,
                    },
                )
                if ev.bid_id is not None:
                    change: _Row = {
                        "filled_ram_gb": ev.bid_filled_ram_gb,
                        "filled_vram_gb": ev.bid_filled_vram_gb,
                        "++contract_ids": (c.contract_id,),
                        "updated_at": at,
                    }
                    if ev.bid_status is not None:
                        change["status"] = ev.bid_status
                    _merge(self.bids, self.bid_patches, ev.bid_id, change)
            case ContractExtended():
                _merge(
                    self.contracts,
                    self.contract_patches,
                    ev.contract_id,
                    {
                        "duration_sec": ev.duration_s,
                        "end_time": ev.end_ms,
                        "version": ev.version,
                        "+extensions": 1,
                        "updated_at": at,
                    },
                )
            case ContractSettled():
                _merge(
                    self.contracts,
                    self.contract_patches,
                    ev.contract_id,
                    {
                        "status": ev.status,
                        "used_sec": ev.used_s,
                        "egress_mgb": ev.egress_mgb,
                        "total_cost_pusd": ev.cost_pusd,
                        "settlement_hash": ev.settlement_hash,
                        "completed_at": ev.completed_ms,
                        "successor_id": ev.successor_id,
                        "updated_at": at,
                    },
                )
                self._node(
                    ev.node_id,
                    ev.region,
                    {
                        "reserved_ram_gb": ev.node_reserved_ram_gb,
                        "reserved_vram_gb": ev.node_reserved_vram_gb,
                        "updated_at": at,
                    },
                )
                if ev.cost_pusd:
                    self.spend[ev.client_id] = self.spend.get(ev.client_id, 0) + ev.cost_pusd
            case Unreadable():
                raise ValueError(ev.problem)

    def _node(self, node_id: str, region: str, values: _Row) -> None:
        _merge(self.nodes, self.node_patches, node_id, values)
        self.node_regions.add(region)

    def _heartbeats(self, ev: HeartbeatsApplied, at: int) -> None:
        region = ev.region
        minute = at - at % 60_000
        nodes, patches, metrics = self.nodes, self.node_patches, self.metrics
        minutes = self.metric_minutes
        for b in ev.entries:
            change: _Row = {
                "offered_ram_gb": b.offered_ram_gb,
                "offered_vram_gb": b.offered_vram_gb,
                "status": b.status,
                "last_heartbeat": at,
                "updated_at": at,
            }
            bandwidth = _int4(b.bandwidth_mbps)
            lat, lng = _u6(b.lat), _u6(b.lng)
            if bandwidth is not None:
                change["bandwidth_mbps"] = bandwidth
            if lat is not None:
                change["latitude"] = lat
            if lng is not None:
                change["longitude"] = lng
            # `_merge` for plain assignments, inlined: the hot path of a fleet's journal.
            node_id = b.node_id
            row = nodes.get(node_id)
            if row is None:
                row = patches.get(node_id)
            if row is None:
                patches[node_id] = change
            else:
                row.update(change)
            key = (node_id, minute)
            first = minutes.setdefault(key, len(metrics))
            if first != len(metrics):
                self.repeats.add(first)
                self.repeats.add(len(metrics))
            metrics.append(
                (
                    node_id,
                    region,
                    b.offered_ram_gb,
                    b.offered_vram_gb,
                    b.available_ram_gb,
                    b.available_vram_gb,
                    _u2(b.cpu_usage_pct),
                    _u2(b.gpu_usage_pct),
                    _int4(b.temperature_c),
                    bandwidth,
                    lat,
                    lng,
                    at,
                    minute,
                )
            )
        if ev.entries:
            self.node_regions.add(region)


# ---------------------------------------------------------------------------------------------
# Writing a fold


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


_Statement = tuple[str, list[list[Any]]]  # SQL and its arguments


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
    return out


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


_CLUSTERS_SQL = """
INSERT INTO clusters AS c (
    region, total_nodes, active_nodes, datacenter_nodes, edge_nodes, mist_nodes,
    total_ram_gb, available_ram_gb, total_vram_gb, available_vram_gb, offered_ram_gb,
    offered_vram_gb, reserved_ram_gb, reserved_vram_gb, avg_price_pusd, center_latitude,
    center_longitude, last_updated)
SELECT r.region,
       count(n.id),
       count(n.id) FILTER (WHERE n.status = 'active'),
       count(n.id) FILTER (WHERE n.node_type = 'datacenter'),
       count(n.id) FILTER (WHERE n.node_type = 'edge_cluster'),
       count(n.id) FILTER (WHERE n.node_type = 'mist_node'),
       coalesce(sum(n.total_ram_gb), 0),
       coalesce(sum(n.available_ram_gb) FILTER (WHERE n.status = 'active'), 0),
       coalesce(sum(n.total_vram_gb), 0),
       coalesce(sum(n.available_vram_gb) FILTER (WHERE n.status = 'active'), 0),
       coalesce(sum(n.offered_ram_gb) FILTER (WHERE n.status = 'active'), 0),
       coalesce(sum(n.offered_vram_gb) FILTER (WHERE n.status = 'active'), 0),
       coalesce(sum(n.reserved_ram_gb), 0),
       coalesce(sum(n.reserved_vram_gb), 0),
       round(avg(n.price_pusd) FILTER (WHERE n.status = 'active'), 6),
       round(avg(n.latitude), 6),
       round(avg(n.longitude), 6),
       now()
FROM unnest($1::text[]) AS r(region)
LEFT JOIN nodes n ON n.region = r.region AND n.status <> 'deactivated'
GROUP BY r.region
ON CONFLICT (region) DO UPDATE SET
    total_nodes = EXCLUDED.total_nodes, active_nodes = EXCLUDED.active_nodes,
    datacenter_nodes = EXCLUDED.datacenter_nodes, edge_nodes = EXCLUDED.edge_nodes,
    mist_nodes = EXCLUDED.mist_nodes, total_ram_gb = EXCLUDED.total_ram_gb,
    available_ram_gb = EXCLUDED.available_ram_gb, total_vram_gb = EXCLUDED.total_vram_gb,
    available_vram_gb = EXCLUDED.available_vram_gb, offered_ram_gb = EXCLUDED.offered_ram_gb,
    offered_vram_gb = EXCLUDED.offered_vram_gb, reserved_ram_gb = EXCLUDED.reserved_ram_gb,
    reserved_vram_gb = EXCLUDED.reserved_vram_gb, avg_price_pusd = EXCLUDED.avg_price_pusd,
    center_latitude = EXCLUDED.center_latitude, center_longitude = EXCLUDED.center_longitude,
    last_updated = EXCLUDED.last_updated
"""


async def refresh_clusters(conn: asyncpg.Connection, regions: Iterable[str]) -> None:
    """Recompute the `clusters` rows of `regions` from `nodes` (the journal does this at most
    about once a second per changed region; call it to make them current now)."""
    regions = sorted(set(regions))
    if regions:
        await conn.execute(_CLUSTERS_SQL, regions)


# ---------------------------------------------------------------------------------------------
# Metrics partitions


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


# ---------------------------------------------------------------------------------------------
# One batch: store, then apply each region's contiguous run


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


# ---------------------------------------------------------------------------------------------
# The worker


def _default_consumer(shard: tuple[int, int] | None) -> str:
    # Stable across restarts on one host: a restarted worker first re-reads its own pending
    # entries instead of waiting `claim_idle_s` for them to be claimed.
    host = f"journal-{socket.gethostname()}"
    return host if shard is None else f"{host}-{shard[0]}of{shard[1]}"


class _Raw(NamedTuple):
    stream: bytes
    entry_id: bytes
    data: bytes | None  # the `e` field; None when the entry has none or was deleted


_Prepared = tuple[list[_Raw], list[tuple[_Raw, str]], Batch]


class _Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        consumer: str,
        stop: asyncio.Event,
        batch_size: int,
        flush_interval_s: float,
        claim_idle_s: float,
        idle_block_s: float,
        stream_keep_s: float,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if not settings.redis_url or not settings.database_url:
            raise ConfigError(
                "MNEMO_REDIS_URL" if not settings.redis_url else "MNEMO_DATABASE_URL",
                "the journal needs both Redis and Postgres URLs (the CLI fills them in)",
            )
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.shard = shard
        self.consumer = consumer
        self.stop = stop
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.claim_every_s = max(0.05, min(5.0, claim_idle_s / 2))
        self.idle_block_ms = max(1, int(idle_block_s * 1000))
        self.stream_keep_ms = int(stream_keep_s * 1000)
        self.redis: aioredis.Redis = aioredis.from_url(settings.redis_url, decode_responses=False)
        # The worker reads XREADGROUP replies as the server sends them (lists), skipping
        # redis-py's per-entry dict building: a few microseconds an event at full speed.
        self.redis.set_response_callback("XREADGROUP", _as_is)
        self.conn: asyncpg.Connection | None = None
        self.streams: dict[bytes, str] = {}  # stream key -> region
        self.pel_cursor: dict[bytes, bytes] = {}  # own pending entries not yet re-read
        self.claim_cursor: dict[bytes, bytes] = {}
        self.partitions: set[date] = set()
        self.dirty_clusters: set[str] = set()
        self.catch_up: set[str] = set()
        self.warned_seq: set[str] = set()
        self.next: dict[str, float] = {}

    # -- plumbing -----------------------------------------------------------------------------

    def _due(self, what: str, every_s: float) -> bool:
        now = time.monotonic()
        if now < self.next.get(what, 0.0):
            return False
        self.next[what] = now + every_s
        return True

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _pg(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            assert self.settings.database_url is not None
            self.conn = await asyncpg.connect(
                self.settings.database_url,
                timeout=10,
                server_settings={"application_name": f"mnemo-journal:{self.consumer}"[:63]},
            )
            await self._load_partitions(self.conn)
        return self.conn

    async def _drop_pg(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None

    async def _with_pg(self, what: str, fn: Any) -> Any:
        """Run `fn(conn)` until it succeeds or `stop` is set, reconnecting with backoff."""
        delay = 0.5
        while True:
            try:
                return await fn(await self._pg())
            except Exception as e:
                if not _pg_transient(e):
                    raise
                await self._drop_pg()
                if self.stop.is_set():
                    return None
                log.warning(
                    "journal: postgres unavailable (%s: %s); retrying %s in %.1f s",
                    type(e).__name__,
                    e,
                    what,
                    delay,
                )
                await self._sleep(delay)
                if self.stop.is_set():
                    return None
                delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _with_redis(self, what: str, fn: Any) -> Any:
        delay = 0.5
        while True:
            try:
                return await fn()
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                if self.stop.is_set():
                    return None
                log.warning(
                    "journal: redis unavailable (%s); retrying %s in %.1f s", e, what, delay
                )
                await self._sleep(delay)
                if self.stop.is_set():
                    return None
                delay = min(delay * 2, _BACKOFF_MAX_S)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # The stream or the group vanished (Redis restarted empty, key deleted).
                log.warning("journal: consumer group missing (%s); recreating", e)
                await self._create_groups(list(self.streams))

    # -- Redis side -----------------------------------------------------------------------------

    async def _refresh_regions(self) -> None:
        members = await self.redis.smembers(self.keys.regions)
        regions = [_text(m) or "" for m in members] + list(self.settings.regions)
        mine = {self.keys.events(r).encode(): r for r in shard_regions(regions, self.shard)}
        for key in [k for k in self.streams if k not in mine]:
            # Dealt to another shard (the regions changed): its entries this worker holds are
            # written and acknowledged as usual; any left pending are claimed by the new owner.
            del self.streams[key]
            self.pel_cursor.pop(key, None)
            self.claim_cursor.pop(key, None)
        new = [key for key in mine if key not in self.streams]
        self.streams.update(mine)
        if new:
            await self._create_groups(new)

    async def _create_groups(self, streams: list[bytes]) -> None:
        for key in streams:
            try:
                await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            self.pel_cursor[key] = b"0"
            self.claim_cursor[key] = b"0-0"

    @staticmethod
    def _raws(reply: Any) -> list[_Raw]:
        out = []
        for stream, entries in _streams(reply):
            # The engine writes one field, `e` (the usual case, without a function call).
            out += [
                _new_tuple(
                    _Raw,
                    (
                        stream,
                        entry_id,
                        fields[1]
                        if type(fields) is list and len(fields) == 2 and fields[0] == b"e"
                        else _e_field(fields),
                    ),
                )
                for entry_id, fields in entries
            ]
        return out

    async def _read_own_pending(self) -> list[_Raw]:
        if not self.pel_cursor:
            return []
        reply: Any = await self.redis.xreadgroup(
            GROUP,
            self.consumer,
            dict(self.pel_cursor),  # type: ignore[arg-type]
            count=self.batch_size,
        )
        out = []
        replied = _streams(reply)
        for stream, entries in replied:
            if not entries:
                self.pel_cursor.pop(stream, None)
                continue
            self.pel_cursor[stream] = entries[-1][0]
            for entry_id, fields in entries:
                out.append(_Raw(stream, entry_id, _e_field(fields)))
        # Streams absent from the reply have no pending entries of ours left.
        for stream in list(self.pel_cursor):
            if all(s != stream for s, _ in replied):
                self.pel_cursor.pop(stream, None)
        return out

    async def _claim(self) -> list[_Raw]:
        out: list[_Raw] = []
        for stream in list(self.streams):
            start = self.claim_cursor.get(stream, b"0-0")
            reply = await self.redis.xautoclaim(
                stream, GROUP, self.consumer, self.claim_idle_ms, start, count=self.batch_size
            )
            self.claim_cursor[stream] = reply[0]
            for entry_id, fields in reply[1]:
                out.append(_Raw(stream, entry_id, (fields or {}).get(b"e")))
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                # Entries trimmed away while pending: nothing left to journal, only to forget.
                log.warning(
                    "journal: %d pending entries of %s were deleted before being journaled",
                    len(deleted),
                    stream.decode(),
                )
                await self.redis.xack(stream, GROUP, *deleted)
        if out:
            log.info(
                "journal: claimed %d entries idle for over %d ms", len(out), self.claim_idle_ms
            )
        return out

    async def _read_batch(self) -> list[_Raw]:
        if not self.streams:
            await self._sleep(self.idle_block_ms / 1000)  # no region yet: nothing to read
            return []
        out = await self._read_own_pending()
        if self._due("claim", self.claim_every_s):
            out += await self._claim()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.flush_interval_s if out else None
        while len(out) < self.batch_size and self.streams and not self.stop.is_set():
            if deadline is None:
                block = self.idle_block_ms
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                block = max(1, int(remaining * 1000))
            reply = await self.redis.xreadgroup(
                GROUP,
                self.consumer,
                dict.fromkeys(self.streams, b">"),
                count=self.batch_size - len(out),
                block=block,
            )
            got = self._raws(reply)
            if not got:
                break
            out += got
            if deadline is None:
                deadline = loop.time() + self.flush_interval_s
        return out

    async def _ack(self, raws: Sequence[_Raw]) -> None:
        by_stream: dict[bytes, list[bytes]] = {}
        for raw in raws:
            by_stream.setdefault(raw.stream, []).append(raw.entry_id)
        # Packed by hiredis (C) and sent as one write: redis-py's own packing of a command
        # with thousands of ids costs about half a microsecond an id.
        packed = b"".join(
            hiredis.pack_command((b"XACK", stream, _GROUP_B, *ids))  # type: ignore[arg-type]
            for stream, ids in by_stream.items()
        )
        try:
            pool = self.redis.connection_pool
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(packed)
                for _ in by_stream:
                    await conn.read_response()
            except BaseException:
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            # Committed already; the entries will be delivered again and change nothing.
            log.warning("journal: could not acknowledge %d entries (%s)", len(raws), e)

    # -- Postgres side ------------------------------------------------------------------------

    async def _load_partitions(self, conn: asyncpg.Connection) -> None:
        self.partitions = await metrics_partitions(conn)

    async def _maintain_partitions(self, conn: asyncpg.Connection) -> None:
        today = datetime.now(UTC).date()
        await conn.fetchval(
            "SELECT mnemo_ensure_metrics_partitions($1, $2)",
            today,
            today + timedelta(days=_PARTITION_DAYS_AHEAD),
        )
        keep_from = today - timedelta(days=max(1, self.settings.metrics_retention_days))
        dropped = await conn.fetchval("SELECT mnemo_drop_metrics_partitions($1)", keep_from)
        if dropped:
            log.info("journal: dropped %d node_metrics partitions before %s", dropped, keep_from)
        await self._load_partitions(conn)

    def _decode(self, raws: Sequence[_Raw]) -> tuple[list[StoredEvent], list[tuple[_Raw, str]]]:
        events, rejects = [], []
        for raw in raws:
            if raw.data is None:
                rejects.append((raw, "entry has no `e` field (or was deleted)"))
                continue
            try:
                events.append(decode_entry(raw.data, lenient=True))
            except (ValueError, UnicodeDecodeError) as e:
                rejects.append((raw, str(e)))
        return events, rejects

    async def _read_prepared(
        self, done: _Prepared | None = None, after: asyncio.Event | None = None
    ) -> _Prepared | None:
        """Read the next batch and fold it (see `run`), once `after` is set; first drop `done`,
        a batch written already."""
        if after is not None:
            await after.wait()
        if done is not None:
            await done[2].discard_stepwise()
            del done
        raws = await self._with_redis("reading the streams", self._read_batch)
        if not raws:
            return None
        events: list[StoredEvent] = []
        rejects: list[tuple[_Raw, str]] = []
        for i in range(0, len(raws), _CHUNK):
            decoded, refused = self._decode(raws[i : i + _CHUNK])
            events += decoded
            rejects += refused
            await asyncio.sleep(0)
        batch = Batch(events, fold=False)
        await batch.fold_stepwise()
        return raws, rejects, batch

    async def _commit(
        self,
        raws: Sequence[_Raw],
        rejects: list[tuple[_Raw, str]],
        batch: Batch,
        on_tail: Callable[[], None] | None = None,
    ) -> bool:

        async def attempt(conn: asyncpg.Connection) -> BatchResult:
            if rejects:
                await self._store_rejects(conn, rejects)
            return await write(conn, batch, partitions=self.partitions, on_tail=on_tail)

        result = await self._with_pg(f"a batch of {len(raws)}", attempt)
        if result is None:
            return False
        self._note(result)
        return True

    def _note(self, result: BatchResult) -> None:
        self.dirty_clusters.update(result.node_regions)
        # Regions with events left to apply: more than one transaction's worth, or a gap
        # (the catch-up then applies nothing and waits for the next batch or the gap check).
        self.catch_up.update(result.waiting)
        if result.rejected:
            self.next["gaps"] = 0.0  # an event `events` refused leaves a gap its reject fills

    async def _store_rejects(
        self, conn: asyncpg.Connection, rejects: list[tuple[_Raw, str]]
    ) -> None:
        for raw, problem in rejects:
            log.error("journal: rejected entry %s %s: %s", raw.stream, raw.entry_id, problem)
        await conn.executemany(
            "INSERT INTO journal_rejects (stream, entry_id, raw, problem) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT DO NOTHING",
            [(r.stream.decode(), r.entry_id.decode(), r.data, p) for r, p in rejects],
        )

    async def _maintain(self) -> None:
        if self._due("regions", _REGIONS_REFRESH_S):
            await self._with_redis("region discovery", self._refresh_regions)
        if self._due("partitions", _PARTITIONS_EVERY_S):
            await self._with_pg("partition maintenance", self._maintain_partitions)
        if self._due("gaps", _GAP_CHECK_S):
            await self._with_pg("gap check", self._check_gaps)
        while self.catch_up and not self.stop.is_set():
            regions = sorted(self.catch_up)
            self.catch_up.clear()
            result = await self._with_pg(
                "catch-up", lambda c, regions=regions: write(c, [], regions=regions)
            )
            if result is None:
                return
            self._note(result)
            if result.applied == 0:
                self.catch_up.difference_update(result.waiting)
        if self.dirty_clusters and self._due("clusters", _CLUSTER_REFRESH_S):
            regions = sorted(self.dirty_clusters)
            self.dirty_clusters.clear()
            await self._with_pg("clusters", lambda c: refresh_clusters(c, regions))
        if self._due("gc", _GC_EVERY_S):
            gc.collect()
        if self._due("trim", _TRIM_EVERY_S):
            await self._with_redis("trimming the streams", self._trim_streams)

    async def _check_gaps(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "SELECT p.region, p.applied_seq, "
            "(SELECT min(seq) FROM events e WHERE e.region = p.region AND e.seq > p.applied_seq) "
            "AS next_seq, (SELECT max(seq) FROM events e WHERE e.region = p.region) AS max_seq "
            "FROM journal_positions p"
        )
        for region, applied, next_seq, max_seq in rows:
            await self._check_sequence(region, max_seq)
            if next_seq is None or next_seq == applied + 1:
                continue
            if await self._pass_rejects(conn, region):
                continue
            if not await self._nothing_in_flight(region):
                continue
            async with conn.transaction():
                now_applied = await conn.fetchval(
                    "SELECT applied_seq FROM journal_positions WHERE region = $1 FOR UPDATE", region
                )
                first = await conn.fetchval(
                    "SELECT min(seq) FROM events WHERE region = $1 AND seq > $2",
                    region,
                    now_applied,
                )
                if first is None or first <= now_applied + 1:
                    continue
                log.warning(
                    "journal: events %s:%d..%d are gone (nothing pending, everything delivered); "
                    "skipping them",
                    region,
                    now_applied + 1,
                    first - 1,
                )
                await conn.execute(
                    "UPDATE journal_positions SET applied_seq = $2, "
                    "skipped = skipped + ($2 - applied_seq), updated_at = now() WHERE region = $1",
                    region,
                    first - 1,
                )
            self.catch_up.add(region)

    async def _pass_rejects(self, conn: asyncpg.Connection, region: str) -> bool:
        """Move `region` past a gap made wholly of events set aside at storing (they are in
        `journal_rejects`, not `events`): nothing can fill it, nothing was lost."""
        async with conn.transaction():
            applied = await conn.fetchval(
                "SELECT applied_seq FROM journal_positions WHERE region = $1 FOR UPDATE", region
            )
            first = await conn.fetchval(
                "SELECT min(seq) FROM events WHERE region = $1 AND seq > $2", region, applied
            )
            if first is None or first <= applied + 1:
                return True
            covered = await conn.fetchval(
                "SELECT count(*) FROM journal_rejects WHERE region = $1 AND seq > $2 AND seq < $3",
                region,
                applied,
                first,
            )
            if covered != first - applied - 1:
                return False
            await conn.execute(
                "UPDATE journal_positions SET applied_seq = $2, updated_at = now() "
                "WHERE region = $1",
                region,
                first - 1,
            )
        self.catch_up.add(region)
        return True

    async def _nothing_in_flight(self, region: str) -> bool:
        """True when no entry of `region` can still reach the journal: the group has nothing
        pending and has been delivered everything the stream holds."""
        key = self.keys.events(region)
        try:
            groups = await self.redis.xinfo_groups(key)
            info = await self.redis.xinfo_stream(key)
        except ResponseError:
            return False
        group = next((g for g in groups if _text(g.get("name")) == GROUP), None)
        if group is None or int(group.get("pending", 0)) != 0:
            return False
        return _text(group.get("last-delivered-id")) == _text(info.get("last-generated-id"))

    async def _trim_streams(self) -> None:
        """Drop stream entries the journal no longer needs: acknowledged (so stored in
        Postgres) and older than `stream_keep_s`, which other readers tailing the stream (the
        market views, the engine's notifier) get as slack. Never past the group's oldest
        pending entry, whoever holds it."""
        keep_from = (int(time.time() * 1000) - self.stream_keep_ms, 0)
        for key in list(self.streams):
            try:
                groups = await self.redis.xinfo_groups(key)
            except ResponseError:
                continue
            group = next((g for g in groups if _text(g.get("name")) == GROUP), None)
            if group is None:
                continue
            if int(group.get("pending", 0)):
                summary = await self.redis.xpending(key, GROUP)
                bound = _stream_id(summary.get("min"))
            else:
                bound = _stream_id(group.get("last-delivered-id"))
            minid = min(bound, keep_from)
            if minid > (0, 0):
                await self.redis.xtrim(key, minid=f"{minid[0]}-{minid[1]}", approximate=True)

    async def _check_sequence(self, region: str, max_seq: int | None) -> None:
        if max_seq is None or region in self.warned_seq:
            return
        raw = await self.redis.get(self.keys.seq(region))
        if raw is not None and int(raw) < max_seq:
            self.warned_seq.add(region)
            log.error(
                "journal: Redis's event sequence for %s (%d) is behind the journal (%d): Redis lost "
                "acknowledged changes; new events would reuse journaled ids. Run `mnemo "
                "rebuild-live` to restore the live market and its sequence.",
                region,
                int(raw),
                max_seq,
            )

    # -- main loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("journal: consumer %s of group %s starting", self.consumer, GROUP)
        ahead: asyncio.Task[Any] | None = None
        # A batch is some ten container objects an event (decoded events, their keys, folded
        # rows), none in a cycle, alive until it is written: the cyclic collector, run every 700
        # allocations, walks them over and over (~10% of the worker's CPU). It runs on a clock
        # instead (`_GC_EVERY_S`, in `_maintain`), which still frees any cycle within seconds.
        gc_enabled = gc.isenabled()
        gc.disable()
        # The CPU work around a batch's transaction happens while Postgres works on its own:
        # the next batch is read, decoded and folded (and the one before dropped) in a task of
        # its own, in slices, during this one's set-based upserts (most of its database time,
        # and none of this process's); the acknowledgement goes out in the background. At most
        # one batch is read ahead.
        done: _Prepared | None = None
        acks: set[asyncio.Task[None]] = set()
        try:
            while not self.stop.is_set():
                await self._maintain()
                if ahead is None:
                    ahead = asyncio.create_task(self._read_prepared(done))
                    done = None
                got = await ahead
                ahead = None
                if got is None:
                    continue
                # The next batch is read once this one's longest statement is in Postgres.
                tail = asyncio.Event()
                ahead = asyncio.create_task(self._read_prepared(done, tail))
                done = None
                raws, rejects, batch = got
                try:
                    committed = await self._commit(raws, rejects, batch, tail.set)
                finally:
                    tail.set()
                if committed:
                    ack = asyncio.create_task(self._ack(raws))
                    acks.add(ack)
                    ack.add_done_callback(acks.discard)
                done = got
                del got, raws, rejects, batch
        finally:
            if gc_enabled:
                gc.enable()
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
            if acks:
                await asyncio.gather(*acks, return_exceptions=True)
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            if self.conn is not None:
                await self.conn.close(timeout=2)
        with contextlib.suppress(Exception):
            await self.redis.aclose()


def shard_regions(regions: Iterable[str], shard: tuple[int, int] | None) -> list[str]:
    """The regions journal worker k of n (`shard`; None: a worker that takes every region)
    reads: every region's name, sorted, dealt out in turn, so n workers each get a share and
    together all of them. A region is applied by one worker at a time anyway (its position row
    is locked), so workers that share regions add throughput only across them; sharded, each
    worker process decodes and folds its own regions' events on a core of its own. Every shard
    computes the same deal from the same set of regions; while the set changes, a region may
    briefly be read by two workers, which changes nothing but speed."""
    ordered = sorted(set(regions))
    if shard is None:
        return ordered
    k, n = shard
    return ordered[k::n]


def _as_is(response: Any, **options: Any) -> Any:
    return response


def _streams(reply: Any) -> list[tuple[bytes, list[Any]]]:
    """(stream, entries) pairs of a raw XREADGROUP reply: a map under RESP3, a list of pairs
    under RESP2."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(stream, entries) for stream, entries in reply]


def _e_field(fields: Any) -> bytes | None:
    """The `e` field of an entry given as a flat [field, value, ...] list (None for an entry
    deleted while pending, or one without `e`)."""
    if not fields:
        return None
    if isinstance(fields, dict):
        return fields.get(b"e")
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"e":
            return fields[i + 1]
    return None


def _stream_id(value: Any) -> tuple[int, int]:
    text = _text(value) or "0-0"
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return None if value is None else str(value)


async def run_journal(
    settings: Settings,
    *,
    consumer: str | None = None,
    stop: asyncio.Event | None = None,
    batch_size: int = BATCH_SIZE,
    flush_interval_s: float = 0.05,
    claim_idle_s: float = 30.0,
    idle_block_s: float = 0.25,
    stream_keep_s: float = 600.0,
    shard: tuple[int, int] | None = None,
) -> None:
    """Journal every region's event stream into Postgres until `stop` is set.

    `consumer` names this worker in the `journal` group (default: `journal-<hostname>`, stable
    across restarts so a restarted worker re-reads its own pending entries first). Entries another
    worker left pending for `claim_idle_s` are claimed. A batch is flushed at `batch_size` entries
    or `flush_interval_s` after its first entry, whichever comes first. Journaled entries older
    than `stream_keep_s` are trimmed from the streams (never one still pending). With `shard`
    (k, n), only the regions `shard_regions` deals to worker k of n are journaled.
    """
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ConfigError("shard", f"shard {shard[0]}/{shard[1]}: want k/n with 0 <= k < n")
    worker = _Worker(
        settings,
        consumer=consumer or _default_consumer(shard),
        stop=stop or asyncio.Event(),
        batch_size=batch_size,
        flush_interval_s=flush_interval_s,
        claim_idle_s=claim_idle_s,
        idle_block_s=idle_block_s,
        stream_keep_s=stream_keep_s,
        shard=shard,
    )
    await worker.run()


# ---------------------------------------------------------------------------------------------
# Replay: a region's history applied again, once the cause of its rejects is mended
#
# The tables are a fold of the region's events in order, and every node, bid and contract row
# starts with a whole-row event (registration, placing, creation) that overwrites it, so
# applying the region's stored events again from its first, in order, rewrites each of its rows
# as if the events set aside had never failed. Two things are not rows of the region and are
# not written twice: the heartbeat metrics (history, appended; a replay appends only those of
# heartbeat events that had been set aside) and the clients' running spend (a sum over regions;
# a replay recomputes it from the contracts of the clients that have any in the region).

_REPLAY_CHUNK = 20_000


class ReplayResult(msgspec.Struct, kw_only=True):
    region: str
    events: int
    """Events of the region applied again."""
    recovered: list[int]
    """Seqs of events that had been set aside and are applied now."""
    refused: list[Reject]
    """Events set aside again (their reason updated in `journal_rejects`)."""


def _without_metrics_or_spend(fold: _Fold) -> None:
    fold.metrics.clear()
    fold.metric_minutes.clear()
    fold.repeats.clear()
    fold.spend.clear()


def _metrics_only(fold: _Fold) -> None:
    fold.nodes.clear()
    fold.node_patches.clear()
    fold.spend.clear()


_RECOMPUTE_SPEND_SQL = """
UPDATE clients AS c
SET current_spend_pusd = s.total,
    current_spend_usd = least(round(s.total * 0.000000000001, 2), 99999999.99)
FROM (
    SELECT client_id, coalesce(sum(total_cost_pusd), 0) AS total FROM contracts
    WHERE client_id IN (SELECT DISTINCT client_id FROM contracts WHERE region = $1)
    GROUP BY client_id
) AS s
WHERE c.id = s.client_id
"""


async def replay_region(conn: asyncpg.Connection, region: str) -> ReplayResult:
    """Apply `region`'s stored events again, from its first to its position, in ONE
    transaction that holds the region's position (a journal worker waits for it): events set
    aside before are applied if they now can be (marked replayed), set aside again with the
    new reason if not. Run it once the cause is mended: a release that reads the event, or the
    row it needed."""
    result = ReplayResult(region=region, events=0, recovered=[], refused=[])
    async with conn.transaction():
        applied = await conn.fetchval(
            "SELECT applied_seq FROM journal_positions WHERE region = $1 FOR UPDATE", region
        )
        if applied is None:
            return result
        before = {
            seq
            for (seq,) in await conn.fetch(
                "SELECT seq FROM journal_rejects WHERE region = $1 AND replayed_at IS NULL",
                region,
            )
        }
        after = 0
        heartbeats: list[StoredEvent] = []
        while True:
            rows = await conn.fetch(
                "SELECT seq, payload::text FROM events WHERE region = $1 AND seq > $2 "
                "AND seq <= $3 ORDER BY seq LIMIT $4",
                region,
                after,
                applied,
                _REPLAY_CHUNK,
            )
            if not rows:
                break
            events = [decode_entry(payload, lenient=True) for _, payload in rows]
            _, refused = await _apply_carefully(
                conn, {region: events}, prune=_without_metrics_or_spend
            )
            result.refused += refused
            failed = {r.stored.seq for r in refused}
            heartbeats += [
                e
                for e in events
                if e.seq in before and e.seq not in failed and e.type == "heartbeats"
            ]
            result.events += len(events)
            after = rows[-1][0]
        if heartbeats:
            await ensure_partitions(
                conn, {_EPOCH_DAY + timedelta(days=e.ts_ms // 86_400_000) for e in heartbeats}
            )
            await _apply_carefully(conn, {region: heartbeats}, prune=_metrics_only)
        await conn.execute(_RECOMPUTE_SPEND_SQL, region)
        still = [r.stored.seq for r in result.refused]
        result.recovered = sorted(before - set(still))
        await conn.execute(
            "UPDATE journal_rejects SET replayed_at = now() WHERE region = $1 "
            "AND replayed_at IS NULL AND NOT (seq = ANY($2::int8[]))",
            region,
            still,
        )
        if result.refused:
            await _record_rejects(conn, result.refused)
        await refresh_clusters(conn, [region])
    return result


async def replay(settings: Settings, regions: Sequence[str] = ()) -> int:
    """`mnemo journal-replay`: replay `regions` (default: every region with events set aside
    and not yet replayed), printing what each recovered; exit status 1 if any event is still
    refused."""
    assert settings.database_url
    out = sys.stdout
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        if not regions:
            regions = [r for r in await rejected_counts(conn) if r]
        if not regions:
            out.write("journal-replay: no event is set aside; nothing to replay\n")
            return 0
        status = 0
        for region in regions:
            r = await replay_region(conn, region)
            out.write(
                f"{region}: {r.events} events applied again; {len(r.recovered)} set aside before "
                f"and applied now{' (' + _seqs(r.recovered) + ')' if r.recovered else ''}; "
                f"{len(r.refused)} still refused\n"
            )
            for j in r.refused:
                out.write(f"  {j.stored.event_id} {j.stored.type}: {j.problem}\n")
            status |= bool(r.refused)
        return status
    finally:
        await conn.close()


def _seqs(seqs: Sequence[int]) -> str:
    shown = ", ".join(map(str, seqs[:10]))
    return shown + (f" and {len(seqs) - 10} more" if len(seqs) > 10 else "")


# ---------------------------------------------------------------------------------------------
# Lag and status


class RegionLag(msgspec.Struct, kw_only=True):
    """One region's stream as the journal's consumer group sees it."""

    region: str
    stream_length: int
    pending: int
    """Delivered to a worker, not yet acknowledged."""
    undelivered: int
    """In the stream, not yet read by any worker."""
    oldest_unacked_age_s: float
    """Age of the oldest event not yet acknowledged (0 when everything is)."""
    last_event_id: str | None


class JournalLag(msgspec.Struct, kw_only=True):
    """The journal's lag across regions (for `/metrics` and `mnemo journal-status`)."""

    regions: list[RegionLag]
    pending: int
    undelivered: int
    oldest_unacked_age_s: float


async def _entry_ts_ms(redis: aioredis.Redis, key: str, entry_id: Any) -> int | None:
    entries = await redis.xrange(key, min=entry_id, max=entry_id, count=1)
    if not entries or not entries[0][1]:
        return None
    raw = entries[0][1].get(b"e") or entries[0][1].get("e")
    try:
        return decode_entry(raw).ts_ms if raw is not None else None
    except ValueError:
        return None


async def journal_lag(
    redis: aioredis.Redis, keys: Keys, *, now_ms: int | None = None, group: str = GROUP
) -> JournalLag:
    """The journal's lag, read from Redis: per region, entries pending (read, not acknowledged)
    and undelivered, and the age of the oldest unacknowledged event. Cheap (a few commands per
    region); works with either `decode_responses` setting."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    members = await redis.smembers(keys.regions)
    regions = sorted(_text(m) or "" for m in members)
    out = []
    for region in regions:
        key = keys.events(region)
        try:
            info = await redis.xinfo_stream(key)
            groups = await redis.xinfo_groups(key)
        except ResponseError:
            continue
        length = int(info.get("length", 0))
        g = next((x for x in groups if _text(x.get("name")) == group), None)
        if g is None:
            pending, delivered_id = 0, "0-0"
        else:
            pending = int(g.get("pending", 0))
            delivered_id = _text(g.get("last-delivered-id")) or "0-0"
        undelivered_entries = await redis.xrange(key, min=f"({delivered_id}", count=1)
        if g is not None and g.get("lag") is not None:
            undelivered = int(g["lag"])
        elif undelivered_entries:
            # The server cannot tell (entries deleted mid-stream): count, up to a bound.
            counted = await redis.xrange(key, min=f"({delivered_id}", count=_LAG_COUNT_MAX)
            undelivered = len(counted or [])
        else:
            undelivered = 0
        oldest_id = None
        if pending:
            summary = await redis.xpending(key, group)
            oldest_id = summary.get("min")
        elif undelivered_entries:
            oldest_id = undelivered_entries[0][0]
        age_s = 0.0
        if oldest_id is not None:
            ts = await _entry_ts_ms(redis, key, oldest_id)
            if ts is not None:
                age_s = max(0.0, (now_ms - ts) / 1000)
        last_event_id = None
        last_entry = info.get("last-entry")
        if last_entry and last_entry[1]:
            raw = last_entry[1].get(b"e") or last_entry[1].get("e")
            with contextlib.suppress(ValueError, TypeError):
                last_event_id = decode_entry(raw).event_id
        out.append(
            RegionLag(
                region=region,
                stream_length=length,
                pending=pending,
                undelivered=undelivered,
                oldest_unacked_age_s=age_s,
                last_event_id=last_event_id,
            )
        )
    return JournalLag(
        regions=out,
        pending=sum(r.pending for r in out),
        undelivered=sum(r.undelivered for r in out),
        oldest_unacked_age_s=max((r.oldest_unacked_age_s for r in out), default=0.0),
    )


class RegionPosition(msgspec.Struct, kw_only=True):
    """How far Postgres has applied a region's events."""

    region: str
    applied_seq: int
    applied_at: datetime | None
    stored_max_seq: int | None
    waiting: int
    """Events stored but not yet applied (waiting for a gap to fill)."""
    skipped: int
    rejected: int
    """Events set aside (`journal_rejects`) and not yet replayed."""


class RejectedEvent(msgspec.Struct, kw_only=True):
    """One row of `journal_rejects` not yet replayed: an event (region and seq), or a stream
    entry that is not an event at all (stream and entry id)."""

    region: str | None
    seq: int | None
    event_type: str | None
    stage: str
    problem: str
    received_at: datetime
    stream: str | None
    entry_id: str | None


async def positions(conn: asyncpg.Connection) -> list[RegionPosition]:
    """Every region's journal position in Postgres."""
    rows = await conn.fetch(
        "SELECT p.region, p.applied_seq, p.applied_ts, p.skipped, "
        "(SELECT max(seq) FROM events e WHERE e.region = p.region) AS max_seq, "
        "(SELECT count(*) FROM events e WHERE e.region = p.region AND e.seq > p.applied_seq) "
        "AS waiting, (SELECT count(*) FROM journal_rejects j WHERE j.region = p.region "
        "AND j.replayed_at IS NULL) AS rejected FROM journal_positions p ORDER BY p.region"
    )
    return [
        RegionPosition(
            region=r["region"],
            applied_seq=r["applied_seq"],
            applied_at=r["applied_ts"],
            stored_max_seq=r["max_seq"],
            waiting=r["waiting"],
            skipped=r["skipped"],
            rejected=r["rejected"],
        )
        for r in rows
    ]


async def rejected_events(conn: asyncpg.Connection, *, limit: int = 20) -> list[RejectedEvent]:
    """The rejects not yet replayed, newest first."""
    rows = await conn.fetch(
        "SELECT region, seq, event_type, stage, problem, received_at, stream, entry_id "
        "FROM journal_rejects WHERE replayed_at IS NULL ORDER BY received_at DESC, id DESC "
        "LIMIT $1",
        limit,
    )
    return [RejectedEvent(**dict(r)) for r in rows]


async def rejected_counts(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int]:
    """Rejects not yet replayed, by region (`""`: stream entries that are not events)."""
    rows = await conn.fetch(
        "SELECT coalesce(region, '') AS region, count(*) AS n FROM journal_rejects "
        "WHERE replayed_at IS NULL GROUP BY 1"
    )
    return {r["region"]: r["n"] for r in rows}


async def status(
    settings: Settings,
) -> tuple[JournalLag, list[RegionPosition], list[RejectedEvent]]:
    """The journal's lag in Redis, its positions in Postgres and its latest rejects."""
    assert settings.redis_url and settings.database_url
    redis = aioredis.from_url(settings.redis_url, decode_responses=False)
    try:
        lag = await journal_lag(redis, Keys(settings.key_prefix))
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        return lag, await positions(conn), await rejected_events(conn)
    finally:
        await conn.close()


async def print_status(settings: Settings) -> int:
    """`mnemo journal-status`: print the lag, the positions and the latest rejects; exit status
    1 if any event is set aside and not yet replayed, else 0."""
    lag, pos, rejects = await status(settings)
    out = sys.stdout
    out.write(
        f"journal group {GROUP!r}: {lag.pending} pending, {lag.undelivered} undelivered, "
        f"oldest unacknowledged event {lag.oldest_unacked_age_s:.1f} s old\n"
    )
    by_region = {p.region: p for p in pos}
    header = f"{'region':<20} {'stream':>9} {'pending':>8} {'undeliv':>8} {'age_s':>8} "
    header += f"{'applied':>10} {'waiting':>8} {'skipped':>8} {'rejected':>8}\n"
    out.write(header)
    for r in lag.regions:
        p = by_region.pop(r.region, None)
        out.write(
            f"{r.region:<20} {r.stream_length:>9} {r.pending:>8} {r.undelivered:>8} "
            f"{r.oldest_unacked_age_s:>8.1f} {p.applied_seq if p else 0:>10} "
            f"{p.waiting if p else 0:>8} {p.skipped if p else 0:>8} {p.rejected if p else 0:>8}\n"
        )
    for p in by_region.values():
        out.write(
            f"{p.region:<20} {'-':>9} {'-':>8} {'-':>8} {'-':>8} {p.applied_seq:>10} "
            f"{p.waiting:>8} {p.skipped:>8} {p.rejected:>8}\n"
        )
    if rejects:
        out.write(
            "set aside (newest first; `mnemo journal-replay --region R` once the cause is "
            "mended):\n"
        )
        for j in rejects:
            what = (
                f"{j.region}:{j.seq} {j.event_type}"
                if j.region is not None
                else f"entry {j.entry_id} of {j.stream}"
            )
            out.write(f"  {j.received_at:%Y-%m-%d %H:%M:%S} {what} at {j.stage}: {j.problem}\n")
    return 1 if any(j.region is not None for j in rejects) else 0
