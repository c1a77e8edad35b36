"""Load test of `POST /api/marketplace/request` against a real gateway on loopback.

    python -m bench.load_http [--nodes 100000] [--regions 8] [--workers <cpus>] [--rate 2000]
                              [--seconds 15] [--connections 64] [--closed-seconds 10]

Target (issue 4): at 100k live asks, >= 2,000 requests/s with p99 <= 20 ms.

What it does, all on 127.0.0.1 and bounded in time (every phase has a limit):
1. Creates a migrated database and a Redis key prefix of its own on the servers named by
   MNEMO_REDIS_URL / MNEMO_DATABASE_URL (default: the local dev servers); removes both at the end.
2. Registers `--nodes` nodes directly in the market (`engine.market.Market`, as agents would via
   the API), spread over `--regions` regions around real cities, with mixed types, sizes and
   prices: the live asks.
3. Starts the gateway as production does: `uvicorn --factory gateway.app:app_from_env` with
   uvloop and httptools, `--workers N`; waits until every worker's market view holds every node.
4. Signs a renter up over HTTP and takes a JWT (the request path then never touches Postgres
   and makes one Redis call, the per-account write limit, raised here so that this one renter
   is not throttled: auth is the token, ranking reads the in-process view).
5. Open loop at `--rate` requests/s for `--seconds` (after `--warmup`), over `--connections`
   keep-alive connections. Latency is measured from each request's scheduled send time, so a
   server that falls behind shows in the figures (no coordinated omission).
6. Closed loop for `--closed-seconds`: every connection sends its next request as soon as the
   previous answer arrives; the rate reached is the saturation throughput.
Requests differ (1,024 bodies: location near a random city, sizes, caps, distance limits). Every
response must be 200; a sample is decoded and must hold matches.

The load generator is this process (raw asyncio protocol on uvloop, one request in flight per
connection) and shares the machine's cores with the gateway and Redis; its own CPU time is
printed with the figures. Output: a human summary and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import redis.asyncio as aioredis

from bench.servers import UNTHROTTLED_ENV, drop_scratch, free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"

CITIES: list[tuple[str, float, float]] = [
    ("us-east-2", 40.7128, -74.0060),
    ("us-west-1", 37.7749, -122.4194),
    ("us-central-1", 41.8781, -87.6298),
    ("eu-west-1", 51.5074, -0.1278),
    ("eu-central-1", 50.1109, 8.6821),
    ("ap-northeast-1", 35.6762, 139.6503),
    ("ap-southeast-1", 1.3521, 103.8198),
    ("sa-east-1", -23.5505, -46.6333),
]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


# ---------------------------------------------------------------------------------------------
# Setup: database, key prefix, live asks


async def _create_database(database_url: str, db: str) -> str:
    from persistence.migrations import migrate

    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{db}"')
    finally:
        await admin.close()
    db_url = _with_database(database_url, db)
    await migrate(db_url)
    return db_url


async def _seed(redis_url: str, prefix: str, nodes: int, regions: int, seed: int) -> float:
    """Register `nodes` nodes in the market; returns the seconds it took."""
    from engine.keys import Keys
    from engine.market import Market
    from engine.types import Node, NodeType

    rng = random.Random(seed)
    r = aioredis.from_url(redis_url, max_connections=300)
    market = Market(r, Keys(prefix))
    await market.load_scripts()
    owner = str(uuid.uuid4())
    now_ms = time.time_ns() // 1_000_000
    cities = CITIES[:regions]

    def node(i: int) -> Node:
        region, lat, lng = cities[i % len(cities)]
        kind = rng.random()
        node_type: NodeType = (
            "mist_node" if kind < 0.85 else ("edge_cluster" if kind < 0.97 else "datacenter")
        )
        scale = {"mist_node": 1, "edge_cluster": 4, "datacenter": 16}[node_type]
        return Node(
            node_id=uuid.uuid4().hex,
            owner_id=owner,
            region=region,
            node_type=node_type,
            name=f"bench-{i}",
            lat=lat + rng.uniform(-1.0, 1.0),
            lng=lng + rng.uniform(-1.0, 1.0),
            total_ram_gb=rng.choice((16, 32, 64, 128)) * scale,
            total_vram_gb=rng.choice((0, 8, 12, 16, 24)) * scale,
            offered_ram_gb=10**6,
            offered_vram_gb=10**6,
            bandwidth_mbps=rng.choice((500, 1000, 10_000)),
            base_latency_ms=round(rng.uniform(0.3, 5.0), 2),
            uptime_score=round(rng.uniform(90.0, 99.99), 2),
            price_pusd=rng.randrange(200_000, 3_000_000),
        )

    start = time.perf_counter()
    sem = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        async with sem:
            await market.register_node(node(i), now_ms)

    try:
        for lo in range(0, nodes, 5000):
            await asyncio.gather(*(one(i) for i in range(lo, min(nodes, lo + 5000))))
    finally:
        await r.aclose()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The gateway under test


def _cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its children (the uvicorn workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@contextlib.contextmanager
def _server(env: dict[str, str], workers: int) -> Iterator[tuple[str, list[str], int]]:
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "gateway.app:app_from_env", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--log-level", "warning", "--no-access-log", "--workers", str(workers),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env})
    try:
        yield f"http://127.0.0.1:{port}", argv, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(base: str, nodes: int, workers: int, token: str | None, limit_s: float) -> None:
    """Until /readyz answers, then until `workers` consecutive answers see every node."""
    deadline = time.monotonic() + limit_s
    with httpx.Client(base_url=base, timeout=5) as http:
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready after {limit_s:.0f} s")
            time.sleep(0.25)
        if token is None:
            return
        # A new connection per probe, so that the probes spread over the workers.
        seen = 0
        while seen < 4 * workers:
            r = httpx.get(f"{base}/api/marketplace", params={"limit": 1},
                          headers={"Authorization": f"Bearer {token}"}, timeout=5)  # fmt: skip
            r.raise_for_status()
            seen = seen + 1 if r.json()["total_count"] >= nodes else 0
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"market view incomplete after {limit_s:.0f} s: {r.json()['total_count']}"
                )
            if seen == 0:
                time.sleep(0.25)


def _renter_token(base: str) -> str:
    with httpx.Client(base_url=base, timeout=30) as http:
        email, password = f"{uuid.uuid4().hex[:12]}@bench.example", "bench-password-1"
        r = http.post(
            "/api/auth/signup", json={"email": email, "password": password, "role": "user"}
        )
        r.raise_for_status()
        r = http.post("/api/auth/token", json={"email": email, "password": password})
        r.raise_for_status()
        return str(r.json()["access_token"])


# ---------------------------------------------------------------------------------------------
# The load generator: raw HTTP/1.1 keep-alive connections, one request in flight each


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def _requests(port: int, token: str, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        _, lat, lng = rng.choice(CITIES)
        body: dict[str, Any] = {
            "ram_gb": rng.choice((4, 8, 16, 32, 64)),
            "vram_gb": rng.choice((0, 0, 4, 8, 12, 24)),
            "duration_sec": rng.choice((600, 3600, 14_400)),
            "max_price_per_gb_sec": rng.choice((0.000001, 0.000002, 0.000004)),
            "prefer_local": rng.random() < 0.8,
            "client_lat": round(lat + rng.uniform(-0.5, 0.5), 4),
            "client_lng": round(lng + rng.uniform(-0.5, 0.5), 4),
        }
        if rng.random() < 0.5:
            body["max_distance_km"] = rng.choice((50, 200, 1000))
        payload = msgspec.json.encode(body)
        out.append(
            b"POST /api/marketplace/request HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (port, token.encode(), len(payload), payload)
        )
    return out


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.sampled = 0
        self.empty = 0
        self.last_done = 0.0
        self.window_s = 0.0
        self.timeline: list[list[float]] = []
        """Per second: [requests completed, server CPU s, client CPU s]."""

    def record(self, latency_s: float, status: int, body: bytes, sample: bool) -> None:
        self.latencies.append(latency_s)
        if status != 200:
            key = f"http {status}"
            self.errors[key] = self.errors.get(key, 0) + 1
        elif sample:
            self.sampled += 1
            if not msgspec.json.decode(body)["matches"]:
                self.empty += 1

    def summary(self, seconds: float) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "requests": len(ms),
            "rate_rps": round(len(ms) / seconds, 1),
            "p50_ms": round(_pct(ms, 0.50), 2),
            "p90_ms": round(_pct(ms, 0.90), 2),
            "p99_ms": round(_pct(ms, 0.99), 2),
            "max_ms": round(max(ms), 2) if ms else None,
            "errors": self.errors,
            "sampled_bodies": self.sampled,
            "sampled_without_matches": self.empty,
            **({"timeline_done_server_client_cpu": self.timeline} if self.timeline else {}),
        }


async def _connect(port: int, n: int) -> list[_Conn]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(n):
        _, proto = await loop.create_connection(_Conn, "127.0.0.1", port)
        conns.append(proto)
    return conns


def _worker_of(server_pid: int, port: int) -> dict[int, int]:
    """Client port -> pid of the uvicorn worker holding the other end of that connection."""
    import psutil

    owner: dict[int, int] = {}
    for proc in [*psutil.Process(server_pid).children(recursive=True), psutil.Process(server_pid)]:
        with contextlib.suppress(psutil.Error):
            for c in proc.net_connections(kind="tcp"):
                if c.laddr and c.laddr.port == port and c.raddr:
                    owner[c.raddr.port] = proc.pid
    return owner


async def _balanced(
    port: int, n: int, server_pid: int, workers: int
) -> tuple[list[_Conn], dict[int, int]]:
    """`n` connections spread evenly over the workers, as a load balancer would spread them.

    The kernel hands each new connection to whichever worker accepts first, which can leave
    one worker with most of the keep-alive connections for the whole run; reconnect the
    surplus until no worker holds more than its share (plus one).
    """
    conns = await _connect(port, n)
    share = -(-n // workers)
    for _ in range(50):
        await asyncio.sleep(0.05)
        owner = _worker_of(server_pid, port)
        by_worker: dict[int, list[_Conn]] = {}
        for c in conns:
            pid = owner.get(c.transport.get_extra_info("sockname")[1], 0)
            by_worker.setdefault(pid, []).append(c)
        surplus = [c for held in by_worker.values() for c in held[share:]]
        if workers <= 1 or (not surplus and len(by_worker) == workers and 0 not in by_worker):
            return conns, {pid: len(held) for pid, held in by_worker.items()}
        for c in surplus[: max(1, len(surplus) // 2)]:
            c.transport.close()
            conns.remove(c)
        conns += await _connect(port, n - len(conns))
    return conns, {pid: len(held) for pid, held in by_worker.items()}


async def _open_loop(
    conns: list[_Conn],
    reqs: list[bytes],
    rate: float,
    warmup_s: float,
    seconds: float,
    server_pid: int,
) -> _Stats:
    """Requests at fixed intervals; latency from the scheduled time (waiting for a free
    connection counts)."""
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    idle: asyncio.Queue[_Conn] = asyncio.Queue()
    for c in conns:
        idle.put_nowait(c)
    stats = _Stats()
    start = clock() + 0.05
    measure_from = start + warmup_s
    total = int((warmup_s + seconds) * rate)
    pending: set[asyncio.Task[None]] = set()

    done = 0

    async def one(i: int, due: float) -> None:
        nonlocal done
        conn = await idle.get()
        try:
            status, body = await conn.request(reqs[i % len(reqs)])
        finally:
            idle.put_nowait(conn)
        done += 1
        if due >= measure_from:
            now = clock()
            stats.record(now - due, status, body, sample=i % 50 == 0)
            stats.last_done = now

    async def sample() -> None:
        # Each second from the start (warm-up included): requests completed, server and client
        # CPU used; what to look at when the box's other load makes a run drift.
        last = (done, _cpu_s(server_pid), time.process_time())
        while True:
            await asyncio.sleep(1.0)
            now = (done, _cpu_s(server_pid), time.process_time())
            stats.timeline.append(
                [now[0] - last[0], round(now[1] - last[1], 2), round(now[2] - last[2], 2)]
            )
            last = now

    sampler = asyncio.create_task(sample())

    for i in range(total):
        due = start + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait_for(asyncio.gather(*pending), timeout=60)
    sampler.cancel()
    # Throughput is what completed over the time it took, not what was scheduled.
    stats.window_s = max(stats.last_done - measure_from, 1e-9)
    return stats


async def _closed_loop(
    conns: list[_Conn], reqs: list[bytes], seconds: float
) -> tuple[_Stats, float]:
    clock = time.perf_counter
    stats = _Stats()
    stop_at = clock() + seconds
    counter = iter(range(10**12))

    async def worker(conn: _Conn) -> None:
        while clock() < stop_at:
            i = next(counter)
            t0 = clock()
            status, body = await conn.request(reqs[i % len(reqs)])
            stats.record(clock() - t0, status, body, sample=i % 50 == 0)

    t0 = clock()
    await asyncio.wait_for(asyncio.gather(*(worker(c) for c in conns)), timeout=seconds + 30)
    return stats, clock() - t0


async def _drive(
    port: int, token: str, args: argparse.Namespace, server_pid: int
) -> dict[str, Any]:
    reqs = _requests(port, token, 1024, args.seed)
    conns, spread = await _balanced(port, args.connections, server_pid, args.workers)
    try:
        cpu0, srv0 = time.process_time(), _cpu_s(server_pid)
        open_stats = await _open_loop(conns, reqs, args.rate, args.warmup, args.seconds, server_pid)
        cpu1, srv1 = time.process_time(), _cpu_s(server_pid)
        closed_stats, closed_s = await _closed_loop(conns, reqs, args.closed_seconds)
        cpu2, srv2 = time.process_time(), _cpu_s(server_pid)
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    load = os.getloadavg()
    return {
        "open_loop": {
            "target_rps": args.rate,
            **open_stats.summary(open_stats.window_s),
            "client_cpu_share": round((cpu1 - cpu0) / (args.warmup + args.seconds), 2),
            "server_cpu_ms_per_request": round(
                1000
                * (srv1 - srv0)
                / max(1, len(open_stats.latencies) * (args.warmup + args.seconds) / args.seconds),
                3,
            ),
        },
        "closed_loop": {
            "connections": args.connections,
            **closed_stats.summary(closed_s),
            "client_cpu_share": round((cpu2 - cpu1) / closed_s, 2),
            "server_cpu_ms_per_request": round(
                1000 * (srv2 - srv1) / max(1, len(closed_stats.latencies)), 3
            ),
        },
        "load_average_1m_at_end": round(load[0], 2),
        "connections_per_worker": sorted(spread.values()),
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--regions", type=int, default=8, choices=range(1, len(CITIES) + 1))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop requests per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured open-loop window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--closed-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url", default=os.environ.get("MNEMO_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument(
        "--database-url", default=os.environ.get("MNEMO_DATABASE_URL", DEFAULT_DATABASE)
    )
    args = parser.parse_args(argv)

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    db = f"mnemo_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"benchhttp{uuid.uuid4().hex[:8]}:"
    command = "python -m bench.load_http " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        db_url = asyncio.run(_create_database(args.database_url, db))
        seed_s = asyncio.run(_seed(args.redis_url, prefix, args.nodes, args.regions, args.seed))
        print(
            f"seeded {args.nodes} live asks in {args.regions} regions in {seed_s:.1f} s", flush=True
        )
        env = {
            "MNEMO_REDIS_URL": args.redis_url,
            "MNEMO_DATABASE_URL": db_url,
            "MNEMO_KEY_PREFIX": prefix,
            "MNEMO_JWT_SECRET": uuid.uuid4().hex + uuid.uuid4().hex,
            "MNEMO_LOG_LEVEL": "WARNING",
            "MNEMO_DATA_DIR": f"/tmp/{db}",
            **UNTHROTTLED_ENV,  # one renter sends every RFQ
        }
        with _server(env, args.workers) as (base, server_argv, server_pid):
            _wait_ready(base, args.nodes, args.workers, None, limit_s=180)
            token = _renter_token(base)
            _wait_ready(base, args.nodes, args.workers, token, limit_s=180)
            port = int(urlsplit(base).port or 0)
            results = asyncio.run(_drive(port, token, args, server_pid))
    finally:
        asyncio.run(drop_scratch(args.database_url, db, args.redis_url, prefix))

    report = {
        "bench": "marketplace_request",
        "command": command,
        "server": " ".join(server_argv[1:]),
        "nodes": args.nodes,
        "regions": args.regions,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        **results,
    }
    o, c = results["open_loop"], results["closed_loop"]
    ok = o["rate_rps"] >= 0.98 * args.rate and o["p99_ms"] <= 20.0 and not o["errors"]
    print(f"command: {command}")
    print(f"server:  {report['server']}")
    print(
        f"open loop at {args.rate:.0f}/s over {args.connections} connections: {o['rate_rps']} req/s, "
        f"p50 {o['p50_ms']} ms, p90 {o['p90_ms']} ms, p99 {o['p99_ms']} ms, max {o['max_ms']} ms, "
        f"errors {o['errors'] or 0}"
    )
    print(
        f"closed loop, {args.connections} connections: {c['rate_rps']} req/s, p50 {c['p50_ms']} ms, "
        f"p99 {c['p99_ms']} ms, errors {c['errors'] or 0}"
    )
    print(
        f"server CPU per request: {o['server_cpu_ms_per_request']} ms (open), "
        f"{c['server_cpu_ms_per_request']} ms (closed); machine load average at the end "
        f"{results['load_average_1m_at_end']} on {os.cpu_count()} CPUs"
    )
    print(
        f"target >= 2000 req/s with p99 <= 20 ms at {args.nodes} asks: {'met' if ok else 'NOT met'}"
    )
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
