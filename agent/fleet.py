"""A simulated fleet: N virtual nodes driven over a few WebSocket connections by one process.

For demos (a newcomer sees a live market) and load (the gateway benchmark's traffic source). This
module wires the parts, as `mnemo-agent --simulate N` runs them:

- `agent.metros`: where supply sits (metros of each region, weighted);
- `agent.population`: N virtual nodes generated from a seed (`make_fleet`);
- `agent.registration`: registering them with the gateway (`register_fleet`, by batches);
- `agent.simulation`: the model of what each node reports, interval by interval (`Fleet`);
- `agent.shards`: the reconnecting connections that send the beats, and their counters;
- `agent.repricer`: PUTting the new asks of nodes that repriced.

`drive_fleet` heartbeats a registered fleet (with notices on, it also subscribes each node's
`node:<id>` channel to keep its lease totals); `run_fleet` signs up, registers (or resumes a
saved fleet) and drives.

Delivery: with notices on and `lease_servers` > 0, the fleet also subscribes each node's
`leases:<id>` and serves its RAM leases as a real node does (`agent.delivery`): a real Valkey
server per lease on this machine, on 127.0.0.1 by default, at most `lease_servers` at once. A
virtual node's memory is imaginary, so its servers are scaled down: `lease_mib_per_gb` MiB per
leased GB (default 1: a 64 GB lease holds 64 MiB), at most `SIM_MAX_LEASE_BYTES` each; the
ready report says so (`LeaseReady.maxmemory_bytes`). With the cap reached a lease gets no
server and no ready report, so the exchange's readiness deadline fails it over (or fails it)
and its renter is not charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from agent.client import Gateway, retrying
from agent.delivery import Delivery
from agent.lease_server import LeaseServers
from agent.population import make_fleet
from agent.registration import REGISTER_BATCH, register_fleet
from agent.repricer import run_repricer
from agent.shards import FleetStats, Link, Shard
from agent.simulation import Fleet
from gateway.protocol import ContractNotice, LeaseNotice, PublicEvent

__all__ = [
    "SIM_MAX_LEASE_BYTES",
    "drive_fleet",
    "fleet_delivery",
    "follows_notices",
    "run_fleet",
]

log = logging.getLogger("mnemo.agent.fleet")

SIM_MAX_LEASE_BYTES = 256 << 20
"""The most memory one simulated lease's server may hold, whatever its size in GB."""
METER_EVERY_S = 5.0
"""How often the fleet reads its lease servers' meters (each beat carries the last reading)."""


def follows_notices(n: int, channels_per_socket: int = 256) -> bool:
    """Whether a fleet of `n` nodes follows its nodes' channels by default."""
    return n <= 10 * channels_per_socket


def fleet_delivery(
    gateway: Gateway,
    *,
    lease_servers: int = 16,
    lease_mib_per_gb: int = 1,
    lease_ports: range = range(17000, 18000),
    lease_host: str = "127.0.0.1",
) -> Delivery:
    """The delivery of a simulated fleet: at most `lease_servers` real lease servers on
    `lease_host`, scaled to `lease_mib_per_gb` MiB per leased GB (see the module docstring)."""
    servers = LeaseServers(
        listen=lease_host,
        advertise_host=lease_host,
        ports=lease_ports,
        max_servers=lease_servers,
    )
    return Delivery(
        gateway,
        servers,
        bytes_per_gb=lease_mib_per_gb << 20,
        max_lease_bytes=SIM_MAX_LEASE_BYTES,
    )


async def drive_fleet(
    fleet: Fleet,
    *,
    api_url: str,
    api_key: str,
    stop: asyncio.Event,
    interval_s: float = 60.0,
    min_gap_s: float | None = None,
    tick_s: float = 0.25,
    nodes_per_connection: int = 25_000,
    batch: int = 1000,
    notices: bool | None = None,
    channels_per_socket: int = 256,
    stats: FleetStats | None = None,
    gateway: Gateway | None = None,
    delivery: Delivery | None = None,
) -> FleetStats:
    """Heartbeat every node of `fleet` every `interval_s` until `stop`; returns the counters.

    `min_gap_s` (default 0.9 x interval) is the least time between two beats of one node: set it
    at or above the gateway's per-node minimum. `notices` (default: on up to 2,560 nodes)
    subscribes each node's `node:<id>` channel, `channels_per_socket` per extra connection (the
    gateway's per-socket limit), to keep the nodes' lease totals; with `delivery` also each
    node's `leases:<id>`, whose orders it carries out (and `delivery` is closed at the end).
    """
    if min_gap_s is None:
        min_gap_s = 0.9 * interval_s
    if min_gap_s > interval_s:
        raise ValueError("min_gap_s must not exceed interval_s")
    if notices is None:
        notices = follows_notices(len(fleet.ids), channels_per_socket)
    stats = stats or FleetStats()
    rng = random.Random(len(fleet.ids))
    order = list(range(len(fleet.ids)))
    last_sent = [-math.inf] * len(fleet.ids)
    per = max(1, nodes_per_connection)
    shards = [
        Shard(
            k,
            fleet,
            order[lo : lo + per],
            api_url=api_url,
            api_key=api_key,
            interval_s=interval_s,
            min_gap_s=min_gap_s,
            tick_s=tick_s,
            batch=batch,
            stats=stats,
            rng=rng,
            last_sent=last_sent,
        )
        for k, lo in enumerate(range(0, len(order), per))
    ]

    if delivery is not None and not notices:
        log.warning("the fleet delivers no leases: it does not follow its nodes' channels")
        delivery = None

    def on_notice(channel: str, event: PublicEvent) -> None:
        if channel.startswith("node:") and isinstance(event, ContractNotice):
            stats.notices[event.notice] += 1
            fleet.apply_notice(channel[5:], event.notice, event.contract)
            if delivery is not None:
                delivery.on_contract_notice(channel[5:], event.notice, event.contract)
        elif channel.startswith("leases:") and isinstance(event, LeaseNotice):
            stats.notices[event.notice] += 1
            if delivery is not None:
                delivery.on_lease_notice(channel[7:], event)

    links = [shard.link for shard in shards]
    if notices:
        channels = [f"node:{node_id}" for node_id in fleet.ids]
        if delivery is not None:
            channels += [f"leases:{node_id}" for node_id in fleet.ids]
        for k, lo in enumerate(range(0, len(channels), channels_per_socket)):
            links.append(
                Link(
                    f"fleet notices {k}",
                    api_url=api_url,
                    api_key=api_key,
                    channels=channels[lo : lo + channels_per_socket],
                    stats=stats,
                    on_event=on_notice,
                )
            )
    # Schedules change by the minute: compute every group's state once per second, not per node.
    cache: dict[str, Any] = {"at": 0.0, "idle": fleet.idle_now(datetime.now(UTC))}

    def idle_of() -> list[bool]:
        now = time.monotonic()
        if now - cache["at"] >= 1.0:
            cache["at"] = now
            cache["idle"] = fleet.idle_now(datetime.now(UTC))
        return cache["idle"]

    tasks: list[asyncio.Task[Any]] = []
    for link in links:
        tasks.append(asyncio.create_task(link.run(stop), name=link.name))
    for shard in shards:
        tasks.append(
            asyncio.create_task(
                shard.beat_loop(stop, idle_of, shard.number / len(shards)),
                name=f"fleet-hb-{shard.number}",
            )
        )
    if gateway is not None and fleet.reprice_per_beat:
        tasks.append(
            asyncio.create_task(run_repricer(gateway, fleet, stats, stop), name="fleet-price")
        )
    if delivery is not None:
        tasks.append(asyncio.create_task(_meter(fleet, delivery, stop), name="fleet-meter"))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if delivery is not None:
            await asyncio.shield(delivery.aclose())
    return stats


async def _meter(fleet: Fleet, delivery: Delivery, stop: asyncio.Event) -> None:
    """Read the lease servers' meters every few seconds into the beats' `leases`."""
    while not stop.is_set():
        await delivery.refresh()
        index = fleet.index
        fleet.lease_meters = {
            index[node_id]: delivery.meters(node_id)
            for node_id in delivery.nodes()
            if node_id in index
        }
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), METER_EVERY_S)


class _FleetState(msgspec.Struct):
    api_url: str
    api_key: str
    seed: int
    n: int
    regions: list[str] | None
    node_ids: list[str]
    delivers: bool = False


def _load_state(
    path: Path | None,
    api_url: str,
    api_key: str | None,
    seed: int,
    n: int,
    regions: Sequence[str] | None,
) -> _FleetState | None:
    """The saved fleet at `path` if it is this fleet (same gateway, seed, size, regions, key)."""
    if path is None or not path.exists():
        return None
    try:
        state = msgspec.json.decode(path.read_bytes(), type=_FleetState)
    except (msgspec.DecodeError, OSError) as exc:
        log.warning("ignoring fleet state %s: %s", path, exc)
        return None
    if (
        state.api_url != api_url.rstrip("/")
        or state.seed != seed
        or state.n != n
        or state.regions != (list(regions) if regions else None)
        or (api_key is not None and api_key != state.api_key)
    ):
        log.info("fleet state in %s is for another fleet; starting anew", path)
        return None
    return state


def _save_state(path: Path, state: _FleetState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    tmp.chmod(0o600)  # holds the fleet account's API key
    tmp.replace(path)


async def run_fleet(
    api_url: str,
    n: int,
    *,
    stop: asyncio.Event,
    api_key: str | None = None,
    seed: int = 0,
    regions: Sequence[str] | None = None,
    interval_s: float = 60.0,
    min_gap_s: float | None = None,
    concurrency: int = 32,
    nodes_per_connection: int = 25_000,
    notices: bool | None = None,
    churn: bool = True,
    reprice_per_beat: float = 0.002,
    state_path: Path | None = None,
    report_every_s: float = 30.0,
    lease_servers: int = 16,
    lease_mib_per_gb: int = 1,
    lease_ports: range = range(17000, 18000),
    lease_host: str = "127.0.0.1",
) -> FleetStats:
    """Sign up (unless `api_key`), register N virtual nodes, and drive them until `stop`.

    `state_path` keeps the account key and node ids, so a restart with the same `seed`, `n` and
    `regions` resumes the same fleet instead of registering a new one. `lease_*`: the fleet's
    delivery (module docstring; `lease_servers=0` delivers nothing).
    """
    nodes = make_fleet(n, seed=seed, regions=regions)
    # Only a fleet that follows its nodes' channels hears lease orders, so only it delivers.
    delivering = lease_servers > 0 and (notices if notices is not None else follows_notices(n))
    state = _load_state(state_path, api_url, api_key, seed, n, regions)
    key: str | None = api_key or (state.api_key if state else None)
    async with Gateway(api_url, key, max_connections=max(4, concurrency)) as gateway:
        if state is not None:
            node_ids = state.node_ids
            key = state.api_key
            log.info("resuming %d virtual nodes from %s", len(node_ids), state_path)
            if state.delivers != delivering and state_path is not None:
                await _set_delivers(gateway, node_ids, delivering, concurrency, stop)
                state.delivers = delivering
                _save_state(state_path, state)
        else:
            if api_key is None:
                email = f"fleet-{uuid.uuid4().hex[:12]}@example.com"
                password = uuid.uuid4().hex
                await retrying(
                    "signing up the fleet's provider account",
                    lambda: gateway.signup(
                        email, password, role="provider", organization="Simulated fleet"
                    ),
                    stop=stop,
                )
                log.info("signed up the fleet's provider account %s", email)
            key = gateway.api_key
            assert key is not None
            log.info("registering %d virtual nodes (batches of %d)", n, REGISTER_BATCH)
            started = time.perf_counter()
            node_ids = await register_fleet(
                gateway,
                nodes,
                concurrency=concurrency,
                stop=stop,
                progress=lambda done, s: log.info("registered %d nodes (%.0f/s)", done, done / s),
                delivers=delivering,
            )
            elapsed = time.perf_counter() - started
            log.info("registered %d nodes in %.1f s (%.0f/s)", n, elapsed, n / max(elapsed, 1e-9))
            if state_path is not None:
                regions_list = list(regions) if regions else None
                _save_state(
                    state_path,
                    _FleetState(
                        gateway.api_url,
                        key,
                        seed,
                        n,
                        regions_list,
                        node_ids,
                        delivers=delivering,
                    ),
                )
        fleet = Fleet(nodes, node_ids, seed=seed, churn=churn, reprice_per_beat=reprice_per_beat)
        stats = FleetStats()
        delivery = None
        if delivering:
            delivery = fleet_delivery(
                gateway,
                lease_servers=lease_servers,
                lease_mib_per_gb=lease_mib_per_gb,
                lease_ports=lease_ports,
                lease_host=lease_host,
            )
        reporter = asyncio.create_task(_report(stats, stop, report_every_s))
        try:
            log.info(
                "driving %d nodes: one beat each per %.0f s over %d connection(s)",
                n,
                interval_s,
                math.ceil(n / nodes_per_connection),
            )
            await drive_fleet(
                fleet,
                api_url=api_url,
                api_key=key,
                stop=stop,
                interval_s=interval_s,
                min_gap_s=min_gap_s,
                nodes_per_connection=nodes_per_connection,
                notices=notices,
                stats=stats,
                gateway=gateway,
                delivery=delivery,
            )
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    return stats


async def _set_delivers(
    gateway: Gateway, node_ids: list[str], delivers: bool, concurrency: int, stop: asyncio.Event
) -> None:
    """Tell the exchange whether a resumed fleet's nodes serve their RAM leases now."""
    log.info("marking %d resumed nodes delivers=%s", len(node_ids), delivers)
    todo = iter(node_ids)

    async def worker() -> None:
        for node_id in todo:
            await retrying(
                "updating a virtual node",
                lambda: gateway.update_node(node_id, {"delivers": delivers}),  # noqa: B023
                stop=stop,
            )

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, 8)))))


async def _report(stats: FleetStats, stop: asyncio.Event, every_s: float) -> None:
    last_sent, last_t = 0, time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        now = time.monotonic()
        rate = (stats.sent - last_sent) / max(now - last_t, 1e-9)
        last_sent, last_t = stats.sent, now
        log.info("fleet: %.0f beats/s; %s", rate, stats.snapshot())
