"""Benchmark: ranking live asks with the Numba kernel against the spec's pure-Python match_nodes.

    .venv/bin/python -m pytest bench/bench_scoring.py --benchmark-only      # pytest-benchmark
    .venv/bin/python -m bench.bench_scoring [--sizes 100000 1000000] [--rounds 2000]
                                            [--baseline-rounds 3] [--json out.json]

Both modes run, side by side in one process on the same synthetic fleet (bench/conftest.py:
mist nodes around 30 North American metros, edge clusters, datacenters, some capacity leased,
a few nodes offline or with a lapsed ask):
- baseline: the spec's `match_nodes` (tests/engine/oracle.py, its transcription) over the Node
  objects, top 10 taken from its sorted result;
- rank: `engine.scoring.rank` over the region's AskBook, top 10, the same request;
  asserted to return the same ids, in the same order, as the baseline (with the documented
  tie-break) before anything is timed;
- rank, mixed requests: 64 different requests in rotation (sizes, caps, places, distance,
  uptime and type filters), for the tail: p50/p99 over every round.
The fleet's Node objects (kept for the baseline) are frozen out of the cyclic GC once built.
Reported: medians, each as a ratio to the baseline's median measured in the same run, and
p50/p99/max of the mixed-request rounds. The default request is a typical RFQ: 32 GB RAM +
8 GB VRAM for an hour, cap 2e-6 USD/GB-s, from Manhattan, prefer_local.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.scoring import AskBook, MatchRequest, rank, warm_up
from engine.types import Node
from tests.engine.oracle import Client, match_nodes

TOP_K = 10
TYPICAL = dict(
    ram_gb=32,
    vram_gb=8,
    duration_s=3600,
    max_price_pusd=2_000_000,
    lat=40.7580,
    lng=-73.9855,
    prefer_local=True,
)


def build_book(nodes: Sequence[Node]) -> AskBook:
    book = AskBook(nodes[0].region, capacity=len(nodes))
    for node in nodes:
        book.upsert(node)
    # This process also holds the fleet as a million Node objects, for the baseline (the book
    # holds none): keep the cyclic GC from walking them in the middle of a timed round.
    gc.collect()
    gc.freeze()
    return book


def spec_top(nodes: Sequence[Node], req: MatchRequest) -> list[dict[str, Any]]:
    """The baseline: the spec's function over the live asks (filters it lacks applied by the
    caller beforehand, outside the timing), top K of its sorted output."""
    requirements: dict[str, Any] = {
        "ram_gb": req.ram_gb,
        "vram_gb": req.vram_gb,
        "max_price_per_gb_sec": req.max_price_pusd,
        "prefer_local": req.prefer_local,
        "duration_sec": req.duration_s,
    }
    if req.max_distance_km is not None:
        requirements["max_distance_km"] = req.max_distance_km
    return match_nodes(Client(req.lat, req.lng), requirements, list(nodes))[:TOP_K]


def eligible(nodes: Sequence[Node], req: MatchRequest, now_ms: int) -> list[Node]:
    """The offer-term and request filters the spec's function does not have."""
    return [
        n
        for n in nodes
        if (n.ask_expires_ms == 0 or n.ask_expires_ms > now_ms)
        and n.min_duration_s <= req.duration_s <= n.max_duration_s
        and n.uptime_score >= req.min_uptime_score
        and (req.node_type is None or n.node_type == req.node_type)
    ]


def check_same_result(nodes: Sequence[Node], book: AskBook, req: MatchRequest, now_ms: int) -> None:
    """rank's top K equals the spec function's (re-sorted with the tie-break), ids and order."""
    pool = eligible(nodes, req, now_ms)
    by_id = {n.node_id: n for n in pool}
    full = match_nodes(
        Client(req.lat, req.lng),
        {
            "ram_gb": req.ram_gb,
            "vram_gb": req.vram_gb,
            "max_price_per_gb_sec": req.max_price_pusd,
            "prefer_local": req.prefer_local,
            "duration_sec": req.duration_s,
            **({"max_distance_km": req.max_distance_km} if req.max_distance_km is not None else {}),
        },
        pool,
    )
    full.sort(
        key=lambda m: (
            -m["match_score"],
            by_id[m["node_id"]].price_pusd,
            by_id[m["node_id"]].arrival_seq,
        )
    )
    want = [m["node_id"] for m in full[:TOP_K]]
    got = [m.node_id for m in rank(book, req, now_ms, TOP_K)]
    assert got == want, (got, want)


def _time(fn: Callable[[], object], rounds: int, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds per call; with `cpu`, this thread's CPU seconds per call appended to it (on a
    shared machine the difference is time the scheduler gave to other processes)."""
    out = []
    for _ in range(rounds):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.thread_time() - c0)
    return out


def _p(data: list[float], q: float) -> float:
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


# ---------------------------------------------------------------------------------------------
# pytest-benchmark

if "pytest" in sys.modules:
    import pytest

    from bench.conftest import NOW_MS, make_requests

    _SIZES = [100_000, 1_000_000]

    @pytest.fixture(scope="module", params=_SIZES, ids=lambda n: f"{n // 1000}k")
    def market(request: Any, fleet_factory: Any) -> tuple[tuple[Node, ...], AskBook]:
        warm_up()
        nodes = fleet_factory(request.param)
        return nodes, build_book(nodes)

    def test_spec_match_nodes(benchmark: Any, market: tuple[tuple[Node, ...], AskBook]) -> None:
        nodes, _book = market
        req = MatchRequest(**TYPICAL).validate()  # type: ignore[arg-type]
        pool = eligible(nodes, req, NOW_MS)
        benchmark.group = f"rank {len(nodes) // 1000}k top-{TOP_K}"
        benchmark.extra_info["baseline"] = True
        rounds = 5 if len(nodes) <= 100_000 else 3
        top = benchmark.pedantic(spec_top, args=(pool, req), rounds=rounds, iterations=1)
        assert len(top) == TOP_K

    def test_rank(benchmark: Any, market: tuple[tuple[Node, ...], AskBook]) -> None:
        nodes, book = market
        req = MatchRequest(**TYPICAL).validate()  # type: ignore[arg-type]
        check_same_result(nodes, book, req, NOW_MS)
        benchmark.group = f"rank {len(nodes) // 1000}k top-{TOP_K}"
        benchmark.extra_info["tail"] = True
        got = benchmark.pedantic(
            rank, args=(book, req, NOW_MS, TOP_K), rounds=500, iterations=1, warmup_rounds=20
        )
        assert len(got) == TOP_K

    def test_rank_mixed_requests(benchmark: Any, market: tuple[tuple[Node, ...], AskBook]) -> None:
        nodes, book = market
        reqs = [MatchRequest(**kw).validate() for kw in make_requests(64)]
        for req in reqs[:8]:
            check_same_result(nodes, book, req, NOW_MS)
        benchmark.group = f"rank {len(nodes) // 1000}k top-{TOP_K}"
        benchmark.extra_info["tail"] = True
        state = {"i": 0}

        def one() -> object:
            state["i"] += 1
            return rank(book, reqs[state["i"] % len(reqs)], NOW_MS, TOP_K)

        benchmark.pedantic(one, rounds=2000, iterations=1, warmup_rounds=64)


# ---------------------------------------------------------------------------------------------
# script mode: p50/p99 printed directly


def _measure(n: int, rounds: int, baseline_rounds: int) -> dict[str, Any]:
    from bench.conftest import NOW_MS, make_fleet, make_requests

    t0 = time.perf_counter()
    nodes = make_fleet(n)
    t1 = time.perf_counter()
    book = build_book(nodes)
    t2 = time.perf_counter()
    print(
        f"\n{n:,} asks: fleet {t1 - t0:.1f} s, book {t2 - t1:.1f} s ({(t2 - t1) / n * 1e6:.2f} us/upsert)"
    )
    req = MatchRequest(**TYPICAL).validate()  # type: ignore[arg-type]
    reqs = [MatchRequest(**kw).validate() for kw in make_requests(64)]
    for r in [req, *reqs[:8]]:
        check_same_result(nodes, book, r, NOW_MS)
    pool = eligible(nodes, req, NOW_MS)
    base = _time(lambda: spec_top(pool, req), baseline_rounds)
    _time(lambda: rank(book, req, NOW_MS, TOP_K), 20)
    same_cpu: list[float] = []
    same = _time(lambda: rank(book, req, NOW_MS, TOP_K), rounds, same_cpu)
    state = {"i": 0}

    def one() -> object:
        state["i"] += 1
        return rank(book, reqs[state["i"] % len(reqs)], NOW_MS, TOP_K)

    _time(one, 64)
    mixed_cpu: list[float] = []
    mixed = _time(one, rounds, mixed_cpu)
    row = {
        "asks": n,
        "baseline_median_ms": statistics.median(base) * 1e3,
        "rank_median_ms": statistics.median(same) * 1e3,
        "rank_p99_ms": _p(same, 0.99) * 1e3,
        "speedup_median": statistics.median(base) / statistics.median(same),
        "mixed_p50_ms": statistics.median(mixed) * 1e3,
        "mixed_p99_ms": _p(mixed, 0.99) * 1e3,
        "mixed_max_ms": max(mixed) * 1e3,
        "rank_cpu_p99_ms": _p(same_cpu, 0.99) * 1e3,
        "mixed_cpu_p50_ms": statistics.median(mixed_cpu) * 1e3,
        "mixed_cpu_p99_ms": _p(mixed_cpu, 0.99) * 1e3,
        "load_avg_1m": os.getloadavg()[0],
        "rounds": rounds,
        "baseline_rounds": baseline_rounds,
    }
    print(
        f"  spec match_nodes  median {row['baseline_median_ms']:9.1f} ms ({baseline_rounds} rounds)\n"
        f"  rank (same req)   median {row['rank_median_ms']:9.3f} ms  p99 {row['rank_p99_ms']:.3f} ms"
        f"  -> x{row['speedup_median']:.0f} faster\n"
        f"  rank (64 mixed)   p50 {row['mixed_p50_ms']:.3f} ms  p99 {row['mixed_p99_ms']:.3f} ms"
        f"  max {row['mixed_max_ms']:.3f} ms ({rounds} rounds)\n"
        f"  CPU time of the calls (this thread): same req p99 {row['rank_cpu_p99_ms']:.3f} ms,"
        f" mixed p50 {row['mixed_cpu_p50_ms']:.3f} ms p99 {row['mixed_cpu_p99_ms']:.3f} ms;"
        f" load average {row['load_avg_1m']:.1f} on {os.cpu_count()} CPUs"
    )
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--baseline-rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    warm_up()
    print(f"kernels ready in {time.perf_counter() - t0:.2f} s (compiled or loaded from cache)")
    report = [_measure(n, args.rounds, args.baseline_rounds) for n in args.sizes]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
