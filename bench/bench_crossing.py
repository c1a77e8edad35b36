"""Benchmark: limit bids placed and filled per second by the engine process.

    python -m bench.bench_crossing [--bids 20000] [--rounds 5] [--nodes 200] [--placers 3]
                                   [--concurrency 64] [--mode stream|backlog|both]
                                   [--redis-url URL] [--json out.json]

What it does, on loopback only and bounded in time:
1. starts a Redis of its own (`redis-server` on a free 127.0.0.1 port, no persistence) unless
   `--redis-url` is given (then it works under a key prefix of its own and deletes it after);
2. registers `--nodes` nodes in one region (prices 500-900 pico-USD/GB-s, `MAX_GB` (65,536 GB)
   of RAM each, so capacity never runs out), directly through `engine.market.Market`;
3. starts the engine exactly as production does, as its own process:
   `python -m scripts.cli engine --regions bench-region` (uvloop), and waits for its lease;
4. per round:
   - stream: `--placers` processes (`--concurrency` coroutines each) place `--bids` bids
     (1-16 GB, cap 1,000, a location near the fleet, prefer_local; a quarter each with a
     node-type, an uptime or a distance filter) through `Market.place_bid` as fast as they can,
     while the engine crosses them as they arrive. Figure: bids / (wall time from the start of
     placing until the book is empty again), so it can never exceed the placing rate, which is
     reported too; plus each bid's placement-to-fill latency (event `ts_ms`, wall clock of the
     placer and of the engine, millisecond resolution);
   - backlog: the fleet offers nothing; `--bids` bids are placed and rest; then one batched
     heartbeat gives every node capacity and the engine crosses the whole book. Figure:
     bids / (wall time from the heartbeat call until the book is empty).
   Every round checks that every bid of the round filled exactly once.
5. prints one JSON line per round, then a summary with the median of each figure, the CPU
   the engine, Redis, this driver and the placer processes (while placing) used per bid, and the
   1-minute load average: on a 2-core machine shared with other work the wall-clock figures
   say more about the machine than about the engine, and CPU per bid is what carries over
   (a process needing C us of CPU per bid tops out near 1e6 / C bids/s on a core of its own).

The pytest-benchmark test at the bottom measures the engine's in-process decision per bid
(`engine.book.BidBook.plan`: rank over a 10,000-node book + plan_fills), no server:
`pytest bench/bench_crossing.py --benchmark-only`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import redis.asyncio as aioredis

from bench.servers import delete_prefix, private_redis
from engine import log as event_log
from engine.core import MAX_GB
from engine.keys import Keys
from engine.market import Market
from engine.types import (
    Bid,
    BidPlaced,
    ContractCreated,
    Heartbeat,
    Node,
)

REPO = Path(__file__).resolve().parent.parent
REGION = "bench-region"
CENTER = (40.73, -73.99)
NODE_RAM_GB = MAX_GB  # the most a node may declare
ROUND_LIMIT_S = 120.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _nodes(count: int, rng: random.Random, *, offered: bool) -> list[Node]:
    types = ("datacenter", "edge_cluster", "mist_node")
    return [
        Node(
            node_id=f"bn{i:06d}-{uuid.uuid4().hex[:8]}",
            owner_id="bench-owner",
            region=REGION,
            node_type=types[i % 3],  # type: ignore[arg-type]
            name=f"bench-{i}",
            lat=CENTER[0] + rng.uniform(-0.5, 0.5),
            lng=CENTER[1] + rng.uniform(-0.5, 0.5),
            total_ram_gb=NODE_RAM_GB,
            total_vram_gb=0,
            offered_ram_gb=NODE_RAM_GB if offered else 0,
            price_pusd=rng.randrange(500, 901),
            uptime_score=rng.uniform(90.0, 100.0),
            heartbeat_interval_s=86_400.0,  # no node goes stale during the run
            max_duration_s=86_400,
        )
        for i in range(count)
    ]


def _bids(count: int, rng: random.Random, round_no: int) -> list[Bid]:
    out = []
    for i in range(count):
        kind = i % 4
        out.append(
            Bid(
                bid_id=f"bb{round_no:02d}-{i:07d}-{uuid.uuid4().hex[:6]}",
                region=REGION,
                client_id=f"bench-client-{i % 50}",
                user_id=f"bench-user-{i % 50}",
                ram_gb=rng.randint(1, 16),
                vram_gb=0,
                duration_s=3600,
                max_price_pusd=1000,
                lat=CENTER[0] + rng.uniform(-1, 1),
                lng=CENTER[1] + rng.uniform(-1, 1),
                prefer_local=True,
                node_type="mist_node" if kind == 1 else None,
                min_uptime_score=92.0 if kind == 2 else 0.0,
                max_distance_km=300.0 if kind == 3 else None,
            )
        )
    return out


async def _place(market: Market, bids: list[Bid], concurrency: int) -> float:
    """Place every bid from `concurrency` coroutines; returns the seconds it took."""
    queue = iter(bids)

    async def worker() -> None:
        for b in queue:
            await market.place_bid(b, _now_ms())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def _placer_main(
    redis_url: str, prefix: str, bids: list[Bid], concurrency: int, go: Any, done: Any
) -> None:
    """A placing process: connect, wait for `go`, place its share, report the seconds taken
    and the CPU seconds this process spent placing."""

    async def run() -> tuple[float, float]:
        redis = aioredis.from_url(redis_url, max_connections=concurrency + 8)
        market = Market(redis, Keys(prefix))
        await market.load_scripts()
        await redis.ping()
        done.put("ready")
        await asyncio.to_thread(go.wait)
        cpu = time.process_time()
        try:
            return await _place(market, bids, concurrency), time.process_time() - cpu
        finally:
            await redis.aclose()

    done.put(asyncio.run(run()))


class _Placers:
    """`count` processes that place a round's bids together (the driver's load must outrun the
    engine). `cpu_s`: the CPU seconds they spent placing in the last `place`."""

    def __init__(self, redis_url: str, prefix: str, count: int, concurrency: int) -> None:
        self.redis_url, self.prefix = redis_url, prefix
        self.count, self.concurrency = count, concurrency
        self.ctx = mp.get_context("spawn")
        self.pids: list[int] = []
        self.cpu_s = 0.0

    async def place(self, bids: list[Bid]) -> float:
        """Place all bids; returns wall seconds from the common start to the last placement."""
        go, done = self.ctx.Event(), self.ctx.Queue()
        shares = [bids[i :: self.count] for i in range(self.count)]
        procs = [
            self.ctx.Process(
                target=_placer_main,
                args=(self.redis_url, self.prefix, share, self.concurrency, go, done),
                daemon=True,
            )
            for share in shares
        ]
        for p in procs:
            p.start()
        self.pids = [p.pid for p in procs if p.pid is not None]
        try:
            for _ in procs:
                await asyncio.to_thread(done.get, True, 60)
            start = time.perf_counter()
            go.set()
            self.cpu_s = 0.0
            for _ in procs:
                _seconds, cpu_s = await asyncio.to_thread(done.get, True, ROUND_LIMIT_S)
                self.cpu_s += cpu_s
            return time.perf_counter() - start
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()


async def _wait_book_empty(redis: aioredis.Redis, keys: Keys, limit_s: float) -> float:
    """Poll until the region's book is empty; returns `time.perf_counter()` at that moment."""
    deadline = time.monotonic() + limit_s
    while await redis.zcard(keys.bids(REGION)):
        if time.monotonic() > deadline:
            raise SystemExit("bench_crossing: bids left unfilled past the round's time limit")
        await asyncio.sleep(0.002)
    return time.perf_counter()


async def _events_since(redis: aioredis.Redis, keys: Keys, start_id: bytes) -> list[Any]:
    out: list[Any] = []
    last = start_id
    while True:
        batch = await redis.xrange(keys.events(REGION), f"({last.decode()}", "+", 10_000)
        if not batch:
            return out
        for entry_id, fields in batch:
            out.append(event_log.decode(event_log.entry_payload(fields)))
            last = entry_id


async def _stream_tail(redis: aioredis.Redis, keys: Keys) -> bytes:
    last = await redis.xrevrange(keys.events(REGION), count=1)
    return last[0][0] if last else b"0-0"


def _fills(events: list[Any], bid_ids: set[str]) -> dict[str, int]:
    """bid id -> fill ts_ms; fails loudly if a bid filled twice or not at all."""
    filled: dict[str, int] = {}
    for ev in events:
        if isinstance(ev, ContractCreated) and ev.bid_id in bid_ids:
            if ev.bid_id in filled:
                raise SystemExit(f"bench_crossing: bid {ev.bid_id} filled twice")
            filled[ev.bid_id] = ev.ts_ms
    if len(filled) != len(bid_ids):
        raise SystemExit(f"bench_crossing: {len(bid_ids) - len(filled)} bids did not fill")
    return filled


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Cpu:
    """CPU seconds used by a set of processes between two readings."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items() if pid is not None}
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            t = proc.cpu_times()
            out[name] = t.user + t.system
        return out

    def used(self) -> dict[str, float]:
        end = self._read()
        return {name: round(end[name] - self.start[name], 2) for name in end}


async def _stream_round(
    redis: aioredis.Redis, keys: Keys, placers: _Placers, bids: list[Bid]
) -> dict[str, Any]:
    start_id = await _stream_tail(redis, keys)
    started = time.perf_counter()
    place_s = await placers.place(bids)
    done = await _wait_book_empty(redis, keys, ROUND_LIMIT_S)
    events = await _events_since(redis, keys, start_id)
    placed = {ev.bid.bid_id: ev.ts_ms for ev in events if isinstance(ev, BidPlaced)}
    filled = _fills(events, set(placed))
    latencies = [filled[b] - placed[b] for b in placed]
    return {
        "bids": len(bids),
        "placed_per_s": round(len(bids) / place_s),
        "bids_per_s": round(len(bids) / (done - started)),
        "fill_latency_ms_p50": _pct(latencies, 0.5),
        "fill_latency_ms_p99": _pct(latencies, 0.99),
    }


async def _backlog_round(
    redis: aioredis.Redis,
    keys: Keys,
    market: Market,
    placers: _Placers,
    bids: list[Bid],
    nodes: list[Node],
) -> dict[str, Any]:
    await placers.place(bids)
    await asyncio.sleep(0.5)  # the engine has seen them and left them resting
    resting = await redis.zcard(keys.bids(REGION))
    if resting != len(bids):
        raise SystemExit(f"bench_crossing: {len(bids) - resting} bids filled with no capacity")
    start_id = await _stream_tail(redis, keys)
    beats = [
        Heartbeat(node_id=n.node_id, available_ram_gb=NODE_RAM_GB, available_vram_gb=0)
        for n in nodes
    ]
    started = time.perf_counter()
    await market.heartbeat("bench-owner", beats, _now_ms(), min_interval_ms=0)
    done = await _wait_book_empty(redis, keys, ROUND_LIMIT_S)
    _fills(await _events_since(redis, keys, start_id), {b.bid_id for b in bids})
    # take the capacity away again for the next backlog round
    empty = [Heartbeat(node_id=n.node_id, available_ram_gb=0, available_vram_gb=0) for n in nodes]
    await market.heartbeat("bench-owner", empty, _now_ms(), min_interval_ms=0)
    return {"bids": len(bids), "bids_per_s": round(len(bids) / (done - started))}


async def _one_round(ctx: tuple[Any, ...], bids: list[Bid]) -> dict[str, Any]:
    mode, redis, keys, market, placers, nodes = ctx
    if mode == "stream":
        return await _stream_round(redis, keys, placers, bids)
    return await _backlog_round(redis, keys, market, placers, bids, nodes)


@contextlib.contextmanager
def _engine(
    redis_url: str, prefix: str, profile: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ)
    env.update(
        MNEMO_REDIS_URL=redis_url,
        MNEMO_KEY_PREFIX=prefix,
        MNEMO_JWT_SECRET="bench-" + "x" * 40,
        MNEMO_LOG_LEVEL="WARNING",
        PYTHONPATH=str(REPO),
    )
    argv = [sys.executable, "-m", "scripts.cli", "engine", "--regions", REGION]
    if profile is not None:
        argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _wait_serving(redis: aioredis.Redis, keys: Keys, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not await redis.exists(keys.engine_lease(REGION)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench_crossing: the engine did not take the region's lease")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # snapshot taken, loop running


async def _bench(args: argparse.Namespace, redis_url: str, redis_pid: int | None) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    keys = Keys(prefix)
    redis = aioredis.from_url(redis_url, max_connections=64)
    market = Market(redis, keys)
    await market.load_scripts()
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        modes = ["stream", "backlog"] if args.mode == "both" else [args.mode]
        for mode in modes:
            mode_prefix = f"{prefix}{mode}:"
            keys = Keys(mode_prefix)
            market = Market(redis, keys)
            nodes = _nodes(args.nodes, rng, offered=mode == "stream")
            for n in nodes:
                await market.register_node(n, _now_ms())
            placers = _Placers(redis_url, mode_prefix, args.placers, args.concurrency)
            profile = (
                args.profile_engine.with_suffix(f".{mode}.prof") if args.profile_engine else None
            )
            with _engine(redis_url, mode_prefix, profile) as proc:
                await _wait_serving(redis, keys, proc)
                ctx = (mode, redis, keys, market, placers, nodes)
                await _one_round(ctx, _bids(min(1000, args.bids), rng, 99))  # warm-up, not counted
                rounds = []
                for r in range(args.rounds):
                    bids = _bids(args.bids, rng, r)
                    cpu = _Cpu({"engine": proc.pid, "redis": redis_pid, "driver": os.getpid()})
                    started = time.perf_counter()
                    row = await _one_round(ctx, bids)
                    row |= {"mode": mode, "round": r}
                    row["wall_s"] = round(time.perf_counter() - started, 2)
                    row["cpu_s"] = cpu.used() | {"placers": round(placers.cpu_s, 2)}
                    row["cpu_us_per_bid"] = {
                        name: round(sec / len(bids) * 1e6) for name, sec in row["cpu_s"].items()
                    }
                    row["loadavg_1m"] = round(os.getloadavg()[0], 1)
                    print(json.dumps(row), flush=True)
                    rounds.append(row)
                results[mode] = rounds
    finally:
        if redis_pid is None:
            await delete_prefix(redis, prefix)
        await redis.aclose()
    summary: dict[str, Any] = {
        "command": " ".join(["python -m bench.bench_crossing", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "nodes": args.nodes,
        "bids_per_round": args.bids,
        "placers": args.placers,
        "rounds": args.rounds,
    }
    for mode, rounds in results.items():
        summary[f"{mode}_bids_per_s_median"] = statistics.median(r["bids_per_s"] for r in rounds)
        for name in ("engine", "redis", "driver", "placers"):
            per_bid = [r["cpu_us_per_bid"][name] for r in rounds if name in r["cpu_us_per_bid"]]
            if per_bid:
                summary[f"{mode}_{name}_cpu_us_per_bid_median"] = statistics.median(per_bid)
        summary[f"{mode}_loadavg_1m"] = [r["loadavg_1m"] for r in rounds]
        summary[f"{mode}_bids_per_s_all"] = [r["bids_per_s"] for r in rounds]
        if mode == "stream":
            summary["stream_placed_per_s_median"] = statistics.median(
                r["placed_per_s"] for r in rounds
            )
            summary["stream_fill_latency_ms_p50_median"] = statistics.median(
                r["fill_latency_ms_p50"] for r in rounds
            )
            summary["stream_fill_latency_ms_p99_median"] = statistics.median(
                r["fill_latency_ms_p99"] for r in rounds
            )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_crossing", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--bids", type=int, default=20_000, help="bids per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--placers", type=int, default=3, help="placing processes")
    parser.add_argument("--concurrency", type=int, default=64, help="coroutines per placer")
    parser.add_argument("--mode", choices=("stream", "backlog", "both"), default="both")
    parser.add_argument("--redis-url", default=None, help="default: a redis-server of our own")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--profile-engine",
        type=Path,
        default=None,
        help="cProfile the engine into PATH.<mode>.prof",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    with private_redis(args.redis_url, "bench_crossing") as (url, pid):
        summary = asyncio.run(_bench(args, url, pid))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: the engine's decision per bid, in process (no server)


def test_plan_one_bid(benchmark: Any) -> None:
    """rank (Numba) + plan_fills for one bid over a 10,000-node book: `BidBook.plan`, the
    engine's decision per bid (engine/book.py)."""
    from engine.book import BidBook
    from engine.quotes import QuoteBook
    from engine.scoring import AskBook

    rng = random.Random(3)
    asks = AskBook(REGION)
    book = BidBook(REGION, asks, QuoteBook(REGION))
    for i, n in enumerate(_nodes(10_000, rng, offered=True)):
        asks.upsert(msgspec.structs.replace(n, arrival_seq=i + 1))
    bids = _bids(1000, rng, 0)
    now = _now_ms()
    for b in bids:
        book.add(b)
    it = iter(range(10**9))

    def plan() -> int:
        b = bids[next(it) % len(bids)]
        return len(book.plan(b, now))

    assert benchmark.pedantic(plan, rounds=200, iterations=10, warmup_rounds=2) == 1


if __name__ == "__main__":
    sys.exit(main())
