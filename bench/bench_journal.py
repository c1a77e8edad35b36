"""Journal throughput: events per second from Redis streams into Postgres, end to end.

Each round: a fresh migrated database (copied with STRATEGY FILE_COPY, its metrics partitions
made beforehand, as a running journal has them) and key prefix, a market history XADDed to the
region streams beforehand (not timed), then one `run_journal` worker is started and timed until
every region's `applied_seq` reaches its last event (stored, applied to every table,
acknowledged afterwards). Reports each round and the median, and the CPU time per event spent
in this process (the worker: reading, decoding, folding), in the worker's Postgres backend (from
/proc, so the server must run on this machine) and in the Redis server (INFO cpu: all its
clients, so other work on a shared server shows there too). On a machine busy with other work
the wall clock says little; the CPU figures say what the rate is on idle cores: the worker
overlaps its own work with the database's, so about 1e6 / max(worker, backend) events/s with
two free cores, or 1e6 / (worker + backend + redis) on one.

    .venv/bin/python -m bench.bench_journal --events 200000 --rounds 5 --workers 2
    .venv/bin/python -m bench.bench_journal --events 200000 --rounds 5 --heartbeat-weight 40 --entries 1
    .venv/bin/python -m bench.bench_journal --events 60000 --rate 20000 --duration 15   # lag

With `--workers N` (N > 1), N journal processes run instead, worker k journaling shard k/N of the
regions as `mnemo journal --shard k/N` does; their CPU is summed, and so is their backends'.

With `--rate`, a producer process (the engine's part: XADD from a process of its own) sends the
history at that rate, over and over with shifted sequence numbers, while one worker journals it
in this process; every 20 ms the age of the oldest event not yet applied in Postgres is sampled.

Servers: MNEMO_BENCH_REDIS_URL / MNEMO_BENCH_DATABASE_URL (default: the local dev servers,
redis://127.0.0.1:6379/0 and postgresql://postgres@127.0.0.1:5432/postgres; the database named
in the URL is only used to create and drop one scratch database per round).

The default mix is the generator's (tests/persistence/history.py): about a third heartbeat
events (1-4 entries each), the rest registrations, updates, bids, fills, extensions, settlements
and failovers over two regions and up to 2000 nodes per region.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import hiredis
import msgspec
import redis.asyncio as aioredis

from bench.servers import delete_prefix
from engine.keys import Keys
from engine.settings import Settings
from persistence.journal.partitions import ensure_partitions
from persistence.journal.worker import BATCH_SIZE, run_journal
from persistence.migrations import migrate
from tests.persistence.history import History, seed_accounts, xadd_all


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a local process (nan when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# FILE_COPY: the scratch database's files (free space maps included) are copied by the admin's
# backend, outside the timing. Under the default (WAL_LOG) the journal's backend creates the
# catalogs' missing free space maps as it first writes them: a few milliseconds a file on a
# filesystem busy with other benchmarks' dropped databases, ~10% of a short round's backend CPU
# that a long-running journal never pays.
_CREATE_DATABASE = 'CREATE DATABASE "{}" STRATEGY FILE_COPY'


async def _ready_partitions(conn: asyncpg.Connection, h: History) -> None:
    """The metrics partitions the worker would otherwise create in its first transactions (the
    history's days, and the days ahead that its maintenance keeps): a running journal creates
    one a day, not in every batch."""
    days = {datetime.fromtimestamp(e.ts_ms / 1000, UTC).date() for e in h.events}
    today = datetime.now(UTC).date()
    days |= {today + timedelta(days=d) for d in range(3)}
    await ensure_partitions(conn, days)


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _redis_cpu_s(redis: aioredis.Redis) -> float:
    """The Redis server's CPU seconds so far (all its clients: other work on a shared server
    shows here too)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _shard_main(
    settings: Settings, shard: tuple[int, int], batch: int, ready: Any, go: Any, stop: Any
) -> None:
    """One of `--workers` journal processes: journals its shard of the regions from `go` until
    `stop` (multiprocessing events)."""

    async def run() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        # The multiprocessing event is waited for in a thread, which then sets the loop's.
        watcher = loop.run_in_executor(
            None, lambda: (stop.wait(), loop.call_soon_threadsafe(stopped.set))
        )
        await run_journal(
            settings, consumer=f"bench-{shard[0]}", stop=stopped, batch_size=batch, shard=shard
        )
        await watcher

    ready.wait()
    go.wait()
    asyncio.run(run())


async def _round(
    redis_url: str, admin_url: str, h: History, encoded: list, batch: int, workers: int
) -> tuple[float, int, float, float, float]:
    name = f"mnemo_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(_CREATE_DATABASE.format(name))
    db_url = _with_database(admin_url, name)
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}:")
    redis = aioredis.from_url(redis_url)
    try:
        await migrate(db_url)
        conn = await asyncpg.connect(db_url)
        await seed_accounts(conn, h)
        await _ready_partitions(conn, h)
        await xadd_all(redis, keys, encoded)
        last: dict[str, int] = {}
        for e in h.events:
            last[e.region] = max(last.get(e.region, 0), int(e.event_id.rsplit(":", 1)[1]))
        settings = Settings(redis_url=redis_url, database_url=db_url, key_prefix=keys.prefix)
        stop = asyncio.Event()
        # --workers N > 1: N processes, worker k journaling shard k/N of the regions (as
        # `mnemo journal --shard k/N` does), started and imported before the clock starts.
        ctx = multiprocessing.get_context("spawn")
        ready, go, stop_all = ctx.Barrier(workers + 1), ctx.Event(), ctx.Event()
        procs = [
            ctx.Process(
                target=_shard_main,
                args=(settings, (k, workers), batch, ready, go, stop_all),
                daemon=True,
            )
            for k in range(workers if workers > 1 else 0)
        ]
        for proc in procs:
            proc.start()
        if procs:
            await asyncio.to_thread(ready.wait)
        started = time.perf_counter()
        cpu_started = time.process_time() if not procs else sum(_cpu_s(p.pid) for p in procs)
        redis_started = await _redis_cpu_s(redis)
        go.set()
        worker = (
            None
            if procs
            else asyncio.create_task(
                run_journal(settings, consumer="bench", stop=stop, batch_size=batch)
            )
        )
        backends: set[int] = set()  # the workers' Postgres connections
        while True:
            if len(backends) < max(1, workers):
                backends.update(
                    pid
                    for (pid,) in await conn.fetch(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE application_name LIKE 'mnemo-journal:bench%'"
                    )
                )
            rows = await conn.fetch("SELECT region, applied_seq FROM journal_positions")
            if {r["region"]: r["applied_seq"] for r in rows} == last:
                break
            if worker is not None and worker.done():
                worker.result()
            if any(not p.is_alive() for p in procs):
                raise RuntimeError("a journal worker process died")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        if procs:
            own_cpu = sum(_cpu_s(p.pid) for p in procs) - cpu_started
        else:
            own_cpu = time.process_time() - cpu_started
        backend_cpu = sum(_cpu_s(pid) for pid in backends)
        redis_cpu = await _redis_cpu_s(redis) - redis_started
        stop.set()
        stop_all.set()
        if worker is not None:
            await worker
        for proc in procs:
            await asyncio.to_thread(proc.join, 30)
        metrics = await conn.fetchval("SELECT count(*) FROM node_metrics")
        await conn.close()
        return elapsed, metrics, own_cpu, backend_cpu, redis_cpu
    finally:
        await delete_prefix(redis, keys.prefix)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _schedule(h: History, total: int) -> tuple[list[str], list[int]]:
    """(region, seq) of the i-th event sent in a lag run: the history over and over, each pass
    with its sequence numbers moved past the previous pass's (the journal's upserts take the
    same nodes, bids and contracts again)."""
    last: dict[str, int] = {}
    for e in h.events:
        last[e.region] = max(last.get(e.region, 0), int(e.event_id.rsplit(":", 1)[1]))
    regions, seqs = [], []
    n = len(h.events)
    for i in range(total):
        e = h.events[i % n]
        regions.append(e.region)
        seqs.append(int(e.event_id.rsplit(":", 1)[1]) + (i // n) * last[e.region])
    return regions, seqs


def _produce(
    redis_url: str,
    keys: Keys,
    h: History,
    schedule: tuple[list[str], list[int]],
    rate: float,
    sent_at: Any,
) -> None:
    """The producer process: XADD the schedule at `rate` events/s (every 5 ms, the events due),
    each stamped with the time it is sent; `sent_at[i]` is when event i went (monotonic)."""

    async def run() -> None:
        redis = aioredis.from_url(redis_url)
        encoder = msgspec.json.Encoder()
        regions, seqs = schedule
        n = len(h.events)
        pool = redis.connection_pool
        conn = await pool.get_connection()
        started = time.monotonic()
        i = 0
        while i < len(seqs):
            due = min(len(seqs), int((time.monotonic() - started) * rate) + 1)
            if due > i:
                now_ms = int(time.time() * 1000)
                packed = []
                for j in range(i, due):
                    region = regions[j]
                    event = msgspec.structs.replace(
                        h.events[j % n], event_id=f"{region}:{seqs[j]}", ts_ms=now_ms
                    )
                    command = (b"XADD", keys.events(region), b"*", b"e", encoder.encode(event))
                    packed.append(hiredis.pack_command(command))  # type: ignore[arg-type]
                await conn.send_packed_command(b"".join(packed))
                sent = time.monotonic()
                for j in range(i, due):
                    await conn.read_response()
                    sent_at[j] = sent
                i = due
            await asyncio.sleep(0.005)
        await pool.release(conn)
        await redis.aclose()

    asyncio.run(run())


async def _lag_run(
    redis_url: str, admin_url: str, h: History, rate: float, duration_s: float, batch: int
) -> list[float]:
    """Events XADDed at `rate` per second for `duration_s` by a producer process (as the engine
    and gateway do, from processes of their own) while one worker journals them in this one;
    every 20 ms, the age of the oldest event not yet applied in Postgres (0 when none).
    Returns the samples in seconds."""
    name = f"mnemo_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(_CREATE_DATABASE.format(name))
    db_url = _with_database(admin_url, name)
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}:")
    redis = aioredis.from_url(redis_url)
    total = int(rate * duration_s)
    schedule = _schedule(h, total)
    index: dict[str, list[int]] = {r: [] for r in h.regions}  # region -> seq - 1 -> i
    for i, region in enumerate(schedule[0]):
        index[region].append(i)
    ctx = multiprocessing.get_context("spawn")
    sent_at = ctx.RawArray("d", total)
    try:
        await migrate(db_url)
        conn = await asyncpg.connect(db_url)
        await seed_accounts(conn, h)
        await _ready_partitions(conn, h)
        await redis.sadd(keys.regions, *h.regions)
        settings = Settings(redis_url=redis_url, database_url=db_url, key_prefix=keys.prefix)
        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_journal(settings, consumer="bench", stop=stop, batch_size=batch)
        )
        await asyncio.sleep(0.5)  # the worker has created its consumer groups
        producer = ctx.Process(
            target=_produce, args=(redis_url, keys, h, schedule, rate, sent_at), daemon=True
        )
        producer.start()
        samples: list[float] = []
        while producer.is_alive():
            rows = await conn.fetch("SELECT region, applied_seq FROM journal_positions")
            applied = {r["region"]: r["applied_seq"] for r in rows}
            now = time.monotonic()
            ages = []
            for region, at in index.items():
                done = applied.get(region, 0)
                if done < len(at) and sent_at[at[done]]:
                    ages.append(now - sent_at[at[done]])
            samples.append(max(ages, default=0.0))
            if worker.done():
                worker.result()
            await asyncio.sleep(0.02)
        producer.join()
        stop.set()
        await worker
        await conn.close()
        sent = sorted(t for t in sent_at if t)
        if len(sent) > 1:
            achieved = len(sent) / (sent[-1] - sent[0])
            print(f"producer: {len(sent)} events sent at {achieved:,.0f} events/s")
        return samples
    finally:
        await delete_prefix(redis, keys.prefix)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=BATCH_SIZE, help="journal batch size")
    parser.add_argument("--entries", type=int, default=4, help="max entries per heartbeat event")
    parser.add_argument(
        "--heartbeat-weight", type=int, default=6, help="weight of heartbeat events in the mix"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="journal processes, each taking its shard of the regions (mnemo journal --shard)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="instead of throughput: XADD this many events/s and report the journal's lag",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds, with --rate")
    args = parser.parse_args()
    redis_url = os.environ.get("MNEMO_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    admin_url = os.environ.get(
        "MNEMO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    t = time.perf_counter()
    h = History.generate(
        args.seed,
        args.events,
        max_nodes=2000,
        max_entries=args.entries,
        heartbeat_weight=args.heartbeat_weight,
    )
    encoded = h.encoded()
    # The history stays in this process (the worker runs in it too): keep the garbage
    # collector from walking it over and over, which a real worker would not pay.
    gc.collect()
    gc.freeze()
    n = len(encoded)
    print(f"history: {n} events generated in {time.perf_counter() - t:.1f} s", flush=True)
    if args.rate:
        samples = sorted(
            await _lag_run(redis_url, admin_url, h, args.rate, args.duration, args.batch)
        )
        p50 = samples[len(samples) // 2]
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        print(
            f"lag at {args.rate:,.0f} events/s for {args.duration:.0f} s: "
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {samples[-1] * 1000:.0f} ms "
            f"({len(samples)} samples of the oldest event not yet applied in Postgres)"
        )
        return
    rates, own, backend, server = [], [], [], []
    for i in range(args.rounds):
        elapsed, metrics, own_cpu, backend_cpu, redis_cpu = await _round(
            redis_url, admin_url, h, encoded, args.batch, args.workers
        )
        rates.append(n / elapsed)
        own.append(own_cpu / n * 1e6)
        backend.append(backend_cpu / n * 1e6)
        server.append(redis_cpu / n * 1e6)
        print(
            f"round {i + 1}: {n} events ({metrics} heartbeat entries) in {elapsed:.2f} s = "
            f"{n / elapsed:,.0f} events/s; CPU per event: worker {own[-1]:.1f} us, "
            f"postgres backend {backend[-1]:.1f} us, redis {server[-1]:.1f} us",
            flush=True,
        )
    w, b, r = statistics.median(own), statistics.median(backend), statistics.median(server)
    print(
        f"median: {statistics.median(rates):,.0f} events/s wall clock over {args.rounds} rounds; "
        f"CPU per event: worker {w:.1f} us, postgres backend {b:.1f} us, redis {r:.1f} us -> "
        f"on idle cores ~{1e6 / max(w, b):,.0f} events/s (two cores), "
        f"~{1e6 / (w + b + r):,.0f} (one)"
    )


if __name__ == "__main__":
    asyncio.run(main())
