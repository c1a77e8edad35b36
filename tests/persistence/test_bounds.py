"""The market's bounds hold end to end: a settlement at the worst case of every bound goes
through the real scripts and the journal into Postgres with exact money, and a client's spend
summed past a 64-bit integer stays exact."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import NamedTuple

import asyncpg
import redis.asyncio as aioredis
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine import core, trust
from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.types import Node
from persistence import ledger
from persistence.journal.batch import write_batch
from persistence.journal.stored import decode_entry

T0 = 1_700_000_000_000
REGION = "bounds-1"


class Case(NamedTuple):
    ram_gb: int
    vram_gb: int
    duration_s: int
    price_pusd: int
    egress_price_pusd: int
    egress_mgb: int

    @property
    def cost_pusd(self) -> int:
        return core.contract_cost_pusd(
            ram_gb=self.ram_gb,
            vram_gb=self.vram_gb,
            used_s=self.duration_s,
            price_pusd=self.price_pusd,
            egress_mgb=self.egress_mgb,
            egress_price_pusd=self.egress_price_pusd,
        )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Leases within every bound, drawn toward their edges (Hypothesis favours the extremes of
    each range): the largest size, the highest prices, the longest term the value allows, the
    most egress the egress bound allows at the drawn egress price."""
    ram = draw(st.integers(0, core.MAX_GB))
    vram = draw(st.integers(0 if ram else 1, core.MAX_GB))
    price = draw(st.integers(1, core.MAX_PRICE_PUSD))
    longest = min(core.MAX_DURATION_S, core.longest_lease_s(ram + vram, price))
    if longest < 1:  # not even a second at this size and price: the highest price that allows one
        price = core.MAX_LEASE_VALUE_PUSD // (ram + vram)
        longest = 1
    duration = draw(st.integers(1, longest))
    egress_price = draw(st.integers(0, core.MAX_EGRESS_PRICE_PUSD))
    most_egress = core.MAX_EGRESS_MGB
    if egress_price:
        most_egress = min(most_egress, core.MAX_EGRESS_VALUE_PUSD * 1000 // egress_price)
    egress = draw(st.integers(0, most_egress))
    return Case(ram, vram, duration, price, egress_price, egress)


# Exactly at the bounds: a lease worth exactly 1,000,000 USD at the highest price, and exactly
# 1,000,000 USD of egress at the highest egress price; and the largest node for the longest term
# at the highest price that still fits.
WORST = Case(500, 500, 1000, core.MAX_PRICE_PUSD, core.MAX_EGRESS_PRICE_PUSD, 1_000_000)
LARGEST = Case(
    core.MAX_GB,
    core.MAX_GB,
    core.MAX_DURATION_S,
    core.MAX_LEASE_VALUE_PUSD // (2 * core.MAX_GB * core.MAX_DURATION_S),
    core.MAX_EGRESS_PRICE_PUSD // 1000,
    core.MAX_EGRESS_MGB,
)


def _draw_cases() -> list[Case]:
    drawn: list[Case] = []

    @settings(max_examples=60, database=None, deadline=None)
    @example(case=WORST)
    @example(case=LARGEST)
    @given(case=cases())
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return drawn


async def test_worst_case_settlements_land_in_postgres_exactly(
    redis: aioredis.Redis, keys: Keys, pool: asyncpg.Pool
) -> None:
    """Every drawn lease (and the exact worst cases, four times over) is reserved and settled by
    the real scripts, journaled, and found in Postgres with its exact cost in pico-USD and in
    USD; the client's spend, summed past 2**63 pico-USD, is exact too."""
    for case in (WORST, LARGEST):
        assert case.cost_pusd <= core.MAX_LEASE_VALUE_PUSD + core.MAX_EGRESS_VALUE_PUSD
    assert WORST.cost_pusd == 2 * 10**18
    drawn = _draw_cases() + [WORST] * 4
    market = Market(redis, keys)
    await market.load_scripts()
    owner, user, client = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    async with pool.acquire() as conn:
        for who in (owner, user):
            await conn.execute(
                "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'x', 'user')",
                who,
                f"{who}@example.test",
            )
        await conn.execute(
            "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')", client, user
        )

    expected: dict[str, int] = {}
    for i, case in enumerate(drawn):
        now = T0 + i * 10 * core.MAX_DURATION_S * 1000
        node = await market.register_node(
            Node(
                node_id=uuid.uuid4().hex,
                owner_id=owner,
                region=REGION,
                node_type="datacenter",
                name=f"edge-{i}",
                lat=0.0,
                lng=0.0,
                total_ram_gb=max(case.ram_gb, 1),
                total_vram_gb=case.vram_gb,
                offered_ram_gb=max(case.ram_gb, 1),
                offered_vram_gb=case.vram_gb,
                price_pusd=case.price_pusd,
                egress_price_pusd=case.egress_price_pusd,
                min_duration_s=1,
                max_duration_s=core.MAX_DURATION_S,
            ),
            now,
        )
        # Money in first (issue 14): the hold, and the debt the last settlement's egress left.
        hold = core.hold_pusd(case.ram_gb + case.vram_gb, case.duration_s, case.price_pusd)
        debt = max(0, -(await market.wallet(REGION, client, now)).avail_pusd)
        for k, start in enumerate(range(0, hold + debt, 10**18)):
            amount = min(10**18, hold + debt - start)
            await market.credit(client, amount, key=f"{i}:{k}", rail="operator", now_ms=now)
        await market.fund_region(client, REGION, hold, now_ms=now)
        # the node's stake covers the lease (engine.trust)
        stake = trust.required_stake(hold)
        if stake:
            await market.lock_stake(node.node_id, owner, stake, f"stake-{i}", now)
        contract = await market.reserve(
            node_id=node.node_id,
            client_id=client,
            user_id=user,
            ram_gb=case.ram_gb,
            vram_gb=case.vram_gb,
            duration_s=case.duration_s,
            max_price_pusd=case.price_pusd,
            now_ms=now,
        )
        settled = await market.settle(
            contract.contract_id,
            Decimal(case.egress_mgb) / 1000,
            now + case.duration_s * 1000,
        )
        assert settled.cost_pusd == case.cost_pusd, case
        expected[contract.contract_id] = case.cost_pusd

    entries = await redis.xrange(keys.events(REGION)) + await redis.xrange(keys.events(FUNDING))
    events = [decode_entry(fields[b"e"]) for _, fields in entries]
    async with pool.acquire() as conn:
        result = await write_batch(conn, events)
        assert result.applied == len(events)
        # the ledger too: every movement balanced, the provider earns the costs less the fee
        assert await conn.fetchval("SELECT sum(amount_pusd) FROM ledger_entries") == 0
        fees = sum(core.platform_fee_pusd(c, market.platform_fee_bps) for c in expected.values())
        # (less what was held back into the nodes' stakes, engine.trust: their stake accounts)
        staked = await ledger.balances(conn, prefix="stake:")
        held_back = sum(staked.values()) - sum(
            trust.required_stake(core.hold_pusd(c.ram_gb + c.vram_gb, c.duration_s, c.price_pusd))
            for c in drawn
        )
        assert await ledger.balance(conn, ledger.provider(owner)) == (
            sum(expected.values()) - fees - held_back
        )
        assert await ledger.balance(conn, ledger.PLATFORM_FEE) == fees
        rows = await conn.fetch("SELECT id, total_cost_pusd, total_cost_usd FROM contracts")
        spend = await conn.fetchrow(
            "SELECT current_spend_pusd, current_spend_usd FROM clients WHERE id = $1", client
        )
    got = {r["id"].hex: (r["total_cost_pusd"], r["total_cost_usd"]) for r in rows}
    assert got == {
        cid: (cost, Decimal(cost).scaleb(-12).quantize(Decimal("1e-12")))
        for cid, cost in expected.items()
    }
    total = sum(expected.values())
    assert total > 2**63  # past what a bigint could have held
    assert spend["current_spend_pusd"] == total
    # The USD twin keeps the spec's DECIMAL(10, 2) and saturates at its largest value.
    assert spend["current_spend_usd"] == min(
        Decimal(total).scaleb(-12).quantize(Decimal("0.01")), Decimal("99999999.99")
    )
