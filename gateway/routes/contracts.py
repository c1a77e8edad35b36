"""Contracts: take capacity on a node (an atomic reserve), see it, extend it, settle it.

Who may do what:
- create: renters and admins, for one of their own clients (`client_id` must be theirs: 403);
- get and list: the contract's renter, the node's owner (read-only), admins; anyone else gets 404
  (a contract id of another tenant is answered as unknown);
- extend and settle: the renter only (the node's owner and admins: 403).
The reserve is one script call in the market: no double booking, the price is the node's ask at
that instant, never above the cap. A lost race is a 409 `capacity_taken`. The same call holds the
contract's cost from the renter's balance (`gateway.money`): one it cannot cover is a 402
`insufficient_funds` (or `budget_exceeded`) with the shortfall, before anything is reserved;
an extension holds its cost the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg

from engine import core
from engine.errors import NotFound
from engine.types import Contract
from gateway.errors import Forbidden, ValidationFailed, named_as
from gateway.money import paying
from gateway.operations import Call, Link, Operation
from gateway.protocol import ContractLive, ContractOut
from gateway.ratelimit import WRITES
from gateway.routes.accounts import RENTERS, client_ids_of, owned_client
from gateway.schemas import (
    ContractCreateRequest,
    ContractExtendRequest,
    ContractList,
    ContractListQuery,
    ContractSettleRequest,
    contract_out,
    public_lease_state,
    to_pusd,
    to_usd,
)
from persistence import history

__all__ = ["OPERATIONS"]


def _can_read(call: Call, contract: Contract) -> bool:
    who = call.user
    return who.is_admin or who.user_id in (contract.user_id, contract.owner_id)


async def _readable(call: Call) -> Contract:
    contract = await call.state.market.get_contract(call.path["contract_id"])
    if contract is None or not _can_read(call, contract):
        raise NotFound("no such contract", field="contract_id")
    return contract


async def _renters(call: Call) -> Contract:
    contract = await _readable(call)
    if contract.user_id != call.user.user_id:
        raise Forbidden("only the renter may change a contract")
    return contract


async def create(call: Call) -> ContractOut:
    body: ContractCreateRequest = call.body
    if body.ram_gb + body.vram_gb == 0:
        raise ValidationFailed("ask for some memory: ram_gb + vram_gb must be > 0", field="ram_gb")
    client = await owned_client(call.state.pool, call.user, body.client_id)
    market = call.state.market
    if body.max_price_per_gb_sec is not None:
        cap = to_pusd(body.max_price_per_gb_sec)
        if cap < 1:
            raise ValidationFailed(
                "price cap below 1e-12 USD per GB-second", field="max_price_per_gb_sec"
            )
    node = await market.get_node(body.node_id)
    if node is None:
        raise NotFound("no such node", field="node_id")
    if body.max_price_per_gb_sec is None:
        cap = node.price_pusd
    now_ms = call.now_ms()
    with named_as(duration_s="duration_sec", max_price_pusd="max_price_per_gb_sec"):
        # refused as malformed before any money moves
        core.validate_reserve(
            node_id=body.node_id,
            client_id=str(client["id"]),
            user_id=call.user.user_id,
            ram_gb=body.ram_gb,
            vram_gb=body.vram_gb,
            duration_s=body.duration_sec,
            max_price_pusd=cap,
        )
    # The hold the reserve will take at the node's price now (issue 14: money first).
    need = core.hold_pusd(body.ram_gb + body.vram_gb, body.duration_sec, min(node.price_pusd, cap))
    with named_as(duration_s="duration_sec", max_price_pusd="max_price_per_gb_sec"):
        contract = await paying(
            market,
            client,
            node.region,
            need,
            now_ms,
            lambda budgeted: market.reserve(
                node_id=body.node_id,
                client_id=str(client["id"]),
                user_id=call.user.user_id,
                ram_gb=body.ram_gb,
                vram_gb=body.vram_gb,
                duration_s=body.duration_sec,
                max_price_pusd=cap,
                now_ms=now_ms,
                budgeted=budgeted,
            ),
        )
    return contract_out(contract)


async def list_contracts(call: Call) -> ContractList:
    q: ContractListQuery = call.query
    market = call.state.market
    pool = call.state.pool
    who = call.user
    # Scope: one client of the caller, one node of the caller, or everything the caller is party
    # to (as renter or as provider); admins see everything.
    client_id: str | None = None
    node_id: str | None = None
    if q.client_id is not None:
        client_id = str((await owned_client(pool, who, q.client_id))["id"])
    elif q.node_id is not None:
        node = await market.get_node(q.node_id)
        if node is None or (node.owner_id != who.user_id and not who.is_admin):
            raise Forbidden("node_id is not one of your nodes", field="node_id")
        node_id = node.node_id

    active: dict[str, ContractOut] = {}
    if q.status in (None, "active"):
        if client_id is not None:
            found = await market.contracts(client_id=client_id)
        elif node_id is not None:
            found = await market.contracts(node_id=node_id)
        elif who.is_admin:
            found = await market.contracts()
        else:
            found = []
            for own_client in await client_ids_of(pool, who):
                found += await market.contracts(client_id=own_client)
            if who.role == "provider":
                # A provider may have thousands of nodes: their active contracts come from the
                # journal's copy (one indexed query) rather than one live read per node.
                for row in await history.provider_active_contracts(pool, who.user_id):
                    out = contract_from_row(row)
                    active[out.contract_id] = out
        for c in found:
            if c.status == "active":
                active[c.contract_id] = contract_out(c)
    ordered = sorted(active.values(), key=lambda c: (-c.start_ms, c.contract_id))

    # Closed contracts come from Postgres (the journal's history): active ones first, then
    # history newest first; one page may span both.
    closed_total = 0
    closed: list[ContractOut] = []
    if q.status != "active":
        skip = max(0, q.offset - len(ordered))
        room = q.limit - max(0, min(len(ordered) - q.offset, q.limit))
        closed_total, rows = await history.closed_contracts(
            pool,
            status=q.status,
            client_id=client_id,
            node_id=node_id,
            party_id=None if who.is_admin else who.user_id,
            limit=room,
            offset=skip,
        )
        closed = [contract_from_row(r) for r in rows]
    page = ordered[q.offset : q.offset + q.limit] + closed
    return ContractList(
        contracts=page,
        total_count=len(ordered) + closed_total,
        offset=q.offset,
        limit=q.limit,
    )


def _ms(value: dt.datetime | None) -> int:
    return 0 if value is None else round(value.timestamp() * 1000)


def _hex(value: uuid.UUID | None) -> str | None:
    return None if value is None else value.hex


def contract_from_row(row: asyncpg.Record) -> ContractOut:
    """A contract of the journal's history (ids as the market writes them: uuid hex)."""
    return ContractOut(
        contract_id=row["id"].hex,
        client_id=str(row["client_id"]) if row["client_id"] is not None else "",
        node_id=row["node_id"].hex if row["node_id"] is not None else "",
        region=row["region"],
        ram_gb=row["ram_gb"],
        vram_gb=row["vram_gb"],
        duration_sec=row["duration_sec"],
        start_ms=_ms(row["start_time"]),
        end_ms=_ms(row["end_time"]),
        price_per_gb_sec=to_usd(row["price_pusd"]),
        egress_price_per_gb=to_usd(row["egress_price_pusd"]),
        max_price_per_gb_sec=to_usd(row["max_price_pusd"]),
        status=row["status"],
        bid_id=_hex(row["bid_id"]),
        predecessor_id=_hex(row["predecessor_id"]),
        successor_id=_hex(row["successor_id"]),
        extensions=row["extensions"],
        used_sec=row["used_sec"],
        egress_gb=row["egress_mgb"] / 1000,
        total_cost_usd=to_usd(row["total_cost_pusd"]),
        settlement_hash=row["settlement_hash"],
        completed_ms=_ms(row["completed_at"]),
        price_pusd=row["price_pusd"],
        egress_price_pusd=row["egress_price_pusd"],
        max_price_pusd=row["max_price_pusd"],
        total_cost_pusd=row["total_cost_pusd"],
        delivered=row["lease_state"] != "none",
        lease_state=public_lease_state(row["lease_state"]),
        ready_ms=_ms(row["ready_at"]),
        egress_bytes=row["egress_bytes"],
        peak_memory_bytes=row["peak_memory_bytes"],
        claimed_egress_gb=None
        if row["claimed_egress_mgb"] is None
        else row["claimed_egress_mgb"] / 1000,
        lease_digest=row["lease_digest"],
    )


async def get_contract(call: Call) -> ContractOut:
    contract = await call.state.market.get_contract(call.path["contract_id"])
    if contract is None:
        # Closed contracts leave Redis after a day; their record is in the journal's history.
        return await _from_history(call)
    if not _can_read(call, contract):
        raise NotFound("no such contract", field="contract_id")
    live = None
    if contract.status == "active":
        now_ms = call.now_ms()
        node = await call.state.market.get_node(contract.node_id)
        accrued = core.accrued_cost_pusd(contract, now_ms)
        live = ContractLive(
            elapsed_sec=core.used_seconds(contract.start_ms, now_ms, contract.duration_s),
            remaining_sec=max(0, (contract.end_ms - now_ms) // 1000),
            accrued_cost_usd=to_usd(accrued),
            accrued_cost_pusd=accrued,
            node_status=node.status if node is not None else "unknown",
            node_last_heartbeat_ms=node.last_heartbeat_ms if node is not None else 0,
        )
    return contract_out(contract, live=live)


async def _from_history(call: Call) -> ContractOut:
    row = await history.contract(call.state.pool, call.path["contract_id"])
    who = call.user
    if row is None or not (
        who.is_admin or who.user_id in (str(row["user_id"]), str(row["owner_id"]))
    ):
        raise NotFound("no such contract", field="contract_id")
    return contract_from_row(row)


async def extend(call: Call) -> ContractOut:
    body: ContractExtendRequest = call.body
    contract = await _renters(call)
    market, now_ms = call.state.market, call.now_ms()
    client = await owned_client(call.state.pool, call.user, contract.client_id)
    size = contract.ram_gb + contract.vram_gb
    need = core.hold_pusd(size, body.additional_duration_sec, contract.price_pusd)
    with named_as(extra_s="additional_duration_sec"):
        extended = await paying(
            market,
            client,
            contract.region,
            need,
            now_ms,
            lambda budgeted: market.extend(
                contract.contract_id, body.additional_duration_sec, now_ms, budgeted=budgeted
            ),
        )
    return contract_out(extended)


async def settle(call: Call) -> ContractOut:
    body: ContractSettleRequest = call.body
    contract = await _renters(call)
    market = call.state.market
    if contract.lease_state != "none" and contract.status == "active":
        return contract_out(await _settle_delivered(call, contract, body.actual_egress_gb))
    with named_as(egress_gb="actual_egress_gb"):
        settled = await market.settle(
            contract.contract_id, body.actual_egress_gb or 0.0, call.now_ms()
        )
    return contract_out(settled)


_SETTLE_POLL_S = (0.005, 0.01, 0.02, 0.05)
"""How often a settle of a delivered lease looks for its settlement (growing to the last)."""


async def _settle_delivered(
    call: Call, contract: Contract, claimed_egress_gb: float | None
) -> Contract:
    """Order the lease's close (billing stops now), then wait for the settlement its node's
    closed report brings; past the close timeout, settle with the last heartbeat's meter (as
    the engine would: whichever comes first settles, the other finds it done)."""
    market = call.state.market
    with named_as(egress_gb="actual_egress_gb"):
        closing = await market.close_lease(
            contract.contract_id, call.now_ms(), claimed_egress_gb=claimed_egress_gb
        )
    deadline = closing.closing_ms + call.state.settings.lease_close_timeout_ms
    polls = 0
    while True:
        current = await market.get_contract(contract.contract_id)
        if current is None:
            raise NotFound("no such contract", field="contract_id")
        if current.status != "active":
            return current
        if current.reported_ms or call.now_ms() >= deadline:
            return await market.settle_lease(contract.contract_id, call.now_ms())
        await asyncio.sleep(_SETTLE_POLL_S[min(polls, len(_SETTLE_POLL_S) - 1)])
        polls += 1


_ON_NODE = {"node_id": "$response.body#/node_id", "contract_id": "$response.body#/contract_id"}
"""The contract's lease on its node (the agent's delivery routes)."""

OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/contracts/create",
        create,
        name="create_contract",
        links={
            "GetContract": Link("get_contract", {"contract_id": "$response.body#/contract_id"}),
            "Extend": Link("extend_contract", {"contract_id": "$response.body#/contract_id"}),
            "Settle": Link("settle_contract", {"contract_id": "$response.body#/contract_id"}),
            "GetNode": Link("get_node", {"node_id": "$response.body#/node_id"}),
            "Access": Link("contract_access", {"contract_id": "$response.body#/contract_id"}),
            "LeaseCredentials": Link("lease_credentials", _ON_NODE),
            "LeaseReady": Link("lease_ready", _ON_NODE),
            "LeaseClosed": Link("lease_closed", _ON_NODE),
        },
        limit=WRITES,
        summary="Take capacity on a node (atomic reserve at the node's price, capped)",
        tag="contracts",
        body=ContractCreateRequest,
        response=ContractOut,
        status=201,
        roles=RENTERS,
        idempotent=True,
        errors=(402, 404, 409, 429),
    ),
    Operation(
        "GET",
        "/api/contracts",
        list_contracts,
        name="list_contracts",
        summary="The caller's contracts (as renter and as provider), filtered by client/node/status",
        tag="contracts",
        query=ContractListQuery,
        response=ContractList,
    ),
    Operation(
        "GET",
        "/api/contracts/{contract_id}",
        get_contract,
        name="get_contract",
        summary="A contract with its live state (renter, node owner, admins)",
        tag="contracts",
        response=ContractOut,
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/contracts/{contract_id}/settle",
        settle,
        name="settle_contract",
        limit=WRITES,
        summary="End a contract now: free the capacity, price what was used, stamp the settlement hash",
        description="A delivered lease is closed first: billing stops at once, the node stops "
        "and wipes its server and reports its final meter and digest, and the contract is "
        "settled then, billing the egress the node measured (`actual_egress_gb` is recorded "
        "as `claimed_egress_gb`, never billed). The request waits for that settlement, at "
        "most `MNEMO_LEASE_CLOSE_TIMEOUT_MS` (after which the last heartbeat's meter is billed, "
        "with no digest). A lease that is not delivered settles at once, billing "
        "`actual_egress_gb`.",
        tag="contracts",
        body=ContractSettleRequest,
        response=ContractOut,
        idempotent=True,
        errors=(404, 409),
    ),
    Operation(
        "POST",
        "/api/contracts/{contract_id}/extend",
        extend,
        name="extend_contract",
        limit=WRITES,
        summary="Extend an active contract",
        tag="contracts",
        body=ContractExtendRequest,
        response=ContractOut,
        idempotent=True,
        errors=(402, 404, 409),
    ),
]
