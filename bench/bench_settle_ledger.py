"""Settlements per second with the ledger (issue 14) against the same without it, in one run.

"Without it" is the code before issue 14: a copy of another git revision (default `main`,
extracted with `git archive` into a temporary folder) runs the same workload in a process of
its own, alternating with this checkout's, round after round. One round of one tree:
- set-up, not timed: a fresh key prefix and a fresh migrated database; `--nodes` nodes,
  `--contracts` one-GB contracts of one hour reserved on them by 100 renters (with the ledger,
  each renter is credited and its money moved to the region first, as the gateway does); the
  set-up's events journaled into Postgres;
- timed, "settle": every contract settled through `Market.settle` (read, then the settle
  script: with the ledger it also captures from the hold, releases the rest and reports the
  fee), `--concurrency` at a time;
- timed, "journal": the settlements' events written into Postgres by the journal's
  `write_batch`, `--batch` events per transaction (with the ledger: the contract rows plus a
  balanced movement of four entries and a `transactions` row per settlement);
- "end to end": contracts / (settle + journal), the rate one engine and one journal worker
  sustain one after the other on one core each.
Each figure is the median of `--rounds` rounds; the ratio is this checkout's over the base's.
On a machine shared with other work the wall clock is noisy; the CPU time per settlement (the
engine's client and the Redis server while settling, the journal worker and its Postgres
backend while journaling) says what each costs on idle cores.

    .venv/bin/python -m bench.bench_settle_ledger --contracts 20000 --rounds 5

Servers: MNEMO_BENCH_REDIS_URL / MNEMO_BENCH_DATABASE_URL (default: the local dev servers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDIS_URL = os.environ.get("MNEMO_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get(
    "MNEMO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
HERE = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000_000


async def _workload(contracts: int, nodes: int, concurrency: int, batch: int) -> dict[str, Any]:
    """One round in the tree this process imports from (its cwd)."""
    import asyncpg
    import redis.asyncio as aioredis

    from engine.keys import Keys
    from engine.market import Market, ReserveRequest
    from engine.types import Node
    from persistence.journal.batch import write_batch
    from persistence.journal.stored import decode_entry
    from persistence.migrations import migrate

    region = "bench"
    name = f"mnemo_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = urlunsplit(urlsplit(DATABASE_URL)._replace(path=f"/{name}"))
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}:")
    redis = aioredis.from_url(REDIS_URL)
    try:
        await migrate(db_url)
        conn = await asyncpg.connect(db_url)
        market = Market(redis, keys)
        await market.load_scripts()
        money = hasattr(market, "credit")
        owner, user = str(uuid.uuid4()), str(uuid.uuid4())
        clients = [str(uuid.uuid4()) for _ in range(100)]
        await conn.executemany(
            "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')",
            [(owner, f"{owner}@b.test"), (user, f"{user}@b.test")],
        )
        await conn.executemany(
            "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')",
            [(c, user) for c in clients],
        )
        per_node = -(-contracts // nodes)
        registered = await market.register_many(
            [
                Node(node_id=uuid.uuid4().hex, owner_id=owner, region=region,
                     node_type="datacenter", name=f"n{i}", lat=1.0, lng=1.0,
                     total_ram_gb=per_node, total_vram_gb=0, offered_ram_gb=per_node,
                     offered_vram_gb=0, price_pusd=800_000, egress_price_pusd=10**10)
                for i in range(nodes)
            ],
            T0,
        )  # fmt: skip
        if money:
            for c in clients:
                amount = 10**15
                await market.credit(c, amount, key=f"bench:{c}", rail="operator", now_ms=T0)  # type: ignore[attr-defined]
                await market.fund_region(c, region, amount, now_ms=T0)  # type: ignore[attr-defined]
        requests = [
            ReserveRequest(node_id=registered[i % nodes].node_id, client_id=clients[i % 100],
                           user_id=user, ram_gb=1, vram_gb=0, duration_s=3600,
                           max_price_pusd=1_000_000)
            for i in range(contracts)
        ]  # fmt: skip
        made = await market.reserve_many(requests, T0)
        ids = [c.contract_id for c in made if not isinstance(c, Exception)]
        assert len(ids) == contracts, [c for c in made if isinstance(c, Exception)][:3]
        streams = [keys.events(region)] + ([keys.events("+funding")] if money else [])
        last: dict[str, bytes] = {}

        async def new_events() -> list[Any]:
            out = []
            for stream in streams:
                start = b"(" + last[stream] if stream in last else b"-"
                for entry_id, fields in await redis.xrange(stream, start, "+"):
                    out.append(decode_entry(fields[b"e"]))
                    last[stream] = entry_id
            return out

        setup = await new_events()
        for i in range(0, len(setup), batch):
            await write_batch(conn, setup[i : i + batch])

        queue = list(ids)
        settle_at = T0 + 600_000

        async def settler() -> None:
            while queue:
                await market.settle(queue.pop(), 0.5, settle_at)

        backend = await conn.fetchval("SELECT pg_backend_pid()")
        redis_cpu, cpu = await _redis_cpu_s(redis), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(settler() for _ in range(concurrency)))
        settle_s = time.perf_counter() - started
        settle_cpu = time.process_time() - cpu
        settle_redis_cpu = await _redis_cpu_s(redis) - redis_cpu
        settled = await new_events()
        assert len(settled) == contracts
        pg_cpu, cpu = _proc_cpu_s(backend), time.process_time()
        started = time.perf_counter()
        for i in range(0, len(settled), batch):
            await write_batch(conn, settled[i : i + batch])
        journal_s = time.perf_counter() - started
        journal_cpu = time.process_time() - cpu
        journal_pg_cpu = _proc_cpu_s(backend) - pg_cpu
        if money:
            assert await conn.fetchval("SELECT sum(amount_pusd) FROM ledger_entries") == 0
        await conn.close()
        return {
            "ledger": money,
            "settle_per_s": contracts / settle_s,
            "journal_per_s": contracts / journal_s,
            "end_to_end_per_s": contracts / (settle_s + journal_s),
            # CPU per settlement in microseconds: the engine's client, the Redis server (all
            # its clients: others' work on a shared server shows here too), the journal
            # worker, its Postgres backend (from /proc: the server runs on this machine)
            "settle_client_us": settle_cpu / contracts * 1e6,
            "settle_redis_us": settle_redis_cpu / contracts * 1e6,
            "journal_worker_us": journal_cpu / contracts * 1e6,
            "journal_pg_us": journal_pg_cpu / contracts * 1e6,
            "cpu_us": (settle_cpu + settle_redis_cpu + journal_cpu + journal_pg_cpu)
            / contracts
            * 1e6,
        }
    finally:
        found = [k async for k in redis.scan_iter(match=f"{keys.prefix}*", count=1000)]
        if found:
            await redis.unlink(*found)
        await redis.aclose()
        admin = await asyncpg.connect(DATABASE_URL)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _redis_cpu_s(redis: Any) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--workload", "--contracts",
         str(args.contracts), "--nodes", str(args.nodes), "--concurrency",
         str(args.concurrency), "--batch", str(args.batch)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"round in {tree} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contracts", type=int, default=20_000)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--base", default="main", help="git revision without the ledger")
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        result = asyncio.run(_workload(args.contracts, args.nodes, args.concurrency, args.batch))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="mnemo-base-") as base:
        archive = subprocess.run(
            ["git", "archive", args.base], cwd=HERE, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        runs: dict[str, list[dict[str, Any]]] = {"base": [], "ledger": []}
        for r in range(args.rounds):
            for name, tree in (("base", Path(base)), ("ledger", HERE)):
                runs[name].append(_round(tree, args))
                print(f"round {r + 1} {name:6s} " + "  ".join(
                    f"{k} {v:,.1f}" for k, v in runs[name][-1].items() if k != "ledger"
                ), flush=True)  # fmt: skip
    print(f"\nmedians of {args.rounds} rounds, {args.contracts:,} settlements each "
          f"(base: {args.base}):")  # fmt: skip
    for metric in ("settle_per_s", "journal_per_s", "end_to_end_per_s", "settle_client_us",
                   "settle_redis_us", "journal_worker_us", "journal_pg_us", "cpu_us"):  # fmt: skip
        base_m = statistics.median(x[metric] for x in runs["base"])
        ledger_m = statistics.median(x[metric] for x in runs["ledger"])
        unit = "/s" if metric.endswith("_per_s") else "us"
        print(f"  {metric:18s} base {base_m:>9,.1f}{unit}  ledger {ledger_m:>9,.1f}{unit}  "
              f"x{ledger_m / base_m:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
