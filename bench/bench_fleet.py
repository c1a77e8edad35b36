"""Benchmark: one simulator process against a real gateway — registration rate, heartbeat rate.

    python -m bench.bench_fleet [--nodes 60000] [--interval 2.5] [--min-interval 1.5]
                                [--seconds 60] [--workers 2] [--concurrency 32]
                                [--nodes-per-connection 15000] [--http-register 5000]
                                [--register-batch 1000] [--batches-in-flight 4]
                                [--idempotent | --no-idempotent] [--json out.json]

    # registration only, 1M nodes end to end over HTTP (the issue's target: <= 120 s):
    python -m bench.bench_fleet --nodes 1000000 --http-register 1000000 --seconds 0

What it does, all on loopback and bounded in time and size:
1. starts a Redis of its own (`redis-server` on a free 127.0.0.1 port, no persistence, its own
   temporary folder) unless `--redis-url` is given, and a fresh Postgres database on
   `--database-url` (default: the dev server at 127.0.0.1:5432), migrated; both removed after;
2. starts the gateway (`uvicorn gateway.app:app_from_env`, `--workers` processes) with the
   per-node heartbeat minimum set to `--min-interval` s;
3. signs up one provider and registers `--http-register` virtual nodes over HTTP the way
   `mnemo-agent --simulate` does (`agent.registration.register_fleet`:
   `POST /api/nodes/register/batch` with `--register-batch` nodes a request, `--batches-in-flight`
   at a time; or, with
   `--register-batch 1`, one `POST /api/nodes/register` per node, `--concurrency` in flight)
   and reports the rate (extrapolated to 1M), the CPU of each process per node (the gateway's
   workers, Redis, the Postgres backends of the bench database, the simulator), the cost of
   each Redis command inside the scripts (`INFO commandstats`) and Redis's memory; the rest of
   `--nodes` are seeded through the market's own batch script (`Market.register_many`, the
   call the batch route makes) so that a large fleet stands up in seconds for the heartbeat
   measurement;
4. drives them for `--seconds` s, each node once per `--interval` s (never closer than
   `--min-interval`: the simulator's own guard, and the gateway would answer `too_soon`), over
   `nodes / --nodes-per-connection` WebSockets, and reports acknowledged heartbeats per second,
   refusals by kind, late ticks, and the CPU each process used.

Rate-limit honesty: every node stays within the per-node limit the gateway enforces: the
simulator never sends a node's beats closer than `--min-interval` and the report counts the
gateway's `too_soon` answers (they must be 0). 1M nodes at a 50 s interval under the default 30 s
limit is 20k beats/s; the same load is `nodes / interval` for any pair, which is how a smaller
fleet on a 2-core machine reaches it (the defaults: 60k nodes at 2.5 s under a 1.5 s limit, the
same 60% ratio of limit to interval; 24k beats/s offered). The simulator counts a node's gap
from the ack of its previous beat, so no delay can make the gateway see two beats too close.
The Redis working set is smaller than with 1M nodes; the per-beat work (one entry of a batched
script call) is the same.

The pytest-benchmark test at the bottom measures the simulator's own cost per beat (no server):
`pytest bench/bench_fleet.py --benchmark-only`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import redis.asyncio as aioredis

from agent.client import Gateway
from agent.fleet import drive_fleet
from agent.population import make_fleet
from agent.registration import register_fleet
from agent.shards import FleetStats
from agent.simulation import Fleet
from bench.servers import UNTHROTTLED_ENV, free_port, private_redis, require_loopback

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _database(admin_url: str) -> Iterator[str]:
    """A fresh migrated database on the server at `admin_url`, dropped afterwards."""
    import asyncpg

    from persistence.migrations import migrate

    require_loopback(admin_url, "bench_fleet")
    name = f"mnemo_bench_{uuid.uuid4().hex[:10]}"
    parts = urlsplit(admin_url)
    url = urlunsplit(parts._replace(path=f"/{name}"))

    async def create() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrate(url)

    async def drop() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    try:
        yield url
    finally:
        asyncio.run(drop())


def _env(
    redis_url: str, database_url: str, *, prefix: str, min_interval_s: float, interval_s: float
) -> dict[str, str]:
    """This process's environment with the MNEMO_* settings of the exchange under test."""
    env = dict(os.environ)
    env.update(
        MNEMO_REDIS_URL=redis_url,
        MNEMO_DATABASE_URL=database_url,
        MNEMO_KEY_PREFIX=prefix,
        MNEMO_JWT_SECRET="bench-" + uuid.uuid4().hex + uuid.uuid4().hex,
        MNEMO_HEARTBEAT_MIN_INTERVAL_S=str(min_interval_s),
        MNEMO_HEARTBEAT_INTERVAL_S=str(interval_s),
        MNEMO_LOG_LEVEL="WARNING",
    )
    # One provider holds the whole fleet (a socket per --nodes-per-connection nodes, one
    # registration request per node with --http-register); bench_lag adds one renter's RFQs.
    env.update(UNTHROTTLED_ENV)
    return env


@contextlib.contextmanager
def _gateway(
    redis_url: str,
    database_url: str,
    *,
    prefix: str,
    workers: int,
    min_interval_s: float,
    interval_s: float,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = _env(
        redis_url,
        database_url,
        prefix=prefix,
        min_interval_s=min_interval_s,
        interval_s=interval_s,
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "gateway.app:app_from_env",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("bench_fleet: the gateway did not become healthy")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


class _Cpu:
    """CPU seconds used by a set of processes (and their children) between two reads."""

    def __init__(self, pids: dict[str, int | list[int] | None]) -> None:
        self.procs: dict[str, list[psutil.Process]] = {}
        me = os.getpid()
        for name, pid in pids.items():
            if pid is None:
                continue
            if isinstance(pid, list):  # a set of processes (Postgres backends), no children
                self.procs[name] = [psutil.Process(p) for p in pid if psutil.pid_exists(p)]
                continue
            proc = psutil.Process(pid)
            # The gateway's workers are its children; this process's children are the servers
            # it started, counted under their own names.
            children = [] if pid == me else proc.children(recursive=True)
            self.procs[name] = [proc, *children]
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, procs in self.procs.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    def rss_mb(self) -> dict[str, int]:
        """Resident memory of each set of processes now, in MiB."""
        out: dict[str, int] = {}
        for name, procs in self.procs.items():
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            out[name] = round(total / 2**20)
        return out

    def add(self, name: str, pids: list[int]) -> None:
        """Count processes started since the first read too (all their CPU is in the window)."""
        known = {p.pid for p in self.procs.setdefault(name, [])}
        for pid in pids:
            if pid not in known and psutil.pid_exists(pid):
                self.procs[name].append(psutil.Process(pid))

    def used(self) -> dict[str, float]:
        end = self._read()
        return {k: round(end[k] - self.start.get(k, 0.0), 2) for k in end}


async def _seed(
    redis_url: str, prefix: str, owner_id: str, nodes: list[Any], interval_s: float
) -> tuple[list[str], float]:
    """Register nodes through the market's own batch script (what the gateway's batch route
    calls), a few batches in flight: the fast way to stand up a large fleet for the heartbeat
    measurement. Returns (ids, seconds)."""
    import redis.asyncio as aioredis

    from engine.keys import Keys
    from engine.market import Market
    from engine.types import Node, pusd

    client = aioredis.from_url(redis_url, max_connections=64)
    market = Market(client, Keys(prefix))
    await market.load_scripts()
    ids = [uuid.uuid4().hex for _ in nodes]
    cursor = iter(range(0, len(nodes), 1000))
    now_ms = int(time.time() * 1000)

    def node(i: int) -> Node:
        v = nodes[i]
        return Node(
            node_id=ids[i],
            owner_id=owner_id,
            region=v.region,
            node_type=v.node_type,
            name=v.name,
            lat=v.latitude,
            lng=v.longitude,
            total_ram_gb=v.total_ram_gb,
            total_vram_gb=v.total_vram_gb,
            offered_ram_gb=v.total_ram_gb,
            offered_vram_gb=v.total_vram_gb,
            bandwidth_mbps=v.bandwidth_mbps,
            base_latency_ms=v.base_latency_ms,
            price_pusd=pusd(v.price_per_gb_sec),
            heartbeat_interval_s=interval_s,
            created_ms=now_ms,
            metadata={"simulated": "true"},
        )

    async def worker() -> None:
        for start in cursor:
            span = range(start, min(len(nodes), start + 1000))
            await market.register_many([node(i) for i in span], now_ms)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(4)))
    finally:
        await client.aclose()
    return ids, time.perf_counter() - started


def _per_node(before: dict[str, Any], after: dict[str, Any], nodes: int) -> dict[str, float]:
    """Microseconds of Redis per node by command (`INFO commandstats`; the scripts' `evalsha`
    includes the commands they call, which are listed too)."""
    out = {}
    for name, stat in after.items():
        usec = stat["usec"] - before.get(name, {}).get("usec", 0)
        if usec / nodes >= 0.01:
            out[name.removeprefix("cmdstat_")] = round(usec / nodes, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


async def _backends(database_url: str) -> list[int]:
    """The pids of the Postgres backends serving `database_url`'s database (the gateway's pool)."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


async def _run(
    args: argparse.Namespace,
    url: str,
    pids: dict[str, int | list[int] | None],
    redis_url: str,
    database_url: str,
    prefix: str,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "interval_s": args.interval,
        "min_interval_s": args.min_interval,
        "gateway_workers": args.workers,
        "cpu_count": psutil.cpu_count(),
    }
    async with Gateway(url, max_connections=args.concurrency) as gateway:
        user, _ = await gateway.signup(
            f"bench-{uuid.uuid4().hex[:8]}@example.com", uuid.uuid4().hex
        )
        made = time.perf_counter()
        nodes = make_fleet(args.nodes, seed=args.seed)
        made = time.perf_counter() - made
        over_http = min(args.nodes, args.http_register)
        redis = aioredis.from_url(redis_url)
        commands0 = await redis.info("commandstats")
        memory0 = (await redis.info("memory"))["used_memory"]
        pids = {**pids, "postgres": await _backends(database_url)}
        cpu = _Cpu(pids)
        load0 = os.getloadavg()
        started = time.perf_counter()
        ids = await register_fleet(
            gateway,
            nodes[:over_http],
            concurrency=args.concurrency,
            batch=args.register_batch,
            batches_in_flight=args.batches_in_flight,
            idempotent=args.idempotent,
        )
        elapsed = time.perf_counter() - started
        cpu.add("postgres", await _backends(database_url))
        used = cpu.used()
        rate = len(ids) / elapsed
        memory1 = (await redis.info("memory"))["used_memory"]
        commands = await redis.info("commandstats")
        await redis.aclose()
        batched = args.register_batch > 1
        result["registration"] = {
            "via": "POST /api/nodes/register/batch" if batched else "POST /api/nodes/register",
            "nodes": len(ids),
            "batch": args.register_batch if batched else None,
            "in_flight": args.batches_in_flight if batched else args.concurrency,
            "idempotency_keys": args.idempotent,
            "seconds": round(elapsed, 2),
            "per_s": round(rate),
            "extrapolated_1m_s": round(1_000_000 / rate, 1),
            "make_fleet_s": round(made, 2),
            "cpu_s": used,
            "cpu_us_per_node": {k: round(v * 1e6 / len(ids), 1) for k, v in used.items()},
            "redis_us_per_node": _per_node(commands0, commands, len(ids)),
            "rss_mb": cpu.rss_mb(),
            "redis_memory_mb": round(memory1 / 2**20),
            "redis_memory_bytes_per_node": round((memory1 - memory0) / len(ids)),
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        }
        print(f"registered {len(ids)} nodes in {elapsed:.1f} s ({rate:.0f}/s)", flush=True)
        print(json.dumps(result["registration"]), flush=True)
        if over_http < args.nodes:
            cpu = _Cpu(pids)
            seeded, seconds = await _seed(
                redis_url, prefix, user["id"], nodes[over_http:], args.interval
            )
            ids += seeded
            result["seeding"] = {
                "via": "Market.register_many (batches of 1,000, 4 in flight)",
                "nodes": len(seeded),
                "seconds": round(seconds, 1),
                "per_s": round(len(seeded) / seconds),
                "cpu_s": cpu.used(),
            }
            print(f"seeded {len(seeded)} more nodes in {seconds:.1f} s", flush=True)

        if args.seconds <= 0:
            return result
        fleet = Fleet(nodes, ids, seed=args.seed, churn=False)
        stats = FleetStats()
        stop = asyncio.Event()
        driver = asyncio.create_task(
            drive_fleet(
                fleet,
                api_url=url,
                api_key=gateway.api_key or "",
                stop=stop,
                interval_s=args.interval,
                min_gap_s=args.min_interval,
                tick_s=args.tick,
                nodes_per_connection=args.nodes_per_connection,
                notices=False,
                stats=stats,
            )
        )
        # Warm-up: one interval (every node's first beat), then the measured window.
        await asyncio.sleep(args.interval)
        ok0, sent0 = stats.outcomes["ok"], stats.sent
        outcomes0 = dict(stats.outcomes)
        cpu = _Cpu(pids)
        t0 = time.perf_counter()
        await asyncio.sleep(args.seconds)
        dt = time.perf_counter() - t0
        ok1, sent1 = stats.outcomes["ok"], stats.sent
        outcomes_window = {k: v - outcomes0.get(k, 0) for k, v in stats.outcomes.items()}
        used = cpu.used()
        stop.set()
        await driver
        result["heartbeats"] = {
            "window_s": round(dt, 1),
            "sent_per_s": round((sent1 - sent0) / dt),
            "acked_ok_per_s": round((ok1 - ok0) / dt),
            "offered_per_s": round(args.nodes / args.interval),
            "connections": -(-args.nodes // args.nodes_per_connection),
            "outcomes_window": outcomes_window,
            "outcomes_total": dict(stats.outcomes),
            "skipped_rate_guard": stats.skipped_rate,
            "skipped_disconnected": stats.skipped_disconnected,
            "late_ticks": stats.late_ticks,
            "ack_latency_ms": stats.ack_latency_ms(),
            "reconnects": stats.reconnects,
            "cpu_s": used,
            "cpu_cores_busy": {k: round(v / dt, 2) for k, v in used.items()},
        }
        print(json.dumps(result["heartbeats"]), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--nodes", type=int, default=60_000)
    parser.add_argument("--interval", type=float, default=2.5)
    parser.add_argument("--min-interval", type=float, default=1.5)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--nodes-per-connection", type=int, default=15_000)
    parser.add_argument("--idempotent", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--register-batch",
        type=int,
        default=1000,
        help="nodes per batch registration; 1: one POST /api/nodes/register per node",
    )
    parser.add_argument("--batches-in-flight", type=int, default=4)
    parser.add_argument(
        "--http-register",
        type=int,
        default=5000,
        help="nodes registered over HTTP (measured); the rest are seeded through the market",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "MNEMO_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    if not 0 < args.min_interval <= args.interval:
        parser.error("need 0 < --min-interval <= --interval")
    if args.nodes < 1 or args.nodes > 2_000_000 or not 0 <= args.seconds <= 600:
        parser.error("bounded: 1..2,000,000 nodes, at most 600 s")
    with (
        private_redis(args.redis_url, "bench_fleet") as (redis_url, redis_pid),
        _database(args.database_url) as db_url,
    ):
        prefix = f"bench{uuid.uuid4().hex[:6]}:"
        with _gateway(
            redis_url,
            db_url,
            prefix=prefix,
            workers=args.workers,
            min_interval_s=args.min_interval,
            interval_s=args.interval,
        ) as (url, proc):
            pids: dict[str, int | list[int] | None] = {
                "gateway": proc.pid,
                "redis": redis_pid,
                "simulator": os.getpid(),
            }
            result = asyncio.run(_run(args, url, pids, redis_url, db_url, prefix))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: the simulator's own cost per beat (no server)


def test_fleet_beat_generation(benchmark: Any) -> None:
    """Build and encode one 1000-beat heartbeat message from a 100k-node fleet."""
    import msgspec

    from gateway.protocol import HeartbeatOp

    nodes = make_fleet(100_000, seed=3)
    fleet = Fleet(nodes, [uuid.UUID(int=i).hex for i in range(len(nodes))], seed=3, churn=False)
    idle = fleet.idle_now(datetime.now(UTC))
    group = fleet.group
    cursor = iter(range(10**9))

    def one_message() -> bytes:
        start = next(cursor) * 1000 % len(nodes)
        beats = [fleet.beat(i, idle[group[i]]) for i in range(start, start + 1000)]
        return msgspec.json.encode(HeartbeatOp(beats=[b for b in beats if b], ref=1))

    frame = benchmark(one_message)
    assert frame.count(b'"node_id"') == 1000


if __name__ == "__main__":
    sys.exit(main())
