"""Benchmark: reserve-to-ready and settle-to-closed of delivered leases, all processes real.

    python -m bench.bench_lease_ready [--leases 40] [--fleet 20] [--redis-url URL]
                                      [--database-url URL] [--json out.json]

Starts a private Redis (unless `--redis-url`), a fresh migrated database on `--database-url`
(default the local PostgreSQL), the gateway (uvicorn, one worker) and the engine as
subprocesses of this checkout; then, in this process:

1. one real node agent (`agent.runner.NodeAgent`, lease ports 42000-42899) and a renter that,
   `--leases` times in a row, reserves 1 GB on the agent's node (`POST /api/contracts/create`),
   waits for `lease_ready` on its `leases` channel, writes one key through the URL, and settles
   (`POST /api/contracts/{id}/settle`, answered once the agent has closed the server and
   reported it);
2. the same against a simulated fleet of `--fleet` nodes (`agent.fleet.drive_fleet` with its
   delivery, cap 16 servers, lease ports 42900-42999), each lease on a node drawn at random.

Reserve-to-ready is measured from sending the create request to receiving the notice (the
renter's view: it includes the exchange's notice to the agent, the agent's credential fetch,
the server's start, the ready report and the notice to the renter). Prints p50/p99/max per case
as one JSON object. Every subprocess and lease server is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import redis.asyncio as aioredis

from agent.client import Gateway, GatewaySocket
from agent.config import AgentConfig
from agent.detect import GpuProbe, GpuReading, MachineReading
from agent.fleet import drive_fleet, fleet_delivery
from agent.population import make_fleet
from agent.registration import register_fleet
from agent.runner import NodeAgent
from agent.shards import FleetStats
from agent.simulation import Fleet
from bench.bench_fleet import REPO, _database, _env, _gateway
from bench.servers import private_redis
from gateway.protocol import LeaseNotice, MarketSummary, PublicEvent

REGION = "us-east-2"


def _tails(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"n": len(values), "p50": at(0.5), "p99": at(0.99), "max": at(1.0)}


class Renter:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, timeout=30)
        self.ready: dict[str, asyncio.Future[LeaseNotice]] = {}
        self.socket: GatewaySocket | None = None
        self.client_id = ""
        self.key = ""

    async def open(self) -> None:
        r = await self.http.post(
            "/api/auth/signup",
            json={
                "email": f"renter-{uuid.uuid4().hex[:10]}@example.com",
                "password": "correct horse battery staple",
                "role": "user",
            },
        )
        r.raise_for_status()
        self.key = r.json()["api_key"]["key"]
        self.http.headers["X-API-Key"] = self.key
        r = await self.http.post("/api/clients", json={"org_name": "bench"})
        r.raise_for_status()
        self.client_id = r.json()["id"]
        self.socket = await GatewaySocket.open(self.url, self.key, on_event=self._on_event)
        await self.socket.subscribe(["leases"])

    def _on_event(self, channel: str, event: PublicEvent) -> None:
        if isinstance(event, LeaseNotice) and event.notice in ("lease_ready", "lease_moved"):
            future = self.ready.get(event.lease.contract_id)
            if future is not None and not future.done():
                future.set_result(event)

    async def one(self, node_id: str) -> tuple[float, float]:
        """(reserve-to-ready s, settle s) of one 1 GB lease on `node_id`."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        r = await self.http.post(
            "/api/contracts/create",
            json={
                "client_id": self.client_id,
                "node_id": node_id,
                "ram_gb": 1,
                "vram_gb": 0,
                "duration_sec": 600,
            },
        )
        r.raise_for_status()
        cid = r.json()["contract_id"]
        future = self.ready.setdefault(cid, loop.create_future())
        notice = await asyncio.wait_for(future, 30)
        ready_s = time.perf_counter() - started
        r = await self.http.get(f"/api/contracts/{cid}/access")
        client = aioredis.from_url(r.json()["url"])
        await client.set("k", "v")
        await client.aclose()
        assert notice.lease.contract_id == cid
        started = time.perf_counter()
        r = await self.http.post(f"/api/contracts/{cid}/settle", json={})
        r.raise_for_status()
        return ready_s, time.perf_counter() - started

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        await self.http.aclose()


async def _engine_serving(url: str, key: str) -> None:
    seen = asyncio.Event()

    def on_event(channel: str, event: PublicEvent) -> None:
        if isinstance(event, MarketSummary) and event.region == REGION:
            seen.set()

    ws = await GatewaySocket.open(url, key, on_event=on_event)
    try:
        await ws.subscribe(["market"])
        await asyncio.wait_for(seen.wait(), 60)
    finally:
        await ws.close()


async def _provider(url: str) -> Gateway:
    gateway = Gateway(url)
    await gateway.signup(f"provider-{uuid.uuid4().hex[:10]}@example.com", "pw-" + uuid.uuid4().hex)
    return gateway


async def one_agent(url: str, leases: int, lease_dir: str) -> dict[str, Any]:
    provider = await _provider(url)
    config = AgentConfig(
        api_url=url,
        api_key=provider.api_key or "",
        name="bench-node",
        region=REGION,
        latitude=40.73,
        longitude=-73.79,
        price_per_gb_sec=0.000001,
        max_ram_gb=8,
        heartbeat_interval=5.0,
        lease_listen="127.0.0.1",
        lease_advertise_host="127.0.0.1",
        lease_ports="42000-42899",
        lease_dir=lease_dir,
    )
    gpus = GpuProbe.open(None)
    agent = NodeAgent(
        config,
        None,
        gpus=gpus,
        sample=lambda _: MachineReading(
            total_ram_gb=64, free_ram_gb=48, cpu_usage_pct=5.0, gpu=GpuReading()
        ),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    renter = Renter(url)
    try:
        while not agent.connected.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        await _engine_serving(url, provider.api_key or "")
        await renter.open()
        assert agent.node_id is not None
        ready, settle = [], []
        for _ in range(leases):
            r, s = await renter.one(agent.node_id)
            ready.append(r)
            settle.append(s)
        return {
            "reserve_to_ready_ms": _tails(ready),
            "settle_ms": _tails(settle),
            "server_start_ms": _tails(agent.delivery.ready_s),
        }
    finally:
        await renter.close()
        stop.set()
        await task
        await provider.aclose()


async def fleet(url: str, nodes: int, leases: int) -> dict[str, Any]:
    provider = await _provider(url)
    virtual = [
        msgspec.structs.replace(node, idle_schedule="always", mean_free=0.9)
        for node in make_fleet(nodes, seed=11, regions=[REGION])
    ]
    ids = await register_fleet(provider, virtual, delivers=True)
    model = Fleet(virtual, ids, seed=11, churn=False)
    delivery = fleet_delivery(provider, lease_servers=16, lease_ports=range(42900, 43000))
    stop = asyncio.Event()
    stats = FleetStats()
    task = asyncio.create_task(
        drive_fleet(
            model,
            api_url=url,
            api_key=provider.api_key or "",
            stop=stop,
            interval_s=2.0,
            min_gap_s=1.0,
            tick_s=0.1,
            notices=True,
            stats=stats,
            gateway=provider,
            delivery=delivery,
        )
    )
    renter = Renter(url)
    rng = random.Random(11)
    try:
        while stats.outcomes["ok"] < nodes:
            if task.done():
                task.result()
            await asyncio.sleep(0.1)
        await _engine_serving(url, provider.api_key or "")
        await renter.open()
        ready, settle = [], []
        for _ in range(leases):
            r, s = await renter.one(rng.choice(ids))
            ready.append(r)
            settle.append(s)
        return {
            "nodes": nodes,
            "reserve_to_ready_ms": _tails(ready),
            "settle_ms": _tails(settle),
            "server_start_ms": _tails(delivery.ready_s),
        }
    finally:
        await renter.close()
        stop.set()
        await task
        await provider.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=40)
    parser.add_argument("--fleet", type=int, default=20)
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    result: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        redis_url, _ = stack.enter_context(private_redis(args.redis_url, "bench_lease_ready"))
        database_url = stack.enter_context(_database(args.database_url))
        url, _proc = stack.enter_context(
            _gateway(
                redis_url,
                database_url,
                prefix=prefix,
                workers=1,
                min_interval_s=0.2,
                interval_s=2.0,
            )
        )
        env = _env(redis_url, database_url, prefix=prefix, min_interval_s=0.2, interval_s=2.0)
        engine = subprocess.Popen(
            [sys.executable, "-m", "scripts.cli", "engine"], env=env, cwd=REPO
        )
        try:
            lease_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlb-"))
            result["one_agent"] = asyncio.run(one_agent(url, args.leases, lease_dir))
            result["fleet"] = asyncio.run(fleet(url, args.fleet, args.leases))
        finally:
            engine.terminate()
            try:
                engine.wait(15)
            except subprocess.TimeoutExpired:
                engine.kill()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
