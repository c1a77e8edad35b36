"""Clusters and analytics: the history in Postgres, served read-only (queries in
`persistence.analytics`; this module holds their wire types and maps the query results to them,
money to USD with the API's converters, each exact amount with its pico-USD twin: the unit
convention of `gateway.protocol`).

Market data is public (no credentials: the web app's market page reads it signed out): the
clusters, their nodes and stats, supply and demand, price candles and recent trades. The rest
needs a principal (any role), with object-level rules: a node's earnings are its owner's
(or an admin's): another caller gets 403, the node being public anyway; a client's spending is
its user's (or an admin's): another caller gets 404, as for an unknown client, since clients are
private. Time series take `start`, `end` (ISO 8601; default: the last 24 hours) and `bucket`
(`1m`, `5m`, `15m`, `1h`, `6h`, `1d`; default `1h`), validated with the field named on error.

The journal writes Postgres a moment after the live market changes (its lag: `mnemo
journal-status`, or `persistence.journal.lag.journal_lag` for `/metrics`), so these answers trail
the live endpoints by that much.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from engine.errors import NotFound
from gateway.errors import Forbidden
from gateway.operations import Call, Link, Operation, route
from gateway.protocol import Trade, whole
from gateway.schemas import Limit, Offset, Region, decimal_to_usd, to_usd
from persistence import accounts, history
from persistence import analytics as q

__all__ = [
    "OPERATIONS",
    "Candle",
    "ClientSpending",
    "Cluster",
    "ClusterList",
    "ClusterNode",
    "ClusterNodes",
    "ClusterStats",
    "ClusterStatsBucket",
    "EarningsBucket",
    "MarketPricing",
    "NodeEarningsHistory",
    "SpendingBreakdown",
    "TradeList",
    "routes",
]

NodeStatus = Annotated[str, Meta(pattern=whole("(active|maintenance|offline|deactivated)"))]
Instant = Annotated[
    datetime,
    Meta(
        extra_json_schema={"format": "date-time"},
        description=f"RFC 3339 (without an offset: UTC), from {q.EARLIEST:%Y-%m-%d} to "
        f"{q.LATEST:%Y-%m-%d}.",
    ),
]


class RangeQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A time range and bucket size."""

    start: Instant | None = None
    end: Instant | None = None
    bucket: q.Bucket = "1h"


class MarketQuery(RangeQuery, kw_only=True):
    region: Region | None = None


class TradesQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    region: Region | None = None
    limit: Annotated[int, Meta(ge=1, le=200)] = 50


class TradeList(msgspec.Struct, kw_only=True):
    """The latest fills, newest first, each as `trades:<region>` announced it."""

    trades: list[Trade]


class ClusterNodesQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    status: NodeStatus | None = None
    offset: Offset = 0
    limit: Limit = 100


# ---------------------------------------------------------------------------------------------
# Responses (the records of `persistence.analytics`, money in USD)


class Cluster(msgspec.Struct, kw_only=True):
    """A region's nodes in aggregate (counts exclude deactivated nodes; available capacity and
    the average price cover active nodes only)."""

    region: str
    center: q.Center | None
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
    avg_price_per_gb_sec: float | None
    last_updated: datetime | None


class ClusterList(msgspec.Struct, kw_only=True):
    clusters: list[Cluster]


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
    price_per_gb_sec: float
    uptime_score: float | None
    last_heartbeat: datetime | None
    price_pusd: int = 0


class ClusterNodes(msgspec.Struct, kw_only=True):
    region: str
    nodes: list[ClusterNode]
    total_count: int


class ClusterStatsBucket(msgspec.Struct, kw_only=True):
    start: datetime
    fills: int = 0
    volume_gb: int = 0
    settled: int = 0
    revenue_usd: float = 0.0
    offered_ram_gb: float = 0.0
    offered_vram_gb: float = 0.0
    available_ram_gb: float = 0.0
    available_vram_gb: float = 0.0
    reporting_nodes: int = 0
    revenue_pusd: int = 0


class ClusterStats(msgspec.Struct, kw_only=True):
    region: str
    cluster: Cluster | None
    start: datetime
    end: datetime
    bucket_s: int
    fills: int
    volume_gb: int
    revenue_usd: float
    buckets: list[ClusterStatsBucket]
    revenue_pusd: int = 0


class EarningsBucket(msgspec.Struct, kw_only=True):
    start: datetime
    amount_usd: float
    contracts: int
    gb_seconds: int
    amount_pusd: int = 0


class NodeEarningsHistory(msgspec.Struct, kw_only=True):
    node_id: str
    start: datetime
    end: datetime
    bucket_s: int
    total_usd: float
    contracts: int
    gb_seconds: int
    buckets: list[EarningsBucket]
    total_pusd: int = 0


class SpendingBreakdown(msgspec.Struct, kw_only=True):
    key: str
    amount_usd: float
    contracts: int
    gb_seconds: int
    amount_pusd: int = 0


class ClientSpending(msgspec.Struct, kw_only=True):
    client_id: str
    start: datetime
    end: datetime
    bucket_s: int
    total_usd: float
    contracts: int
    gb_seconds: int
    by_node_type: list[SpendingBreakdown]
    by_region: list[SpendingBreakdown]
    buckets: list[EarningsBucket]
    total_pusd: int = 0


class Candle(msgspec.Struct, kw_only=True):
    """Cleared prices (USD per GB-second) of one region's fills in one bucket; the `_pusd`
    twins are exact (the VWAP, a mean, comes in USD only)."""

    region: str
    start: datetime
    open: float
    high: float
    low: float
    close: float
    vwap: float
    fills: int
    volume_gb: int
    volume_gb_s: int
    open_pusd: int = 0
    high_pusd: int = 0
    low_pusd: int = 0
    close_pusd: int = 0


class MarketPricing(msgspec.Struct, kw_only=True):
    start: datetime
    end: datetime
    bucket_s: int
    candles: list[Candle]


# ---------------------------------------------------------------------------------------------
# Records to wire types


def cluster_out(c: q.Cluster) -> Cluster:
    return Cluster(
        region=c.region,
        center=c.center,  # no money in it: the record's is the wire's
        total_nodes=c.total_nodes,
        active_nodes=c.active_nodes,
        node_composition=c.node_composition,
        total_ram_gb=c.total_ram_gb,
        available_ram_gb=c.available_ram_gb,
        total_vram_gb=c.total_vram_gb,
        available_vram_gb=c.available_vram_gb,
        offered_ram_gb=c.offered_ram_gb,
        offered_vram_gb=c.offered_vram_gb,
        reserved_ram_gb=c.reserved_ram_gb,
        reserved_vram_gb=c.reserved_vram_gb,
        avg_price_per_gb_sec=None if c.avg_price_pusd is None else decimal_to_usd(c.avg_price_pusd),
        last_updated=c.last_updated,
    )


def cluster_nodes_out(r: q.ClusterNodes) -> ClusterNodes:
    return ClusterNodes(
        region=r.region,
        nodes=[
            ClusterNode(
                node_id=n.node_id,
                name=n.name,
                node_type=n.node_type,
                status=n.status,
                lat=n.lat,
                lng=n.lng,
                total_ram_gb=n.total_ram_gb,
                available_ram_gb=n.available_ram_gb,
                total_vram_gb=n.total_vram_gb,
                available_vram_gb=n.available_vram_gb,
                price_per_gb_sec=to_usd(n.price_pusd),
                uptime_score=n.uptime_score,
                last_heartbeat=n.last_heartbeat,
                price_pusd=n.price_pusd,
            )
            for n in r.nodes
        ],
        total_count=r.total_count,
    )


def cluster_stats_out(r: q.ClusterStats) -> ClusterStats:
    return ClusterStats(
        region=r.region,
        cluster=None if r.cluster is None else cluster_out(r.cluster),
        start=r.start,
        end=r.end,
        bucket_s=r.bucket_s,
        fills=r.fills,
        volume_gb=r.volume_gb,
        revenue_usd=to_usd(r.revenue_pusd),
        revenue_pusd=r.revenue_pusd,
        buckets=[
            ClusterStatsBucket(
                start=b.start,
                fills=b.fills,
                volume_gb=b.volume_gb,
                settled=b.settled,
                revenue_usd=to_usd(b.revenue_pusd),
                offered_ram_gb=b.offered_ram_gb,
                offered_vram_gb=b.offered_vram_gb,
                available_ram_gb=b.available_ram_gb,
                available_vram_gb=b.available_vram_gb,
                reporting_nodes=b.reporting_nodes,
                revenue_pusd=b.revenue_pusd,
            )
            for b in r.buckets
        ],
    )


def _earnings_buckets(buckets: list[q.EarningsBucket]) -> list[EarningsBucket]:
    return [
        EarningsBucket(
            start=b.start,
            amount_usd=to_usd(b.amount_pusd),
            contracts=b.contracts,
            gb_seconds=b.gb_seconds,
            amount_pusd=b.amount_pusd,
        )
        for b in buckets
    ]


def node_earnings_out(r: q.NodeEarnings) -> NodeEarningsHistory:
    return NodeEarningsHistory(
        node_id=r.node_id,
        start=r.start,
        end=r.end,
        bucket_s=r.bucket_s,
        total_usd=to_usd(r.total_pusd),
        contracts=r.contracts,
        gb_seconds=r.gb_seconds,
        buckets=_earnings_buckets(r.buckets),
        total_pusd=r.total_pusd,
    )


def _breakdown(rows: list[q.SpendingBreakdown]) -> list[SpendingBreakdown]:
    return [
        SpendingBreakdown(
            key=b.key,
            amount_usd=to_usd(b.amount_pusd),
            contracts=b.contracts,
            gb_seconds=b.gb_seconds,
            amount_pusd=b.amount_pusd,
        )
        for b in rows
    ]


def client_spending_out(r: q.ClientSpending) -> ClientSpending:
    return ClientSpending(
        client_id=r.client_id,
        start=r.start,
        end=r.end,
        bucket_s=r.bucket_s,
        total_usd=to_usd(r.total_pusd),
        contracts=r.contracts,
        gb_seconds=r.gb_seconds,
        by_node_type=_breakdown(r.by_node_type),
        by_region=_breakdown(r.by_region),
        buckets=_earnings_buckets(r.buckets),
        total_pusd=r.total_pusd,
    )


def market_pricing_out(r: q.MarketPricing) -> MarketPricing:
    return MarketPricing(
        start=r.start,
        end=r.end,
        bucket_s=r.bucket_s,
        candles=[
            Candle(
                region=c.region,
                start=c.start,
                open=to_usd(c.open_pusd),
                high=to_usd(c.high_pusd),
                low=to_usd(c.low_pusd),
                close=to_usd(c.close_pusd),
                vwap=decimal_to_usd(c.vwap_pusd),
                fills=c.fills,
                volume_gb=c.volume_gb,
                volume_gb_s=c.volume_gb_s,
                open_pusd=c.open_pusd,
                high_pusd=c.high_pusd,
                low_pusd=c.low_pusd,
                close_pusd=c.close_pusd,
            )
            for c in r.candles
        ],
    )


# ---------------------------------------------------------------------------------------------
# Routes


def _window(query: RangeQuery) -> q.Window:
    return q.window(query.start, query.end, query.bucket)


async def list_clusters(call: Call) -> ClusterList:
    return ClusterList(clusters=[cluster_out(c) for c in await q.clusters(call.state.pool)])


async def cluster_nodes(call: Call) -> ClusterNodes:
    query: ClusterNodesQuery = call.query
    found = await q.cluster_nodes(
        call.state.pool,
        call.path["region"],
        status=query.status,
        limit=query.limit,
        offset=query.offset,
    )
    return cluster_nodes_out(found)


async def cluster_stats(call: Call) -> ClusterStats:
    stats = await q.cluster_stats(call.state.pool, call.path["region"], _window(call.query))
    return cluster_stats_out(stats)


async def node_earnings(call: Call) -> NodeEarningsHistory:
    node_id = call.path["node_id"]
    w = _window(call.query)
    # The live market knows a node the moment it registers; Postgres a moment later.
    node = await call.state.market.get_node(node_id)
    owner = (
        node.owner_id if node is not None else await history.node_owner(call.state.pool, node_id)
    )
    if owner is None:
        raise NotFound("no such node", field="node_id")
    who = call.user
    if not who.is_admin and _norm(owner) != _norm(who.user_id):
        raise Forbidden("only the node's owner may see its earnings")
    return node_earnings_out(await q.node_earnings(call.state.pool, node_id, w))


async def client_spending(call: Call) -> ClientSpending:
    client_id = call.path["client_id"]
    w = _window(call.query)
    client = await accounts.client(call.state.pool, client_id)
    who = call.user
    if client is None or (not who.is_admin and client["user_id"].hex != _norm(who.user_id)):
        raise NotFound("no such client", field="client_id")
    return client_spending_out(await q.client_spending(call.state.pool, client_id, w))


async def market_supply(call: Call) -> q.MarketSupply:
    query: MarketQuery = call.query
    return await q.market_supply(call.state.pool, _window(query), region=query.region)


async def market_pricing(call: Call) -> MarketPricing:
    query: MarketQuery = call.query
    pricing = await q.market_pricing(call.state.pool, _window(query), region=query.region)
    return market_pricing_out(pricing)


async def recent_trades(call: Call) -> TradeList:
    query: TradesQuery = call.query
    found = await q.recent_trades(call.state.pool, region=query.region, limit=query.limit)
    return TradeList(
        trades=[
            Trade(
                contract_id=t.contract_id,
                node_id=t.node_id,
                region=t.region,
                ram_gb=t.ram_gb,
                vram_gb=t.vram_gb,
                duration_sec=t.duration_sec,
                price_per_gb_sec=to_usd(t.price_pusd),
                price_pusd=t.price_pusd,
                ts_ms=t.ts_ms,
            )
            for t in found
        ]
    )


def _norm(user_id: str) -> str:
    try:
        return uuid.UUID(user_id).hex
    except ValueError:
        return user_id


OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/api/clusters",
        list_clusters,
        name="list_clusters",
        links={
            "ClusterNodes": Link("cluster_nodes", {"region": "$response.body#/clusters/0/region"}),
            "ClusterStats": Link("cluster_stats", {"region": "$response.body#/clusters/0/region"}),
        },
        summary="Geographic cluster statistics, one per region",
        tag="clusters",
        response=ClusterList,
        auth=False,
    ),
    Operation(
        "GET",
        "/api/clusters/{region}/nodes",
        cluster_nodes,
        name="cluster_nodes",
        summary="The nodes of a cluster (history database)",
        tag="clusters",
        query=ClusterNodesQuery,
        response=ClusterNodes,
        auth=False,
    ),
    Operation(
        "GET",
        "/api/clusters/{region}/stats",
        cluster_stats,
        name="cluster_stats",
        summary="A cluster's fills, revenue and reported capacity over time",
        tag="clusters",
        query=RangeQuery,
        response=ClusterStats,
        auth=False,
    ),
    Operation(
        "GET",
        "/api/analytics/node/{node_id}/earnings",
        node_earnings,
        name="node_earnings_history",
        summary="A node's earnings over time (owner)",
        tag="analytics",
        query=RangeQuery,
        response=NodeEarningsHistory,
        errors=(403, 404),
    ),
    Operation(
        "GET",
        "/api/analytics/client/{client_id}/spending",
        client_spending,
        name="client_spending",
        summary="A client's spending over time, by node type and region (owner)",
        tag="analytics",
        query=RangeQuery,
        response=ClientSpending,
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/analytics/market/supply",
        market_supply,
        name="market_supply",
        summary="Supply (offered, reserved) against demand (bids, fills) per region",
        tag="analytics",
        query=MarketQuery,
        # No money in it: the history's record is the wire's, field for field.
        response=q.MarketSupply,
        auth=False,
    ),
    Operation(
        "GET",
        "/api/analytics/market/pricing",
        market_pricing,
        name="market_pricing",
        summary="Cleared-price candles (open, high, low, close, volume) per region",
        tag="analytics",
        query=MarketQuery,
        response=MarketPricing,
        auth=False,
    ),
    Operation(
        "GET",
        "/api/market/trades",
        recent_trades,
        name="recent_trades",
        summary="The latest fills (of a region, or all), newest first, as `trades:<region>` "
        "announces them; public market data",
        tag="analytics",
        query=TradesQuery,
        response=TradeList,
        auth=False,
    ),
]

routes = [route(op) for op in OPERATIONS]
"""Mounted by `gateway.app`."""
