"""The node agent's main loop: register, heartbeat, follow the node's contracts, shut down cleanly.

Life of a run:
1. Detect the machine; register it (the `node_id` goes back into the config file atomically) or,
   when the config already names a node, check it still exists, bring it back from maintenance,
   and push any terms the owner changed in the config (price, name, bandwidth, location...).
   An exchange that lost the node (404) gets it registered anew; a node its owner deactivated
   stops the agent with a message (re-registering would undo the owner's decision).
2. Keep one WebSocket to the gateway (reconnecting with capped, jittered exponential backoff),
   subscribed to `node:<id>` and `leases:<id>`; every (re)connect resynchronises the lease record
   from the contract list and the lease servers from the node's lease list, since notices sent
   while away are lost.
   Delivery (`agent.delivery`): each RAM lease gets a Valkey server of its own
   (`agent.lease_server`), opened on `lease_open`, reported ready, metered in every heartbeat
   (`leases`), closed, digested and wiped on `lease_close` or when its contract ended.
3. Heartbeat on the interval the gateway asks for (`next_heartbeat_in_sec`, else the config's),
   with +-10% jitter so a fleet restarted together spreads out, never sooner than the gateway's
   minimum. Over the socket when it is up, else `POST /api/nodes/{id}/heartbeat`. When neither
   works the beat is retried with backoff (capped at the interval) until the gateway returns.
4. On SIGINT/SIGTERM (the caller sets `stop`): `PUT /api/nodes/{id} {"status": "maintenance"}`,
   so renters' matching skips the node at once instead of after three missed heartbeats. The
   lease servers stop with the agent (their data is not kept: the exchange fails the leases over
   when the node goes offline, or a restarted agent serves them afresh, empty).

What a heartbeat reports is `agent.leases.available_gb` per memory kind (see that module).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.client import ApiError, Backoff, Gateway, GatewaySocket, GatewayUnavailable, retrying
from agent.config import AgentConfig, ConfigError, save_node_id
from agent.delivery import Delivery
from agent.detect import GIB, GpuProbe, MachineReading, read_machine, system_metadata
from agent.lease_server import LeaseServers
from agent.leases import LeaseBook, available_gb
from gateway.protocol import (
    Beat,
    BeatResult,
    ContractNotice,
    ContractNoticeKind,
    ContractOut,
    HeartbeatOutcome,
    LeaseNotice,
    PublicEvent,
    TrustNotice,
)

__all__ = ["AgentStopped", "NodeAgent", "advertise_host", "registration_body"]

log = logging.getLogger("mnemo.agent")


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds")


def _log_standing(event: TrustNotice) -> None:
    """Tell the provider watching the agent's log what `node:<id>` says of its standing."""
    score = f"uptime {event.uptime_score:.1f} over {event.uptime_history_windows} h"
    if event.notice == "warned":
        log.warning(
            "node %s is warned (%s, under the threshold): it gets no new leases from %s "
            "unless its uptime recovers by then",
            event.node_id,
            score,
            _when(event.suspension_due_ms),
        )
    elif event.notice == "suspended":
        log.warning(
            "node %s is suspended from new leases (%s); its running leases go on, and it is "
            "reinstated once its uptime recovers",
            event.node_id,
            score,
        )
    else:
        log.info("node %s is %s (%s)", event.node_id, event.notice, score)


JITTER = 0.1
RESYNC_EVERY_S = 600.0
"""Re-read the node's contracts this often even while connected (self-heals a lost notice)."""
LEASE_GRACE_MS = 300_000
"""A lease whose end passed this long ago without an end notice is forgotten."""


class AgentStopped(Exception):
    """The agent cannot go on (key refused, node deactivated by its owner...); `str` says why."""


def registration_body(config: AgentConfig, machine: MachineReading) -> dict[str, Any]:
    """The `POST /api/nodes/register` body for this machine (the spec's fields, plus limits)."""
    metadata = {**system_metadata(machine.gpu), **config.metadata}
    metadata["idle_schedule"] = config.idle_schedule
    body: dict[str, Any] = {
        "node_type": config.node_type,
        "name": config.name,
        "region": config.region,
        "latitude": config.latitude,
        "longitude": config.longitude,
        "total_ram_gb": machine.total_ram_gb,
        "total_vram_gb": machine.total_vram_gb,
        "bandwidth_mbps": config.bandwidth_mbps,
        "base_latency_ms": config.base_latency_ms,
        "price_per_gb_sec": config.price_per_gb_sec,
        "metadata": metadata,
        # The agent serves its RAM leases (agent.delivery): the exchange expects ready reports.
        "delivers": True,
    }
    if config.max_ram_gb is not None:
        body["max_ram_gb"] = min(config.max_ram_gb, machine.total_ram_gb)
    if config.max_vram_gb is not None:
        body["max_vram_gb"] = min(config.max_vram_gb, machine.total_vram_gb)
    return body


def _terms_changes(config: AgentConfig, node: dict[str, Any]) -> dict[str, Any]:
    """Terms in the config that differ from the registered node (what a restart should push)."""
    wanted = {
        "name": config.name,
        "price_per_gb_sec": config.price_per_gb_sec,
        "bandwidth_mbps": config.bandwidth_mbps,
        "base_latency_ms": config.base_latency_ms,
        "latitude": config.latitude,
        "longitude": config.longitude,
    }
    changes: dict[str, Any] = {}
    for key, value in wanted.items():
        current = node.get(key)
        if isinstance(value, float) and isinstance(current, int | float):
            if abs(current - value) <= 1e-12 * max(1.0, abs(value)):
                continue
        elif current == value:
            continue
        changes[key] = value
    if not node.get("delivers", True):
        changes["delivers"] = True  # registered before delivery: say it serves its leases now
    if node.get("metadata", {}).get("idle_schedule") != config.idle_schedule:
        changes["metadata"] = {**node.get("metadata", {}), "idle_schedule": config.idle_schedule}
    return changes


def _clamp(value: float | None, low: float, high: float) -> float | None:
    return None if value is None else min(high, max(low, value))


class NodeAgent:
    """One machine's agent. `await agent.run(stop)` until `stop` is set; see the module docstring.

    `config_path` is where the `node_id` is written back (None: not persisted, e.g. in tests).
    `gpus` and `sample` replace NVML and psutil (tests make the machine's memory steady).
    """

    def __init__(
        self,
        config: AgentConfig,
        config_path: Path | None,
        *,
        gpus: GpuProbe | None = None,
        gateway: Gateway | None = None,
        rng: random.Random | None = None,
        sample: Callable[[GpuProbe], MachineReading] = read_machine,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.node_id: str | None = config.node_id
        self.leases = LeaseBook()
        self.schedule = config.schedule
        self.gateway = gateway or Gateway(config.base_url, config.api_key)
        self._own_gateway = gateway is None
        self._gpus = gpus
        self._own_gpus = gpus is None
        self._rng = rng or random.Random()
        self._read_machine = sample
        self._socket: GatewaySocket | None = None
        self._resync_buffer: list[tuple[ContractNoticeKind, ContractOut]] | None = None
        self._idle: bool | None = None
        self.server_interval_s: float | None = None
        """The node's `heartbeat_interval_sec` at the exchange (offline after missing 3)."""
        self.server_min_interval_s = 0.0
        """The exchange's per-node heartbeat minimum (learned from an HTTP heartbeat reply)."""
        self.beats_sent = 0
        self.last_reply: dict[str, Any] | None = None
        """The last HTTP heartbeat reply (the node's capacity as the exchange sees it)."""
        self.connected = asyncio.Event()
        """Set while the WebSocket is up and subscribed (tests and `status` watch it)."""
        self.notices: list[tuple[ContractNoticeKind, ContractOut]] = []
        """Every contract notice received, in order (bounded to the last 1000)."""
        self.delivery = Delivery(
            self.gateway,
            LeaseServers(
                listen=config.lease_listen,
                advertise_host=config.lease_advertise_host or "127.0.0.1",
                ports=config.lease_port_range,
                tls_cert=config.lease_tls_cert,
                tls_key=config.lease_tls_key,
                lease_dir=config.lease_dir,
            ),
        )
        """The node's lease servers (see `agent.delivery`)."""

    # -- the run -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; raises `AgentStopped` when the agent cannot go on."""
        if self._gpus is None:
            self._gpus = GpuProbe.open()
        if self.config.lease_advertise_host is None:
            self.delivery.servers.advertise_host = await asyncio.to_thread(
                advertise_host, self.config
            )
        connection: asyncio.Task[None] | None = None
        registered = False
        try:
            await self._ensure_registered(stop)
            registered = True
            connection = asyncio.create_task(self._connection_loop(stop), name="agent-ws")
            connection.add_done_callback(_log_failure)
            await self._heartbeat_loop(stop)
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
        finally:
            if connection is not None:
                connection.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connection
            if self._socket is not None:
                await self._socket.close()
                self._socket = None
            await asyncio.shield(self.delivery.aclose())
            if registered and stop.is_set():
                await asyncio.shield(self._enter_maintenance())
            if self._own_gateway:
                await self.gateway.aclose()
            if self._own_gpus and self._gpus is not None:
                self._gpus.close()

    # -- registration ------------------------------------------------------------------------

    def _sample(self) -> MachineReading:
        assert self._gpus is not None
        return self._read_machine(self._gpus)

    async def _ensure_registered(self, stop: asyncio.Event) -> None:
        if self.node_id is not None:
            try:
                node = await retrying("checking the node", lambda: self._get_node(), stop=stop)
            except ApiError as exc:
                if exc.status == 404:
                    log.warning(
                        "the exchange does not know node %s; registering anew", self.node_id
                    )
                    self.node_id = None
                else:
                    raise AgentStopped(f"node {self.node_id}: {exc}") from None
            else:
                await self._resume(node, stop)
                return
        machine = self._sample()
        body = registration_body(self.config, machine)
        log.info(
            "registering %s: %d GB RAM, %d GB VRAM (%s) in %s",
            self.config.name,
            machine.total_ram_gb,
            machine.total_vram_gb,
            machine.gpu.model or "no GPU",
            self.config.region,
        )
        try:
            key = f"register-{uuid.uuid4().hex}"  # one key for all retries of this registration
            node_id, node = await retrying(
                "registering",
                lambda: self.gateway.register_node(body, idempotency_key=key),
                stop=stop,
            )
        except ApiError as exc:
            raise AgentStopped(f"registration refused: {exc}") from None
        self.node_id = node_id
        self.server_interval_s = float(node.get("heartbeat_interval_sec") or 0) or None
        if self.config_path is not None:
            try:
                save_node_id(self.config_path, node_id)
            except (OSError, ConfigError) as exc:
                # Going on would register this machine again at the next start.
                raise AgentStopped(
                    f"registered node {node_id} but could not record it in "
                    f'{self.config_path} ({exc}); add "node_id": "{node_id}" to the file'
                ) from None
            log.info("registered node %s (saved to %s)", node_id, self.config_path)
        else:
            log.info("registered node %s", node_id)

    async def _get_node(self) -> dict[str, Any]:
        assert self.node_id is not None
        return await self.gateway.get_node(self.node_id)

    async def _resume(self, node: dict[str, Any], stop: asyncio.Event) -> None:
        assert self.node_id is not None
        node_id = self.node_id
        self.server_interval_s = float(node.get("heartbeat_interval_sec") or 0) or None
        if node.get("status") == "deactivated":
            raise AgentStopped(
                f"node {node_id} was deactivated by its owner; remove `node_id` from "
                f"{self.config_path or 'the config'} to register this machine anew"
            )
        changes = _terms_changes(self.config, node)
        if node.get("status") == "maintenance":
            changes["status"] = "active"
        if changes:
            log.info("updating node %s: %s", node_id, ", ".join(sorted(changes)))
            try:
                await retrying(
                    "updating the node",
                    lambda: self.gateway.update_node(node_id, changes),
                    stop=stop,
                )
            except ApiError as exc:
                raise AgentStopped(f"node {node_id}: update refused: {exc}") from None
        log.info("resuming node %s (%s)", node_id, self.config.name)

    async def _enter_maintenance(self) -> None:
        if self.node_id is None:
            return
        node_id = self.node_id
        try:
            async with asyncio.timeout(10):
                await retrying(
                    "entering maintenance",
                    lambda: self.gateway.update_node(node_id, {"status": "maintenance"}),
                    backoff=Backoff(0.5, 2.0),
                    attempts=3,
                )
            log.info("node %s set to maintenance", node_id)
        except (ApiError, GatewayUnavailable, TimeoutError) as exc:
            # The node will go offline after missed heartbeats instead; nothing is lost.
            log.warning("could not set node %s to maintenance: %s", node_id, exc)

    # -- the socket and the lease record -----------------------------------------------------

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(1.0, 60.0)
        while not stop.is_set():
            socket: GatewaySocket | None = None
            try:
                socket = await GatewaySocket.open(
                    self.config.base_url, self.config.api_key, on_event=self._on_event
                )
                await socket.subscribe([f"node:{self.node_id}"])
                if self.delivery.enabled:
                    try:
                        await socket.subscribe([f"leases:{self.node_id}"])
                    except ApiError as exc:  # an exchange without delivery
                        self.delivery.enabled = False
                        log.warning("lease orders refused (%s): serving no leases", exc)
                await self._resync()
                self._socket = socket
                self.connected.set()
                backoff.reset()
                log.info("connected to %s", self.config.base_url)
                while not stop.is_set() and socket.is_open:
                    closed = await _first(socket.closed, stop, timeout_s=RESYNC_EVERY_S)
                    if closed is None and not stop.is_set():
                        await self._resync()
                if socket.closed.done():
                    log.warning("gateway socket lost: %s", socket.closed.result())
            except (GatewayUnavailable, ApiError) as exc:
                log.warning("gateway socket: %s", exc)
            finally:
                self.connected.clear()
                self._socket = None
                if socket is not None:
                    await socket.close()
            if stop.is_set():
                return
            delay = backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _resync(self) -> None:
        """Reset the lease record from the gateway's list of the node's active contracts."""
        assert self.node_id is not None
        self._resync_buffer = []
        try:
            contracts = await self.gateway.node_contracts(self.node_id)
            self.leases.replace(contracts)
            # Notices that arrived while the list was being read are newer than the list.
            for notice, contract in self._resync_buffer:
                self.leases.apply(notice, contract)
        finally:
            self._resync_buffer = None
        try:
            await self.delivery.resync(self.node_id)
        except ApiError as exc:
            log.warning("could not list the node's leases: %s", exc)
        log.debug(
            "lease record: %d contracts, %d GB RAM + %d GB VRAM leased",
            len(self.leases),
            self.leases.leased_ram_gb,
            self.leases.leased_vram_gb,
        )

    def _on_event(self, channel: str, event: PublicEvent) -> None:
        if isinstance(event, LeaseNotice) and self.node_id is not None:
            if channel == f"leases:{self.node_id}":
                self.delivery.on_lease_notice(self.node_id, event)
            return
        if isinstance(event, TrustNotice):
            _log_standing(event)
            return
        if not isinstance(event, ContractNotice):
            return
        notice, contract = event.notice, event.contract
        if self._resync_buffer is not None:
            self._resync_buffer.append((notice, contract))
        if self.node_id is not None:
            self.delivery.on_contract_notice(self.node_id, notice, contract)
        lease = self.leases.apply(notice, contract)
        self.notices.append((notice, contract))
        del self.notices[:-1000]
        log.info(
            "%s: %s (%d GB RAM + %d GB VRAM, ends %s); leased now %d GB RAM + %d GB VRAM",
            notice.replace("_", " "),
            lease.contract_id,
            lease.ram_gb,
            lease.vram_gb,
            datetime.fromtimestamp(lease.end_ms / 1000).isoformat(timespec="seconds")
            if lease.end_ms
            else "?",
            self.leases.leased_ram_gb,
            self.leases.leased_vram_gb,
        )

    # -- heartbeats --------------------------------------------------------------------------

    def _local_now(self) -> datetime:
        zone = self.config.zone
        return datetime.now(zone) if zone is not None else datetime.now().astimezone()

    def make_beat(self) -> Beat:
        """Sample the machine and build this instant's heartbeat (see `agent.leases`)."""
        assert self.node_id is not None
        machine = self._sample()
        local = self._local_now()
        idle = self.schedule.is_idle_at(local)
        if idle != self._idle:
            if self._idle is not None or not idle:
                minute = local.hour * 60 + local.minute
                left = self.schedule.minutes_until_change(minute)
                until = f" for {left // 60}h{left % 60:02d}" if left is not None else ""
                log.info(
                    "%s the idle schedule '%s': %s%s",
                    "inside" if idle else "outside",
                    self.config.idle_schedule,
                    "lending" if idle else "offering nothing",
                    until,
                )
            self._idle = idle
        self.leases.prune(int(time.time() * 1000), LEASE_GRACE_MS)
        gpu = machine.gpu
        meters = self.delivery.meters(self.node_id)
        return Beat(
            node_id=self.node_id,
            available_ram_gb=available_gb(
                machine.free_ram_gb,
                self.config.max_ram_gb,
                self.leases.leased_ram_gb,
                idle=idle,
                held_gb=self.delivery.used_bytes(self.node_id) // GIB,
            ),
            available_vram_gb=available_gb(
                machine.free_vram_gb, self.config.max_vram_gb, self.leases.leased_vram_gb, idle=idle
            ),
            cpu_usage_pct=_clamp(machine.cpu_usage_pct, 0.0, 100.0),
            gpu_usage_pct=_clamp(gpu.usage_pct, 0.0, 100.0),
            temperature_c=None
            if gpu.temperature_c is None
            else min(200, max(-100, gpu.temperature_c)),
            latitude=self.config.latitude,
            longitude=self.config.longitude,
            leases=meters or None,
        )

    async def _send_beat(self, beat: Beat) -> BeatResult | None:
        """The gateway's verdict on `beat`; None when it refused it for a reason no outcome
        names (logged)."""
        assert self.node_id is not None
        socket = self._socket
        if socket is not None and socket.is_open:
            try:
                results = await socket.heartbeat([beat])
            except GatewayUnavailable as exc:
                log.info("heartbeat over the socket failed (%s); falling back to HTTP", exc)
            else:
                for result in results:
                    if result.node_id == self.node_id:
                        return result
                log.warning("heartbeat ack without this node; falling back to HTTP")
        try:
            reply = await self.gateway.heartbeat(self.node_id, beat.body())
        except ApiError as exc:
            outcome = _outcome_of(exc)
            if outcome is None:
                return None
            return BeatResult(self.node_id, outcome, int((exc.retry_after_s or 0) * 1000))
        self.last_reply = reply
        self.server_interval_s = float(reply.get("next_heartbeat_in_sec") or 0) or None
        self.server_min_interval_s = float(reply.get("min_interval_sec") or 0)
        return BeatResult(self.node_id, "ok")

    def _interval_s(self) -> float:
        """The config's interval, kept within what the exchange asks: no slower than the node's
        `heartbeat_interval_sec` (it counts missed beats against that), no faster than its
        minimum; then jittered."""
        base = self.config.heartbeat_interval
        if self.server_interval_s:
            base = min(base, self.server_interval_s)
        low = self.server_min_interval_s * (1 + JITTER) + 0.5
        return max(low, base * self._rng.uniform(1 - JITTER, 1 + JITTER))

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(1.0, min(30.0, self.config.heartbeat_interval))
        while not stop.is_set():
            await self.delivery.refresh()
            beat = self.make_beat()
            try:
                outcome = await self._send_beat(beat)
            except GatewayUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("heartbeat failed (%s); retrying in %.1f s", exc, delay)
                await _sleep(stop, delay)
                continue
            backoff.reset()
            if outcome is None:
                await _sleep(stop, self.config.heartbeat_interval)
                continue
            match outcome.outcome:
                case "ok":
                    self.beats_sent += 1
                    log.debug(
                        "heartbeat: %d GB RAM, %d GB VRAM available",
                        beat.available_ram_gb,
                        beat.available_vram_gb,
                    )
                    delay = self._interval_s()
                case "too_soon":
                    delay = max(outcome.retry_after_ms / 1000, 1.0) + self._rng.uniform(0, 1)
                    log.info("heartbeat too soon; next in %.1f s", delay)
                case "not_found":
                    log.warning(
                        "the exchange no longer knows node %s; registering anew", self.node_id
                    )
                    self.node_id = None
                    await self._ensure_registered(stop)
                    await self._reconnect()
                    continue
                case "deactivated":
                    raise AgentStopped(
                        f"node {self.node_id} was deactivated; remove `node_id` from "
                        f"{self.config_path or 'the config'} to register anew"
                    )
                case "forbidden":
                    raise AgentStopped(f"the API key does not own node {self.node_id}")
            await _sleep(stop, delay)

    async def _reconnect(self) -> None:
        if self._socket is not None:
            await self._socket.close()  # the connection loop reconnects with the new node id


def advertise_host(config: AgentConfig) -> str:
    """The host renters dial when `lease_advertise_host` is unset: the `lease_listen` address
    when it names one, else this machine's address on its route to the exchange (no packet
    is sent), else 127.0.0.1."""
    if config.lease_listen not in ("0.0.0.0", "::"):
        return config.lease_listen
    host = urlsplit(config.api_url).hostname or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, 80, type=socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _log_failure(task: asyncio.Task[Any]) -> None:
    # Nobody awaits the socket task until shutdown: say at once if it died (heartbeats go on
    # over HTTP, but notices stop).
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("the gateway socket task failed; contract notices stop", exc_info=exc)


def _outcome_of(exc: ApiError) -> HeartbeatOutcome | None:
    """The outcome the socket would have answered for the REST route's refusal (None: none)."""
    if exc.status == 429:
        return "too_soon"
    if exc.status == 404:
        return "not_found"
    if exc.status in (401, 403):
        return "forbidden"
    if exc.status == 409 and "deactivated" in exc.message:
        return "deactivated"
    log.error("heartbeat refused: %s; trying again at the next interval", exc)
    return None


async def _sleep(stop: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay_s)


async def _first(
    closed: asyncio.Future[str], stop: asyncio.Event, *, timeout_s: float
) -> str | None:
    """Wait for the socket to close or `stop`; the close reason, or None on timeout/stop."""
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    waiting: set[asyncio.Future[Any]] = {closed, stopper}
    try:
        done, _ = await asyncio.wait(
            waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopper.cancel()
    if closed in done:
        return closed.result()
    return None
