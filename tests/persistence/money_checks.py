"""The money invariants the crash and sequence tests check (issue 14), in one place."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import redis.asyncio as aioredis

from engine.keys import FUNDING, Keys
from engine.market import Market
from persistence import ledger
from persistence.journal.batch import write_batch
from persistence.journal.stored import decode_entry


async def drain(
    redis: aioredis.Redis, keys: Keys, conn: asyncpg.Connection, slots: Sequence[str]
) -> None:
    """Journal every event of the slots' streams into Postgres (as the journal worker does;
    idempotent, so calling it again writes only what is new)."""
    events = []
    for slot in slots:
        for _, fields in await redis.xrange(keys.events(slot)):
            events.append(decode_entry(fields[b"e"]))
    if events:
        result = await write_batch(conn, events)
        assert result.rejected == 0 and not result.waiting


async def holds_match_reservations(
    market: Market, client: str, regions: Sequence[str], now_ms: int
) -> None:
    """No hold without its reservation, no reservation without its hold: each region wallet's
    held money is exactly the holds of the client's open contracts and resting bids there, and
    every one of those holds money."""
    for region in regions:
        wallet = await market.wallet(region, client, now_ms)
        total = 0
        for c in await market.contracts(client_id=client, region=region):
            assert c.hold_pusd > 0, c
            total += c.hold_pusd
        for bid in await market.bids(region):
            if bid.client_id == client:
                assert bid.hold_pusd == (bid.remaining_ram_gb + bid.remaining_vram_gb) * (
                    bid.duration_s * bid.max_price_pusd
                ), bid
                total += bid.hold_pusd
        assert wallet.held_pusd == total, (region, client, wallet, total)


async def ledger_matches_live(
    market: Market, conn: asyncpg.Connection, client: str, regions: Sequence[str], now_ms: int
) -> None:
    """After the journal has drained: the book balances, and the client's ledger accounts equal
    its live wallets, holds and money in transit."""
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM (SELECT movement FROM ledger_entries GROUP BY movement "
            "HAVING sum(amount_pusd) <> 0) x"
        )
        == 0
    )
    assert (await conn.fetchval("SELECT coalesce(sum(amount_pusd), 0) FROM ledger_entries")) == 0
    live: dict[str, int] = {}
    for slot, w in (await market.wallets(client, now_ms)).items():
        live[ledger.client_slot(client, slot).name] = w.avail_pusd
        if slot != FUNDING:
            live[ledger.client_held(client, slot).name] = w.held_pusd
    live[ledger.client_transit(client).name] = await market.in_transit(client, [FUNDING, *regions])
    book = await ledger.balances(conn, f"client:{client}:")
    assert {a: v for a, v in live.items() if v} == {a: v for a, v in book.items() if v}
