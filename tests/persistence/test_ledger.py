"""The ledger (issue 14): balanced, keyed movements; the journal writes the market's money
events into it; its balances equal the live market's wallets and holds."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine import core
from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.types import Bid, Node
from persistence import ledger
from persistence.journal.batch import write_batch
from persistence.journal.stored import decode_entry

T0 = 1_700_000_000_000
USD = 10**12
PRICE = 800_000


@pytest.fixture
async def market(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Market]:
    m = Market(redis, keys, platform_fee_bps=1000)
    await m.load_scripts()
    yield m


async def _people(conn: asyncpg.Connection) -> tuple[str, str, str]:
    """A provider, a renter and the renter's client (uuid hex, as the API writes them)."""
    provider, renter, client = (uuid.uuid4().hex for _ in range(3))
    await conn.executemany(
        "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'x', $3)",
        [(provider, f"{provider}@x.test", "provider"), (renter, f"{renter}@x.test", "user")],
    )
    await conn.execute(
        "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')", client, renter
    )
    return provider, renter, client


async def journal(market: Market, conn: asyncpg.Connection) -> None:
    """Write every region's (and the funding slot's) events so far into Postgres."""
    events = []
    for slot in [FUNDING, *await market.regions()]:
        for _, fields in await market.redis.xrange(market.keys.events(slot)):
            events.append(decode_entry(fields[b"e"]))
    await write_batch(conn, events)


async def live_balances(market: Market, client: str, now_ms: int) -> dict[str, int]:
    """The client's money in the live market as ledger accounts would show it."""
    out: dict[str, int] = {}
    transit = 0
    for slot, w in (await market.wallets(client, now_ms)).items():
        out[ledger.client_slot(client, slot).name] = w.avail_pusd
        if slot != FUNDING:
            out[ledger.client_held(client, slot).name] = w.held_pusd
        for sent in (await market.pending_transfers(slot)).values():
            transit += sent.amount_pusd if sent.client_id == client else 0
    out[ledger.client_transit(client).name] = transit
    return {k: v for k, v in out.items() if v}


async def book_balances(conn: asyncpg.Connection, client: str) -> dict[str, int]:
    return {k: v for k, v in (await ledger.balances(conn, f"client:{client}:")).items() if v}


async def test_post_movement_is_balanced_and_written_once(conn: asyncpg.Connection) -> None:
    """A movement is written once per key; an unbalanced one is refused by Python and by
    Postgres; the book is append-only."""
    entries = [(ledger.provider("u1"), -5), (ledger.rail("stripe"), 5)]
    assert await ledger.post_movement(conn, "payout:1", "payout", entries, ts_ms=T0)
    assert not await ledger.post_movement(conn, "payout:1", "payout", entries, ts_ms=T0)
    assert await ledger.balance(conn, ledger.rail("stripe")) == 5
    assert await ledger.balance(conn, ledger.provider("u1")) == -5
    with pytest.raises(ledger.UnbalancedMovement):
        await ledger.post_movement(conn, "bad", "payout", [(ledger.rail("stripe"), 1)], ts_ms=T0)
    await conn.execute(
        "INSERT INTO ledger_movements (key, cause, ts) VALUES ('raw', 'x', now());"
        "INSERT INTO ledger_accounts (account, kind) VALUES ('rail:x', 'rail') ON CONFLICT DO NOTHING"
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "INSERT INTO ledger_entries (movement, line, account, amount_pusd) VALUES ('raw', 0, 'rail:x', 7)"
        )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("DELETE FROM ledger_entries")


async def test_the_journal_books_every_movement_and_matches_the_live_market(
    market: Market, conn: asyncpg.Connection
) -> None:
    """Credit, transfer, bid, fill, reserve, extend, settle, cancel: after the journal, every
    movement sums to zero, each wallet and hold equals its ledger account, the provider earns
    the cost less the fee, and the payments are in `transactions`."""
    provider, renter, client = await _people(conn)
    await market.register_node(
        Node(node_id=uuid.uuid4().hex, owner_id=provider, region="us-east-2", node_type="mist_node",
             name="n", lat=40.0, lng=-73.0, total_ram_gb=64, total_vram_gb=0, offered_ram_gb=64,
             offered_vram_gb=0, price_pusd=PRICE),
        T0,
    )  # fmt: skip
    [node] = await market.nodes("us-east-2")
    await market.credit(client, 50 * USD, key="topup-1", rail="stripe", reference="pi_1", now_ms=T0)
    await market.fund_region(client, "us-east-2", 10 * USD, now_ms=T0)
    c = await market.reserve(
        node_id=node.node_id, client_id=client, user_id=renter, ram_gb=8, vram_gb=0,
        duration_s=3600, max_price_pusd=10**6, now_ms=T0,
    )  # fmt: skip
    await market.extend(c.contract_id, 600, T0 + 1000)
    bid = await market.place_bid(
        Bid(bid_id=uuid.uuid4().hex, region="us-east-2", client_id=client, user_id=renter,
            ram_gb=4, vram_gb=0, duration_s=600, max_price_pusd=2 * PRICE),
        T0 + 2000,
    )  # fmt: skip
    fill = await market.reserve(
        node_id=node.node_id, client_id=client, user_id=renter, ram_gb=4, vram_gb=0,
        duration_s=600, max_price_pusd=2 * PRICE, now_ms=T0 + 3000, bid_id=bid.bid_id,
    )  # fmt: skip
    settled = await market.settle(c.contract_id, 2.5, T0 + 900_000)
    failed = await market.fail_contract(fill.contract_id, T0 + 60_000)
    assert failed.cost_pusd == core.hold_pusd(4, 57, PRICE)
    await market.debit(client, USD, key="refund-1", rail="stripe", now_ms=T0 + 1_000_000)
    await journal(market, conn)
    await journal(market, conn)  # a redelivery writes nothing twice

    assert (
        await conn.fetchval(
            "SELECT count(*) FROM (SELECT movement FROM ledger_entries GROUP BY movement "
            "HAVING sum(amount_pusd) <> 0) x"
        )
        == 0
    )
    assert await conn.fetchval("SELECT sum(amount_pusd) FROM ledger_entries") == 0
    now = T0 + 1_000_000
    assert await book_balances(conn, client) == await live_balances(market, client, now)
    fee = core.platform_fee_pusd(settled.cost_pusd, 1000)
    cost_fill = core.hold_pusd(4, 57, PRICE)  # failed after 57 s: the time served is billed
    earned = settled.cost_pusd - fee + cost_fill - core.platform_fee_pusd(cost_fill, 1000)
    # The node had no stake: part of its earnings was held back into it (engine.trust), and the
    # failed lease's SLA credit came out of it; earnings, stake and credit add up to the cost.
    stake = ledger.stake(node.node_id, provider).name
    held, credited = await conn.fetchrow(
        "SELECT coalesce(sum(amount_pusd) FILTER (WHERE amount_pusd > 0), 0), "
        "coalesce(-sum(amount_pusd) FILTER (WHERE amount_pusd < 0), 0) "
        "FROM ledger_entries WHERE account = $1",
        stake,
    )
    assert held > 0 and credited > 0
    assert await ledger.balance(conn, ledger.provider(provider)) == earned - held
    assert await ledger.balance(conn, stake) == held - credited
    assert await ledger.balance(conn, ledger.PLATFORM_FEE) == fee + core.platform_fee_pusd(
        cost_fill, 1000
    )
    rows = await conn.fetch(
        "SELECT kind, amount_pusd, payment_method FROM transactions ORDER BY kind, amount_pusd"
    )
    assert [tuple(r) for r in rows] == sorted(
        [("charge", settled.cost_pusd, "balance"), ("charge", cost_fill, "balance"),
         ("debit", USD, "stripe"), ("topup", 50 * USD, "stripe")]
    )  # fmt: skip
