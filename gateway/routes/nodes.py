"""Nodes: a provider registers machines, heartbeats them, changes their terms, deactivates them.

Who may do what:
- register (one node, or a batch of up to `MAX_REGISTER_BATCH`, all or none): providers and
  admins; the nodes belong to the caller;
- heartbeat, update: the node's owner only (403 for anyone else; the heartbeat script checks the
  owner itself, atomically with the heartbeat);
- deactivate: the owner, or an admin (moderation);
- list and get: any authenticated caller (nodes are public market listings), but the owner id and
  the earnings are shown to the owner and admins only.
Heartbeats are limited to one per node per `heartbeat_min_interval_s` (the spec's 30 s): the
market's script refuses an early one and says when the next is due, which becomes 429 with
`Retry-After`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncpg
import msgspec

from engine import core, trust
from engine.errors import Conflict, InsufficientFunds, NotFound
from engine.keys import mint_id
from engine.types import Node, NodeChanges
from gateway.errors import Forbidden, RateLimited, ValidationFailed
from gateway.heartbeats import market_heartbeat
from gateway.operations import Call, Link, Operation
from gateway.protocol import Heartbeat
from gateway.ratelimit import WRITES
from gateway.schemas import (
    MAX_REGISTER_BATCH,
    MAX_REGISTER_BATCH_BYTES,
    HeartbeatResponse,
    MaintenanceRequest,
    NodeBatchRegistered,
    NodeBatchRegisterRequest,
    NodeDetail,
    NodeEarnings,
    NodeList,
    NodeListQuery,
    NodeOut,
    NodeRegistered,
    NodeRegisterRequest,
    NodeScores,
    NodeUpdateRequest,
    ScoredWindowOut,
    ScoresQuery,
    StakeRequest,
    metadata_to_market,
    node_detail,
    node_out,
    to_pusd,
    to_usd,
)
from persistence import history
from persistence import stake as stakes

__all__ = ["OPERATIONS", "PROVIDERS", "OwnerIndex", "node_earnings"]

PROVIDERS = frozenset({"provider", "admin"})


def _shows_owner(call: Call, node: Node) -> bool:
    return call.user.user_id == node.owner_id or call.user.is_admin


async def _node(call: Call) -> Node:
    node = await call.state.market.get_node(call.path["node_id"])
    if node is None:
        raise NotFound("no such node", field="node_id")
    return node


def _price(usd_value: float, field: str) -> int:
    amount = to_pusd(usd_value)
    if amount < 1:
        raise ValidationFailed(
            "price below the smallest unit (1e-12 USD per GB-second)", field=field
        )
    return amount


def _new_node(
    body: NodeRegisterRequest,
    node_id: str,
    owner_id: str,
    interval_s: float,
    now_ms: int,
    at: str = "",
) -> Node:
    """The node a registration body describes; `at` prefixes the fields named in refusals
    (`nodes[3].` in a batch)."""
    if body.total_ram_gb + body.total_vram_gb == 0:
        raise ValidationFailed("a node must have some memory", field=f"{at}total_ram_gb")
    if body.min_duration_sec > body.max_duration_sec:
        raise ValidationFailed(
            "min_duration_sec exceeds max_duration_sec", field=f"{at}min_duration_sec"
        )
    offered_ram = (
        body.total_ram_gb if body.max_ram_gb is None else min(body.max_ram_gb, body.total_ram_gb)
    )
    offered_vram = (
        body.total_vram_gb
        if body.max_vram_gb is None
        else min(body.max_vram_gb, body.total_vram_gb)
    )
    return Node(
        node_id=node_id,
        owner_id=owner_id,
        region=body.region,
        node_type=body.node_type,
        name=body.name,
        lat=body.latitude,
        lng=body.longitude,
        total_ram_gb=body.total_ram_gb,
        total_vram_gb=body.total_vram_gb,
        offered_ram_gb=offered_ram,
        offered_vram_gb=offered_vram,
        bandwidth_mbps=body.bandwidth_mbps,
        base_latency_ms=body.base_latency_ms,
        price_pusd=_price(body.price_per_gb_sec, f"{at}price_per_gb_sec"),
        egress_price_pusd=to_pusd(body.egress_price_per_gb),
        min_duration_s=body.min_duration_sec,
        max_duration_s=body.max_duration_sec,
        heartbeat_interval_s=interval_s,
        created_ms=now_ms,
        metadata=metadata_to_market(body.metadata),
        delivers=body.delivers,
    )


async def register(call: Call) -> NodeRegistered:
    now_ms = call.now_ms()
    node = _new_node(
        call.body,
        mint_id(call.body.region),
        call.user.user_id,
        call.state.settings.heartbeat_interval_s,
        now_ms,
    )
    registered = await call.state.market.register_node(node, now_ms)
    return NodeRegistered(node_id=registered.node_id, node=node_out(registered, show_owner=True))


async def register_batch(call: Call) -> NodeBatchRegistered:
    """Every node of the body, or none: each is checked as `register` checks one (a refusal
    names it, `nodes[i].<field>`) before the market registers them all in one call per region
    (`Market.register_many`)."""
    body: NodeBatchRegisterRequest = call.body
    now_ms = call.now_ms()
    owner_id, interval_s = call.user.user_id, call.state.settings.heartbeat_interval_s
    # each id carries its node's region (engine.keys.mint_id: routing by id needs no lookup)
    nodes = [
        _new_node(node, mint_id(node.region), owner_id, interval_s, now_ms, f"nodes[{i}].")
        for i, node in enumerate(body.nodes)
    ]
    registered = await call.state.market.register_many(nodes, now_ms)
    return NodeBatchRegistered(node_ids=[node.node_id for node in registered])


async def heartbeat(call: Call) -> HeartbeatResponse:
    body: Heartbeat = call.body
    if (problem := body.location_error()) is not None:
        raise ValidationFailed(problem, field="latitude")
    node_id = call.path["node_id"]
    state = call.state
    settings = state.settings
    beat = market_heartbeat(node_id, body)
    [outcome] = await state.market.heartbeat(
        call.user.user_id,
        [beat],
        call.now_ms(),
        min_interval_ms=int(settings.heartbeat_min_interval_s * 1000),
    )
    match outcome.outcome:
        case "ok":
            pass
        case "not_found":
            raise NotFound("no such node", field="node_id")
        case "forbidden":
            raise Forbidden("only the node's owner may send its heartbeats")
        case "too_soon":
            raise RateLimited(
                f"at most one heartbeat per {settings.heartbeat_min_interval_s:g} s per node",
                retry_after_s=outcome.retry_after_ms / 1000,
                code="heartbeat_too_soon",
            )
        case "deactivated":
            raise Conflict("the node is deactivated", field="node_id")
        case other:
            raise Conflict(f"heartbeat refused ({other})", field="node_id")
    node = await state.market.get_node(node_id)
    if node is None:
        raise NotFound("no such node", field="node_id")
    return HeartbeatResponse(
        status="ok",
        node_id=node_id,
        node_status=node.status,
        offered_ram_gb=node.offered_ram_gb,
        offered_vram_gb=node.offered_vram_gb,
        reserved_ram_gb=node.reserved_ram_gb,
        reserved_vram_gb=node.reserved_vram_gb,
        available_ram_gb=max(0, node.available_ram_gb),
        available_vram_gb=max(0, node.available_vram_gb),
        next_heartbeat_in_sec=node.heartbeat_interval_s,
        min_interval_sec=settings.heartbeat_min_interval_s,
    )


class OwnerIndex:
    """Which nodes of this process's market view belong to whom (owners never change).

    Built from the view's books, learning each node's owner once; `nodes_of()` then costs one
    pass over the books' ids (about 10 ms at 100k nodes) plus the owner's own nodes. A derived
    cache of the read model, never authoritative. `warm()` learns every node at start-up.
    """

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    def warm(self, view: Any) -> None:
        for book in view.books():
            self._learn(book, book.node_ids())

    def _learn(self, book: Any, ids: list[str]) -> None:
        for node_id in ids:
            if node_id not in self._owner:
                node = book.node(node_id)
                if node is not None:
                    self._owner[node_id] = node.owner_id

    def nodes_of(self, view: Any, owner_id: str) -> list[Node]:
        """The owner's nodes as the view sees them now (deactivated ones included)."""
        out: list[Node] = []
        seen = 0
        for book in view.books():
            ids = book.node_ids()
            seen += len(ids)
            self._learn(book, ids)
            for node_id in ids:
                if self._owner.get(node_id) == owner_id and (node := book.node(node_id)):
                    out.append(node)
        if len(self._owner) > 2 * seen + 1024:
            # Ids of nodes gone from the view: start afresh rather than grow without bound.
            self._owner.clear()
        return out


async def list_nodes(call: Call) -> NodeList:
    """The caller's own nodes (`mine`) come live from this process's market view; every other
    listing from Postgres (the journal's `nodes` table, indexed), where filtering and paging cost
    the same whatever the size of the market (reading every node from Redis took seconds of the
    event loop at 100k nodes). Those rows trail the live market by the journal's lag (normally
    well under a second); `GET /api/nodes/{id}` is always live."""
    q: NodeListQuery = call.query
    if q.mine:
        return _own_nodes(call, q)
    total, rows = await history.nodes_page(
        call.state.pool,
        node_type=q.node_type,
        region=q.region,
        status=q.status,
        min_ram_gb=q.min_ram,
        min_vram_gb=q.min_vram,
        limit=q.limit,
        offset=q.offset,
    )
    me, admin = call.user.user_id, call.user.is_admin
    return NodeList(
        nodes=[_node_from_row(r, me=me, admin=admin) for r in rows],
        total_count=total,
        offset=q.offset,
        limit=q.limit,
    )


def _own_nodes(call: Call, q: NodeListQuery) -> NodeList:
    nodes = call.state.owners.nodes_of(call.state.view, call.user.user_id)
    picked = [
        n
        for n in nodes
        if (q.node_type is None or n.node_type == q.node_type)
        and (q.region is None or n.region == q.region)
        and (q.status is None or n.status == q.status)
        and (q.min_ram is None or n.available_ram_gb >= q.min_ram)
        and (q.min_vram is None or n.available_vram_gb >= q.min_vram)
    ]
    picked.sort(key=lambda n: (n.created_ms, n.node_id))
    return NodeList(
        nodes=[node_out(n, show_owner=True) for n in picked[q.offset : q.offset + q.limit]],
        total_count=len(picked),
        offset=q.offset,
        limit=q.limit,
    )


def _ms(value: dt.datetime | None) -> int:
    return 0 if value is None else round(value.timestamp() * 1000)


def _node_from_row(row: asyncpg.Record, *, me: str, admin: bool) -> NodeOut:
    owner = str(row["owner_id"]) if row["owner_id"] is not None else None
    metadata = msgspec.json.decode(row["metadata"]) if row["metadata"] else {}
    return NodeOut(
        node_id=row["id"].hex,
        owner_id=owner if admin or owner == me else None,
        node_type=row["node_type"],
        name=row["name"],
        region=row["region"],
        latitude=float(row["latitude"] or 0),
        longitude=float(row["longitude"] or 0),
        total_ram_gb=row["total_ram_gb"],
        total_vram_gb=row["total_vram_gb"],
        offered_ram_gb=row["offered_ram_gb"],
        offered_vram_gb=row["offered_vram_gb"],
        reserved_ram_gb=row["reserved_ram_gb"],
        reserved_vram_gb=row["reserved_vram_gb"],
        available_ram_gb=max(0, row["available_ram_gb"]),
        available_vram_gb=max(0, row["available_vram_gb"]),
        bandwidth_mbps=row["bandwidth_mbps"],
        base_latency_ms=float(row["base_latency_ms"]),
        uptime_score=float(
            row["uptime_score"] if row["uptime_score"] is not None else trust.NEW_NODE_SCORE
        ),
        reputation_score=row["reputation_score"] if row["reputation_score"] is not None else 100,
        price_per_gb_sec=to_usd(row["price_pusd"]),
        egress_price_per_gb=to_usd(row["egress_price_pusd"]),
        min_duration_sec=row["min_duration_sec"],
        max_duration_sec=row["max_duration_sec"],
        status=row["status"],
        ask_expires_ms=_ms(row["ask_expires_at"]),
        heartbeat_interval_sec=row["heartbeat_interval_s"],
        last_heartbeat_ms=_ms(row["last_heartbeat"]),
        created_ms=_ms(row["created_at"]),
        metadata={str(k): str(v) for k, v in metadata.items()},
        price_pusd=row["price_pusd"],
        egress_price_pusd=row["egress_price_pusd"],
        uptime_new=row["uptime_windows"] < trust.MIN_WINDOWS,
        uptime_history_windows=row["uptime_windows"],
        suspended=row["suspended_at"] is not None,
        suspended_since_ms=_ms(row["suspended_at"]),
        suspension_due_ms=_ms(row["suspend_at"]),
        maintenance_start_ms=_ms(row["maintenance_start"]),
        maintenance_end_ms=_ms(row["maintenance_end"]),
        delivered_contracts=row["delivered_contracts"],
        cut_contracts=row["cut_contracts"],
        stake_usd=to_usd(row["stake_pusd"]),
        stake_pusd=row["stake_pusd"],
        stake_held_usd=to_usd(row["stake_held_pusd"]),
        stake_held_pusd=row["stake_held_pusd"],
        delivers=row["delivers"],
    )


async def get_node(call: Call) -> NodeDetail:
    node = await _node(call)
    mine = _shows_owner(call, node)
    earnings = await node_earnings(call, node) if mine else None
    return node_detail(node, show_owner=mine, earnings=earnings)


async def update_node(call: Call) -> NodeOut:
    body: NodeUpdateRequest = call.body
    node = await _node(call)
    if node.owner_id != call.user.user_id:
        raise Forbidden("only the node's owner may change it")
    if (body.latitude is None) != (body.longitude is None):
        raise ValidationFailed("give latitude and longitude together", field="latitude")
    min_d = node.min_duration_s if body.min_duration_sec is None else body.min_duration_sec
    max_d = node.max_duration_s if body.max_duration_sec is None else body.max_duration_sec
    if min_d > max_d:
        raise ValidationFailed(
            "min_duration_sec exceeds max_duration_sec", field="min_duration_sec"
        )
    changes = NodeChanges(
        name=body.name,
        price_pusd=None
        if body.price_per_gb_sec is None
        else _price(body.price_per_gb_sec, "price_per_gb_sec"),
        egress_price_pusd=None
        if body.egress_price_per_gb is None
        else to_pusd(body.egress_price_per_gb),
        min_duration_s=body.min_duration_sec,
        max_duration_s=body.max_duration_sec,
        bandwidth_mbps=body.bandwidth_mbps,
        base_latency_ms=body.base_latency_ms,
        ask_expires_ms=body.ask_expires_ms,
        status=body.status,
        lat=body.latitude,
        lng=body.longitude,
        metadata=None if body.metadata is None else metadata_to_market(body.metadata),
        delivers=body.delivers,
    )
    updated = await call.state.market.update_node(node.node_id, changes, call.now_ms())
    return node_out(updated, show_owner=True)


async def deactivate_node(call: Call) -> NodeOut:
    node = await _node(call)
    if node.owner_id != call.user.user_id and not call.user.is_admin:
        raise Forbidden("only the node's owner may deactivate it")
    updated = await call.state.market.deactivate_node(node.node_id, call.now_ms())
    return node_out(updated, show_owner=True)


# ---------------------------------------------------------------------------------------------
# Trust: announced maintenance, the uptime history


async def announce_maintenance(call: Call) -> NodeOut:
    body: MaintenanceRequest = call.body
    node = await _node(call)
    if node.owner_id != call.user.user_id:
        raise Forbidden("only the node's owner may announce its maintenance")
    if body.start_ms == 0:
        raise ValidationFailed("start_ms must be a time ahead", field="start_ms")
    await call.state.market.announce_maintenance(
        node.node_id, node.owner_id, body.start_ms, body.end_ms, call.now_ms()
    )
    return node_out(await _node(call), show_owner=True)


async def withdraw_maintenance(call: Call) -> NodeOut:
    node = await _node(call)
    if node.owner_id != call.user.user_id:
        raise Forbidden("only the node's owner may withdraw its maintenance")
    await call.state.market.announce_maintenance(node.node_id, node.owner_id, 0, 0, call.now_ms())
    return node_out(await _node(call), show_owner=True)


def _stake_amount(body: StakeRequest) -> int:
    amount = to_pusd(body.amount_usd)
    if amount <= 0:  # below half a pico-USD: nothing to move
        raise ValidationFailed("must be at least 1e-12 USD (one pico-USD)", field="amount_usd")
    return amount


async def lock_stake(call: Call) -> NodeDetail:
    """Lock part of the provider's earnings as the node's stake: out of the ledger's
    `provider:<user>` (what is not paid out nor promised to a pending payout) into
    `stake_transit:<node>`, then into the node's stake in the live market, once per `lock_id`
    (persistence.stake)."""
    body: StakeRequest = call.body
    node = await _node(call)
    if node.owner_id != call.user.user_id:
        raise Forbidden("only the node's owner may lock its stake")
    amount = _stake_amount(body)
    key = body.lock_id or uuid.uuid4().hex
    reserved = await stakes.reserve_lock(
        call.state.pool, node.owner_id, node.node_id, amount, f"{node.node_id}:{key}"
    )
    if not reserved:
        free = await stakes.earnings_free_pusd(call.state.pool, node.owner_id)
        raise InsufficientFunds(
            "your earnings not yet paid out cannot cover the stake",
            field="amount_usd",
            shortfall_pusd=amount - max(free, 0),
        )
    await call.state.market.lock_stake(
        node.node_id, node.owner_id, amount, f"{node.node_id}:{key}", call.now_ms()
    )
    return node_detail(await _node(call), show_owner=True, earnings=None)


async def release_stake(call: Call) -> NodeDetail:
    """Release part of the node's stake back to the provider's earnings (what its active
    leases do not require)."""
    body: StakeRequest = call.body
    node = await _node(call)
    if node.owner_id != call.user.user_id:
        raise Forbidden("only the node's owner may release its stake")
    await call.state.market.release_stake(
        node.node_id, node.owner_id, _stake_amount(body), call.now_ms()
    )
    return node_detail(await _node(call), show_owner=True, earnings=None)


_SCORES_SPAN = dt.timedelta(days=92)


def _utc(t: dt.datetime, field: str) -> dt.datetime:
    utc = t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)
    if not dt.datetime(1970, 1, 1, tzinfo=dt.UTC) <= utc <= dt.datetime(9999, 12, 1, tzinfo=dt.UTC):
        raise ValidationFailed("must lie between 1970-01-01 and 9999-12-01 (UTC)", field=field)
    return utc


async def node_scores(call: Call) -> NodeScores:
    """The node's closed uptime windows in [start, end) (default: the last 30 days), at most
    92 days at once, and its standing now."""
    q: ScoresQuery = call.query
    node = await _node(call)
    end = _utc(q.end, "end") if q.end is not None else dt.datetime.now(dt.UTC)
    start = _utc(q.start, "start") if q.start is not None else end - dt.timedelta(days=30)
    if start >= end:
        raise ValidationFailed("start must be before end", field="start")
    if end - start > _SCORES_SPAN:
        raise ValidationFailed("at most 92 days at once", field="start")
    windows = await history.node_scores(call.state.pool, node.node_id, start, end)
    return NodeScores(
        node_id=node.node_id,
        start=start,
        end=end,
        windows=[
            ScoredWindowOut(
                window_start_ms=_ms(w.window_start),
                up_pct=w.up_pct,
                uptime_score=w.uptime_score,
                notice=w.notice,  # type: ignore[arg-type]
            )
            for w in windows
        ],
        uptime_score=node.uptime_score,
        uptime_new=node.uptime_new,
        uptime_history_windows=node.uptime_windows,
        reputation_score=node.reputation_score,
        suspended=node.suspended_ms != 0,
        suspension_due_ms=node.suspend_at_ms,
    )


# ---------------------------------------------------------------------------------------------
# Earnings


async def node_earnings(call: Call, node: Node) -> NodeEarnings:
    """What the node has earned: settled contracts from Postgres (written by the journal, which
    trails the live market by its lag, normally well under a second), plus what its active
    contracts have accrued so far (from the live market)."""
    now_ms = call.now_ms()
    active = await call.state.market.contracts(node_id=node.node_id)
    accrued = sum(core.accrued_cost_pusd(c, now_ms) for c in active)
    settled = await history.node_settled(call.state.pool, node.node_id)
    return NodeEarnings(
        total_earned_usd=to_usd(settled.total_pusd),
        settled_contracts=settled.contracts,
        active_contracts=len(active),
        accrued_active_usd=to_usd(accrued),
        total_earned_pusd=settled.total_pusd,
        accrued_active_pusd=accrued,
    )


OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/nodes/register",
        register,
        name="register_node",
        links={
            "GetNode": Link("get_node", {"node_id": "$response.body#/node_id"}),
            "UpdateNode": Link("update_node", {"node_id": "$response.body#/node_id"}),
            "DeactivateNode": Link("deactivate_node", {"node_id": "$response.body#/node_id"}),
            "Heartbeat": Link("node_heartbeat", {"node_id": "$response.body#/node_id"}),
            "Leases": Link("node_leases", {"node_id": "$response.body#/node_id"}),
            "Earnings": Link("node_earnings_history", {"node_id": "$response.body#/node_id"}),
            "Scores": Link("node_scores", {"node_id": "$response.body#/node_id"}),
            "Stake": Link("lock_stake", {"node_id": "$response.body#/node_id"}),
            "ReleaseStake": Link("release_stake", {"node_id": "$response.body#/node_id"}),
            "Maintenance": Link("announce_maintenance", {"node_id": "$response.body#/node_id"}),
            "EndMaintenance": Link("withdraw_maintenance", {"node_id": "$response.body#/node_id"}),
            "Contracts": Link("list_contracts", {"node_id": "$response.body#/node_id"}),
            "TakeNode": Link("create_contract", body={"node_id": "$response.body#/node_id"}),
            "Cluster": Link("cluster_nodes", {"region": "$response.body#/node/region"}),
            "ClusterStats": Link("cluster_stats", {"region": "$response.body#/node/region"}),
            "Book": Link("order_book", {"region": "$response.body#/node/region"}),
        },
        limit=WRITES,
        summary="Register a node (provider)",
        tag="nodes",
        description="Answers 200 (not 201) with `node_id` at the top level: the spec's own "
        "`node_agent.py` treats any other status as a failed registration.",
        body=NodeRegisterRequest,
        response=NodeRegistered,
        status=200,
        roles=PROVIDERS,
        idempotent=True,
    ),
    Operation(
        "POST",
        "/api/nodes/register/batch",
        register_batch,
        name="register_nodes",
        links={
            "GetNode": Link("get_node", {"node_id": "$response.body#/node_ids/0"}),
            "Heartbeat": Link("node_heartbeat", {"node_id": "$response.body#/node_ids/0"}),
        },
        limit=WRITES,
        summary=f"Register up to {MAX_REGISTER_BATCH:,} nodes at once, all or none (provider)",
        description="Each item is the body of `POST /api/nodes/register`, checked the same "
        "way; a refusal names the item (`nodes[17].latitude`) and registers nothing. The "
        "answer lists the new ids in the order of `nodes`. Bodies up to "
        f"{MAX_REGISTER_BATCH_BYTES // (1024 * 1024)} MiB. With `Idempotency-Key`, a retry "
        "gets the first answer and registers nothing more.",
        tag="nodes",
        body=NodeBatchRegisterRequest,
        response=NodeBatchRegistered,
        status=201,
        roles=PROVIDERS,
        idempotent=True,
        max_body_bytes=MAX_REGISTER_BATCH_BYTES,
    ),
    Operation(
        "POST",
        "/api/nodes/{node_id}/heartbeat",
        heartbeat,
        name="node_heartbeat",
        summary="Report a node's free capacity and metrics (owner; at most one per interval)",
        tag="nodes",
        body=Heartbeat,
        response=HeartbeatResponse,
        roles=PROVIDERS,
        errors=(404, 409, 429),
    ),
    Operation(
        "GET",
        "/api/nodes",
        list_nodes,
        name="list_nodes",
        links={
            "GetNode": Link("get_node", {"node_id": "$response.body#/nodes/0/node_id"}),
        },
        summary="List nodes with filters (`mine`: live; otherwise from the journal's copy, which "
        "trails the live market by its lag)",
        tag="nodes",
        query=NodeListQuery,
        response=NodeList,
    ),
    Operation(
        "GET",
        "/api/nodes/{node_id}",
        get_node,
        name="get_node",
        summary="A node, with its earnings for the owner",
        tag="nodes",
        response=NodeDetail,
        errors=(404,),
    ),
    Operation(
        "PUT",
        "/api/nodes/{node_id}",
        update_node,
        name="update_node",
        summary="Change a node's terms (owner)",
        tag="nodes",
        body=NodeUpdateRequest,
        response=NodeOut,
        roles=PROVIDERS,
        errors=(404, 409),
    ),
    Operation(
        "POST",
        "/api/nodes/{node_id}/maintenance",
        announce_maintenance,
        name="announce_maintenance",
        summary="Announce a maintenance window (owner): that time is not counted as downtime",
        description="At least 1 h and at most 90 days ahead, at most 4 h long, at most one "
        "window starting per 7 days (counted from the last one that took effect); a pending "
        "window is replaced, one in progress must end first (`DELETE`). The node should stop "
        "heartbeating only inside the window: silence outside it is downtime. Answers the node "
        "(`maintenance_start_ms`, `maintenance_end_ms`).",
        tag="nodes",
        body=MaintenanceRequest,
        response=NodeOut,
        roles=PROVIDERS,
        errors=(404, 409),
    ),
    Operation(
        "DELETE",
        "/api/nodes/{node_id}/maintenance",
        withdraw_maintenance,
        name="withdraw_maintenance",
        summary="Cancel the announced maintenance window, or end the one in progress (owner)",
        tag="nodes",
        response=NodeOut,
        roles=PROVIDERS,
        errors=(404, 409),
    ),
    Operation(
        "POST",
        "/api/nodes/{node_id}/stake",
        lock_stake,
        name="lock_stake",
        summary="Lock part of your earnings as the node's stake (owner)",
        description="The stake covers the leases the node may take (10 % of their value beyond "
        "10 USD: a reserve it does not cover is refused `insufficient_stake`) and pays renters' "
        "SLA credits when the node cuts a lease short. It comes out of the earnings not yet paid "
        "out (402 `insufficient_funds` beyond them). Give `lock_id` (or `Idempotency-Key`) to "
        "make a retry safe.",
        tag="nodes",
        body=StakeRequest,
        response=NodeDetail,
        roles=PROVIDERS,
        errors=(402, 404),
        idempotent=True,
    ),
    Operation(
        "POST",
        "/api/nodes/{node_id}/stake/release",
        release_stake,
        name="release_stake",
        summary="Release part of the node's stake to your earnings (owner)",
        description="At most what the node's active leases do not require "
        "(`stake_required_usd`), else 409. Each call releases `amount_usd` again: give "
        "`Idempotency-Key` to make a retry safe (a retry with the same key gets the first "
        "answer and releases nothing more).",
        tag="nodes",
        body=StakeRequest,
        response=NodeDetail,
        roles=PROVIDERS,
        errors=(404, 409),
        idempotent=True,
    ),
    Operation(
        "GET",
        "/api/nodes/{node_id}/scores",
        node_scores,
        name="node_scores",
        summary="A node's uptime hour by hour (up share, 30-day score, standing changes)",
        description="From the journal (it trails the live market by its lag). `start` and "
        "`end` in RFC 3339 (default: the last 30 days), at most 92 days apart.",
        tag="nodes",
        query=ScoresQuery,
        response=NodeScores,
        errors=(404,),
    ),
    Operation(
        "DELETE",
        "/api/nodes/{node_id}",
        deactivate_node,
        name="deactivate_node",
        summary="Deactivate a node (owner or admin): no new leases, running ones finish",
        tag="nodes",
        response=NodeOut,
        roles=PROVIDERS,
        errors=(404, 409),
    ),
]
