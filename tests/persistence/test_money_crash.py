"""kill -9 between any two steps of moving money (issue 14): a real process
(tests/persistence/money_crash_worker.py) is killed right after each step of a transfer and of
the gateway's contract and bid calls, and at random moments; afterwards, once the engine's
repair loop has run, no hold is without its reservation and no reservation without its hold,
no money is lost or made (funding + regions + holds + in transit + what was spent), and once
the journal has drained, Postgres's ledger equals the live market."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.types import ContractSettled, Node
from tests.persistence.money_checks import drain, holds_match_reservations, ledger_matches_live
from tests.persistence.money_crash_worker import REGION

USD = 10**12


@pytest.fixture
async def world(
    redis: aioredis.Redis, keys: Keys, conn: asyncpg.Connection
) -> AsyncIterator[tuple[Market, str, str]]:
    """A market with one big node and a renter holding 1,000 USD in its funding wallet."""
    market = Market(redis, keys)
    await market.load_scripts()
    owner, user, client = uuid.uuid4().hex, uuid.uuid4().hex, str(uuid.uuid4())
    await conn.executemany(
        "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')",
        [(owner, f"{owner}@x.test"), (user, f"{user}@x.test")],
    )
    await conn.execute(
        "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')", client, user
    )
    node = await market.register_node(
        Node(node_id=uuid.uuid4().hex, owner_id=owner, region=REGION, node_type="datacenter",
             name="big", lat=1.0, lng=1.0, total_ram_gb=1024, total_vram_gb=0,
             offered_ram_gb=1024, offered_vram_gb=0, price_pusd=1_000_000),
        _now(),
    )  # fmt: skip
    await market.credit(client, 1000 * USD, key="seed", rail="operator", now_ms=_now())
    yield market, client, node.node_id


def _now() -> int:
    return time.time_ns() // 1_000_000


def _start(
    redis_url: str, keys: Keys, mode: str, client: str, node: str, steps: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.persistence.money_crash_worker", redis_url, keys.prefix,
         mode, client, node, str(steps)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _kill_after(proc: subprocess.Popen[str], lines: int) -> list[str]:
    """Read `lines` lines of the worker's progress, then SIGKILL it (it waits there)."""
    assert proc.stdout is not None
    seen = []
    try:
        for _ in range(lines):
            line = proc.stdout.readline()
            assert line, f"the worker stopped early: {seen}"
            seen.append(line.strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    return seen


async def _spent(market: Market) -> int:
    """What the renter has paid for: the costs of its closed contracts (from the events)."""
    return sum(
        e.cost_pusd for e in await market.read_events(REGION) if isinstance(e, ContractSettled)
    )


async def _check(market: Market, conn: asyncpg.Connection, client: str, keys: Keys) -> None:
    now = _now()
    wallets = await market.wallets(client, now)
    transit = await market.in_transit(client, [FUNDING, REGION])
    money = sum(w.avail_pusd + w.held_pusd for w in wallets.values()) + transit
    assert money + await _spent(market) == 1000 * USD  # nothing lost, nothing made
    await holds_match_reservations(market, client, [REGION], now)
    # the engine's repair loop finishes every transfer the kill cut short
    await market.complete_transfers(_now(), older_than_ms=0)
    for slot in (FUNDING, REGION):
        assert await market.pending_transfers(slot) == {}
    await holds_match_reservations(market, client, [REGION], now)
    await drain(market.redis, keys, conn, [FUNDING, REGION])
    await ledger_matches_live(market, conn, client, [REGION], _now())


@pytest.mark.parametrize("mode, cycle", [("transfer", 6), ("gateway", 5)])
async def test_kill_9_after_each_step(
    world: tuple[Market, str, str], redis_url: str, keys: Keys, conn: asyncpg.Connection,
    mode: str, cycle: int,
) -> None:  # fmt: skip
    """Killed right after step k of a transfer (sent, received, done; there and back) or of the
    gateway's calls (funded, reserved, placed, settled, cancelled), for every k."""
    market, client, node = world
    for k in range(1, cycle + 2):
        proc = _start(redis_url, keys, mode, client, node, steps=k)
        seen = await asyncio.to_thread(_kill_after, proc, k)
        assert len(seen) == k
        await _check(market, conn, client, keys)


@pytest.mark.parametrize("mode", ["transfer", "gateway"])
async def test_kill_9_at_random_moments(
    world: tuple[Market, str, str], redis_url: str, keys: Keys, conn: asyncpg.Connection, mode: str
) -> None:
    """Killed at random instants, working flat out: the same invariants hold every time."""
    market, client, node = world
    rng = random.Random(14)
    for _ in range(6):
        proc = _start(redis_url, keys, mode, client, node, steps=0)
        assert proc.stdout is not None
        await asyncio.to_thread(proc.stdout.readline)  # it is running
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        await _check(market, conn, client, keys)
