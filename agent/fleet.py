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
from agent.population import make_fleet
from agent.registration import REGISTER_BATCH, register_fleet
from agent.repricer import run_repricer
from agent.shards import FleetStats, Link, Shard
from agent.simulation import Fleet
from gateway.protocol import ContractNotice, PublicEvent

__all__ = ["drive_fleet", "run_fleet"]

log = logging.getLogger("mnemo.agent.fleet")


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
) -> FleetStats:
    """Heartbeat every node of `fleet` every `interval_s` until `stop`; returns the counters.

    `min_gap_s` (default 0.9 x interval) is the least time between two beats of one node: set it
    at or above the gateway's per-node minimum. `notices` (default: on up to 2,560 nodes)
    subscribes each node's `node:<id>` channel, `channels_per_socket` per extra connection (the
    gateway's per-socket limit), to keep the nodes' lease totals.
    """
    if min_gap_s is None:
        min_gap_s = 0.9 * interval_s
    if min_gap_s > interval_s:
        raise ValueError("min_gap_s must not exceed interval_s")
    if notices is None:
        notices = len(fleet.ids) <= 10 * channels_per_socket
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

    def on_notice(channel: str, event: PublicEvent) -> None:
        if channel.startswith("node:") and isinstance(event, ContractNotice):
            stats.notices[event.notice] += 1
            fleet.apply_notice(channel[5:], event.notice, event.contract)

    links = [shard.link for shard in shards]
    if notices:
        channels = [f"node:{node_id}" for node_id in fleet.ids]
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
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return stats


class _FleetState(msgspec.Struct):
    api_url: str
    api_key: str
    seed: int
    n: int
    regions: list[str] | None
    node_ids: list[str]


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
) -> FleetStats:
    """Sign up (unless `api_key`), register N virtual nodes, and drive them until `stop`.

    `state_path` keeps the account key and node ids, so a restart with the same `seed`, `n` and
    `regions` resumes the same fleet instead of registering a new one.
    """
    nodes = make_fleet(n, seed=seed, regions=regions)
    state = _load_state(state_path, api_url, api_key, seed, n, regions)
    key: str | None = api_key or (state.api_key if state else None)
    async with Gateway(api_url, key, max_connections=max(4, concurrency)) as gateway:
        if state is not None:
            node_ids = state.node_ids
            key = state.api_key
            log.info("resuming %d virtual nodes from %s", len(node_ids), state_path)
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
            )
            elapsed = time.perf_counter() - started
            log.info("registered %d nodes in %.1f s (%.0f/s)", n, elapsed, n / max(elapsed, 1e-9))
            if state_path is not None:
                regions_list = list(regions) if regions else None
                _save_state(
                    state_path, _FleetState(gateway.api_url, key, seed, n, regions_list, node_ids)
                )
        fleet = Fleet(nodes, node_ids, seed=seed, churn=churn, reprice_per_beat=reprice_per_beat)
        stats = FleetStats()
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
            )
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    return stats


async def _report(stats: FleetStats, stop: asyncio.Event, every_s: float) -> None:
    last_sent, last_t = 0, time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        now = time.monotonic()
        rate = (stats.sent - last_sent) / max(now - last_t, 1e-9)
        last_sent, last_t = stats.sent, now
        log.info("fleet: %.0f beats/s; %s", rate, stats.snapshot())
