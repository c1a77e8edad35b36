"""Benchmarks of trust (issue 15): ranking on measured uptime, and the heartbeat's uptime work.

Two measurements, each against a baseline taken in the same run:

    .venv/bin/python -m bench.bench_trust rank [--asks 1000000] [--rounds 600] [--runs 3]
    .venv/bin/python -m bench.bench_trust beats [--fleet 1000000] [--steady 5] [--hourly 3]
                                                [--runs 3] [--base 71ebc8c]
    .venv/bin/python -m pytest bench/bench_trust.py --benchmark-only   # rank only, 1M asks
                                                  # (MNEMO_BENCH_ASKS=100000 for fewer)

rank: the same synthetic fleet (bench/conftest.py) in two AskBooks: one with every node's
`uptime_score` 99.0 (what every node showed before trust: the baseline), one with measured
per-node values from `engine.trust.score_centi` over synthetic histories (most nodes at 100 after
30 days, new ones blended towards 90, a few that miss windows, some far below; `uptime_windows`
set). Both are checked against the spec's `match_nodes` (same ids, same order) before anything
is timed; then each round ranks one request (the typical RFQ or one of 64 mixed requests,
`min_uptime_score` filters included) in both books, their order alternating round to round.
Reported per run: medians (wall and this thread's CPU) and their ratio, measured / constant;
over the runs, the median of the runs' ratios.

beats: the heartbeat script's CPU with trust's uptime bookkeeping against the code before trust
(`--base`, default 71ebc8c, the main branch just before trust was merged; extracted with
`git archive`), alternating run by run, each in a process of its own whose imports come from
its tree, against one private Valkey (embedded, append-only file fsynced every second, emptied
between runs, its append-only file rewritten empty and never rewritten during a run; nothing
else uses it, so its `INFO cpu` is this workload's). One run of one tree:
- `--fleet` nodes of one owner registered (not timed), each beating once (not timed: with trust
  this begins the node's accounting, once in its life);
- steady: `--steady` rounds of one beat per node, a second apart, in calls of 1,000 (with trust
  each beat takes the fast check: same window, within the grace; `engine.trust.on_time`);
- hourly: every node's interval set to an hour, then `--hourly` rounds an hour apart, every beat
  on time and the first of its hour: with trust each closes its node's window (`up_beat`: the
  accounting read, updated, written, and its TrustUpdated entry).
Reported: per phase the median round's beats/s, and CPU per beat of the server and of the client
(the engine's process), medians over the runs; the ratio trust / base; and the server's CPU per
beat at the default 60 s interval, where one beat in 60 is the first of its hour:
`(59 * steady + hourly) / 60`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000_000
HOUR_MS = 3_600_000
REGION = "us-east-2"


# ---------------------------------------------------------------------------------------------
# rank: constant uptime (before trust) against measured uptime, one process, same requests


def measured_uptime(n: int, seed: int = 3) -> tuple[list[float], list[int]]:
    """Per node `(uptime_score, uptime_windows)` as engine.trust computes them from a history:
    15 % new (1-167 counted windows), the rest a full 30 days (720); of each, 75 % never down,
    20 % down a little (mean window value 100 less an exponential of mean 2), 5 % flaky (mean
    value 40-95: a node that misses a third of its windows scores about 67)."""
    import numpy as np

    from engine import trust

    rng = np.random.default_rng(seed)
    windows = np.where(
        rng.random(n) < 0.15, rng.integers(1, trust.MIN_WINDOWS, size=n), trust.PERIOD_WINDOWS
    )
    kind = rng.random(n)
    mean = np.where(
        kind < 0.75,
        100.0,
        np.where(kind < 0.95, 100.0 - rng.exponential(2.0, size=n), rng.uniform(40.0, 95.0, n)),
    )
    total = np.clip(np.rint(windows * np.maximum(mean, 0.0)), 0, 100 * windows).astype(np.int64)
    scores = [trust.score(t, w) for t, w in zip(total.tolist(), windows.tolist(), strict=True)]
    return scores, windows.tolist()


def trust_books(n: int) -> dict[str, Any]:
    """The fleet twice: every uptime 99.0 (before trust), and measured (engine.trust)."""
    import msgspec

    from bench.bench_scoring import build_book
    from bench.conftest import make_fleet

    fleet = make_fleet(n)
    constant = [msgspec.structs.replace(x, uptime_score=99.0, uptime_windows=0) for x in fleet]
    scores, windows = measured_uptime(n)
    measured = [
        msgspec.structs.replace(x, uptime_score=s, uptime_windows=w)
        for x, s, w in zip(fleet, scores, windows, strict=True)
    ]
    gc.unfreeze()
    return {
        "constant": (constant, build_book(constant)),
        "measured": (measured, build_book(measured)),
        "scores": scores,
    }


def rank_requests() -> list[Any]:
    from bench.bench_scoring import TYPICAL
    from bench.conftest import make_requests
    from engine.scoring import MatchRequest

    return [
        MatchRequest(**TYPICAL).validate(),  # type: ignore[arg-type]
        *(MatchRequest(**kw).validate() for kw in make_requests(64)),
    ]


def check_books(books: dict[str, Any], reqs: Sequence[Any], checks: int) -> None:
    """Each book's top K equals the spec function's for the first `checks` requests."""
    from bench.bench_scoring import check_same_result
    from bench.conftest import NOW_MS

    for name in ("constant", "measured"):
        nodes, book = books[name]
        for req in reqs[:checks]:
            check_same_result(nodes, book, req, NOW_MS)


def _rank_run(books: dict[str, Any], reqs: Sequence[Any], rounds: int) -> dict[str, Any]:
    from bench.bench_scoring import TOP_K
    from bench.conftest import NOW_MS
    from engine.scoring import rank

    wall: dict[str, list[float]] = {"constant": [], "measured": []}
    cpu: dict[str, list[float]] = {"constant": [], "measured": []}
    for r in range(rounds + 2 * len(reqs)):
        req = reqs[r % len(reqs)]
        order = ("constant", "measured") if r % 2 == 0 else ("measured", "constant")
        for name in order:
            book = books[name][1]
            c0 = time.thread_time()
            t0 = time.perf_counter()
            rank(book, req, NOW_MS, TOP_K)
            t1 = time.perf_counter()
            c1 = time.thread_time()
            if r >= 2 * len(reqs):  # the first passes over the requests warm both books
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
    out: dict[str, Any] = {"rounds": rounds, "load_avg_1m": os.getloadavg()[0]}
    for name in ("constant", "measured"):
        out[f"{name}_median_ms"] = statistics.median(wall[name]) * 1e3
        out[f"{name}_p99_ms"] = sorted(wall[name])[int(0.99 * len(wall[name]))] * 1e3
        out[f"{name}_cpu_median_ms"] = statistics.median(cpu[name]) * 1e3
    out["ratio"] = out["measured_median_ms"] / out["constant_median_ms"]
    out["cpu_ratio"] = out["measured_cpu_median_ms"] / out["constant_cpu_median_ms"]
    return out


def rank_main(args: argparse.Namespace) -> int:
    from engine.scoring import warm_up

    warm_up()
    t0 = time.perf_counter()
    books = trust_books(args.asks)
    scores = books["scores"]
    print(
        f"{args.asks:,} asks, two books built in {time.perf_counter() - t0:.0f} s; measured "
        f"uptime: median {statistics.median(scores):.2f}, at 100 {scores.count(100.0) / len(scores):.0%},"
        f" below 95 {sum(s < 95 for s in scores) / len(scores):.1%}, below 60 "
        f"{sum(s < 60 for s in scores) / len(scores):.2%}",
        flush=True,
    )
    reqs = rank_requests()
    check_books(books, reqs, args.checks)
    gc.collect()
    gc.freeze()
    runs = []
    for i in range(args.runs):
        row = _rank_run(books, reqs, args.rounds)
        runs.append(row)
        print(
            f"run {i + 1}: constant {row['constant_median_ms']:.3f} ms (p99 "
            f"{row['constant_p99_ms']:.3f}), measured {row['measured_median_ms']:.3f} ms (p99 "
            f"{row['measured_p99_ms']:.3f}): x{row['ratio']:.3f} the time; CPU "
            f"{row['constant_cpu_median_ms']:.3f} vs {row['measured_cpu_median_ms']:.3f} ms "
            f"(x{row['cpu_ratio']:.3f}); load {row['load_avg_1m']:.1f}",
            flush=True,
        )
    print(
        f"median of {args.runs} runs: measured / constant x{statistics.median(r['ratio'] for r in runs):.3f}"
        f" wall, x{statistics.median(r['cpu_ratio'] for r in runs):.3f} CPU"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# beats: the heartbeat script with trust against the code before it, alternating runs


def _node(i: int) -> Any:
    from engine import core
    from engine.types import Node

    return Node(
        node_id=f"n{i}", owner_id="fleet", region=REGION, node_type="mist_node",
        name=f"node {i}", lat=40.0 + i % 100 / 100, lng=-74.0, total_ram_gb=core.MAX_GB,
        total_vram_gb=core.MAX_GB, offered_ram_gb=core.MAX_GB, offered_vram_gb=core.MAX_GB,
        price_pusd=800_000 + i % 50,
    )  # fmt: skip


async def _server_cpu_s(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _beats_workload(redis_url: str, fleet: int, steady: int, hourly: int) -> dict[str, Any]:
    """One run in the tree this process imports from (its cwd)."""
    import redis.asyncio as aioredis

    from engine.keys import Keys
    from engine.market import Market
    from engine.types import Heartbeat

    # no read timeout (redis-py 8 has 5 s): a batch may wait while the server frees the last
    # run's gigabytes
    client = aioredis.from_url(redis_url, max_connections=64, socket_timeout=None)
    market = Market(client, Keys("bench:"))
    await market.load_scripts()
    for start in range(0, fleet, 4000):
        await asyncio.gather(
            *(
                market.register_many([_node(i) for i in range(s, min(fleet, s + 1000))], T0)
                for s in range(start, min(fleet, start + 4000), 1000)
            )
        )
    beats = [
        Heartbeat(
            node_id=f"n{i}",
            available_ram_gb=100 + i % 7,
            available_vram_gb=i % 5,
            cpu_usage_pct=12.5,
            temperature_c=40,
        )
        for i in range(fleet)
    ]
    gc.collect()
    gc.freeze()

    async def one_round(now: int) -> tuple[float, float, float]:
        server = await _server_cpu_s(client)
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = await market.heartbeat("fleet", beats, now, 0)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        assert all(o.outcome == "ok" for o in out), {o.outcome for o in out}
        return wall, cpu, await _server_cpu_s(client) - server

    now = T0 + 1000
    first = await one_round(now)
    phases: dict[str, list[tuple[float, float, float]]] = {"first": [first], "steady": []}
    for _ in range(steady):
        now += 1000
        phases["steady"].append(await one_round(now))
    pipe = client.pipeline(transaction=False)
    for i in range(fleet):
        pipe.hset(market.keys.node(REGION, f"n{i}"), "heartbeat_interval_s", "3600.0")
        if len(pipe) >= 10_000:
            await pipe.execute()
    await pipe.execute()
    phases["hourly"] = []
    for _ in range(hourly):
        now += HOUR_MS
        phases["hourly"].append(await one_round(now))
    result: dict[str, Any] = {"trust": hasattr(market, "announce_maintenance")}
    for name, rounds in phases.items():
        wall = statistics.median(r[0] for r in rounds)
        result[f"{name}_per_s"] = fleet / wall
        result[f"{name}_client_us"] = sum(r[1] for r in rounds) / (fleet * len(rounds)) * 1e6
        result[f"{name}_server_us"] = sum(r[2] for r in rounds) / (fleet * len(rounds)) * 1e6
    result["used_memory_mb"] = (await client.info("memory"))["used_memory"] / 2**20
    await client.aclose()
    return result


def _beats_run(tree: Path, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "beats-workload", "--redis-url", redis_url,
         "--fleet", str(args.fleet), "--steady", str(args.steady), "--hourly", str(args.hourly)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_avg_1m"] = os.getloadavg()[0]
    return result


def _empty(server: Any) -> None:
    """Empty the private server and its append-only file (a rewrite of nothing), and wait."""
    server.flushall()
    while int(server.info("persistence")["aof_rewrite_in_progress"]):
        time.sleep(0.5)
    server.bgrewriteaof()
    time.sleep(0.5)
    while int(server.info("persistence")["aof_rewrite_in_progress"]) or int(
        server.info("persistence")["aof_rewrite_scheduled"]
    ):
        time.sleep(0.5)


def beats_main(args: argparse.Namespace) -> int:
    import redis

    sys.path.insert(0, str(HERE))
    from scripts.embedded import EmbeddedServers

    runs: dict[str, list[dict[str, Any]]] = {"base": [], "trust": []}
    with tempfile.TemporaryDirectory(prefix="mnemo-bench-trust-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.base], cwd=HERE, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        with EmbeddedServers(Path(tmp) / "data", want_redis=True, want_postgres=False) as servers:
            url = servers.redis_url
            flush = redis.Redis.from_url(url)
            # No automatic rewrite of the append-only file: its fork (of a server of several
            # GB) would land in one run and not the other; each run starts from an empty file.
            flush.config_set("auto-aof-rewrite-percentage", 0)
            for r in range(args.runs):
                for name, tree in (("base", base), ("trust", HERE)):
                    _empty(flush)
                    row = _beats_run(tree, url, args)
                    assert row["trust"] == (name == "trust"), row
                    runs[name].append(row)
                    print(
                        f"run {r + 1} {name:5s} "
                        + "  ".join(
                            f"{k} {v:,.1f}" for k, v in row.items() if not isinstance(v, bool)
                        ),
                        flush=True,
                    )
            _empty(flush)
            flush.close()
    print(f"\nmedians of {args.runs} runs, {args.fleet:,} nodes (base: {args.base}):")
    med: dict[str, dict[str, float]] = {"base": {}, "trust": {}}
    for metric in runs["base"][0]:
        if metric == "trust":
            continue
        for name in ("base", "trust"):
            med[name][metric] = statistics.median(x[metric] for x in runs[name])
        print(
            f"  {metric:18s} base {med['base'][metric]:>11,.2f}  trust {med['trust'][metric]:>11,.2f}"
            f"  x{med['trust'][metric] / med['base'][metric]:.3f}"
        )
    mix = {
        name: (59 * med[name]["steady_server_us"] + med[name]["hourly_server_us"]) / 60
        for name in ("base", "trust")
    }
    print(
        f"  server us per beat at a 60 s interval (59 steady + 1 hourly): base {mix['base']:.2f}"
        f"  trust {mix['trust']:.2f}  x{mix['trust'] / mix['base']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rank", help="ranking with constant against measured uptime")
    r.add_argument("--asks", type=int, default=1_000_000)
    r.add_argument("--rounds", type=int, default=600)
    r.add_argument("--runs", type=int, default=3)
    r.add_argument("--checks", type=int, default=3, help="requests checked against the spec")
    r.add_argument("--json")
    for name in ("beats", "beats-workload"):
        b = sub.add_parser(name)
        b.add_argument("--fleet", type=int, default=1_000_000)
        b.add_argument("--steady", type=int, default=5)
        b.add_argument("--hourly", type=int, default=3)
        b.add_argument("--runs", type=int, default=3)
        b.add_argument("--base", default="71ebc8c")
        b.add_argument("--redis-url")
        b.add_argument("--json")
    args = parser.parse_args(argv)
    if args.what == "rank":
        return rank_main(args)
    if args.what == "beats-workload":
        result = asyncio.run(_beats_workload(args.redis_url, args.fleet, args.steady, args.hourly))
        print(json.dumps(result))
        return 0
    return beats_main(args)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: the ranking pair, the constant-uptime book as the group's baseline

if "pytest" in sys.modules and __name__ != "__main__":
    import pytest

    @pytest.fixture(scope="module")
    def books() -> dict[str, Any]:
        from engine.scoring import warm_up

        warm_up()
        out = trust_books(int(os.environ.get("MNEMO_BENCH_ASKS", "1000000")))
        check_books(out, rank_requests(), 1)
        gc.collect()
        gc.freeze()
        return out

    @pytest.mark.parametrize("name", ["constant", "measured"])
    def test_rank_uptime(benchmark: Any, books: dict[str, Any], name: str) -> None:
        from bench.bench_scoring import TOP_K
        from bench.conftest import NOW_MS
        from engine.scoring import rank

        book = books[name][1]
        reqs = rank_requests()
        benchmark.group = f"rank {len(book):,} asks top-10, uptime 99.0 for all vs measured"
        benchmark.extra_info["baseline"] = name == "constant"
        benchmark.extra_info["tail"] = True
        state = {"i": 0}

        def one() -> object:
            state["i"] += 1
            return rank(book, reqs[state["i"] % len(reqs)], NOW_MS, TOP_K)

        benchmark.pedantic(one, rounds=1000, iterations=1, warmup_rounds=len(reqs))


if __name__ == "__main__":
    sys.exit(main())
