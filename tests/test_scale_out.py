"""Scale-out on one machine: a Redis Cluster of 3 primaries, two gateway processes, two engine
processes and two journal shards, each a real `mnemo` process, as a deployment would run them
behind a load balancer.

A provider registers nodes in four regions (spread over the shards) through one gateway, a
renter places a bid in each region through the other one and hears of every fill on a WebSocket
of the first: the engines cross every region (their leases spread over both), the notices cross
from whichever engine made the fill to the gateway holding the socket (pub/sub), and the two
journal shards together write every event into Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect

from engine.connection import open_redis
from engine.keys import Keys
from scripts.cluster import LocalCluster, free_ports

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the process handling is Linux's"
)

ROOT = Path(__file__).resolve().parent.parent
REGIONS = ("us-east-2", "eu-west-1", "ap-south-1", "sa-east-1")
WAIT_S = 60.0
SECRET = "scale-out-test-secret-" + "x" * 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with tempfile.TemporaryDirectory(prefix="mnemo-scale-") as tmp:
        with LocalCluster(Path(tmp), masters=3) as c:
            yield c


@contextlib.contextmanager
def _processes(
    env: dict[str, str], commands: list[tuple[str, list[str], dict[str, str]]], logs: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, args, extra in commands:
            with (logs / f"{name}.log").open("wb") as out:
                started[name] = subprocess.Popen(
                    [sys.executable, "-m", "scripts.cli", *args],
                    cwd=ROOT,
                    env={**env, **extra},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        yield started
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in started.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _tail(logs: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(logs.glob("*"))
    )


async def _eventually(check: Any, what: str, logs: Path, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError):
            result = await check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n{_tail(logs)}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def deployment(
    cluster: LocalCluster, db_url: str, tmp_path: Path
) -> AsyncIterator[tuple[list[str], Keys, Path]]:
    """Two gateways (their base URLs), two engines, journal shards 0/2 and 1/2."""
    keys = Keys(f"so{os.getpid()}:")
    ports = free_ports(range(44000, 45000), 2)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MNEMO_REDIS_URL": cluster.url,
        "MNEMO_DATABASE_URL": db_url,
        "MNEMO_KEY_PREFIX": keys.prefix,
        "MNEMO_JWT_SECRET": SECRET,
        "MNEMO_DATA_DIR": str(tmp_path / "data"),
        "MNEMO_LOG_LEVEL": "WARNING",
        "MNEMO_HOST": "127.0.0.1",
    }
    commands = [
        ("gateway-a", ["gateway", "--no-access-log"], {"MNEMO_PORT": str(ports[0])}),
        ("gateway-b", ["gateway", "--no-access-log"], {"MNEMO_PORT": str(ports[1])}),
        ("engine-1", ["engine"], {}),
        ("engine-2", ["engine"], {}),
        ("journal-0", ["journal", "--shard", "0/2", "--consumer", "j0"], {}),
        ("journal-1", ["journal", "--shard", "1/2", "--consumer", "j1"], {}),
    ]
    with _processes(env, commands, logs) as procs:
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        async with httpx.AsyncClient(timeout=10) as client:
            for base in bases:

                async def up(base: str = base) -> bool:
                    for name, proc in procs.items():
                        assert proc.poll() is None, f"{name} exited\n{_tail(logs)}"
                    return (await client.get(f"{base}/readyz")).status_code == 200

                await _eventually(up, f"{base} ready", logs, timeout_s=120)
        yield bases, keys, logs
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited during the test\n{_tail(logs)}"


async def _signup(api: httpx.AsyncClient, role: str) -> dict[str, str]:
    email = f"{role}-{os.urandom(5).hex()}@example.com"
    r = await api.post(
        "/api/auth/signup",
        json={"email": email, "password": "correct horse battery staple", "role": role},
    )
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["api_key"]["key"]}


async def test_gateways_engines_and_journal_shards_share_one_cluster(
    deployment: tuple[list[str], Keys, Path], cluster: LocalCluster, db_url: str
) -> None:
    """Every bid placed through one gateway fills, its notice reaches a socket on the other, both
    engines serve regions, and both journal shards' events are in Postgres."""
    (base_a, base_b), keys, logs = deployment
    async with (
        httpx.AsyncClient(base_url=base_a, timeout=10) as a,
        httpx.AsyncClient(base_url=base_b, timeout=10) as b,
    ):
        provider = await _signup(a, "provider")
        renter = await _signup(b, "user")
        r = await b.post("/api/clients", json={"org_name": "scale-out"}, headers=renter)
        assert r.status_code == 201, r.text
        client_id = r.json()["id"]
        # An operator funds the renter (contracts are paid for), with the command operators use.
        credit = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "scripts.cli", "credit", client_id, "100", "--reason", "test"],
            cwd=ROOT,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "MNEMO_REDIS_URL": cluster.url,
                "MNEMO_DATABASE_URL": db_url,
                "MNEMO_KEY_PREFIX": keys.prefix,
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert credit.returncode == 0, credit.stdout + credit.stderr
        for region in REGIONS:
            r = await a.post(
                "/api/nodes/register",
                json={
                    "node_type": "datacenter", "name": f"dc-{region}", "region": region,
                    "latitude": 40.7, "longitude": -74.0, "total_ram_gb": 256,
                    "total_vram_gb": 0, "bandwidth_mbps": 1000, "base_latency_ms": 1.0,
                    "price_per_gb_sec": 0.0000008,
                },
                headers=provider,
            )  # fmt: skip
            assert r.status_code == 200, r.text
        ws_url = base_a.replace("http://", "ws://") + f"/ws?api_key={renter['X-API-Key']}"
        async with await connect(ws_url, open_timeout=WAIT_S) as ws:
            await ws.send(json.dumps({"op": "subscribe", "channels": ["fills"]}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert reply["type"] == "subscribed", reply
            bids = {}
            for region in REGIONS:
                r = await b.post(
                    "/api/bids",
                    json={
                        "client_id": client_id, "region": region, "ram_gb": 16, "vram_gb": 0,
                        "duration_sec": 600, "max_price_per_gb_sec": 0.000001,
                    },
                    headers=renter,
                )  # fmt: skip
                assert r.status_code == 201, r.text
                bids[r.json()["bid_id"]] = region
            filled: dict[str, str] = {}
            deadline = time.monotonic() + WAIT_S
            while len(filled) < len(bids):
                left = deadline - time.monotonic()
                assert left > 0, f"fills heard: {filled}\n{_tail(logs)}"
                frame = json.loads(await asyncio.wait_for(ws.recv(), left))
                if frame.get("type") == "event" and frame.get("channel") == "fills":
                    data = frame["data"]
                    filled[data["bid_id"]] = data["region"]
            assert filled == bids

    redis = open_redis(cluster.url)
    try:

        async def both_engines_serve() -> bool:
            holders = {
                (await redis.get(keys.engine_lease(region)) or b"").decode() for region in REGIONS
            }
            return len(holders - {""}) == 2

        await _eventually(both_engines_serve, "the regions spread over both engines", logs)
    finally:
        await redis.aclose()

    conn = await asyncpg.connect(db_url)
    try:

        async def journaled() -> bool:
            rows = await conn.fetch(
                "SELECT region, count(*) AS n FROM events WHERE type = 'contract_created' "
                "GROUP BY region"
            )
            return {r["region"]: r["n"] for r in rows} == dict.fromkeys(REGIONS, 1)

        await _eventually(journaled, "every fill journaled", logs)
    finally:
        await conn.close()
