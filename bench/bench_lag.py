"""Benchmark: the journal's lag while the gateway benchmark runs, all processes real.

    python -m bench.bench_lag [--nodes 60000] [--interval 2.5] [--min-interval 1.5]
                              [--seconds 30] [--workers 2] [--nodes-per-connection 15000]
                              [--http-rate 0] [--http-connections 32]
                              [--renters 2] [--renter-rate 120]
                              [--sample-every 0.1] [--settle-max 30] [--drain-max 120]
                              [--repeat 1]
                              [--redis-url URL] [--database-url URL] [--json out.json]

    # the issue's target, lag p99 <= 1 s while the heartbeat benchmark runs (3 runs of 30 s):
    python -m bench.bench_lag --seconds 30 --repeat 3
    # with RFQs on the gateway at the same time:
    python -m bench.bench_lag --seconds 30 --repeat 3 --http-rate 500

Lag is the age of the oldest event in the Redis streams that the journal has not acknowledged
(it acknowledges after its Postgres transaction commits): `persistence.journal.lag.journal_lag`,
the maximum over regions, sampled every `--sample-every` s from a thread of this process with its
own event loop and Redis connection (so the simulator's loop cannot delay the samples much).

What one run does, on loopback and bounded in time (`--seconds` <= 600, every wait has a limit):
1. starts a Redis of its own (`bench.servers.private_redis`) unless `--redis-url` is given, and a
   fresh migrated Postgres database on `--database-url` (bench_fleet's `_database`), both
   removed afterwards;
2. starts the exchange's processes with one MNEMO_* environment: the gateway (bench_fleet's
   `_gateway`, uvicorn with `--workers`), one `mnemo journal` and, once the fleet is beating,
   one `mnemo engine`;
3. signs a provider up and seeds `--nodes` nodes through `Market.register_many` (bench_fleet's
   `_seed`), then drives them over the WebSocket as bench_fleet's heartbeat phase does
   (`agent.fleet.drive_fleet`, each node every `--interval` s, never closer than
   `--min-interval`); `--renters` renter bots (`scripts.renter_bot.RenterBot`, `--renter-rate`
   actions a minute each: RFQ + contract, limit bids, extends, settles) so that the journal sees
   more than heartbeats; with `--http-rate`, load_http's open loop of
   `POST /api/marketplace/request` over `--http-connections` keep-alive connections;
4. settles: waits until the registrations' backlog is journaled (lag under 1 s) and at least
   one interval has passed, at most `--settle-max` s (a journal that cannot keep up never
   settles; the run measures anyway and says `"settled": false`);
5. measures for `--seconds` s: lag p50/p99/max and the pending/undelivered counts at the p99
   sample; events XADDed and events and heartbeat entries (`node_metrics` rows) journaled per
   second; CPU share (cores busy) of the gateway's workers, the engine, the journal, Redis, the
   Postgres backends of the bench database and this process (simulator, bots, load generator);
6. stops the load and the engine, waits for the journal to drain (at most `--drain-max` s) and
   checks that every stream entry reached Postgres: per region, the stream's `entries-added`
   equals the rows of `events` and the journal's applied position equals the last sequence
   number (`lost` is null when the journal did not drain in time).
Each run starts from nothing (its own Redis, database and processes) and prints one JSON line;
with `--repeat N` a last line holds the medians. Every subprocess is stopped on the way out,
also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import psutil
import redis.asyncio as aioredis

from agent.client import Gateway
from agent.fleet import drive_fleet
from agent.population import make_fleet
from agent.shards import FleetStats
from agent.simulation import Fleet
from bench.bench_fleet import _backends, _Cpu, _database, _env, _gateway, _seed
from bench.load_http import _balanced, _open_loop, _renter_token, _requests
from bench.servers import private_redis
from engine.keys import Keys
from persistence.journal.lag import journal_lag
from persistence.journal.status import positions

REPO = Path(__file__).resolve().parent.parent
MNEMO = str(Path(sys.executable).with_name("mnemo"))
TARGET_P99_S = 1.0


@contextlib.contextmanager
def _process(name: str, argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess stopped on the way out: SIGTERM (the exchange's processes stop cleanly on
    it), then SIGKILL after 15 s."""
    proc = subprocess.Popen(argv, env=env, cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                print(f"bench_lag: {name} ignored SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


class _LagSampler(threading.Thread):
    """`journal_lag` every `every_s` s in a thread of its own: (perf_counter time, oldest
    unacknowledged age in s (max over regions), pending, undelivered)."""

    def __init__(self, redis_url: str, keys: Keys, every_s: float) -> None:
        super().__init__(name="lag-sampler", daemon=True)
        self.redis_url, self.keys, self.every_s = redis_url, keys, every_s
        self.samples: list[tuple[float, float, int, int]] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._loop())
        except BaseException as e:  # reported by the run, which then fails
            self.error = e

    async def _loop(self) -> None:
        redis = aioredis.from_url(self.redis_url)
        try:
            due = time.perf_counter()
            while not self.halt.is_set():
                lag = await journal_lag(redis, self.keys)
                self.samples.append(
                    (time.perf_counter(), lag.oldest_unacked_age_s, lag.pending, lag.undelivered)
                )
                due += self.every_s
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
        finally:
            await redis.aclose()

    def latest(self) -> tuple[float, float, int, int] | None:
        return self.samples[-1] if self.samples else None

    def between(self, t0: float, t1: float) -> list[tuple[float, float, int, int]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


def _lag_figures(samples: list[tuple[float, float, int, int]]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0}
    ordered = sorted(samples, key=lambda s: s[1])
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(samples)]
    return {
        "samples": len(samples),
        "sample_gap_max_ms": round(max(gaps, default=0.0) * 1000),
        "p50_ms": round(ordered[len(ordered) // 2][1] * 1000),
        "p99_ms": round(p99[1] * 1000),
        "max_ms": round(ordered[-1][1] * 1000),
        "pending_at_p99": p99[2],
        "undelivered_at_p99": p99[3],
        "pending_max": max(s[2] for s in samples),
        "undelivered_max": max(s[3] for s in samples),
        "age_first_ms": round(samples[0][1] * 1000),
        "age_last_ms": round(samples[-1][1] * 1000),
    }


async def _stream_counts(redis: aioredis.Redis, keys: Keys) -> dict[str, int]:
    """Entries ever XADDed to each region's stream (`XINFO STREAM` entries-added, Redis 7+)."""
    out = {}
    for member in await redis.smembers(keys.regions):
        region = member.decode() if isinstance(member, bytes) else str(member)
        with contextlib.suppress(aioredis.ResponseError):
            info = await redis.xinfo_stream(keys.events(region))
            out[region] = int(info["entries-added"])
    return out


async def _pg_counts(conn: asyncpg.Connection) -> tuple[int, int]:
    """(rows of events, rows of node_metrics: heartbeat entries journaled)."""
    events = await conn.fetchval("SELECT count(*) FROM events")
    metrics = await conn.fetchval("SELECT count(*) FROM node_metrics")
    return int(events), int(metrics)


async def _until(what: str, limit_s: float, check: Any, every_s: float = 0.2) -> float:
    """Wait until `check()` is true, at most `limit_s` s; returns the seconds waited."""
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > limit_s:
            raise TimeoutError(f"bench_lag: {what} not reached in {limit_s:.0f} s")
        await asyncio.sleep(every_s)
    return time.perf_counter() - started


async def _run(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    url: str,
    env: dict[str, str],
    pids: dict[str, int | list[int] | None],
    redis_url: str,
    database_url: str,
    prefix: str,
) -> dict[str, Any]:
    from scripts.renter_bot import RenterBot

    keys = Keys(prefix)
    redis = aioredis.from_url(redis_url)
    conn = await asyncpg.connect(database_url)
    sampler = _LagSampler(redis_url, keys, args.sample_every)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    gateways: list[Gateway] = []
    try:
        gateway = Gateway(url)
        gateways.append(gateway)
        await gateway.__aenter__()
        user, _ = await gateway.signup(
            f"bench-{uuid.uuid4().hex[:8]}@example.com", uuid.uuid4().hex
        )
        nodes = make_fleet(args.nodes, seed=args.seed)
        ids, seed_s = await _seed(redis_url, prefix, user["id"], nodes, args.interval)
        print(f"seeded {len(ids)} nodes in {seed_s:.1f} s", flush=True)
        sampler.start()
        load_started = time.perf_counter()
        fleet = Fleet(nodes, ids, seed=args.seed, churn=False)
        stats = FleetStats()
        tasks.append(
            asyncio.create_task(
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
                ),
                name="fleet",
            )
        )
        # The engine marks a node offline after 3 missed intervals: start it once every
        # seeded node has had the time to send its first beat.
        await asyncio.sleep(args.interval)
        engine = stack.enter_context(_process("engine", [MNEMO, "engine"], env))
        pids = {**pids, "engine": engine.pid}
        bots = []
        for i in range(args.renters):
            bot_gateway = Gateway(url)
            gateways.append(bot_gateway)
            await bot_gateway.__aenter__()
            bot = RenterBot(
                bot_gateway,
                rng=random.Random(args.seed * 1000 + i),
                rate_per_min=args.renter_rate,
                max_open_bids=10,
                max_active=50,
                budget_usd=1e6,
            )
            bots.append(bot)
            tasks.append(asyncio.create_task(bot.run(stop), name=f"renter-{i}"))
        http: dict[str, Any] = {}
        http_task: asyncio.Task[Any] | None = None
        if args.http_rate > 0:
            port = int(urlsplit(url).port or 0)
            token = await asyncio.to_thread(_renter_token, url)
            reqs = _requests(port, token, 1024, args.seed)
            conns, _ = await _balanced(port, args.http_connections, pids["gateway"], args.workers)  # type: ignore[arg-type]

        def settled() -> bool:
            last = sampler.latest()
            if sampler.error is not None:
                raise sampler.error
            return last is not None and last[1] < 1.0 and last[2] + last[3] < 50_000

        # A journal that cannot keep up never settles: measure anyway (the figures say so).
        with contextlib.suppress(TimeoutError):
            await _until("lag under 1 s", args.settle_max, settled)
        settle_s = time.perf_counter() - load_started
        print(
            f"settled={settled()} after {settle_s:.1f} s; measuring {args.seconds:.0f} s",
            flush=True,
        )

        if args.http_rate > 0:
            http_task = asyncio.create_task(
                _open_loop(conns, reqs, args.http_rate, 0.0, args.seconds, pids["gateway"])  # type: ignore[arg-type]
            )
        pids = {**pids, "postgres": await _backends(database_url)}
        cpu = _Cpu(pids)
        load0 = os.getloadavg()
        added0 = await _stream_counts(redis, keys)
        pg0 = await _pg_counts(conn)
        ok0, outcomes0 = stats.outcomes["ok"], dict(stats.outcomes)
        t0 = time.perf_counter()
        await asyncio.sleep(args.seconds)
        t1 = time.perf_counter()
        dt = t1 - t0
        added1 = await _stream_counts(redis, keys)
        pg1 = await _pg_counts(conn)
        ok1 = stats.outcomes["ok"]
        cpu.add("postgres", await _backends(database_url))
        used, rss = cpu.used(), cpu.rss_mb()
        load1 = os.getloadavg()
        if http_task is not None:
            http_stats = await http_task
            http = {"target_rps": args.http_rate, **http_stats.summary(http_stats.window_s)}
            http.pop("timeline_done_server_client_cpu", None)
            for c in conns:
                c.transport.close()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        sampler.halt.set()
        sampler.join(5)
        # Nothing lost: with no writer left (the engine stopped too), drain, then every entry
        # XADDed is a row of events, applied in order.
        engine.terminate()
        await asyncio.to_thread(engine.wait, 15)
        drained = time.perf_counter()
        while True:
            lag = await journal_lag(redis, keys)
            if lag.pending == 0 and lag.undelivered == 0:
                break
            if time.perf_counter() - drained > args.drain_max:
                break
            await asyncio.sleep(0.1)
        drain_s = time.perf_counter() - drained
        backlog = lag.pending + lag.undelivered
        added = await _stream_counts(redis, keys)
        rows = {
            r["region"]: int(r["n"])
            for r in await conn.fetch("SELECT region, count(*) AS n FROM events GROUP BY region")
        }
        seqs = {r: int(await redis.get(keys.seq(r)) or 0) for r in added}
        applied = {
            p.region: (p.applied_seq, p.stored_max_seq, p.error) for p in await positions(conn)
        }
        missing = {
            r: {"xadded": n, "rows": rows.get(r, 0), "seq": seqs[r], "applied": applied.get(r)}
            for r, n in added.items()
            if n != rows.get(r, 0)
        }
        unapplied = {r: a for r, a in applied.items() if a[2] is not None or a[0] != (a[1] or 0)}
        window = _lag_figures(sampler.between(t0, t1))
        xadded = sum(added1.values()) - sum(added0.values())
        return {
            "lag": window,
            "target_p99_ms": round(TARGET_P99_S * 1000),
            "met": window.get("p99_ms", 1e9) <= TARGET_P99_S * 1000,
            "window_s": round(dt, 1),
            "settle_s": round(settle_s, 1),
            "settled": settled(),
            "xadded_per_s": round(xadded / dt),
            "events_journaled_per_s": round((pg1[0] - pg0[0]) / dt),
            "heartbeat_entries_journaled_per_s": round((pg1[1] - pg0[1]) / dt),
            "heartbeats_acked_ok_per_s": round((ok1 - ok0) / dt),
            "heartbeats_offered_per_s": round(args.nodes / args.interval),
            "heartbeat_outcomes_window": {
                k: v - outcomes0.get(k, 0) for k, v in stats.outcomes.items()
            },
            "heartbeat_ack_latency_ms": stats.ack_latency_ms(),
            "late_ticks": stats.late_ticks,
            "renter_actions": _merge_counts([b.counts for b in bots]),
            "http": http or None,
            "cpu_cores_busy": {k: round(v / dt, 2) for k, v in used.items()},
            "rss_mb": rss,
            "drain_s": round(drain_s, 1),
            "stream_entries": sum(added.values()),
            "events_rows": sum(rows.values()),
            "backlog_after_drain": backlog,
            "lost": None if backlog else sum(added.values()) - sum(rows.values()),
            "missing_by_region": missing,
            "unapplied_regions": {r: list(a) for r, a in unapplied.items()},
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in load1],
        }
    finally:
        stop.set()
        sampler.halt.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gateways:
            with contextlib.suppress(Exception):
                await g.__aexit__(None, None, None)
        await conn.close()
        await redis.aclose()


def _merge_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def _one_run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        redis_url, redis_pid = stack.enter_context(private_redis(args.redis_url, "bench_lag"))
        db_url = stack.enter_context(_database(args.database_url))
        prefix = f"benchlag{uuid.uuid4().hex[:6]}:"
        env = _env(
            redis_url,
            db_url,
            prefix=prefix,
            min_interval_s=args.min_interval,
            interval_s=args.interval,
        )
        url, gateway = stack.enter_context(
            _gateway(
                redis_url,
                db_url,
                prefix=prefix,
                workers=args.workers,
                min_interval_s=args.min_interval,
                interval_s=args.interval,
            )
        )
        journal = stack.enter_context(_process("journal", [MNEMO, "journal"], env))
        pids: dict[str, int | list[int] | None] = {
            "gateway": gateway.pid,
            "journal": journal.pid,
            "redis": redis_pid,
            "bench": os.getpid(),
        }
        result = asyncio.run(_run(args, stack, url, env, pids, redis_url, db_url, prefix))
        for name, proc in (("gateway", gateway), ("journal", journal)):
            if proc.poll() is not None:
                raise SystemExit(f"bench_lag: the {name} exited during the run ({proc.returncode})")
        return result


_MEDIAN_KEYS = (
    ("lag", "p50_ms"),
    ("lag", "p99_ms"),
    ("lag", "max_ms"),
    ("lag", "pending_at_p99"),
    ("lag", "undelivered_at_p99"),
    ("xadded_per_s",),
    ("events_journaled_per_s",),
    ("heartbeat_entries_journaled_per_s",),
    ("heartbeats_acked_ok_per_s",),
    ("lost",),
)


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(runs)}
    for path in _MEDIAN_KEYS:
        values = []
        for r in runs:
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, int | float):
                values.append(v)
        if values:
            out[".".join(path)] = statistics.median(values)
    names = {k for r in runs for k in r["cpu_cores_busy"]}
    out["cpu_cores_busy"] = {
        k: statistics.median(r["cpu_cores_busy"].get(k, 0.0) for r in runs) for k in sorted(names)
    }
    out["met_runs"] = sum(bool(r["met"]) for r in runs)
    return out


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds the context managers: every subprocess is stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_lag", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--nodes", type=int, default=60_000)
    parser.add_argument("--interval", type=float, default=2.5)
    parser.add_argument("--min-interval", type=float, default=1.5)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2, help="gateway workers")
    parser.add_argument("--nodes-per-connection", type=int, default=15_000)
    parser.add_argument("--http-rate", type=float, default=0.0, help="RFQs/s (0: none)")
    parser.add_argument("--http-connections", type=int, default=32)
    parser.add_argument("--renters", type=int, default=2)
    parser.add_argument("--renter-rate", type=float, default=120.0, help="actions/min per bot")
    parser.add_argument("--sample-every", type=float, default=0.1, help="seconds")
    parser.add_argument("--settle-max", type=float, default=30.0, help="seconds")
    parser.add_argument("--drain-max", type=float, default=120.0, help="seconds")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "MNEMO_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--json", type=Path, help="write the runs and medians here too")
    args = parser.parse_args(argv)
    if not 0 < args.min_interval <= args.interval:
        parser.error("need 0 < --min-interval <= --interval")
    if not 1 <= args.nodes <= 200_000 or not 1 <= args.seconds <= 600:
        parser.error("bounded: 1..200,000 nodes, 1..600 s")
    if not 1 <= args.repeat <= 10 or not 0.01 <= args.sample_every <= 5:
        parser.error("bounded: --repeat 1..10, --sample-every 0.01..5 s")
    signal.signal(signal.SIGTERM, _sigterm)
    runs = []
    for i in range(args.repeat):
        result = {
            "run": i + 1,
            "nodes": args.nodes,
            "interval_s": args.interval,
            "gateway_workers": args.workers,
            "http_rate": args.http_rate,
            "renters": args.renters,
            "cpu_count": psutil.cpu_count(),
            **_one_run(args),
        }
        runs.append(result)
        print(json.dumps(result), flush=True)
    summary = _medians(runs)
    if args.repeat > 1:
        print(json.dumps({"medians": summary}), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": summary}, indent=2))
    return 0 if summary["met_runs"] == len(runs) and summary.get("lost") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
