"""History queries for analysts: clusters, earnings, spending, supply and demand, price candles.

Plain SQL over the tables the journal keeps (persistence/migrations/002_market.sql); results are
plain records (msgspec Structs) with money exact in pico-USD (`_pusd`): integers for sums and
prices, a `Decimal` where a mean makes a fraction of a pico-USD (an average price, a VWAP). The
API converts to its units at its edge (`gateway.analytics`).

Time series take a `Window`: a half-open range [start, end) widened to whole buckets, and a bucket
size from `BUCKETS`. Buckets are aligned to the Unix epoch (UTC) and labelled by their start; a
bucket with nothing in it is left out (the series is sparse). Definitions, per bucket:

- earnings / spending: contracts *settled* (completed_at) in the bucket: their cost, count and
  GB-seconds used ((ram + vram) x used seconds).
- pricing (candles): fills, i.e. contracts *created* in the bucket (start_time), in fill order
  (time, then event sequence): open/close = first/last fill's price, high/low, number of fills,
  volume in GB (ram + vram) and GB-seconds at fill ((ram + vram) x duration as filled), and the
  volume-weighted average price (weights: GB-seconds).
- supply: per node, the mean over its heartbeats in the bucket of what it offered and of what was
  reserved (offered - available), summed over nodes; demand: bids placed in the bucket (count and
  GB) and fills (count and GB). `current` adds the live picture from the latest state: capacity of
  active nodes and the unfilled remainder of open, unexpired bids.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

import asyncpg
import msgspec

from engine.errors import InvalidRequest

__all__ = [
    "BUCKETS",
    "Bucket",
    "Candle",
    "ClientSpending",
    "Cluster",
    "ClusterNode",
    "ClusterNodes",
    "ClusterStats",
    "ClusterStatsBucket",
    "EarningsBucket",
    "MarketPricing",
    "MarketSupply",
    "NodeEarnings",
    "SpendingBreakdown",
    "SupplyBucket",
    "SupplyNow",
    "TradeRecord",
    "Window",
    "client_spending",
    "cluster_nodes",
    "cluster_stats",
    "clusters",
    "market_pricing",
    "market_supply",
    "node_earnings",
    "recent_trades",
    "window",
]

Bucket = Literal["1m", "5m", "15m", "1h", "6h", "1d"]
BUCKETS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "6h": 21_600, "1d": 86_400}
MAX_BUCKETS = 2000
MAX_RANGE = timedelta(days=366)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EARLIEST = _EPOCH
"""No history predates the Unix epoch (events carry Unix milliseconds)."""
LATEST = datetime(9999, 12, 1, tzinfo=UTC)
"""The last instant a range may name: room below datetime's year-9999 ceiling to round up to a
whole bucket and to add a day."""

# ---------------------------------------------------------------------------------------------
# Time windows


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """A validated [start, end) range of whole buckets of `bucket_s` seconds."""

    start: datetime
    end: datetime
    bucket_s: int

    @property
    def bucket(self) -> timedelta:
        return timedelta(seconds=self.bucket_s)


def _instant(t: datetime, field: str) -> datetime:
    """`t` in UTC (naive is UTC) if it lies in [EARLIEST, LATEST], else InvalidRequest naming
    `field`. An offset at the calendar's edge (year 1 at +14:00) has no UTC instant at all."""
    try:
        utc = (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise InvalidRequest(
            f"must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC)", field=field
        )
    return utc


def window(
    start: datetime | None,
    end: datetime | None,
    bucket: str = "1h",
    *,
    now: datetime | None = None,
) -> Window:
    """Validate a time range and bucket size (raises `InvalidRequest` naming the field).

    Defaults: `end` now, `start` 24 hours before `end`. Naive datetimes are UTC; both must lie
    between `EARLIEST` and `LATEST`. The range is widened to whole buckets (start rounded down,
    end rounded up) and may span at most `MAX_BUCKETS` buckets and `MAX_RANGE`.
    """
    if bucket not in BUCKETS:
        raise InvalidRequest(f"bucket must be one of {', '.join(BUCKETS)}", field="bucket")
    size = BUCKETS[bucket]
    given_start = _instant(start, "start") if start is not None else None
    end = _instant(end, "end") if end is not None else (now or datetime.now(UTC))
    start = given_start if given_start is not None else max(EARLIEST, end - timedelta(days=1))
    if start >= end:
        raise InvalidRequest(
            "start must be before end", field="start" if given_start is not None else "end"
        )
    if end - start > MAX_RANGE:
        raise InvalidRequest(f"the range may span at most {MAX_RANGE.days} days", field="start")
    step_us = size * 1_000_000
    start_s = (start - _EPOCH) // timedelta(microseconds=1) // step_us * size
    end_s = -(-((end - _EPOCH) // timedelta(microseconds=1)) // step_us) * size
    if (end_s - start_s) // size > MAX_BUCKETS:
        raise InvalidRequest(
            f"at most {MAX_BUCKETS} buckets: widen the bucket or narrow the range", field="bucket"
        )
    return Window(
        start=_EPOCH + timedelta(seconds=start_s),
        end=_EPOCH + timedelta(seconds=end_s),
        bucket_s=size,
    )


# ---------------------------------------------------------------------------------------------
# Clusters


class Center(msgspec.Struct):
    lat: float
    lng: float


class Cluster(msgspec.Struct, kw_only=True):
    """A region's nodes in aggregate (counts exclude deactivated nodes; available capacity and
    the average price cover active nodes only)."""

    region: str
    center: Center | None
    total_nodes: int
    active_nodes: int
    node_composition: dict[str, int]
    total_ram_gb: int
    available_ram_gb: int
    total_vram_gb: int
    available_vram_gb: int
    offered_ram_gb: int
    offered_vram_gb: int
    reserved_ram_gb: int
    reserved_vram_gb: int
    avg_price_pusd: Decimal | None
    last_updated: datetime | None


def _cluster(r: asyncpg.Record) -> Cluster:
    center = None
    if r["center_latitude"] is not None and r["center_longitude"] is not None:
        center = Center(float(r["center_latitude"]), float(r["center_longitude"]))
    return Cluster(
        region=r["region"],
        center=center,
        total_nodes=r["total_nodes"],
        active_nodes=r["active_nodes"],
        node_composition={
            "datacenter": r["datacenter_nodes"],
            "edge_cluster": r["edge_nodes"],
            "mist_node": r["mist_nodes"],
        },
        total_ram_gb=r["total_ram_gb"],
        available_ram_gb=r["available_ram_gb"],
        total_vram_gb=r["total_vram_gb"],
        available_vram_gb=r["available_vram_gb"],
        offered_ram_gb=r["offered_ram_gb"],
        offered_vram_gb=r["offered_vram_gb"],
        reserved_ram_gb=r["reserved_ram_gb"],
        reserved_vram_gb=r["reserved_vram_gb"],
        avg_price_pusd=r["avg_price_pusd"],
        last_updated=r["last_updated"],
    )


async def clusters(db: asyncpg.Pool | asyncpg.Connection) -> list[Cluster]:
    """Every region's cluster row (kept by the journal, at most about a second stale)."""
    rows = await db.fetch("SELECT * FROM clusters WHERE total_nodes > 0 ORDER BY region")
    return [_cluster(r) for r in rows]


class ClusterNode(msgspec.Struct, kw_only=True):
    node_id: str
    name: str
    node_type: str
    status: str
    lat: float | None
    lng: float | None
    total_ram_gb: int
    available_ram_gb: int
    total_vram_gb: int
    available_vram_gb: int
    price_pusd: int
    uptime_score: float | None
    last_heartbeat: datetime | None


class ClusterNodes(msgspec.Struct, kw_only=True):
    region: str
    nodes: list[ClusterNode]
    total_count: int


async def cluster_nodes(
    db: asyncpg.Pool | asyncpg.Connection,
    region: str,
    *,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> ClusterNodes:
    """The region's nodes that are not deactivated (or those in `status`), in arrival order."""
    rows = await db.fetch(
        """
        SELECT id, name, node_type, status, latitude, longitude, total_ram_gb, available_ram_gb,
               total_vram_gb, available_vram_gb, price_pusd, uptime_score, last_heartbeat,
               count(*) OVER () AS total_count
        FROM nodes
        WHERE region = $1 AND CASE WHEN $2::text IS NULL THEN status <> 'deactivated'
                                   ELSE status = $2 END
        ORDER BY arrival_seq, id
        LIMIT $3 OFFSET $4
        """,
        region,
        status,
        limit,
        offset,
    )
    total = rows[0]["total_count"] if rows else 0
    if not rows and offset:
        total = await db.fetchval(
            "SELECT count(*) FROM nodes WHERE region = $1 AND CASE WHEN $2::text IS NULL "
            "THEN status <> 'deactivated' ELSE status = $2 END",
            region,
            status,
        )
    return ClusterNodes(
        region=region,
        nodes=[
            ClusterNode(
                node_id=r["id"].hex,
                name=r["name"],
                node_type=r["node_type"],
                status=r["status"],
                lat=None if r["latitude"] is None else float(r["latitude"]),
                lng=None if r["longitude"] is None else float(r["longitude"]),
                total_ram_gb=r["total_ram_gb"],
                available_ram_gb=max(0, r["available_ram_gb"]),
                total_vram_gb=r["total_vram_gb"],
                available_vram_gb=max(0, r["available_vram_gb"]),
                price_pusd=r["price_pusd"],
                uptime_score=None if r["uptime_score"] is None else float(r["uptime_score"]),
                last_heartbeat=r["last_heartbeat"],
            )
            for r in rows
        ],
        total_count=total,
    )


class ClusterStatsBucket(msgspec.Struct, kw_only=True):
    start: datetime
    fills: int = 0
    volume_gb: int = 0
    settled: int = 0
    revenue_pusd: int = 0
    offered_ram_gb: float = 0.0
    offered_vram_gb: float = 0.0
    available_ram_gb: float = 0.0
    available_vram_gb: float = 0.0
    reporting_nodes: int = 0


class ClusterStats(msgspec.Struct, kw_only=True):
    region: str
    cluster: Cluster | None
    start: datetime
    end: datetime
    bucket_s: int
    fills: int
    volume_gb: int
    revenue_pusd: int
    buckets: list[ClusterStatsBucket]


_BIN = "date_bin($3 * interval '1 second', {col}, 'epoch'::timestamptz)"

_CAPACITY_SQL = f"""
WITH per_node AS (
    SELECT region, {_BIN.format(col="minute")} AS bucket, node_id,
           sum(sum_offered_ram_gb)::numeric / sum(samples) AS offered_ram,
           sum(sum_offered_vram_gb)::numeric / sum(samples) AS offered_vram,
           sum(sum_available_ram_gb)::numeric / sum(samples) AS available_ram,
           sum(sum_available_vram_gb)::numeric / sum(samples) AS available_vram
    FROM node_metrics_1m
    WHERE minute >= $1 AND minute < $2 AND ($4::text IS NULL OR region = $4)
    GROUP BY 1, 2, 3
)
SELECT region, bucket, sum(offered_ram) AS offered_ram, sum(offered_vram) AS offered_vram,
       sum(available_ram) AS available_ram, sum(available_vram) AS available_vram,
       count(*) AS nodes
FROM per_node GROUP BY 1, 2 ORDER BY 1, 2
"""

_FILLS_SQL = f"""
SELECT region, {_BIN.format(col="start_time")} AS bucket, count(*) AS fills,
       sum(ram_gb) AS ram, sum(vram_gb) AS vram
FROM contracts
WHERE start_time >= $1 AND start_time < $2 AND ($4::text IS NULL OR region = $4)
GROUP BY 1, 2
"""


async def cluster_stats(
    db: asyncpg.Pool | asyncpg.Connection, region: str, w: Window
) -> ClusterStats:
    """A region's activity over `w`: fills, settled revenue and reported capacity per bucket."""
    cluster_row = await db.fetchrow("SELECT * FROM clusters WHERE region = $1", region)
    buckets: dict[datetime, ClusterStatsBucket] = {}

    def at(t: datetime) -> ClusterStatsBucket:
        b = buckets.get(t)
        if b is None:
            b = buckets[t] = ClusterStatsBucket(start=t)
        return b

    for r in await db.fetch(_FILLS_SQL, w.start, w.end, w.bucket_s, region):
        b = at(r["bucket"])
        b.fills, b.volume_gb = r["fills"], int(r["ram"] + r["vram"])
    settled = await db.fetch(
        f"""
        SELECT {_BIN.format(col="completed_at")} AS bucket, count(*) AS n,
               sum(total_cost_pusd) AS cost
        FROM contracts WHERE region = $4 AND completed_at >= $1 AND completed_at < $2
        GROUP BY 1
        """,
        w.start,
        w.end,
        w.bucket_s,
        region,
    )
    for r in settled:
        b = at(r["bucket"])
        b.settled, b.revenue_pusd = r["n"], int(r["cost"])
    for r in await db.fetch(_CAPACITY_SQL, w.start, w.end, w.bucket_s, region):
        b = at(r["bucket"])
        b.offered_ram_gb = float(r["offered_ram"])
        b.offered_vram_gb = float(r["offered_vram"])
        b.available_ram_gb = float(r["available_ram"])
        b.available_vram_gb = float(r["available_vram"])
        b.reporting_nodes = r["nodes"]
    ordered = [buckets[t] for t in sorted(buckets)]
    return ClusterStats(
        region=region,
        cluster=_cluster(cluster_row) if cluster_row is not None else None,
        start=w.start,
        end=w.end,
        bucket_s=w.bucket_s,
        fills=sum(b.fills for b in ordered),
        volume_gb=sum(b.volume_gb for b in ordered),
        revenue_pusd=sum(b.revenue_pusd for b in ordered),
        buckets=ordered,
    )


# ---------------------------------------------------------------------------------------------
# Earnings and spending


class EarningsBucket(msgspec.Struct, kw_only=True):
    start: datetime
    amount_pusd: int
    contracts: int
    gb_seconds: int


class NodeEarnings(msgspec.Struct, kw_only=True):
    node_id: str
    start: datetime
    end: datetime
    bucket_s: int
    total_pusd: int
    contracts: int
    gb_seconds: int
    buckets: list[EarningsBucket]


_SETTLED_SQL = f"""
SELECT {_BIN.format(col="c.completed_at")} AS bucket, count(*) AS n,
       sum(c.total_cost_pusd) AS cost, sum((c.ram_gb + c.vram_gb)::bigint * c.used_sec) AS gbs
FROM contracts c
WHERE c.{{who}} = $4 AND c.completed_at >= $1 AND c.completed_at < $2
GROUP BY 1 ORDER BY 1
"""


def _earnings_buckets(rows: list[asyncpg.Record]) -> list[EarningsBucket]:
    return [
        EarningsBucket(
            start=r["bucket"],
            amount_pusd=int(r["cost"]),
            contracts=r["n"],
            gb_seconds=int(r["gbs"]),
        )
        for r in rows
    ]


async def node_earnings(
    db: asyncpg.Pool | asyncpg.Connection, node_id: str, w: Window
) -> NodeEarnings:
    """What a node earned over `w`: its contracts settled in each bucket (completed, failed
    or failed over: each is charged for the time it served)."""
    rows = await db.fetch(
        _SETTLED_SQL.format(who="node_id"), w.start, w.end, w.bucket_s, _uuid(node_id)
    )
    return NodeEarnings(
        node_id=node_id,
        start=w.start,
        end=w.end,
        bucket_s=w.bucket_s,
        total_pusd=int(sum(r["cost"] for r in rows)),
        contracts=sum(r["n"] for r in rows),
        gb_seconds=int(sum(r["gbs"] for r in rows)),
        buckets=_earnings_buckets(rows),
    )


class SpendingBreakdown(msgspec.Struct, kw_only=True):
    key: str
    amount_pusd: int
    contracts: int
    gb_seconds: int


class ClientSpending(msgspec.Struct, kw_only=True):
    client_id: str
    start: datetime
    end: datetime
    bucket_s: int
    total_pusd: int
    contracts: int
    gb_seconds: int
    by_node_type: list[SpendingBreakdown]
    by_region: list[SpendingBreakdown]
    buckets: list[EarningsBucket]


async def client_spending(
    db: asyncpg.Pool | asyncpg.Connection, client_id: str, w: Window
) -> ClientSpending:
    """What a client spent over `w` (contracts settled in the window), per bucket and broken
    down by node type and by region."""
    cid = _uuid(client_id)
    rows = await db.fetch(_SETTLED_SQL.format(who="client_id"), w.start, w.end, w.bucket_s, cid)
    breakdown = await db.fetch(
        """
        SELECT n.node_type, c.region, count(*) AS n, sum(c.total_cost_pusd) AS cost,
               sum((c.ram_gb + c.vram_gb)::bigint * c.used_sec) AS gbs
        FROM contracts c JOIN nodes n ON n.id = c.node_id
        WHERE c.client_id = $3 AND c.completed_at >= $1 AND c.completed_at < $2
        GROUP BY 1, 2
        """,
        w.start,
        w.end,
        cid,
    )

    def group(field: str) -> list[SpendingBreakdown]:
        acc: dict[str, list[int]] = {}
        for r in breakdown:
            a = acc.setdefault(r[field], [0, 0, 0])
            a[0] += r["cost"]
            a[1] += r["n"]
            a[2] += r["gbs"]
        return [
            SpendingBreakdown(key=k, amount_pusd=int(a[0]), contracts=a[1], gb_seconds=int(a[2]))
            for k, a in sorted(acc.items())
        ]

    return ClientSpending(
        client_id=client_id,
        start=w.start,
        end=w.end,
        bucket_s=w.bucket_s,
        total_pusd=int(sum(r["cost"] for r in rows)),
        contracts=sum(r["n"] for r in rows),
        gb_seconds=int(sum(r["gbs"] for r in rows)),
        by_node_type=group("node_type"),
        by_region=group("region"),
        buckets=_earnings_buckets(rows),
    )


# ---------------------------------------------------------------------------------------------
# Market: supply and demand, prices


class SupplyBucket(msgspec.Struct, kw_only=True):
    region: str
    start: datetime
    offered_ram_gb: float = 0.0
    offered_vram_gb: float = 0.0
    reserved_ram_gb: float = 0.0
    reserved_vram_gb: float = 0.0
    reporting_nodes: int = 0
    bids: int = 0
    bid_ram_gb: int = 0
    bid_vram_gb: int = 0
    fills: int = 0
    filled_ram_gb: int = 0
    filled_vram_gb: int = 0


class SupplyNow(msgspec.Struct, kw_only=True):
    region: str
    active_nodes: int
    offered_ram_gb: int
    offered_vram_gb: int
    reserved_ram_gb: int
    reserved_vram_gb: int
    resting_bids: int
    resting_bid_ram_gb: int
    resting_bid_vram_gb: int


class MarketSupply(msgspec.Struct, kw_only=True):
    start: datetime
    end: datetime
    bucket_s: int
    buckets: list[SupplyBucket]
    current: list[SupplyNow]


async def market_supply(
    db: asyncpg.Pool | asyncpg.Connection,
    w: Window,
    *,
    region: str | None = None,
    now: datetime | None = None,
) -> MarketSupply:
    """Supply against demand per region and resource over `w` (see the module docstring)."""
    now = now or datetime.now(UTC)
    buckets: dict[tuple[str, datetime], SupplyBucket] = {}

    def at(r: asyncpg.Record) -> SupplyBucket:
        key = (r["region"], r["bucket"])
        b = buckets.get(key)
        if b is None:
            b = buckets[key] = SupplyBucket(region=key[0], start=key[1])
        return b

    for r in await db.fetch(_CAPACITY_SQL, w.start, w.end, w.bucket_s, region):
        b = at(r)
        b.offered_ram_gb = float(r["offered_ram"])
        b.offered_vram_gb = float(r["offered_vram"])
        b.reserved_ram_gb = float(r["offered_ram"] - r["available_ram"])
        b.reserved_vram_gb = float(r["offered_vram"] - r["available_vram"])
        b.reporting_nodes = r["nodes"]
    bids = await db.fetch(
        f"""
        SELECT region, {_BIN.format(col="created_at")} AS bucket, count(*) AS n,
               sum(ram_gb) AS ram, sum(vram_gb) AS vram
        FROM bids
        WHERE created_at >= $1 AND created_at < $2 AND ($4::text IS NULL OR region = $4)
        GROUP BY 1, 2
        """,
        w.start,
        w.end,
        w.bucket_s,
        region,
    )
    for r in bids:
        b = at(r)
        b.bids, b.bid_ram_gb, b.bid_vram_gb = r["n"], int(r["ram"]), int(r["vram"])
    for r in await db.fetch(_FILLS_SQL, w.start, w.end, w.bucket_s, region):
        b = at(r)
        b.fills, b.filled_ram_gb, b.filled_vram_gb = r["fills"], int(r["ram"]), int(r["vram"])
    current = await db.fetch(
        """
        WITH supply AS (
            SELECT region, count(*) AS n, sum(offered_ram_gb) AS oram,
                   sum(offered_vram_gb) AS ovram, sum(reserved_ram_gb) AS rram,
                   sum(reserved_vram_gb) AS rvram
            FROM nodes WHERE status = 'active' AND ($1::text IS NULL OR region = $1)
            GROUP BY region
        ), demand AS (
            SELECT region, count(*) AS n, sum(ram_gb - filled_ram_gb) AS ram,
                   sum(vram_gb - filled_vram_gb) AS vram
            FROM bids
            WHERE status = 'open' AND (expires_at IS NULL OR expires_at > $2)
              AND ($1::text IS NULL OR region = $1)
            GROUP BY region
        )
        SELECT coalesce(s.region, d.region) AS region, coalesce(s.n, 0) AS nodes,
               coalesce(s.oram, 0) AS oram, coalesce(s.ovram, 0) AS ovram,
               coalesce(s.rram, 0) AS rram, coalesce(s.rvram, 0) AS rvram,
               coalesce(d.n, 0) AS bids, coalesce(d.ram, 0) AS bram, coalesce(d.vram, 0) AS bvram
        FROM supply s FULL JOIN demand d ON d.region = s.region
        ORDER BY 1
        """,
        region,
        now,
    )
    return MarketSupply(
        start=w.start,
        end=w.end,
        bucket_s=w.bucket_s,
        buckets=[buckets[k] for k in sorted(buckets)],
        current=[
            SupplyNow(
                region=r["region"],
                active_nodes=r["nodes"],
                offered_ram_gb=int(r["oram"]),
                offered_vram_gb=int(r["ovram"]),
                reserved_ram_gb=int(r["rram"]),
                reserved_vram_gb=int(r["rvram"]),
                resting_bids=r["bids"],
                resting_bid_ram_gb=int(r["bram"]),
                resting_bid_vram_gb=int(r["bvram"]),
            )
            for r in current
        ],
    )


class Candle(msgspec.Struct, kw_only=True):
    """Cleared prices (pico-USD per GB-second) of one region's fills in one bucket."""

    region: str
    start: datetime
    open_pusd: int
    high_pusd: int
    low_pusd: int
    close_pusd: int
    vwap_pusd: Decimal
    fills: int
    volume_gb: int
    volume_gb_s: int


class MarketPricing(msgspec.Struct, kw_only=True):
    start: datetime
    end: datetime
    bucket_s: int
    candles: list[Candle]


async def market_pricing(
    db: asyncpg.Pool | asyncpg.Connection, w: Window, *, region: str | None = None
) -> MarketPricing:
    """OHLC candles with volume of the cleared price, per region and bucket, from fills."""
    rows = await db.fetch(
        f"""
        SELECT region, {_BIN.format(col="start_time")} AS bucket,
               (array_agg(price_pusd ORDER BY start_time, created_seq))[1] AS open,
               max(price_pusd) AS high, min(price_pusd) AS low,
               (array_agg(price_pusd ORDER BY start_time DESC, created_seq DESC))[1] AS close,
               count(*) AS fills, sum(ram_gb + vram_gb) AS gb,
               sum((ram_gb + vram_gb)::bigint * initial_duration_sec) AS gbs,
               sum(price_pusd::numeric * (ram_gb + vram_gb) * initial_duration_sec) AS notional
        FROM contracts
        WHERE start_time >= $1 AND start_time < $2 AND ($4::text IS NULL OR region = $4)
        GROUP BY 1, 2 ORDER BY 1, 2
        """,
        w.start,
        w.end,
        w.bucket_s,
        region,
    )
    candles = []
    for r in rows:
        gbs = int(r["gbs"])
        # A zero-GB-second fill cannot happen (durations are >= 1 s), but never divide by zero.
        vwap = Decimal(r["notional"]) / gbs if gbs else Decimal(r["close"])
        candles.append(
            Candle(
                region=r["region"],
                start=r["bucket"],
                open_pusd=r["open"],
                high_pusd=r["high"],
                low_pusd=r["low"],
                close_pusd=r["close"],
                vwap_pusd=vwap,
                fills=r["fills"],
                volume_gb=int(r["gb"]),
                volume_gb_s=gbs,
            )
        )
    return MarketPricing(start=w.start, end=w.end, bucket_s=w.bucket_s, candles=candles)


class TradeRecord(msgspec.Struct, kw_only=True):
    """One fill (a contract as it was made), as the `trades:<region>` channel announces it."""

    contract_id: str
    node_id: str
    region: str
    ram_gb: int
    vram_gb: int
    duration_sec: int
    price_pusd: int
    ts_ms: int


async def recent_trades(
    db: asyncpg.Pool | asyncpg.Connection, *, region: str | None = None, limit: int = 50
) -> list[TradeRecord]:
    """The latest fills (of `region`, or of every region), newest first: the same contracts
    the candles count (`market_pricing`), with the term they were filled for."""
    rows = await db.fetch(
        """
        SELECT id, node_id, region, ram_gb, vram_gb, initial_duration_sec, price_pusd,
               (extract(epoch FROM start_time) * 1000)::bigint AS ts_ms
        FROM contracts WHERE $1::text IS NULL OR region = $1
        ORDER BY start_time DESC, created_seq DESC
        LIMIT $2
        """,
        region,
        limit,
    )
    return [
        TradeRecord(
            contract_id=r["id"].hex,
            node_id=r["node_id"].hex,
            region=r["region"],
            ram_gb=r["ram_gb"],
            vram_gb=r["vram_gb"],
            duration_sec=r["initial_duration_sec"],
            price_pusd=r["price_pusd"],
            ts_ms=r["ts_ms"],
        )
        for r in rows
    ]


def _uuid(value: str) -> uuid.UUID:
    # A malformed id is the caller's error (names nothing), not a server error.
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequest("not an id", field="id") from None
