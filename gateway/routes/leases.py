"""Delivery: the node's agent reports its lease servers; the renter gets the way in.

Who may do what:
- the node-authenticated routes under `/api/nodes/{node_id}/leases` (the agent's): the node's
  owner only (403 for anyone else, as heartbeats; 404 for a node or a lease that is not there,
  a contract of another node included);
- `GET /api/contracts/{id}/access`: the contract's renter only; anyone else, the node's owner
  and admins included, gets 404 (the answer holds the lease's password).

The flow (README, "Delivery"): a delivered lease starts `pending`; the agent fetches its
credentials, starts the lease's server and reports `ready` (the lease bills from then); the
renter's settle, or the end of the term, orders the close (`lease_close` on `leases:<node_id>`);
the agent stops and wipes the server and reports `closed` with its final meter and digest,
which settles the contract (the measured egress billed, the digest in the settlement hash).
"""

from __future__ import annotations

from engine.errors import Conflict, NotFound
from engine.types import Contract, Node
from gateway.errors import Forbidden
from gateway.leases import lease_access, lease_credentials
from gateway.operations import Call, Operation
from gateway.protocol import (
    LeaseAccess,
    LeaseClosed,
    LeaseCredentials,
    LeaseEndpoint,
    LeaseReady,
)
from gateway.routes.nodes import PROVIDERS
from gateway.schemas import lease_endpoint

__all__ = ["OPERATIONS"]


async def _own_node(call: Call) -> Node:
    node = await call.state.market.get_node(call.path["node_id"])
    if node is None:
        raise NotFound("no such node", field="node_id")
    if node.owner_id != call.user.user_id:
        raise Forbidden("only the node's owner may speak for its leases")
    return node


async def _lease(call: Call) -> Contract:
    """The contract of the path on the caller's node of the path."""
    node = await _own_node(call)
    contract = await call.state.market.get_contract(call.path["contract_id"])
    if contract is None or contract.node_id != node.node_id:
        raise NotFound("no such lease on this node", field="contract_id")
    return contract


async def list_leases(call: Call) -> list[LeaseEndpoint]:
    node = await _own_node(call)
    contracts = await call.state.market.contracts(node_id=node.node_id)
    return [
        lease_endpoint(c) for c in contracts if c.status == "active" and c.lease_state != "none"
    ]


async def credentials(call: Call) -> LeaseCredentials:
    contract = await _lease(call)
    if contract.lease_state == "none":
        raise NotFound("this contract is not a delivered lease", field="contract_id")
    if contract.status != "active":
        raise Conflict(f"contract is {contract.status}", field="contract_id")
    return lease_credentials(call.state.settings.lease_secret, contract)


async def ready(call: Call) -> LeaseEndpoint:
    body: LeaseReady = call.body
    await _own_node(call)
    contract = await call.state.market.lease_ready(
        call.path["contract_id"],
        call.path["node_id"],
        host=body.host,
        port=body.port,
        tls=body.tls,
        now_ms=call.now_ms(),
    )
    return lease_endpoint(contract)


async def closed(call: Call) -> LeaseEndpoint:
    body: LeaseClosed = call.body
    contract = await _lease(call)
    if contract.status != "active":
        return lease_endpoint(contract)  # settled already (a repeat, or the close timeout)
    market = call.state.market
    try:
        await market.report_lease(
            contract.contract_id,
            contract.node_id,
            call.now_ms(),
            egress_bytes=body.egress_bytes,
            peak_memory_bytes=body.peak_memory_bytes,
            digest=body.digest,
        )
    except Conflict:
        again = await market.get_contract(contract.contract_id)
        if again is None or again.status == "active":
            raise
        return lease_endpoint(again)  # settled meanwhile
    return lease_endpoint(await market.settle_lease(contract.contract_id, call.now_ms()))


async def access(call: Call) -> LeaseAccess:
    contract = await call.state.market.get_contract(call.path["contract_id"])
    if contract is None or contract.user_id != call.user.user_id:
        raise NotFound("no such contract", field="contract_id")
    return lease_access(call.state.settings.lease_secret, contract)


_AGENT = (
    "For the node's agent: authenticate as the node's owner (the heartbeats' API key). See the "
    "README's Delivery section."
)

OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/api/nodes/{node_id}/leases",
        list_leases,
        name="node_leases",
        summary="The node's delivered leases that are open, with their state (its agent's resync)",
        description=_AGENT + " A lease in state `closed` here is one whose close was ordered: "
        "stop its server, wipe it and report `closed`.",
        tag="delivery",
        response=list[LeaseEndpoint],
        roles=PROVIDERS,
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/nodes/{node_id}/leases/{contract_id}/credentials",
        credentials,
        name="lease_credentials",
        summary="The one ACL user the lease's server must accept (the node's owner only)",
        description=_AGENT + " Derived, never stored: the same answer every time.",
        tag="delivery",
        response=LeaseCredentials,
        roles=PROVIDERS,
        errors=(404, 409),
    ),
    Operation(
        "POST",
        "/api/nodes/{node_id}/leases/{contract_id}/ready",
        ready,
        name="lease_ready",
        summary="Report that the node serves the lease at host:port (billing starts)",
        description=_AGENT + " A repeat moves the endpoint (a restarted server) and keeps the "
        "first report's time. 409 once the lease is not pending or ready any more (it failed "
        "over for want of this report, or it is closing or closed).",
        tag="delivery",
        body=LeaseReady,
        response=LeaseEndpoint,
        roles=PROVIDERS,
        errors=(404, 409),
    ),
    Operation(
        "POST",
        "/api/nodes/{node_id}/leases/{contract_id}/closed",
        closed,
        name="lease_closed",
        summary="Report the lease's server stopped and wiped, with its final meter and digest "
        "(settles the contract)",
        description=_AGENT + " Accepted once the close was ordered (`lease_close`) or the term "
        "is over; the measured egress is billed and the digest goes into the settlement "
        "hash. A repeat, or a report after the exchange settled without it, changes nothing "
        "and answers 200 with the lease as it is.",
        tag="delivery",
        body=LeaseClosed,
        response=LeaseEndpoint,
        roles=PROVIDERS,
        errors=(404, 409),
    ),
    Operation(
        "GET",
        "/api/contracts/{contract_id}/access",
        access,
        name="contract_access",
        summary="How to reach the rented memory: a redis:// (rediss:// with TLS) URL with its "
        "credentials (the renter only)",
        description="`url` is set once `state` is `ready`; after a failover the lease moves to "
        "another node, with a new endpoint and a new password (the `leases` channel of `/ws` "
        "says `lease_moved`). `delivered` false: the lease is reserved, not delivered (a VRAM "
        "lease, or a node whose agent does not deliver): there is no endpoint. Anyone but the "
        "renter gets 404.",
        tag="contracts",
        response=LeaseAccess,
        errors=(404,),
    ),
]
