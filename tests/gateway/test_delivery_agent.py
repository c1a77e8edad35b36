"""Delivery with the real node agent (`mnemo-agent run` in a process of its own, its lease
servers real Valkey processes) against a real gateway, engine and journal.

The agent is killed with SIGKILL mid-lease: its node goes offline, the lease moves to another
node's agent, and the renter is told the new endpoint on `/ws`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError

from agent.client import GatewaySocket
from agent.config import AgentConfig, save_config
from agent.digest import lease_digest_async
from gateway.protocol import LeaseNotice
from tests.agent.test_agent_gateway import Exchange, eventually
from tests.gateway.test_delivery import (
    MB,
    User,
    _access,
    _contract,
    _engine_serving,
    _rent,
    _write_and_read,
    exchange,
    users,
)

__all__ = ["exchange", "users"]  # the fixtures, shared with test_delivery


@contextlib.asynccontextmanager
async def agent_process(
    exchange: Exchange, provider: User, tmp_path: Path, name: str, ports: str, **overrides: Any
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`mnemo-agent run` for a node of `provider` (lease ports `ports`); (process, node id) once
    the node registered, heartbeats and delivers."""
    path = tmp_path / f"{name}.json"
    values: dict[str, Any] = {
        "api_url": exchange.url,
        "api_key": provider.key,
        "name": name,
        "region": "us-east-2",
        "latitude": 40.73,
        "longitude": -73.79,
        "price_per_gb_sec": 0.000001,
        "max_ram_gb": 4,
        "heartbeat_interval": 5.0,  # the floor of a config file; it beats as the gateway asks
        "lease_listen": "127.0.0.1",
        "lease_advertise_host": "127.0.0.1",
        "lease_ports": ports,
        "lease_dir": str(tmp_path / f"{name}-leases"),
    }
    values.update(overrides)
    save_config(path, AgentConfig(**values))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMO_AGENT_")}
    log = (tmp_path / f"{name}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        "--config",
        str(path),
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await eventually(lambda: "node_id" in json.loads(path.read_text()), "registered", 60)
        node_id: str = json.loads(path.read_text())["node_id"]

        async def beating() -> bool:
            r = await provider.http.get(f"/api/nodes/{node_id}")
            return bool(r.json()["last_heartbeat_ms"])

        await eventually(beating, "the agent's first heartbeat", 60)
        # The node says its agent delivers (an agent that registers with it needs no update).
        r = await provider.http.put(f"/api/nodes/{node_id}", json={"delivers": True})
        assert r.status_code == 200 and r.json()["delivers"] is True, r.text
        await _engine_serving(exchange.url, provider)
        yield proc, node_id
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def test_the_real_agent_delivers_meters_and_wipes_a_lease(
    exchange: Exchange, users: Any, tmp_path: Path
) -> None:
    """Reserve -> the agent's server is ready -> the renter writes and reads 100 MB through the
    URL of /access; another renter's credentials are refused; settle -> the server refuses
    connections, the billed egress is the agent's measurement (within 1 % of what the renter
    read) and the digest the one the renter computed."""
    provider, renter, other = await users("provider"), await users("user"), await users("user")
    async with agent_process(exchange, provider, tmp_path, "real", "43000-43499") as (_, node_id):
        cid = await _rent(exchange, renter, node_id)
        other_cid = await _rent(exchange, other, node_id)
        access = await _access(renter, cid)
        other_access = await _access(other, other_cid)
        assert access["port"] in range(43000, 43500)
        with pytest.raises(AuthenticationError):
            await aioredis.Redis(
                host=access["host"],
                port=access["port"],
                username=other_access["username"],
                password=other_access["password"],
            ).ping()
        await _write_and_read(access["url"], 100)
        client = aioredis.from_url(access["url"])
        dumped = 0

        async def execute(*args: Any) -> Any:
            nonlocal dumped
            reply = await client.execute_command(*args)
            if isinstance(reply, bytes):
                dumped += len(reply)
            return reply

        digest = await lease_digest_async(execute)
        await client.aclose()

        r = await renter.http.post(f"/api/contracts/{cid}/settle", json={"actual_egress_gb": 7})
        assert r.status_code == 200, r.text
        settled = r.json()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((access["host"], access["port"]), timeout=1).close()
        node = (await provider.http.get(f"/api/nodes/{node_id}")).json()
        assert node["reserved_ram_gb"] == 1  # the other renter's lease only

    assert settled["status"] == "completed" and settled["lease_state"] == "closed"
    assert settled["lease_digest"] == digest
    assert settled["claimed_egress_gb"] == 7.0  # recorded, not billed
    read = 100 * MB + dumped  # what the renter's GETs and DUMPs received, framing aside
    assert read <= settled["egress_bytes"] <= read * 1.01
    assert abs(settled["egress_gb"] * 1e9 - settled["egress_bytes"]) <= 0.5e6


async def test_kill_9_of_the_agent_moves_the_lease_to_another_agent(
    exchange: Exchange, users: Any, tmp_path: Path
) -> None:
    """kill -9 of the agent mid-lease: the node goes offline, the lease fails over to the other
    agent's node, the renter gets `lease_moved` on /ws with the new endpoint and uses it; the
    old contract is charged only up to the dead node's last heartbeat."""
    provider, renter = await users("provider"), await users("user")
    notices: list[LeaseNotice] = []
    ws = await GatewaySocket.open(
        exchange.url,
        renter.key,
        on_event=lambda ch, ev: notices.append(ev) if isinstance(ev, LeaseNotice) else None,
    )
    try:
        await ws.subscribe(["leases"])
        async with (
            agent_process(
                exchange, provider, tmp_path, "doomed", "43500-43749", price_per_gb_sec=0.0000005
            ) as (doomed, first),
            agent_process(exchange, provider, tmp_path, "spare", "43750-43999") as (_, second),
        ):
            cid = await _rent(exchange, renter, first, max_price_per_gb_sec=0.00001)
            access = await _access(renter, cid)
            await _write_and_read(access["url"], 2)
            doomed.send_signal(signal.SIGKILL)
            await doomed.wait()
            killed_ms = time.time() * 1000
            # Its lease server dies with it (PR_SET_PDEATHSIG: the kernel's SIGKILL, then the
            # exit that closes its port, a moment later on a loaded machine).
            await eventually(
                lambda: _refuses(access["host"], access["port"]), "the lease server gone", 10
            )
            await eventually(
                lambda: any(n.notice == "lease_moved" for n in notices), "lease_moved", 60
            )
            moved = next(n for n in notices if n.notice == "lease_moved")
            assert moved.lease.node_id == second
            old = await _contract(renter, cid)
            assert old["status"] == "failed_over"
            dead = (await provider.http.get(f"/api/nodes/{first}")).json()
            assert dead["status"] == "offline" and dead["last_heartbeat_ms"] <= killed_ms
            # (nothing when its last beat came before the ready report: a loaded machine)
            served_ms = dead["last_heartbeat_ms"] - old["ready_ms"]
            assert old["used_sec"] == max(0, -(-served_ms // 1000))
            new = await _access(renter, old["successor_id"])
            assert (new["host"], new["port"]) == (moved.lease.host, moved.lease.port)
            await _write_and_read(new["url"], 2)
    finally:
        await ws.close()


def _refuses(host: str, port: int) -> bool:
    """Nothing listens on (host, port) any more."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False
