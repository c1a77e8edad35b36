"""Benchmarks of the live market's scripts: pipelined reserves and batched heartbeats.

pytest-benchmark, not part of the test suite (CI does not run `bench/`):

    .venv/bin/pytest bench/bench_market.py --benchmark-only -q -p no:cacheprovider -s

The server is a private embedded Valkey started for the run (append-only file, fsync every
second: the production setting), unless `MNEMO_BENCH_REDIS_URL` names one. Each benchmark
records in `extra_info`, and prints:

- the rate from the median round (wall clock, the figure to compare with the targets: >= 20,000
  contracts/s pipelined, >= 100,000 heartbeats/s in batched script calls);
- CPU microseconds per item in this client process and in the server (from the server's
  `INFO cpu`; meaningful only on a server nobody else is using, like the private one), which
  say what the rate would be on idle cores when the wall clock is disturbed by other load;
- the 1-minute load average at the end (how disturbed the wall clock was).

Figures are end to end from one Python process: request validation, script calls, decoding
every answer. `reserve` is measured with one pipelined client and with four concurrent ones
(as several gateways or engines would be); requests stay in order within each client.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bench.servers import delete_prefix
from engine import core
from engine.keys import Keys
from engine.market import Market, ReserveRequest
from engine.types import Contract, Heartbeat, LeaseMeter, Node

T0 = 1_700_000_000_000
RESERVES_PER_ROUND = 5_000
FLEET = int(os.environ.get("MNEMO_BENCH_FLEET", "10000"))
"""Nodes beating in the heartbeat benchmarks (`MNEMO_BENCH_FLEET=1000000` for a million)."""
ROUNDS = int(os.environ.get("MNEMO_BENCH_ROUNDS", "10"))
HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    given = os.environ.get("MNEMO_BENCH_REDIS_URL")
    if given:
        yield given
        return
    from scripts.embedded import EmbeddedServers

    with tempfile.TemporaryDirectory(prefix="mnemo-bench-") as tmp:
        with EmbeddedServers(Path(tmp), want_redis=True, want_postgres=False) as servers:
            yield servers.redis_url


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def market(loop: asyncio.AbstractEventLoop, redis_url: str) -> Iterator[Market]:
    client = aioredis.from_url(redis_url, max_connections=64)
    keys = Keys(f"bench{uuid.uuid4().hex[:10]}:")
    m = Market(client, keys)
    loop.run_until_complete(m.load_scripts())
    try:
        yield m
    finally:
        loop.run_until_complete(delete_prefix(client, keys.prefix))
        loop.run_until_complete(client.aclose())


def _node(i: int, **extra: Any) -> Node:
    return Node(
        node_id=f"n{i}", owner_id="fleet", region="us-east-2", node_type="mist_node",
        name=f"node {i}", lat=40.0 + i % 100 / 100, lng=-74.0, total_ram_gb=core.MAX_GB,
        total_vram_gb=core.MAX_GB, offered_ram_gb=core.MAX_GB, offered_vram_gb=core.MAX_GB,
        price_pusd=800_000 + i % 50, **extra,
    )  # fmt: skip


async def _register(market: Market, count: int, **extra: Any) -> None:
    for start in range(0, count, 4000):
        await asyncio.gather(
            *(
                market.register_many(
                    [_node(i, **extra) for i in range(s, min(count, s + 1000))], T0
                )
                for s in range(start, min(count, start + 4000), 1000)
            )
        )


async def _server_cpu_s(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _measure(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    market: Market,
    round_: Callable[[], Awaitable[None]],
    per_round: int,
    name: str,
) -> None:
    """Run the rounds; record the median rate and CPU per item (client, server)."""
    cpu = {"client": 0.0, "server": 0.0, "rounds": 0}

    def run() -> None:
        server = loop.run_until_complete(_server_cpu_s(market.redis))
        client = time.process_time()
        loop.run_until_complete(round_())
        cpu["client"] += time.process_time() - client
        cpu["server"] += loop.run_until_complete(_server_cpu_s(market.redis)) - server
        cpu["rounds"] += 1

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    median = benchmark.stats.stats.median
    items = per_round * cpu["rounds"]
    report = {
        name: round(per_round / median),
        "client_cpu_us_per_item": round(cpu["client"] / items * 1e6, 2),
        "server_cpu_us_per_item": round(cpu["server"] / items * 1e6, 2),
        "loadavg_1m": round(os.getloadavg()[0], 1),
    }
    benchmark.extra_info.update(report)
    print(f"\n{benchmark.name}: {report} (median round {median * 1000:.1f} ms)")


def _reserves(count: int) -> list[ReserveRequest]:
    return [
        ReserveRequest(
            node_id=f"n{i % 100}",
            client_id=f"c{i % 37}",
            user_id="u",
            ram_gb=1,
            vram_gb=1,
            duration_s=3600,
            max_price_pusd=1_000_000,
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("clients", [1, 4])
def test_reserve_pipelined(benchmark: Any, loop: Any, market: Market, clients: int) -> None:
    """Contracts created per second by `reserve_many` (RESERVES_PER_ROUND per round, split
    over `clients` concurrent pipelines)."""
    loop.run_until_complete(_register(market, 100))
    batch = _reserves(RESERVES_PER_ROUND // clients)

    async def round_() -> None:
        outs = await asyncio.gather(*(market.reserve_many(batch, T0 + 1) for _ in range(clients)))
        assert all(isinstance(c, Contract) for out in outs for c in out)

    _measure(benchmark, loop, market, round_, len(batch) * clients, "contracts_per_s")


def test_heartbeat_batches(benchmark: Any, loop: Any, market: Market) -> None:
    """Heartbeats applied per second: one owner's fleet of FLEET nodes per round, in batched
    script calls."""
    loop.run_until_complete(_register(market, FLEET))
    beats = [
        Heartbeat(
            node_id=f"n{i}",
            available_ram_gb=100 + i % 7,
            available_vram_gb=i % 5,
            cpu_usage_pct=12.5,
            temperature_c=40,
        )
        for i in range(FLEET)
    ]
    now = [T0]

    async def round_() -> None:
        now[0] += 1
        out = await market.heartbeat("fleet", beats, now[0], 0)
        assert all(o.outcome == "ok" for o in out)

    # Not measured: each node's first beat, which begins its uptime accounting (engine.trust)
    # and is counted by `test_heartbeat_batches_closing_windows`; the rounds are the steady state.
    loop.run_until_complete(round_())
    _measure(benchmark, loop, market, round_, FLEET, "heartbeats_per_s")


def test_heartbeat_batches_closing_windows(benchmark: Any, loop: Any, market: Market) -> None:
    """The same fleet, each round an hour after the last, on time (the nodes' interval is an
    hour): every beat closes its node's uptime window (engine.trust), the work a node's first
    beat of each hour does (one beat in 60 at the default 60 s interval)."""
    loop.run_until_complete(_register(market, FLEET))
    beats = [
        Heartbeat(node_id=f"n{i}", available_ram_gb=100 + i % 7, available_vram_gb=i % 5)
        for i in range(FLEET)
    ]

    async def hourly() -> None:
        pipe = market.redis.pipeline(transaction=False)
        for i in range(FLEET):
            pipe.hset(market.keys.node("us-east-2", f"n{i}"), "heartbeat_interval_s", "3600.0")
        await pipe.execute()

    loop.run_until_complete(hourly())
    now = [T0]

    async def round_() -> None:
        now[0] += HOUR_MS
        out = await market.heartbeat("fleet", beats, now[0], 0)
        assert all(o.outcome == "ok" for o in out)

    loop.run_until_complete(round_())  # the first beats, as above
    _measure(benchmark, loop, market, round_, FLEET, "heartbeats_per_s")


def test_heartbeat_batches_with_meters(benchmark: Any, loop: Any, market: Market) -> None:
    """The same fleet, each node delivering one RAM lease whose meter rides in every beat
    (delivery: the heartbeat script stores each lease's egress and peak)."""
    loop.run_until_complete(_register(market, FLEET, delivers=True))
    requests = [
        ReserveRequest(
            node_id=f"n{i}",
            client_id="c",
            user_id="u",
            ram_gb=1,
            vram_gb=0,
            duration_s=3600,
            max_price_pusd=1_000_000,
        )
        for i in range(FLEET)
    ]
    contracts = loop.run_until_complete(market.reserve_many(requests, T0))
    assert all(isinstance(c, Contract) and c.lease_state == "pending" for c in contracts)
    ids = [c.contract_id for c in contracts if isinstance(c, Contract)]
    # Every round's meters differ from the last round's (a busy lease: each beat stores its
    # meter and puts it in the event; an idle lease's unchanged meter costs a comparison).
    beats = [
        [
            Heartbeat(
                node_id=f"n{i}",
                available_ram_gb=100 + i % 7,
                available_vram_gb=i % 5,
                cpu_usage_pct=12.5,
                temperature_c=40,
                leases=[
                    LeaseMeter(
                        contract_id=ids[i], egress_bytes=k * 10**9 + i, peak_memory_bytes=k + i
                    )
                ],
            )
            for i in range(FLEET)
        ]
        for k in (1, 2)
    ]
    now = [T0]

    async def round_() -> None:
        now[0] += 1
        out = await market.heartbeat("fleet", beats[now[0] % 2], now[0], 0)
        assert all(o.outcome == "ok" for o in out)

    _measure(benchmark, loop, market, round_, FLEET, "heartbeats_per_s")
