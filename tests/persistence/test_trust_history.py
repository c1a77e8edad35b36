"""Measured uptime end to end: a steady node and one silent every third hour, through the real
scripts, the journal (scores and history in Postgres), ranking and `mnemo rebuild-live`."""

from __future__ import annotations

import asyncio
import io
import uuid

import asyncpg
import redis.asyncio as aioredis

from engine import trust
from engine.keys import Keys
from engine.market import Market
from engine.replay import region_snapshot
from engine.scoring import AskBook, MatchRequest, rank
from engine.settings import Settings
from engine.types import Heartbeat, Node
from persistence.journal.worker import run_journal
from persistence.rebuild import rebuild_live
from tests.conftest import _delete_prefix
from tests.engine.conftest import fund
from tests.engine.test_trust import reference_centi
from tests.persistence.test_journal_worker import _eventually

W = trust.WINDOW_MS
DAY = 86_400_000
T0 = 1_700_000_000_000 // W * W + 123_456
REGION = "us-east-2"
STEP = 1_800_000  # the nodes beat every 30 min


async def _owner(conn: asyncpg.Connection) -> tuple[str, str]:
    user, client = uuid.uuid4().hex, uuid.uuid4().hex
    await conn.execute(
        "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'x', 'provider')",
        user,
        f"{user}@example.test",
    )
    await conn.execute(
        "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')", client, user
    )
    return user, client


def _node(node_id: str, owner: str) -> Node:
    return Node(
        node_id=node_id, owner_id=owner, region=REGION, node_type="edge_cluster",
        name=node_id[:8], lat=40.7, lng=-73.8, total_ram_gb=64, total_vram_gb=0,
        offered_ram_gb=64, price_pusd=800_000, heartbeat_interval_s=STEP / 1000,
        max_duration_s=86_400,
    )  # fmt: skip


def _ranked(nodes: list[Node], min_uptime: float, now_ms: int) -> list[str]:
    book = AskBook(REGION)
    for n in nodes:
        book.upsert(n)
    req = MatchRequest(
        ram_gb=8, vram_gb=0, max_price_pusd=1_000_000, duration_s=600, min_uptime_score=min_uptime
    )
    return [m.node_id for m in rank(book, req, now_ms)]


async def test_steady_and_flaky_nodes_through_journal_and_rebuild(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """Their scores differ as the formula says; ranking and min_uptime_score separate them;
    the journal keeps each one's hours and score; after Redis is lost, rebuild-live restores
    both (and their reputation) exactly."""
    market = Market(redis, keys)
    await market.load_scripts()
    owner, client = await _owner(conn)
    steady, flaky = uuid.uuid4().hex, uuid.uuid4().hex
    for node_id in (steady, flaky):
        await market.register_node(_node(node_id, owner), T0)
    # a contract each: served in full on the steady node, cut short on the flaky one
    await fund(market, client, now_ms=T0)
    served = await market.reserve(
        node_id=steady, client_id=client, user_id=owner, ram_gb=8, vram_gb=0, duration_s=3600,
        max_price_pusd=1_000_000, now_ms=T0,
    )  # fmt: skip
    cut = await market.reserve(
        node_id=flaky, client_id=client, user_id=owner, ram_gb=8, vram_gb=0, duration_s=3600,
        max_price_pusd=1_000_000, now_ms=T0,
    )  # fmt: skip
    await market.settle(served.contract_id, 0, T0 + 3_600_000)
    await market.fail_contract(cut.contract_id, T0 + 600_000)

    end = T0 + 31 * DAY
    flaky_beats = []
    for t in range(T0 + STEP, end, STEP):
        beats = [Heartbeat(node_id=steady, available_ram_gb=64, available_vram_gb=0)]
        if (t // W) % 3:
            beats.append(Heartbeat(node_id=flaky, available_ram_gb=64, available_vram_gb=0))
            flaky_beats.append(t)
        outcomes = await market.heartbeat(owner, beats, t, 0)
        assert {o.outcome for o in outcomes} == {"ok"}
        for node_id in await market.stale_nodes(REGION, t):
            await market.mark_offline(node_id, t)
        await market.sweep_uptime(REGION, t)
    last = flaky_beats[-1]
    a, b = await market.get_node(steady), await market.get_node(flaky)
    assert a is not None and b is not None
    # the formula: a steady node is all up; the flaky one's share from first principles
    assert a.uptime_score == 100.0 and a.uptime_windows == trust.PERIOD_WINDOWS
    expected, windows = reference_centi(T0, STEP / 1000, flaky_beats, last)
    assert round(b.uptime_score * 100) == expected and b.uptime_windows == windows
    # a third of each silent hour is still within the 45 min of grace: about 75, not suspended
    assert 70.0 < b.uptime_score < 80.0 and not b.suspended_ms
    assert (a.reputation_score, b.reputation_score) == (100, 90)
    assert (a.delivered_contracts, b.cut_contracts) == (1, 1)
    # ranking reads the measured value: the steady node first, only it at min_uptime_score 90
    live = [a, b]
    assert _ranked(live, 0.0, last) == [steady, flaky]
    assert _ranked(live, 90.0, last) == [steady]

    settings = Settings(redis_url=redis_url, database_url=db_url, key_prefix=keys.prefix)
    total = int(await redis.get(keys.seq(REGION)) or 0)

    async def journaled() -> bool:
        got = await conn.fetchval(
            "SELECT applied_seq FROM journal_positions WHERE region = $1", REGION
        )
        return got == total

    stop = asyncio.Event()
    worker = asyncio.create_task(run_journal(settings, consumer="trust", stop=stop))
    try:
        await _eventually(journaled, 120, "the journal to catch up")
    finally:
        stop.set()
        await asyncio.wait_for(worker, 60)
    rows = {
        r["id"].hex: r
        for r in await conn.fetch(
            "SELECT id, uptime_score, uptime_windows, reputation_score, cut_contracts FROM nodes"
        )
    }
    assert float(rows[steady]["uptime_score"]) == 100.0
    assert float(rows[flaky]["uptime_score"]) == b.uptime_score
    assert rows[flaky]["uptime_windows"] == b.uptime_windows
    assert (rows[flaky]["reputation_score"], rows[flaky]["cut_contracts"]) == (90, 1)
    hours = await conn.fetch(
        "SELECT window_start, up_pct, uptime_score FROM node_scores WHERE node_id = $1 "
        "ORDER BY window_start",
        uuid.UUID(flaky),
    )
    accounting = await market.uptime_of(b)
    assert accounting is not None
    assert len(hours) == (accounting.win - T0 // W)  # every closed hour since the registration
    # a silent hour: up until 45 min after the last beat, 17 min into it (28 %); the hour after
    # it: down until its first beat, 2 min in (97 %); the others: 100 %
    phase = [(int(h["window_start"].timestamp() * 1000) // W) % 3 for h in hours[1:]]
    values = [h["up_pct"] for h in hours[1:]]
    assert {v for p, v in zip(phase, values, strict=True) if p == 0} == {28}
    assert {v for p, v in zip(phase, values, strict=True) if p == 1} == {97}
    assert {v for p, v in zip(phase, values, strict=True) if p == 2} == {100}
    assert float(hours[-1]["uptime_score"]) == b.uptime_score

    # Redis is lost: rebuild-live restores the scores, the accounting and the standing.
    # (the contracts closed 31 days before `last` are past the retention: not rebuilt)
    kept = ("node:", "uptime", "trust-due", "asks", "hb", "geo", "seq", "arrival")

    async def market_state() -> dict[str, object]:
        snapshot = await region_snapshot(redis, keys, REGION)
        return {k: v for k, v in snapshot.items() if k.startswith(kept)}

    before = await market_state()
    assert before["uptime"] and before["node:" + steady]
    await _delete_prefix(redis, keys.prefix)
    out = io.StringIO()
    assert await rebuild_live(settings, now_ms=last, out=out) == 0, out.getvalue()
    assert await market_state() == before
    a2, b2 = await market.get_node(steady), await market.get_node(flaky)
    assert a2 is not None and b2 is not None
    assert (a2.uptime_score, b2.uptime_score) == (a.uptime_score, b.uptime_score)
    assert (a2.reputation_score, b2.reputation_score) == (100, 90)
    assert _ranked([a2, b2], 90.0, last) == [steady]
