"""The fold: ordered events -> row changes (pure; no I/O), and the columns of the tables it
fills, with how each column's values travel to Postgres.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, assert_never

import msgspec

from engine.trust import WINDOW_MS
from engine.types import (
    BidCancelled,
    BidExpired,
    BidPlaced,
    ContractCreated,
    ContractExtended,
    ContractSettled,
    HeartbeatsApplied,
    LeaseChanged,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
    StakeChanged,
    TransferReceived,
    TransferSent,
    TrustUpdated,
    WalletCredited,
    WalletDebited,
)
from persistence import ledger
from persistence.journal.stored import StoredEvent, Unreadable
from persistence.ledger import Movement


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
    "uptime_windows": "int4",
    "suspend_at": "ms",
    "suspended_at": "ms",
    "maintenance_start": "ms",
    "maintenance_end": "ms",
    "delivered_contracts": "int4",
    "cut_contracts": "int4",
    "stake_pusd": "int8",
    "stake_held_pusd": "int8",
    "delivers": "bool",
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
    "lease_state": "varchar(10)",
    "ready_at": "ms",
    "lease_host": "varchar(253)",
    "lease_port": "int4",
    "lease_tls": "bool",
    "closing_at": "ms",
    "reported_at": "ms",
    "egress_bytes": "int8",
    "peak_memory_bytes": "int8",
    "claimed_egress_mgb": "int8",
    "lease_digest": "varchar(64)",
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

_Statement = tuple[str, list[list[Any]]]  # SQL and its arguments


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


def _lease_columns(
    state: str,
    ready_ms: int,
    host: str | None,
    port: int,
    tls: bool,
    closing_ms: int,
    reported_ms: int,
    egress_bytes: int,
    peak_memory_bytes: int,
    claimed_egress_mgb: int | None,
    digest: str | None,
) -> _Row:
    """A contract's delivery columns (migration 007)."""
    return {
        "lease_state": state,
        "ready_at": ready_ms or None,
        "lease_host": host,
        "lease_port": port or None,
        "lease_tls": tls,
        "closing_at": closing_ms or None,
        "reported_at": reported_ms or None,
        "egress_bytes": egress_bytes,
        "peak_memory_bytes": peak_memory_bytes,
        "claimed_egress_mgb": claimed_egress_mgb,
        "lease_digest": digest,
    }


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
        # (node, window) -> node_scores row: node_id, window start ms, region, up_pct, score
        # in hundredths, notice (engine.trust)
        self.scores: dict[tuple[str, int], tuple[Any, ...]] = {}
        # issue 14: the ledger movements of the money events, in order (persistence.ledger)
        self.ledger: list[Movement] = []
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
        if not isinstance(ev, Unreadable):
            self.ledger += ledger.movements_of(ev)
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
                    "uptime_windows": n.uptime_windows,
                    "suspend_at": n.suspend_at_ms or None,
                    "suspended_at": n.suspended_ms or None,
                    "maintenance_start": n.maint_start_ms or None,
                    "maintenance_end": n.maint_end_ms or None,
                    "delivered_contracts": n.delivered_contracts,
                    "cut_contracts": n.cut_contracts,
                    "stake_pusd": n.stake_pusd,
                    "stake_held_pusd": n.stake_held_pusd,
                    "delivers": n.delivers,
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
                    **_lease_columns(
                        c.lease_state,
                        c.ready_ms,
                        c.lease_host,
                        c.lease_port,
                        c.lease_tls,
                        c.closing_ms,
                        c.reported_ms,
                        c.egress_bytes,
                        c.peak_memory_bytes,
                        c.claimed_egress_mgb,
                        c.lease_digest,
                    ),
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
            case LeaseChanged():
                change = _lease_columns(
                    ev.lease_state,
                    ev.ready_ms,
                    ev.lease_host,
                    ev.lease_port,
                    ev.lease_tls,
                    ev.closing_ms,
                    ev.reported_ms,
                    ev.egress_bytes,
                    ev.peak_memory_bytes,
                    ev.claimed_egress_mgb,
                    ev.lease_digest,
                )
                change["version"] = ev.version
                change["updated_at"] = at
                _merge(self.contracts, self.contract_patches, ev.contract_id, change)
            case ContractSettled():
                settled: _Row = {"lease_state": ev.lease_state} if ev.lease_state else {}
                _merge(
                    self.contracts,
                    self.contract_patches,
                    ev.contract_id,
                    {
                        **settled,
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
                if ev.node_stake_pusd is not None:
                    self._node(
                        ev.node_id,
                        ev.region,
                        {
                            "stake_pusd": ev.node_stake_pusd,
                            "stake_held_pusd": ev.node_stake_held_pusd or 0,
                        },
                    )
                if ev.node_reputation_score is not None:
                    self._node(
                        ev.node_id,
                        ev.region,
                        {
                            "reputation_score": ev.node_reputation_score,
                            "delivered_contracts": ev.node_delivered_contracts or 0,
                            "cut_contracts": ev.node_cut_contracts or 0,
                        },
                    )
                if ev.cost_pusd:
                    self.spend[ev.client_id] = self.spend.get(ev.client_id, 0) + ev.cost_pusd
            case TrustUpdated():
                self._trust(ev, at)
            case StakeChanged():
                self._node(
                    ev.node_id,
                    ev.region,
                    {
                        "stake_pusd": ev.node_stake_pusd,
                        "stake_held_pusd": ev.node_stake_held_pusd,
                        "updated_at": at,
                    },
                )
            case WalletCredited() | WalletDebited() | TransferSent() | TransferReceived():
                pass  # money only: its movements are in self.ledger
            case Unreadable():
                raise ValueError(ev.problem)
            case _:
                assert_never(ev)

    def _trust(self, ev: TrustUpdated, at: int) -> None:
        for e in ev.entries:
            change: _Row = {
                "uptime_score": _u2(e.uptime_score),
                "uptime_windows": e.uptime_windows,
                "suspend_at": e.suspend_at_ms or None,
                "suspended_at": e.suspended_ms or None,
                "updated_at": at,
            }
            if e.maint_start_ms is not None:
                change["maintenance_start"] = e.maint_start_ms or None
                change["maintenance_end"] = e.maint_end_ms or None
            self._node(e.node_id, ev.region, change)
            last = len(e.closed) - 1
            for x, (w, value, centi) in enumerate(e.closed):
                self.scores[(e.node_id, w)] = (
                    e.node_id,
                    w * WINDOW_MS,
                    ev.region,
                    value if value >= 0 else None,
                    centi,
                    e.notice if x == last else None,
                )

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
