"""The real node agent (and the simulated fleet) delivering leases through a real gateway, the
engine and the journal: lease orders, ready reports, meters in heartbeats, close with the
digest, a lease server that dies, an agent that is killed. Lease ports 42000-42999."""

# The exchange (gateway, engine, journal) and its users are the delivery tests' own fixtures,
# imported below; the tests' parameters of the same names are those fixtures.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from agent.client import Gateway, GatewaySocket
from agent.config import AgentConfig, save_config
from agent.digest import lease_digest_async
from agent.fleet import drive_fleet, fleet_delivery
from agent.population import make_fleet
from agent.registration import register_fleet
from agent.resp import RespConnection
from agent.runner import NodeAgent
from agent.shards import FleetStats
from agent.simulation import Fleet
from engine.keys import Keys
from gateway.protocol import LeaseNotice, PublicEvent
from tests.agent.test_agent_gateway import Exchange, _config, _probe, _steady, eventually
from tests.gateway.test_delivery import (  # noqa: F401 (fixtures)
    REGION,
    User,
    _access,
    _contract,
    _engine_serving,
    _rent,
    exchange,
    users,
)

MIB = 1 << 20


@pytest.fixture
def lease_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mla-")  # short: the admin socket's path is bounded
    yield path
    shutil.rmtree(path, True)


def _agent_config(url: str, key: str, lease_dir: str, **overrides: Any) -> AgentConfig:
    return _config(url, key, **{"lease_dir": lease_dir, **overrides})


@contextlib.asynccontextmanager
async def serving(agent: NodeAgent, exchange: Exchange, provider: User) -> AsyncIterator[str]:
    """Run `agent` until the block ends; its node id once it is connected and the engine
    serves the region."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: agent.connected.is_set() or task.done(), "the agent connected")
        if task.done():
            task.result()
        assert agent.node_id is not None and agent.delivery.enabled
        await _engine_serving(exchange.url, provider)
        yield agent.node_id
    finally:
        stop.set()
        await task


async def _renter_connection(access: dict[str, Any]) -> RespConnection:
    return await RespConnection.open(
        access["host"], access["port"], username=access["username"], password=access["password"]
    )


async def test_the_agent_serves_a_lease_from_reserve_to_settlement(
    exchange: Exchange, users: Any, lease_dir: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """Reserve -> the agent reports ready -> the renter writes and reads through the URL; the
    heartbeats carry exactly what the renter received; settle -> the agent closes the server
    (the port refuses, the process is gone) and the bill and the digest are the node's
    measurement and the renter's own digest."""
    provider, renter = await users("provider"), await users("user")
    agent = NodeAgent(
        _agent_config(exchange.url, provider.key, lease_dir), None, gpus=_probe(), sample=_steady
    )
    async with serving(agent, exchange, provider) as node_id:
        cid = await _rent(exchange, renter, node_id, ram_gb=1)
        access = await _access(renter, cid)
        assert access["url"] == (
            f"redis://{access['username']}:{access['password']}@127.0.0.1:{access['port']}"
        )
        server = agent.delivery.serving(cid)
        assert server is not None and server.port == access["port"]
        assert server.spec.maxmemory_bytes == 1 << 30  # 1 GB = 1 GiB

        conn = await _renter_connection(access)
        try:
            await conn.pipeline([("SET", f"v{i}", os.urandom(MIB)) for i in range(20)])
            for i in range(20):
                assert len(await conn.execute("GET", f"v{i}")) == MIB
            digest = await lease_digest_async(conn)
        finally:
            await conn.close()
        received = conn.bytes_received

        async def metered() -> bool:
            # The exchange keeps the heartbeats' meters beside the live market until settling.
            # "<node id> <base> <counter> <peak>" (engine/keys.py): egress = base + counter
            held = await redis.hget(keys.lease_meters(REGION), cid)
            return held is not None and int(held.split()[1]) + int(held.split()[2]) == received

        await eventually(metered, "a heartbeat carried the renter's egress", 20)

        pid = server.pid
        r = await renter.http.post(f"/api/contracts/{cid}/settle", json={})
        assert r.status_code == 200, r.text
        settled = r.json()
        assert settled["status"] == "completed" and settled["lease_state"] == "closed"
        assert settled["lease_digest"] == digest
        assert settled["egress_bytes"] == received
        assert abs(settled["egress_gb"] * 1e9 - received) <= 0.01 * received
        assert settled["peak_memory_bytes"] >= 20 * MIB
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", access["port"])
        assert not psutil.pid_exists(pid)
        assert agent.delivery.serving(cid) is None and len(agent.delivery.servers) == 0
        node = (await provider.http.get(f"/api/nodes/{node_id}")).json()
        assert node["reserved_ram_gb"] == 0


async def test_a_lease_server_that_dies_is_served_again(
    exchange: Exchange, users: Any, lease_dir: str
) -> None:
    """A lease server killed under the agent is started again (empty), on a new port the
    renter finds through `/access`; the lease stays ready and its meter does not go back."""
    provider, renter = await users("provider"), await users("user")
    agent = NodeAgent(
        _agent_config(exchange.url, provider.key, lease_dir), None, gpus=_probe(), sample=_steady
    )
    async with serving(agent, exchange, provider) as node_id:
        cid = await _rent(exchange, renter, node_id, ram_gb=1)
        access = await _access(renter, cid)
        client = aioredis.from_url(access["url"])
        await client.set("k", b"x" * MIB)
        assert await client.get("k") == b"x" * MIB
        await client.aclose()
        server = agent.delivery.serving(cid)
        assert server is not None
        await server.read_meter()
        before = server.egress_bytes
        os.kill(server.pid, signal.SIGKILL)

        async def moved() -> bool:
            r = await renter.http.get(f"/api/contracts/{cid}/access")
            body = r.json()
            return bool(body["state"] == "ready" and body["port"] != access["port"])

        await eventually(moved, "the lease served on a new port", 20)
        again = await _access(renter, cid)
        client = aioredis.from_url(again["url"])
        assert await client.get("k") is None  # a fresh, empty server
        await client.set("k", "v")
        await client.aclose()
        meters = agent.delivery.meters(node_id)
        assert [m.contract_id for m in meters] == [cid]
        assert meters[0].egress_bytes >= before


async def test_killing_the_agent_moves_the_lease_to_another_agent(
    exchange: Exchange, users: Any, tmp_path: Path, lease_dir: str
) -> None:
    """kill -9 of `mnemo-agent run` mid-lease: its lease server dies with it (the port refuses),
    the node goes offline, the lease fails over to another node whose agent serves it, and the
    renter hears the new endpoint on `/ws` and can use it."""
    provider, renter = await users("provider"), await users("user")
    path = tmp_path / "node_config.json"
    save_config(
        path,
        _agent_config(
            exchange.url,
            provider.key,
            tempfile.mkdtemp(prefix="mla-", dir=lease_dir),
            name="dying",
            heartbeat_interval=5.0,
            price_per_gb_sec=0.0000005,
            lease_ports="42900-42949",
        ),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMO_AGENT_")}
    dying = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "run", "--config", str(path), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    second = NodeAgent(
        _agent_config(exchange.url, provider.key, lease_dir, lease_ports="42950-42999"),
        None,
        gpus=_probe(),
        sample=_steady,
    )
    notices: list[LeaseNotice] = []

    def on_event(channel: str, event: PublicEvent) -> None:
        if isinstance(event, LeaseNotice):
            notices.append(event)

    ws = await GatewaySocket.open(exchange.url, renter.key, on_event=on_event)
    try:
        await ws.subscribe(["leases"])
        await eventually(lambda: "node_id" in json.loads(path.read_text()), "registered", 60)
        first = json.loads(path.read_text())["node_id"]
        async with serving(second, exchange, provider) as other:

            async def first_live() -> bool:
                node = (await provider.http.get(f"/api/nodes/{first}")).json()
                return bool(node["last_heartbeat_ms"])

            await eventually(first_live, "the first agent beats", 60)
            cid = await _rent(exchange, renter, first, ram_gb=1, max_price_per_gb_sec=0.00001)
            access = await _access(renter, cid)
            client = aioredis.from_url(access["url"])
            await client.set("k", "v")
            await client.aclose()

            dying.send_signal(signal.SIGKILL)
            await dying.wait()
            assert await _refused_within(access["port"], 1.0)
            await eventually(
                lambda: any(n.notice == "lease_moved" for n in notices), "lease_moved", 30
            )
            moved = next(n for n in notices if n.notice == "lease_moved")
            assert moved.lease.node_id == other and moved.lease.state == "ready"
            old = await _contract(renter, cid)
            assert old["status"] == "failed_over"
            new = await _access(renter, old["successor_id"])
            assert (new["host"], new["port"]) == (moved.lease.host, moved.lease.port)
            assert second.delivery.serving(old["successor_id"]) is not None
            client = aioredis.from_url(new["url"])
            await client.set("k", "w")
            assert await client.get("k") == b"w"
            await client.aclose()
    finally:
        await ws.close()
        if dying.returncode is None:
            dying.kill()
            await dying.wait()


async def _refused_within(port: int, timeout_s: float) -> bool:
    """Whether connections to `port` are refused within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except (ConnectionRefusedError, ConnectionResetError):
            # reset: the connection raced the dying server's close; refused from then on
            return True
        writer.close()
        await asyncio.sleep(0.02)
    return False


async def test_the_simulated_fleet_delivers_within_its_cap(exchange: Exchange, users: Any) -> None:
    """A virtual node that wins a contract serves it from a real, scaled-down lease server
    (1 MiB per GB here: past it, OOM); with the fleet's cap of servers reached the next lease
    gets no server, fails, and costs its renter nothing; settling returns the renter's digest."""
    provider, renter, late = await users("provider"), await users("user"), await users("user")
    gateway = Gateway(exchange.url, provider.key)
    nodes = [  # lending now, whatever the hour, with most of their memory free
        msgspec.structs.replace(node, idle_schedule="always", mean_free=0.9)
        for node in make_fleet(2, seed=3, regions=[REGION])
    ]
    ids = await register_fleet(gateway, nodes, delivers=True)
    fleet = Fleet(nodes, ids, seed=3, churn=False)
    delivery = fleet_delivery(gateway, lease_servers=1, lease_ports=range(42800, 42900))
    stop = asyncio.Event()
    stats = FleetStats()
    task = asyncio.create_task(
        drive_fleet(
            fleet,
            api_url=exchange.url,
            api_key=provider.key,
            stop=stop,
            interval_s=1.0,
            min_gap_s=0.5,
            tick_s=0.1,
            notices=True,
            stats=stats,
            gateway=gateway,
            delivery=delivery,
        )
    )
    try:
        await eventually(lambda: stats.outcomes["ok"] >= 4, "the fleet beats", 60)
        await _engine_serving(exchange.url, provider)
        cid = await _rent(exchange, renter, ids[0], ram_gb=2)
        access = await _access(renter, cid)
        client = aioredis.from_url(access["url"])
        try:
            await client.set("small", b"s" * (MIB // 2))
            with pytest.raises(OutOfMemoryError):
                await client.set("big", b"b" * (3 * MIB))  # the lease holds 2 MiB of data
            digest = await lease_digest_async(client)
        finally:
            await client.aclose()

        over = await _rent(exchange, late, ids[1], ram_gb=1)
        await _access(late, over, "failed")
        contract = await _contract(late, over)
        assert contract["total_cost_pusd"] == 0 and contract["used_sec"] == 0
        assert delivery.refused_full >= 1

        r = await renter.http.post(f"/api/contracts/{cid}/settle", json={})
        assert r.status_code == 200, r.text
        assert r.json()["lease_digest"] == digest
        assert len(delivery.servers) == 0
    finally:
        stop.set()
        await task
        await gateway.aclose()
