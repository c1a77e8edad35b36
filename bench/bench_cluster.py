"""Scale-out: reserves and heartbeats per second on a Redis Cluster of 1, 2 and 3 primaries.

    .venv/bin/python -m bench.bench_cluster [--shards 1,2,3] [--seconds 5] [--rounds 3]
        [--clients 2] [--json out.json]

For each size a local cluster (`scripts.cluster`: the embedded Valkey, append-only file with
fsync every second, each primary pinned with `taskset` to a core of its own where the machine
has enough, round-robin otherwise) is started, six regions are chosen so that they spread
evenly over the primaries (two per primary with three), and each gets `--nodes` nodes. Then, for
`--seconds`, `--clients` load processes (each its own event loop and cluster client) run

- reserves: `Market.reserve_many` batches of 200, round-robin over the regions (one script call
  per region and batch, sent to that region's primary);
- heartbeats: `Market.heartbeat` batches of 1,000 beats per region (every node beats once per
  batch, min interval 0);

and the run reports, per size: operations per second (wall clock, all clients), and per primary
the operations it served and its CPU (`INFO cpu` before and after), hence CPU microseconds per
operation per shard. On a machine with fewer cores than primaries plus clients the wall-clock
rates cannot grow with the shards; the per-shard CPU says what a core per shard would do: a
shard serves at most 1 / (its CPU per operation) operations per second, so N shards on N cores
serve N times that, as long as the clients have cores of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from engine.connection import open_redis
from engine.keys import Keys, mint_id
from engine.market import Market, ReserveRequest
from engine.types import Heartbeat, Node
from scripts.cluster import SLOTS, LocalCluster

T0 = 1_700_000_000_000
REGIONS_PER_SHARD = {1: 6, 2: 3, 3: 2}
PREFIX = "bc:"
RESERVE_BATCH = 200


def _regions(shards: int, per_shard: int) -> list[str]:
    """Region names whose slots fall `per_shard` in each primary's equal range of slots."""
    want = {i: per_shard for i in range(shards)}
    out: list[str] = []
    n = 0
    keys = Keys(PREFIX)
    while any(want.values()):
        name = f"region-{n}"
        n += 1
        shard = key_slot(keys.seq(name).encode()) * shards // SLOTS
        if want[shard]:
            want[shard] -= 1
            out.append(name)
    return out


def _node(region: str, i: int) -> Node:
    return Node(
        node_id=mint_id(region), owner_id="bench", region=region, node_type="datacenter",
        name=f"n{i}", lat=40.0, lng=-74.0, total_ram_gb=65_536, total_vram_gb=0,
        offered_ram_gb=65_536, offered_vram_gb=0, price_pusd=800_000,
        max_duration_s=10**6, heartbeat_interval_s=60.0,
    )  # fmt: skip


async def _setup(url: str, regions: list[str], nodes: int) -> dict[str, list[str]]:
    client = open_redis(url)
    try:
        market = Market(client, Keys(PREFIX))
        await market.load_scripts()
        out = {}
        for region in regions:
            registered = await market.register_many([_node(region, i) for i in range(nodes)], T0)
            out[region] = [n.node_id for n in registered]
        return out
    finally:
        await client.aclose()


async def _load(
    url: str,
    kind: str,
    nodes: dict[str, list[str]],
    seconds: float,
    seed: int,
    share: int = 0,
    clients: int = 1,
) -> int:
    client = open_redis(url)
    market = Market(client, Keys(PREFIX))
    done = 0
    try:
        await market.load_scripts()
        end = time.monotonic() + seconds
        now_ms = T0 + 1000
        turn = seed
        while time.monotonic() < end:
            turn += 1
            now_ms += 1
            if kind == "reserve":
                # a batch per region in each round trip: every primary gets work from each
                requests = [
                    ReserveRequest(
                        node_id=ids[(turn * RESERVE_BATCH + j) % len(ids)],
                        client_id="c",
                        user_id="u",
                        ram_gb=1,
                        vram_gb=0,
                        duration_s=60,
                        max_price_pusd=10**7,
                    )
                    for ids in nodes.values()
                    for j in range(RESERVE_BATCH)
                ]
                results = await market.reserve_many(requests, now_ms)
                done += sum(1 for r in results if not isinstance(r, Exception))
            else:
                # each client beats its own share of the nodes, at the wall clock's time (a
                # beat older than the node's last is refused)
                now_ms = max(now_ms + 1, time.time_ns() // 1_000_000)
                beats = [
                    Heartbeat(node_id=i, available_ram_gb=65_536, available_vram_gb=0)
                    for ids in nodes.values()
                    for i in ids[share::clients]
                ]
                outcomes = await market.heartbeat("bench", beats, now_ms, 0)
                done += sum(1 for o in outcomes if o.outcome == "ok")
    finally:
        await client.aclose()
    return done


def _client(args: tuple[str, str, dict[str, list[str]], float, int, int, int]) -> int:
    return asyncio.run(_load(*args))


def _cpu(cluster: LocalCluster) -> dict[int, tuple[float, int]]:
    """Per primary port: (CPU seconds, commands processed) so far."""
    out = {}
    for server in cluster.primaries():
        c = redis.Redis(port=server.port)
        cpu = c.info("cpu")
        stats = c.info("stats")
        out[server.port] = (
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            int(stats["total_commands_processed"]),
        )
        c.close()
    return out


def measure(shards: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    cpus = list(range(min(cores, shards))) if args.pin else None
    regions = _regions(shards, REGIONS_PER_SHARD.get(shards, 2))
    out: dict[str, Any] = {"shards": shards, "regions": regions, "pinned": cpus}
    with LocalCluster(tmp / f"c{shards}", masters=shards, appendonly=True, cpus=cpus) as cluster:
        nodes = asyncio.run(_setup(cluster.url, regions, args.nodes))
        for kind in ("reserve", "heartbeat"):
            rates, per_op = [], []
            for round_ in range(args.rounds):
                before = _cpu(cluster)
                start = time.monotonic()
                with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
                    done = pool.map(
                        _client,
                        [
                            (
                                cluster.url,
                                kind,
                                nodes,
                                args.seconds,
                                7919 * (round_ + 1) + i,
                                i,
                                args.clients,
                            )
                            for i in range(args.clients)
                        ],
                    )
                wall = time.monotonic() - start
                after = _cpu(cluster)
                total = sum(done)
                rates.append(total / args.seconds)
                # operations per shard: the regions are spread evenly, so each shard did
                # total / shards of them
                shard_cpu = [after[p][0] - before[p][0] for p in after]
                per_op.append([1e6 * cpu / max(1.0, total / shards) for cpu in shard_cpu])
                print(
                    f"  {shards} shard(s) {kind}: {total / args.seconds:,.0f}/s "
                    f"(wall {wall:.1f} s), server CPU per op per shard "
                    f"{', '.join(f'{u:.1f}' for u in per_op[-1])} us, "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            median = statistics.median(rates)
            cpu_us = statistics.median(statistics.mean(r) for r in per_op)
            out[kind] = {
                "rates": rates,
                "median_per_s": median,
                "cpu_us_per_op_per_shard": cpu_us,
                "projected_per_s_core_per_shard": shards * 1e6 / cpu_us,
            }
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_cluster")
    parser.add_argument("--shards", default="1,2,3")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1000, help="nodes per region")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="mnemo-bench-cluster-") as tmp:
        for shards in (int(s) for s in args.shards.split(",")):
            results.append(measure(shards, args, Path(tmp)))
    base = results[0]
    print("\nshards | reserves/s | x | heartbeats/s | x | CPU us/op/shard (res, hb) | projected")
    for r in results:
        res, hb = r["reserve"], r["heartbeat"]
        print(
            f"{r['shards']} | {res['median_per_s']:,.0f} | "
            f"x{res['median_per_s'] / base['reserve']['median_per_s']:.2f} | "
            f"{hb['median_per_s']:,.0f} | "
            f"x{hb['median_per_s'] / base['heartbeat']['median_per_s']:.2f} | "
            f"{res['cpu_us_per_op_per_shard']:.1f}, {hb['cpu_us_per_op_per_shard']:.1f} | "
            f"{res['projected_per_s_core_per_shard']:,.0f} res/s, "
            f"{hb['projected_per_s_core_per_shard']:,.0f} hb/s"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
