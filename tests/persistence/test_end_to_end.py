"""End to end with the engine's real scripts: Market -> streams -> journal -> Postgres, then
Redis lost and the live market rebuilt from Postgres."""

from __future__ import annotations

import asyncio
import io
import random
import time
import uuid

import asyncpg
import redis.asyncio as aioredis

from engine.errors import MarketError
from engine.keys import Keys
from engine.market import Market
from engine.replay import region_snapshot, snapshot_digest
from engine.settings import Settings
from engine.types import Bid, Heartbeat, Node, NodeChanges
from persistence.journal.worker import run_journal
from persistence.rebuild import rebuild_live
from tests.conftest import _SEED, _delete_prefix
from tests.engine.claims import without_empty_claims
from tests.persistence.test_journal_worker import _eventually

REGIONS = ("us-east-2", "eu-west-1")


async def _accounts(conn: asyncpg.Connection, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        user, client = uuid.uuid4().hex, uuid.uuid4().hex
        await conn.execute(
            "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'x', 'user')",
            user,
            f"{user}@example.test",
        )
        await conn.execute(
            "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')", client, user
        )
        out.append((user, client))
    return out


async def _trade(market: Market, rng: random.Random, owners: list, renters: list) -> int:
    """Drive the real scripts through a small market day; returns the number of calls made."""
    now = int(time.time() * 1000) - 600_000
    nodes: list[Node] = []
    contracts: list[str] = []
    calls = 0
    for i in range(12):
        owner = rng.choice(owners)[0]
        node = Node(
            node_id=uuid.uuid4().hex,
            owner_id=owner,
            region=REGIONS[i % 2],
            node_type=rng.choice(["datacenter", "edge_cluster", "mist_node"]),
            name=f"n{i}",
            lat=40 + rng.random(),
            lng=-73 + rng.random(),
            total_ram_gb=64,
            total_vram_gb=24,
            offered_ram_gb=48,
            offered_vram_gb=16,
            price_pusd=rng.randint(500_000, 1_500_000),
        )
        nodes.append(await market.register_node(node, now))
        calls += 1
    for _step in range(150):
        now += rng.randint(100, 3000)
        action = rng.random()
        try:
            if action < 0.3:
                node = rng.choice(nodes)
                beat = Heartbeat(
                    node_id=node.node_id,
                    available_ram_gb=rng.randint(8, 48),
                    available_vram_gb=rng.randint(0, 16),
                    cpu_usage_pct=rng.uniform(0, 100),
                    temperature_c=rng.randint(30, 80),
                )
                await market.heartbeat(node.owner_id, [beat], now, 0)
            elif action < 0.55:
                user, client = rng.choice(renters)
                c = await market.reserve(
                    node_id=rng.choice(nodes).node_id,
                    client_id=client,
                    user_id=user,
                    ram_gb=rng.randint(1, 8),
                    vram_gb=rng.randint(0, 2),
                    duration_s=rng.choice([60, 600, 3600]),
                    max_price_pusd=2_000_000,
                    now_ms=now,
                )
                contracts.append(c.contract_id)
            elif action < 0.7 and contracts:
                await market.settle(contracts.pop(rng.randrange(len(contracts))), 1.5, now)
            elif action < 0.8 and contracts:
                await market.extend(rng.choice(contracts), 600, now)
            elif action < 0.95:
                user, client = rng.choice(renters)
                await market.place_bid(
                    Bid(
                        bid_id=uuid.uuid4().hex,
                        region=rng.choice(REGIONS),
                        client_id=client,
                        user_id=user,
                        ram_gb=rng.randint(1, 4),
                        vram_gb=0,
                        duration_s=600,
                        max_price_pusd=rng.randint(100_000, 400_000),
                    ),
                    now,
                )
            else:
                await market.update_node(
                    rng.choice(nodes).node_id,
                    NodeChanges(price_pusd=rng.randint(500_000, 1_500_000)),
                    now,
                )
            calls += 1
        except MarketError:
            pass  # a refusal is a normal outcome (capacity taken, price above cap, ...)
    return calls


async def _snapshots(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
    return {r: snapshot_digest(await region_snapshot(redis, keys, r)) for r in REGIONS}


async def test_scripts_to_postgres_and_back(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """The journal stores every event the scripts wrote and its tables agree with the live
    market; after Redis is wiped, rebuild-live restores the same live state, and trading and
    journaling go on with fresh event ids."""
    market = Market(redis, keys)
    await market.load_scripts()
    rng = random.Random(_SEED)
    owners = await _accounts(conn, 2)
    renters = await _accounts(conn, 3)
    await _trade(market, rng, owners, renters)
    total = {r: int(await redis.get(keys.seq(r)) or 0) for r in REGIONS}
    settings = Settings(redis_url=redis_url, database_url=db_url, key_prefix=keys.prefix)

    async def journaled() -> bool:
        rows = await conn.fetch("SELECT region, applied_seq FROM journal_positions")
        return {r["region"]: r["applied_seq"] for r in rows} == total

    stop = asyncio.Event()
    worker = asyncio.create_task(run_journal(settings, consumer="e2e", stop=stop))
    try:
        await _eventually(journaled, 60, "the journal to catch up")
        # The tables agree with the live market.
        for node in await market.nodes():
            row = await conn.fetchrow("SELECT * FROM nodes WHERE id = $1", node.node_id)
            assert (row["status"], row["reserved_ram_gb"], row["offered_ram_gb"]) == (
                node.status,
                node.reserved_ram_gb,
                node.offered_ram_gb,
            )
            assert row["price_pusd"] == node.price_pusd
        live = {c.contract_id: c for c in await market.contracts()}
        active = await conn.fetch("SELECT id, end_time FROM contracts WHERE status = 'active'")
        assert {r["id"].hex for r in active} == {k for k, c in live.items() if c.status == "active"}
        before = {r: await region_snapshot(redis, keys, r) for r in REGIONS}

        # Redis is lost; the journal loses its streams with it.
        stop.set()
        await asyncio.wait_for(worker, 30)
        await _delete_prefix(redis, keys.prefix)
        out = io.StringIO()
        assert await rebuild_live(settings, out=out) == 0, out.getvalue()
        assert "100%" in out.getvalue() or "events" in out.getvalue()
        # The same live state, less the directory claims of ids whose object was never made
        # (a refused bid's): they name nothing, and no event records them.
        after = await _snapshots(redis, keys)
        rebuilt = {r: await region_snapshot(redis, keys, r) for r in REGIONS}
        expected = without_empty_claims(before, rebuilt)
        assert after == {r: snapshot_digest(expected[r]) for r in REGIONS}
        # A second run refuses to merge into a live region.
        assert await rebuild_live(settings, out=io.StringIO()) == 1

        # Trading goes on: new events continue the sequence and are journaled.
        stop = asyncio.Event()
        worker = asyncio.create_task(run_journal(settings, consumer="e2e", stop=stop))
        node = next(n for n in await market.nodes() if n.region == "us-east-2")
        await market.update_node(
            node.node_id,
            NodeChanges(name="after"),
            int(time.time() * 1000),
        )
        total["us-east-2"] += 1

        await _eventually(journaled, 60, "the journal to pick up the new event")
        assert await conn.fetchval("SELECT name FROM nodes WHERE id = $1", node.node_id) == "after"
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
