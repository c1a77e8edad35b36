"""The repricer: PUTs the new ask of the simulated nodes that repriced.

The model (`agent.simulation.Fleet`) only queues such nodes in `repricing`; this drains the queue
over HTTP, a trickle of one request at a time (a node reprices about once in 500 beats).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agent.client import ApiError, Gateway, GatewayUnavailable
from agent.shards import FleetStats
from agent.simulation import Fleet

__all__ = ["run_repricer"]

# One logger for the whole simulator, whichever of its modules speaks (as before the split).
log = logging.getLogger("mnemo.agent.fleet")


async def run_repricer(
    gateway: Gateway, fleet: Fleet, stats: FleetStats, stop: asyncio.Event
) -> None:
    """PUT the new ask of nodes that repriced (a trickle: one request at a time)."""
    while not stop.is_set():
        while fleet.repricing and not stop.is_set():
            i = fleet.repricing.pop()
            try:
                await gateway.update_node(fleet.ids[i], {"price_per_gb_sec": fleet.price[i]})
                stats.repriced += 1
            except (ApiError, GatewayUnavailable) as exc:
                log.debug("repricing %s: %s", fleet.ids[i], exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
