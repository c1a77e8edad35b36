"""Stake and SLA credits end to end: earnings held back into a node's stake, a stake locked out of
the provider's earnings, leases cut short by the node's death paid for their delivered seconds
only and credited out of the stake by tier (half for a death inside announced maintenance), the
reserve refusing a node whose stake does not cover a lease, and the ledger balanced."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine import core, trust
from engine.errors import Conflict, InsufficientStake
from engine.keys import Keys
from engine.market import Market
from engine.settings import Settings
from engine.types import Node
from persistence import ledger
from persistence import stake as stakes
from persistence.journal.worker import run_journal
from tests.engine.conftest import fund
from tests.persistence.test_journal_worker import _eventually

REGION = "us-east-2"
T0 = 1_700_000_000_000
HOUR = 3_600_000
PRICE = 1_000_000  # 1e-6 USD per GB-second: 64 GB for an hour is 0.2304 USD


async def _account(conn: asyncpg.Connection, role: str) -> str:
    user = uuid.uuid4().hex
    await conn.execute(
        "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'x', $3)",
        user,
        f"{user}@example.test",
        role,
    )
    return user


def _node(owner: str) -> Node:
    return Node(
        node_id=uuid.uuid4().hex, owner_id=owner, region=REGION, node_type="datacenter",
        name="staked", lat=40.7, lng=-73.8, total_ram_gb=1024, total_vram_gb=0,
        offered_ram_gb=1024, price_pusd=PRICE, max_duration_s=30 * 86_400,
    )  # fmt: skip


async def test_a_lease_cut_by_the_nodes_death(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """The renter pays for the seconds delivered only and is credited out of the stake by tier;
    the stake falls by exactly the credit; inside announced maintenance the credit is half; a
    node whose stake does not cover a lease gets none; the ledger balances to the pico-USD."""
    market = Market(redis, keys)
    await market.load_scripts()
    owner = await _account(conn, "provider")
    renter = await _account(conn, "user")
    client = uuid.uuid4().hex
    await conn.execute(
        "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')", client, renter
    )
    await fund(market, client, usd=10_000, now_ms=T0)
    vanished, declared = _node(owner), _node(owner)
    for n in (vanished, declared):
        await market.register_node(n, T0)

    def lease(node: Node, gb: int, hours: int, at: int):  # type: ignore[no-untyped-def]
        return market.reserve(
            node_id=node.node_id, client_id=client, user_id=renter, ram_gb=gb, vram_gb=0,
            duration_s=hours * 3600, max_price_pusd=PRICE, now_ms=at,
        )  # fmt: skip

    # 1. A completed lease: half the provider's earnings held back, up to 10 % of its value.
    first = await lease(vanished, 512, 5, T0)  # 9.216 USD (under 10 USD: no stake needed)
    done = await market.settle(first.contract_id, 0, T0 + 5 * HOUR)
    fee = core.platform_fee_pusd(done.cost_pusd, market.platform_fee_bps)
    kept = min((done.cost_pusd - fee) // 2, trust.stake_target(first.hold_pusd))
    node = await market.get_node(vanished.node_id)
    assert node is not None and (node.stake_pusd, node.stake_held_pusd) == (kept, kept)
    assert kept == 921_600_000_000 and node.lease_value_pusd == 0

    # 2. The stake gates new leases: 36.864 USD of leases need (36.864 - 10) x 10 % = 2.6864 USD.
    with pytest.raises(InsufficientStake):
        await lease(vanished, 512, 20, T0 + 11 * HOUR)
    with pytest.raises(InsufficientStake):
        await lease(declared, 512, 20, T0 + 11 * HOUR)

    # 3. The provider locks 2 and 3 USD out of its earnings (journaled: they are in the ledger).
    settings = Settings(redis_url=redis_url, database_url=db_url, key_prefix=keys.prefix)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_journal(settings, consumer="stake", stop=stop))

    async def journaled() -> bool:
        got = await conn.fetchval(
            "SELECT applied_seq FROM journal_positions WHERE region = $1", REGION
        )
        return got == int(await redis.get(keys.seq(REGION)) or 0)

    try:
        await _eventually(journaled, 60, "the journal")
        earned = await ledger.balance(conn, ledger.provider(owner))
        assert earned == done.cost_pusd - fee - kept
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            five, seven = 2 * 10**12, 3 * 10**12
            assert not await stakes.reserve_lock(pool, owner, vanished.node_id, earned + 1, "l0")
            assert await stakes.reserve_lock(pool, owner, vanished.node_id, five, "l1")
            assert await stakes.reserve_lock(pool, owner, declared.node_id, seven, "l2")
            assert await stakes.reserve_lock(pool, owner, declared.node_id, seven, "l2")  # once
        finally:
            await pool.close()
        assert await market.lock_stake(vanished.node_id, owner, five, "l1", T0 + 11 * HOUR)
        assert await market.lock_stake(declared.node_id, owner, seven, "l2", T0 + 11 * HOUR)
        # a repeat of a lock's second step changes nothing
        assert await market.lock_stake(declared.node_id, owner, seven, "l2", T0 + 11 * HOUR) is None
        with pytest.raises(Conflict):  # more than the node has
            await market.release_stake(declared.node_id, owner, seven + 1, T0 + 11 * HOUR)

        # 4. Two leases of 36.864 USD, each node dying 70 minutes into its 20 hours: the second
        # node had announced maintenance for that time.
        start = T0 + 12 * HOUR
        cut_a = await lease(vanished, 512, 20, start)
        cut_b = await lease(declared, 512, 20, start)
        await market.announce_maintenance(
            declared.node_id, owner, start + HOUR, start + 3 * HOUR, start
        )
        before = (await market.wallet(REGION, client, start)).avail_pusd
        stakes_before = {
            n.node_id: (await market.get_node(n.node_id)).stake_pusd  # type: ignore[union-attr]
            for n in (vanished, declared)
        }
        died = start + HOUR + 600_000  # 5.8 % of the 20 hours
        a = await market.fail_contract(cut_a.contract_id, died)
        b = await market.fail_contract(cut_b.contract_id, died)
        delivered_s = (died - start) // 1000
        for c in (a, b):
            # charged for the seconds delivered only
            assert c.status == "failed" and c.used_s == delivered_s
            assert c.cost_pusd == 512 * delivered_s * PRICE
        # under 10 % delivered: the tier credits 100 % of the charge; half inside maintenance
        assert trust.sla_credit_bps("failed", delivered_s, 20 * 3600) == 10_000
        # (at most half of the node's stake: one outage never takes it all)
        cap = {k: v * trust.SLA_STAKE_CAP_BPS // 10_000 for k, v in stakes_before.items()}
        credit_a = min(a.cost_pusd, cap[vanished.node_id])
        credit_b = min(b.cost_pusd // 2, cap[declared.node_id])
        assert credit_b < credit_a
        after = (await market.wallet(REGION, client, died)).avail_pusd
        # the holds came back, the delivered seconds were paid, the credits came in
        assert after == before + cut_a.hold_pusd + cut_b.hold_pusd - a.cost_pusd - b.cost_pusd + (
            credit_a + credit_b
        )
        for n, credit in ((vanished, credit_a), (declared, credit_b)):
            now = await market.get_node(n.node_id)
            assert now is not None
            assert now.stake_pusd == stakes_before[n.node_id] - credit  # exactly the credit
            assert now.cut_contracts == 1 and now.reputation_score == 90
        # a contract closes once: closing it again is refused, and credits and releases nothing
        for c in (cut_a, cut_b):
            with pytest.raises(Conflict):
                await market.fail_contract(c.contract_id, died + 60_000)
            with pytest.raises(Conflict):
                await market.settle(c.contract_id, 0, died + 60_000)
        assert (await market.wallet(REGION, client, died)).avail_pusd == after
        for n, credit in ((vanished, credit_a), (declared, credit_b)):
            now = await market.get_node(n.node_id)
            assert now is not None and now.stake_pusd == stakes_before[n.node_id] - credit

        # 5. The book: balanced, the stakes and the renter's wallet as the live market says.
        await _eventually(journaled, 60, "the journal")
        assert await conn.fetchval("SELECT sum(amount_pusd) FROM ledger_entries") == 0
        for n in (vanished, declared):
            live = await market.get_node(n.node_id)
            assert live is not None
            assert await ledger.balance(conn, f"stake:{n.node_id}") == live.stake_pusd
            assert await ledger.balance(conn, f"stake_transit:{n.node_id}") == 0
        region_wallet = await ledger.balance(conn, ledger.client_region(client, REGION))
        assert region_wallet == (await market.wallet(REGION, client, died)).avail_pusd
        credits = await conn.fetch(
            "SELECT contract_id, sum(e.amount_pusd) AS credit FROM ledger_movements m "
            "JOIN ledger_entries e ON e.movement = m.key "
            "WHERE m.cause = 'sla_credit' AND e.account LIKE 'client:%' GROUP BY contract_id"
        )
        assert {r["contract_id"]: int(r["credit"]) for r in credits} == {
            a.contract_id: credit_a,
            b.contract_id: credit_b,
        }
        # one credit movement and one settlement (its hold's release) per contract
        per_contract = await conn.fetch(
            "SELECT contract_id, cause, count(*) AS n FROM ledger_movements "
            "WHERE contract_id = ANY($1::text[]) AND cause IN ('settle', 'sla_credit') "
            "GROUP BY contract_id, cause",
            [a.contract_id, b.contract_id],
        )
        assert sorted((r["contract_id"], r["cause"], r["n"]) for r in per_contract) == sorted(
            (c.contract_id, cause, 1) for c in (a, b) for cause in ("settle", "sla_credit")
        )
    finally:
        stop.set()
        await asyncio.wait_for(worker, 60)
