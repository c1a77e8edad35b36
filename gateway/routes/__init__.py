"""The REST API's operations, one module per concept.

`accounts` (sign-up, tokens, API keys, clients), `nodes` (provider side), `marketplace` (browse and
ranked matches), `contracts`, `leases` (delivery: the agent's reports, the renter's access), `bids`
(limit orders and the book), `balances` (money: balances, operators' credits), `health` (probes).
Each module exports `OPERATIONS`; `gateway.app` turns them into routes.
"""

from __future__ import annotations

from gateway.operations import Operation
from gateway.routes import accounts, balances, bids, contracts, health, leases, marketplace, nodes

__all__ = ["OPERATIONS"]

# The router tries routes in this order: the busiest (matching, heartbeats) come first.
OPERATIONS: list[Operation] = [
    *marketplace.OPERATIONS,
    *nodes.OPERATIONS,
    *contracts.OPERATIONS,
    *leases.OPERATIONS,
    *bids.OPERATIONS,
    *accounts.OPERATIONS,
    *balances.OPERATIONS,
    *health.OPERATIONS,
]
