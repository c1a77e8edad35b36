"""Clusters and analytics: the history in Postgres, served read-only (queries in
`persistence.analytics`).

Every route needs a principal (any role). Object-level rules: a node's earnings are its owner's
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
from gateway.schemas import Limit, Offset, Region
from persistence import analytics as q

__all__ = ["OPERATIONS", "routes"]

NodeStatus = Annotated[str, Meta(pattern=r"^(active|maintenance|offline|deactivated)$")]
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


class ClusterNodesQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    status: NodeStatus | None = None
    offset: Offset = 0
    limit: Limit = 100


class ClusterList(msgspec.Struct, kw_only=True):
    clusters: list[q.Cluster]


def _window(query: RangeQuery) -> q.Window:
    return q.window(query.start, query.end, query.bucket)


async def list_clusters(call: Call) -> ClusterList:
    return ClusterList(clusters=await q.clusters(call.state.pool))


async def cluster_nodes(call: Call) -> q.ClusterNodes:
    query: ClusterNodesQuery = call.query
    return await q.cluster_nodes(
        call.state.pool,
        call.path["region"],
        status=query.status,
        limit=query.limit,
        offset=query.offset,
    )


async def cluster_stats(call: Call) -> q.ClusterStats:
    return await q.cluster_stats(call.state.pool, call.path["region"], _window(call.query))


def _as_uuid(value: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no such {name.removesuffix('_id')}", field=name) from None


async def node_earnings(call: Call) -> q.NodeEarnings:
    node_id = call.path["node_id"]
    w = _window(call.query)
    # The live market knows a node the moment it registers; Postgres a moment later.
    node = await call.state.market.get_node(node_id)
    if node is not None:
        owner = node.owner_id
    else:
        row = await call.state.pool.fetchval(
            "SELECT owner_id FROM nodes WHERE id = $1", _as_uuid(node_id, "node_id")
        )
        if row is None:
            raise NotFound("no such node", field="node_id")
        owner = row.hex
    who = call.user
    if not who.is_admin and _norm(owner) != _norm(who.user_id):
        raise Forbidden("only the node's owner may see its earnings")
    return await q.node_earnings(call.state.pool, node_id, w)


async def client_spending(call: Call) -> q.ClientSpending:
    client_id = call.path["client_id"]
    w = _window(call.query)
    user_id = await call.state.pool.fetchval(
        "SELECT user_id FROM clients WHERE id = $1", _as_uuid(client_id, "client_id")
    )
    who = call.user
    if user_id is None or (not who.is_admin and user_id.hex != _norm(who.user_id)):
        raise NotFound("no such client", field="client_id")
    return await q.client_spending(call.state.pool, client_id, w)


async def market_supply(call: Call) -> q.MarketSupply:
    query: MarketQuery = call.query
    return await q.market_supply(call.state.pool, _window(query), region=query.region)


async def market_pricing(call: Call) -> q.MarketPricing:
    query: MarketQuery = call.query
    return await q.market_pricing(call.state.pool, _window(query), region=query.region)


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
    ),
    Operation(
        "GET",
        "/api/clusters/{region}/nodes",
        cluster_nodes,
        name="cluster_nodes",
        summary="The nodes of a cluster (history database)",
        tag="clusters",
        query=ClusterNodesQuery,
        response=q.ClusterNodes,
    ),
    Operation(
        "GET",
        "/api/clusters/{region}/stats",
        cluster_stats,
        name="cluster_stats",
        summary="A cluster's fills, revenue and reported capacity over time",
        tag="clusters",
        query=RangeQuery,
        response=q.ClusterStats,
    ),
    Operation(
        "GET",
        "/api/analytics/node/{node_id}/earnings",
        node_earnings,
        name="node_earnings_history",
        summary="A node's earnings over time (owner)",
        tag="analytics",
        query=RangeQuery,
        response=q.NodeEarnings,
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
        response=q.ClientSpending,
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
        response=q.MarketSupply,
    ),
    Operation(
        "GET",
        "/api/analytics/market/pricing",
        market_pricing,
        name="market_pricing",
        summary="Cleared-price candles (open, high, low, close, volume) per region",
        tag="analytics",
        query=MarketQuery,
        response=q.MarketPricing,
    ),
]

routes = [route(op) for op in OPERATIONS]
"""Mounted by `gateway.app`."""
