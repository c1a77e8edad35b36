"""Delivery: the exchange's orders to a node's agent, carried out on its lease servers.

`Delivery` serves the RAM leases of the nodes of one owner (one node for `NodeAgent`, many for
the simulated fleet) through one `LeaseServers`:

- open: on `lease_open` (channel `leases:<node_id>`), or at a resync (`GET /api/nodes/{id}/leases`
  on every (re)connect and periodically) for a lease `pending` or `ready` that has no server here
  (after an agent restart its server died with the agent: it is started fresh, empty, and
  reported ready again). Fetch the credentials, start the server, `POST .../ready`. A 409 (the
  lease failed or closed meanwhile) stops the server again. A VRAM lease is reserved, not
  delivered: it gets no server.
- close: on `lease_close`, on `contract_ended` / `contract_failed_over` (channel `node:<id>`), on
  a resync that lists it `closed`/`failed` or no longer lists it, or when its end passed
  `END_GRACE_MS` ago (found at the resync that a passed end triggers): close the server (final
  meter, digest, stop, wipe; `LeaseServer.close`), then `POST .../closed`. Only then can the exchange
  settle and offer the capacity again.
- meter: `refresh()` reads every server's meter (before each heartbeat); `meters(node_id)` is the
  heartbeat's `leases`. A server that died by itself is started again, empty, on a new port and
  reported ready again; its meter carries on from what the dead one had measured, so a lease's
  meter never goes down while this process lives (a restarted agent starts from 0).

With `max_servers` reached a lease is not served: the agent reports nothing, so the exchange's
readiness deadline fails it over (or fails it) and the renter is not charged. A later resync
serves it if a server freed up meanwhile and the lease is still pending.

Every order runs in a task of its own, one at a time per lease; failures are logged, never
raised into the caller (notices come from the WebSocket reader).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.client import ApiError, Backoff, Gateway, GatewayUnavailable, retrying
from agent.lease_server import GIB, LeaseServer, LeaseServerError, LeaseServers, LeaseSpec
from gateway.protocol import (
    ContractNoticeKind,
    ContractOut,
    LeaseClosed,
    LeaseEndpoint,
    LeaseMeter,
    LeaseNotice,
    LeaseReady,
)

__all__ = ["Delivery"]

log = logging.getLogger("mnemo.agent.delivery")

T = TypeVar("T")

END_GRACE_MS = 15_000
"""A lease whose end passed this long ago without a close order makes the agent ask the
exchange (a resync of its node); a lease the exchange no longer lists is then closed."""
RESYNC_GAP_S = 10.0
"""The least time between two end-triggered resyncs of one node."""
CALL_ATTEMPTS = 5


@dataclass
class _Lease:
    contract_id: str
    node_id: str
    ram_gb: int
    expires_ms: int
    server: LeaseServer | None = None
    closed: LeaseClosed | None = None
    egress_base: int = 0
    peak_base: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def meter(self) -> LeaseMeter:
        egress, peak = self.egress_base, self.peak_base
        if self.server is not None:
            egress += self.server.egress_bytes
            peak = max(peak, self.server.peak_memory_bytes)
        return LeaseMeter(contract_id=self.contract_id, egress_bytes=egress, peak_memory_bytes=peak)


class Delivery:
    """The lease servers of one owner's nodes, kept in step with the exchange.

    `bytes_per_gb` is the memory a lease server gets per leased GB: `GIB` on a real node; the
    simulated fleet scales it down (its leases are not backed by the memory they name), and
    caps each server at `max_lease_bytes`.
    """

    def __init__(
        self,
        gateway: Gateway,
        servers: LeaseServers,
        *,
        bytes_per_gb: int = GIB,
        max_lease_bytes: int | None = None,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.gateway = gateway
        self.servers = servers
        self.bytes_per_gb = bytes_per_gb
        self.max_lease_bytes = max_lease_bytes
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))
        self._leases: dict[str, _Lease] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_resync: dict[str, float] = {}
        self._ended: dict[str, None] = {}
        """Leases closed here (the last 10,000): a stale listing never serves them again."""
        self.enabled = True
        """False once the exchange showed it does not deliver (no lease routes): nothing runs."""
        self.ready_s: list[float] = []
        """Start-to-ready seconds of every server started (the last 1000)."""
        self.refused_full = 0
        """Leases not served because the cap of servers was reached."""

    # -- what the heartbeat reads ----------------------------------------------------------

    def meters(self, node_id: str) -> list[LeaseMeter]:
        """The meter of every lease of `node_id` this agent serves (the heartbeat's `leases`)."""
        return [
            lease.meter()
            for lease in self._leases.values()
            if lease.node_id == node_id and lease.server is not None and lease.closed is None
        ]

    def used_bytes(self, node_id: str) -> int:
        """Memory the node's lease servers hold for their leases' data, each at most its lease's
        size (the capacity rule in `agent.leases`)."""
        total = 0
        for lease in self._leases.values():
            server = lease.server
            if lease.node_id == node_id and server is not None and lease.closed is None:
                held = max(0, server.rss_bytes - server.baseline_rss_bytes)
                total += min(held, server.spec.maxmemory_bytes)
        return total

    def lease_bytes(self, ram_gb: int) -> int:
        """The memory a lease of `ram_gb` GB gets on this agent's servers."""
        size = ram_gb * self.bytes_per_gb
        return size if self.max_lease_bytes is None else min(size, self.max_lease_bytes)

    def nodes(self) -> set[str]:
        """The nodes with a lease server running here."""
        return {
            lease.node_id
            for lease in self._leases.values()
            if lease.server is not None and lease.closed is None
        }

    def serving(self, contract_id: str) -> LeaseServer | None:
        lease = self._leases.get(contract_id)
        return None if lease is None or lease.closed is not None else lease.server

    # -- orders ----------------------------------------------------------------------------

    def on_lease_notice(self, node_id: str, event: LeaseNotice) -> None:
        """An order on `leases:<node_id>`."""
        endpoint = event.lease
        if endpoint.node_id != node_id:
            return
        match event.notice:
            case "lease_open":
                self._spawn(self.open(endpoint), f"open {endpoint.contract_id}")
            case "lease_close" | "lease_failed" | "lease_closed":
                self._spawn(self.close(endpoint.contract_id), f"close {endpoint.contract_id}")
            case "lease_ready" | "lease_moved":
                pass

    def on_contract_notice(
        self, node_id: str, notice: ContractNoticeKind, contract: ContractOut
    ) -> None:
        """A contract notice on `node:<node_id>`: an ended contract's lease closes; an extended
        one's lease lives longer."""
        lease = self._leases.get(contract.contract_id)
        if lease is None or contract.node_id != node_id:
            return
        if notice in ("contract_ended", "contract_failed_over") or contract.status != "active":
            self._spawn(self.close(contract.contract_id), f"close {contract.contract_id}")
        elif contract.end_ms > lease.expires_ms:
            lease.expires_ms = contract.end_ms

    async def resync(self, node_id: str) -> None:
        """Serve every lease the exchange lists for `node_id` as pending or ready, and close
        those it no longer does. Raises `GatewayUnavailable` / `ApiError` from the listing."""
        if not self.enabled:
            return
        self._last_resync[node_id] = time.monotonic()
        try:
            endpoints = await self.gateway.node_leases(node_id)
        except ApiError as exc:
            if exc.status in (404, 405):
                self._disable(f"GET /api/nodes/{node_id}/leases answered {exc.status}")
                return
            raise
        listed = {e.contract_id: e for e in endpoints}
        now_ms = self._now_ms()
        for endpoint in endpoints:
            if endpoint.expires_ms and endpoint.expires_ms + END_GRACE_MS < now_ms:
                # Its term is over and no close came: close it on our own (the exchange takes
                # a closed report once the term is over).
                self._spawn(self.close(endpoint.contract_id), f"close {endpoint.contract_id}")
            elif endpoint.state in ("pending", "ready"):
                lease = self._leases.get(endpoint.contract_id)
                if lease is not None and endpoint.expires_ms > lease.expires_ms:
                    lease.expires_ms = endpoint.expires_ms
                self._spawn(self.open(endpoint), f"open {endpoint.contract_id}")
        for lease in list(self._leases.values()):
            if lease.node_id != node_id or lease.closed is not None:
                continue
            now = listed.get(lease.contract_id)
            if now is None or now.state in ("failed", "closed"):
                self._spawn(self.close(lease.contract_id), f"close {lease.contract_id}")

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.warning("the exchange does not deliver leases (%s): serving none", why)
        self.enabled = False

    async def open(self, endpoint: LeaseEndpoint) -> LeaseServer | None:
        """Serve `endpoint`'s lease (idempotent: a lease already served is reported ready
        again if the exchange still has it pending). The server, or None if not served."""
        if not self.enabled:
            return None
        cid, node_id = endpoint.contract_id, endpoint.node_id
        if cid in self._ended:
            return None
        if endpoint.kind != "ram" or endpoint.ram_gb <= 0:
            log.debug("lease %s is %s: reserved, not delivered", cid, endpoint.kind)
            return None
        lease = self._leases.get(cid)
        if lease is None:
            lease = self._leases[cid] = _Lease(cid, node_id, endpoint.ram_gb, endpoint.expires_ms)
        async with lease.lock:
            if lease.closed is not None:
                return None
            if lease.server is not None and lease.server.alive:
                if endpoint.state == "pending":
                    await self._report_ready(lease, lease.server)
                return lease.server
            if lease.server is not None:  # died by itself: start afresh, carry its meter
                self._retire(lease)
            if self.servers.full:
                self.refused_full += 1
                log.warning(
                    "lease %s not served: %d lease servers run (the cap); the exchange will "
                    "fail it over",
                    cid,
                    len(self.servers),
                )
                if lease.server is None and not lease.egress_base:
                    self._leases.pop(cid, None)
                return None
            try:
                credentials = await self._call(
                    f"credentials of {cid}", lambda: self.gateway.lease_credentials(node_id, cid)
                )
            except (ApiError, GatewayUnavailable) as exc:
                log.warning("lease %s: no credentials (%s); not served", cid, exc)
                self._leases.pop(cid, None)
                return None
            spec = LeaseSpec(
                contract_id=cid,
                username=credentials.username,
                password=credentials.password,
                maxmemory_bytes=self.lease_bytes(endpoint.ram_gb),
            )
            try:
                server = await self.servers.start(spec)
            except LeaseServerError as exc:
                log.error("lease %s: %s", cid, exc)
                self._leases.pop(cid, None)
                return None
            lease.server = server
            self.ready_s.append(server.start_s)
            del self.ready_s[:-1000]
            if not await self._report_ready(lease, server):
                return None
            return server

    async def _report_ready(self, lease: _Lease, server: LeaseServer) -> bool:
        body = LeaseReady(
            host=server.host,
            port=server.port,
            tls=server.tls,
            maxmemory_bytes=server.spec.maxmemory_bytes,
        )
        try:
            await self._call(
                f"ready of {lease.contract_id}",
                lambda: self.gateway.lease_ready(lease.node_id, lease.contract_id, body),
            )
        except (ApiError, GatewayUnavailable) as exc:
            # 409: the lease failed or closed meanwhile; unreachable: the deadline passes.
            log.warning(
                "lease %s: ready not accepted (%s); stopping its server", lease.contract_id, exc
            )
            await self.servers.close(lease.contract_id)
            lease.server = None
            self._leases.pop(lease.contract_id, None)
            return False
        log.info("lease %s ready at %s:%d", lease.contract_id, server.host, server.port)
        return True

    async def close(self, contract_id: str) -> LeaseClosed | None:
        """Close the lease's server and report it closed (idempotent); the report, or None if
        this agent serves no such lease."""
        lease = self._leases.get(contract_id)
        if lease is None:
            return None
        async with lease.lock:
            if lease.closed is None:
                result = await self.servers.close(contract_id) if lease.server is not None else None
                base = LeaseClosed(egress_bytes=0, peak_memory_bytes=0)
                result = result or base
                lease.closed = LeaseClosed(
                    egress_bytes=lease.egress_base + result.egress_bytes,
                    peak_memory_bytes=max(lease.peak_base, result.peak_memory_bytes),
                    digest=result.digest,
                )
                log.info(
                    "lease %s closed: %d bytes out, peak %d bytes, digest %s",
                    contract_id,
                    lease.closed.egress_bytes,
                    lease.closed.peak_memory_bytes,
                    lease.closed.digest,
                )
            report = lease.closed
            try:
                await self._call(
                    f"closed of {contract_id}",
                    lambda: self.gateway.lease_closed(lease.node_id, contract_id, report),
                )
            except ApiError as exc:
                if exc.status not in (404, 409):
                    log.warning("lease %s: closed report refused (%s)", contract_id, exc)
            except GatewayUnavailable as exc:
                # The exchange settles with the last heartbeat's meter after its close timeout.
                log.warning("lease %s: closed report not delivered (%s)", contract_id, exc)
            self._leases.pop(contract_id, None)
            self._ended[contract_id] = None
            if len(self._ended) > 10_000:
                del self._ended[next(iter(self._ended))]
            return report

    # -- the periodic work -----------------------------------------------------------------

    async def refresh(self) -> None:
        """Read every server's meter; restart servers that died; ask the exchange about leases
        whose end passed. Called before each heartbeat."""
        if not self._leases:
            return
        now = self._now_ms()
        ended_nodes: set[str] = set()
        for lease in list(self._leases.values()):
            server = lease.server
            if lease.closed is not None or server is None or lease.lock.locked():
                continue
            if server.alive:
                try:
                    await server.read_meter()
                except (ConnectionError, OSError, TimeoutError) as exc:
                    log.warning("lease %s: meter unreadable (%s)", lease.contract_id, exc)
            if not server.alive:
                log.error(
                    "lease %s: its server (pid %d) died (status %s); starting a fresh one",
                    lease.contract_id,
                    server.pid,
                    server.process.returncode,
                )
                endpoint = LeaseEndpoint(
                    contract_id=lease.contract_id,
                    node_id=lease.node_id,
                    kind="ram",
                    state="pending",
                    host=None,
                    port=None,
                    tls=server.tls,
                    expires_ms=lease.expires_ms,
                    ram_gb=lease.ram_gb,
                )
                self._spawn(self.open(endpoint), f"reopen {lease.contract_id}")
            if lease.expires_ms and lease.expires_ms + END_GRACE_MS < now:
                ended_nodes.add(lease.node_id)
        for node_id in ended_nodes:
            if time.monotonic() - self._last_resync.get(node_id, -1e9) >= RESYNC_GAP_S:
                self._spawn(self.resync(node_id), f"resync {node_id}")

    def _retire(self, lease: _Lease) -> None:
        server = lease.server
        if server is None:
            return
        lease.egress_base += server.egress_bytes
        lease.peak_base = max(lease.peak_base, server.peak_memory_bytes)
        lease.server = None
        self.servers.forget(lease.contract_id)
        self._spawn(server.kill(), f"reap {lease.contract_id}")

    async def settle(self) -> None:
        """Wait for every order in flight (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """The agent is going away: cancel orders in flight and stop every server at once (no
        reports: the exchange fails the leases over when the node goes offline)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.servers.close_all()
        self._leases.clear()

    # -- helpers ---------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(f"lease {name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await retrying(what, call, backoff=Backoff(0.2, 2.0), attempts=CALL_ATTEMPTS)
