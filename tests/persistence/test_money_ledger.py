"""Random sequences of money movements through the real scripts, the journal and Postgres
(issue 14): after every step, once the journal has drained, every ledger movement sums to zero,
every balance equals the sum of its entries, every wallet and hold in Redis equals its ledger
account, and every hold belongs to an open contract or bid (and every open contract or bid of
a funded renter to its hold). At the end of a sequence, `mnemo rebuild-live` restores from
Postgres the same wallets, holds, outboxes and credit keys.

Operations: credits and debits (keys sometimes repeated), transfers both ways (some cut after
their first step, finished later by the repair loop), contracts reserved, extended, settled
(with egress beyond the hold), failed and failed over, bids placed, filled, cancelled and
expired, and time passing (across a month too). Sequences: `MNEMO_LEDGER_EXAMPLES` (default
15), steps `MNEMO_LEDGER_STEPS` (default 30).
"""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import Coroutine
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine.connection import open_redis
from engine.errors import MarketError
from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.settings import Settings
from engine.types import Bid, Node
from persistence import ledger
from persistence.journal.batch import write_batch
from persistence.journal.stored import decode_entry
from persistence.rebuild import rebuild_live

EXAMPLES = int(os.environ.get("MNEMO_LEDGER_EXAMPLES", "15"))
STEPS = int(os.environ.get("MNEMO_LEDGER_STEPS", "30"))
T0 = 1_701_300_000_000  # 2023-11-29: a few ticks cross into December
REGIONS = ("r1", "r2")
PRICES = (100_000, 300_000, 900_000)


class LedgerMachine(RuleBasedStateMachine):
    loop: asyncio.AbstractEventLoop
    client: aioredis.Redis
    conn: asyncpg.Connection
    redis_url: str
    db_url: str

    def __init__(self) -> None:
        super().__init__()
        self.keys = Keys(f"lg{uuid.uuid4().hex[:10]}:")
        self.market = Market(self.client, self.keys, platform_fee_bps=1000)
        self.now = T0
        self.last_ids: dict[str, bytes] = {}
        self.contracts: list[str] = []
        self.bids: list[str] = []
        self.nodes: dict[str, list[str]] = {r: [] for r in REGIONS}

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def attempt(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            return self.run(coro)
        except MarketError as exc:
            return exc

    @initialize()
    def populate(self) -> None:
        self.run(self._populate())

    async def _populate(self) -> None:
        await self.conn.execute(
            "TRUNCATE events, journal_positions, journal_rejects, ledger_entries, "
            "ledger_movements, ledger_accounts, transactions, contracts, bids, nodes, clients, "
            "users CASCADE"
        )
        self.provider, self.user = uuid.uuid4().hex, uuid.uuid4().hex
        self.clients = [str(uuid.uuid4()) for _ in range(2)]
        await self.conn.executemany(
            "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'x', 'user')",
            [(u, f"{u}@x.test") for u in (self.provider, self.user)],
        )
        await self.conn.executemany(
            "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')",
            [(c, self.user) for c in self.clients],
        )
        for i, (region, price) in enumerate(
            [("r1", PRICES[0]), ("r1", PRICES[1]), ("r1", PRICES[2]), ("r2", PRICES[1])]
        ):
            node = await self.market.register_node(
                Node(node_id=uuid.uuid4().hex, owner_id=self.provider, region=region,
                     node_type="datacenter", name=f"n{i}", lat=1.0, lng=2.0, total_ram_gb=64,
                     total_vram_gb=0, offered_ram_gb=64, offered_vram_gb=0, price_pusd=price,
                     egress_price_pusd=10**12, min_duration_s=1, max_duration_s=86_400),
                self.now,
            )  # fmt: skip
            self.nodes[region].append(node.node_id)

    # -- rules ----------------------------------------------------------------------------

    @rule(c=st.integers(0, 1), usd=st.sampled_from((1, 2, 50)), repeat=st.integers(0, 2))
    def credit(self, c: int, usd: int, repeat: int) -> None:
        key = f"k{repeat}" if repeat else uuid.uuid4().hex
        self.attempt(
            self.market.credit(self.clients[c], usd * 10**10, key=key, rail="stripe",
                               reference="pi", now_ms=self.now)
        )  # fmt: skip

    @rule(c=st.integers(0, 1), usd=st.sampled_from((1, 20)), negative=st.booleans())
    def debit(self, c: int, usd: int, negative: bool) -> None:
        self.attempt(
            self.market.debit(self.clients[c], usd * 10**10, key=uuid.uuid4().hex,
                              rail="stripe", now_ms=self.now, allow_negative=negative)
        )  # fmt: skip

    @rule(
        c=st.integers(0, 1),
        region=st.sampled_from(REGIONS),
        amount=st.sampled_from((0, 10**9, 10**11)),
        inward=st.booleans(),
        cut=st.booleans(),
    )
    def move(self, c: int, region: str, amount: int, inward: bool, cut: bool) -> None:
        """A transfer either way; `cut` stops it after its first step (a crash)."""
        src, dst = (FUNDING, region) if inward else (region, FUNDING)
        if cut:
            self.attempt(
                self.market.send_transfer(self.clients[c], from_slot=src, to_slot=dst,
                                          amount_pusd=amount, allow_pusd=amount, now_ms=self.now,
                                          credit_line_pusd=10**10)
            )  # fmt: skip
        else:
            self.attempt(
                self.market.transfer(self.clients[c], from_slot=src, to_slot=dst,
                                     amount_pusd=amount, allow_pusd=amount, now_ms=self.now,
                                     credit_line_pusd=10**10)
            )  # fmt: skip

    @rule()
    def repair(self) -> None:
        self.run(self.market.complete_transfers(self.now, older_than_ms=0))

    @rule(
        c=st.integers(0, 1),
        i=st.integers(0, 3),
        ram=st.integers(1, 8),
        duration=st.sampled_from((60, 600, 3600)),
        fund=st.booleans(),
        budget=st.sampled_from((None, 10**9, 10**11)),
    )
    def reserve(self, c: int, i: int, ram: int, duration: int, fund: bool, budget: Any) -> None:
        region = "r1" if i < 3 else "r2"
        node_id = self.nodes[region][i % len(self.nodes[region])]
        client = self.clients[c]
        if fund:
            self.attempt(
                self.market.fund_region(client, region, ram * duration * PRICES[2],
                                        now_ms=self.now, credit_line_pusd=10**10,
                                        budget_pusd=budget)
            )  # fmt: skip
        got = self.attempt(
            self.market.reserve(node_id=node_id, client_id=client, user_id=self.user,
                                ram_gb=ram, vram_gb=0, duration_s=duration,
                                max_price_pusd=PRICES[2], now_ms=self.now,
                                budgeted=budget is not None)
        )  # fmt: skip
        if not isinstance(got, MarketError):
            self.contracts.append(got.contract_id)

    @rule(c=st.integers(0, 1), region=st.sampled_from(REGIONS), split=st.booleans())
    def place_bid(self, c: int, region: str, split: bool) -> None:
        client = self.clients[c]
        self.attempt(self.market.fund_region(client, region, 6 * 600 * PRICES[2], now_ms=self.now))
        got = self.attempt(
            self.market.place_bid(
                Bid(bid_id=uuid.uuid4().hex, region=region, client_id=client, user_id=self.user,
                    ram_gb=6, vram_gb=0, duration_s=600, max_price_pusd=PRICES[2],
                    allow_split=split, min_fill_gb=2, expires_ms=self.now + 100_000),
                self.now,
            )
        )  # fmt: skip
        if not isinstance(got, MarketError):
            self.bids.append(got.bid_id)

    @rule(b=st.integers(0, 99), i=st.integers(0, 3), ram=st.sampled_from((2, 6)))
    def fill(self, b: int, i: int, ram: int) -> None:
        if not self.bids:
            return
        bid = self.run(self.market.get_bid(self.bids[b % len(self.bids)]))
        if bid is None or bid.status != "open":
            return
        nodes = self.nodes[bid.region]
        self.attempt(
            self.market.reserve(node_id=nodes[i % len(nodes)], client_id=bid.client_id,
                                user_id=bid.user_id, ram_gb=min(ram, bid.remaining_ram_gb),
                                vram_gb=0, duration_s=bid.duration_s,
                                max_price_pusd=bid.max_price_pusd, now_ms=self.now,
                                bid_id=bid.bid_id)
        )  # fmt: skip

    @rule(b=st.integers(0, 99))
    def cancel_bid(self, b: int) -> None:
        if self.bids:
            self.attempt(self.market.cancel_bid(self.bids[b % len(self.bids)], self.now))

    @rule(k=st.integers(0, 99), extra=st.sampled_from((60, 600)))
    def extend(self, k: int, extra: int) -> None:
        if self.contracts:
            self.attempt(
                self.market.extend(self.contracts[k % len(self.contracts)], extra, self.now)
            )

    @rule(k=st.integers(0, 99), egress=st.sampled_from((0, 0.5, 40.0)))
    def settle(self, k: int, egress: float) -> None:
        if self.contracts:
            cid = self.contracts[k % len(self.contracts)]
            self.attempt(self.market.settle(cid, egress, self.now))

    @rule(k=st.integers(0, 99))
    def fail(self, k: int) -> None:
        if self.contracts:
            self.attempt(
                self.market.fail_contract(self.contracts[k % len(self.contracts)], self.now)
            )

    @rule(k=st.integers(0, 99), i=st.integers(0, 2))
    def failover(self, k: int, i: int) -> None:
        if self.contracts:
            got = self.attempt(
                self.market.failover(self.contracts[k % len(self.contracts)], self.nodes["r1"][i],
                                     self.now)
            )  # fmt: skip
            if not isinstance(got, MarketError):
                self.contracts.append(got[1].contract_id)

    @rule(dt=st.sampled_from((1_000, 60_000, 700_000, 2 * 86_400_000)))
    def tick(self, dt: int) -> None:
        """Time passes (the last step crosses into the next month); bids expire."""
        self.now += dt
        for region in REGIONS:
            self.run(self.market.expire_bids(region, self.now))

    # -- invariants -----------------------------------------------------------------------

    async def _drain(self) -> None:
        events = []
        for slot in (FUNDING, *REGIONS):
            key = self.keys.events(slot)
            start = b"(" + self.last_ids[slot] if slot in self.last_ids else b"-"
            for entry_id, fields in await self.client.xrange(key, start, "+"):
                events.append(decode_entry(fields[b"e"]))
                self.last_ids[slot] = entry_id
        if events:
            result = await write_batch(self.conn, events)
            assert result.rejected == 0 and not result.waiting

    async def _check(self) -> None:
        await self._drain()
        conn = self.conn
        unbalanced = await conn.fetchval(
            "SELECT count(*) FROM (SELECT movement FROM ledger_entries GROUP BY movement "
            "HAVING sum(amount_pusd) <> 0) x"
        )
        assert unbalanced == 0
        sums = {
            r["account"]: int(r["s"])
            for r in await conn.fetch(
                "SELECT account, sum(amount_pusd) AS s FROM ledger_entries GROUP BY account"
            )
        }
        book = await ledger.balances(conn)
        assert {a: b for a, b in book.items() if a in sums} == sums
        assert sum(sums.values()) == 0
        for client in self.clients:
            live: dict[str, int] = {}
            for slot, w in (await self.market.wallets(client, self.now)).items():
                live[ledger.client_slot(client, slot).name] = w.avail_pusd
                if slot != FUNDING:
                    live[ledger.client_held(client, slot).name] = w.held_pusd
                    holds = await self._holds(slot, client)
                    assert w.held_pusd == holds, (slot, client)  # every hold is a reservation's
            live[ledger.client_transit(client).name] = await self.market.in_transit(
                client, [FUNDING, *REGIONS]
            )
            mine = {a: v for a, v in book.items() if a.startswith(f"client:{client}:")}
            assert {a: v for a, v in live.items() if v} == {a: v for a, v in mine.items() if v}

    async def _holds(self, region: str, client: str) -> int:
        total = 0
        for c in await self.market.contracts(client_id=client, region=region):
            assert c.hold_pusd >= 0
            total += c.hold_pusd
        for bid in await self.market.bids(region):
            if bid.client_id == client:
                assert bid.hold_pusd == (bid.remaining_ram_gb + bid.remaining_vram_gb) * (
                    bid.duration_s * bid.max_price_pusd
                )
                total += bid.hold_pusd
        return total

    @invariant()
    def ledger_matches_the_live_market(self) -> None:
        self.run(self._check())

    def teardown(self) -> None:
        rebuilt = Keys(f"rb{uuid.uuid4().hex[:10]}:")
        try:
            self.run(self._check())
            status = self.run(
                rebuild_live(
                    Settings(redis_url=self.redis_url, database_url=self.db_url,
                             key_prefix=rebuilt.prefix),
                    now_ms=self.now,
                    out=io.StringIO(),
                )
            )  # fmt: skip
            assert status == 0
            for slot in (FUNDING, *REGIONS):
                for name in ("wallets", "outbox", "ops", "transfers", "open_counts"):
                    original = self.run(self._read(getattr(self.keys, name)(slot)))
                    again = self.run(self._read(getattr(rebuilt, name)(slot)))
                    assert again == original, (slot, name)
        finally:
            self.run(_drop(self.client, self.keys))
            self.run(_drop(self.client, rebuilt))

    async def _read(self, key: str) -> Any:
        kind = (await self.client.type(key)).decode()
        if kind == "hash":
            return await self.client.hgetall(key)
        if kind == "zset":
            return await self.client.zrange(key, 0, -1, withscores=True)
        return kind


async def _drop(client: aioredis.Redis, keys: Keys) -> None:
    found = [k async for k in client.scan_iter(match=f"{keys.prefix}*", count=1000)]
    if found:
        await client.unlink(*found)


def test_ledger_and_live_market_agree(redis_url: str, db_url: str) -> None:
    """Random money sequences: the ledger balances, and it equals the live market, step by step."""
    loop = asyncio.new_event_loop()
    LedgerMachine.loop = loop
    LedgerMachine.client = open_redis(redis_url)
    LedgerMachine.conn = loop.run_until_complete(asyncpg.connect(db_url))
    LedgerMachine.redis_url, LedgerMachine.db_url = redis_url, db_url
    try:
        from hypothesis.stateful import run_state_machine_as_test

        run_state_machine_as_test(
            LedgerMachine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        loop.run_until_complete(LedgerMachine.conn.close())
        loop.run_until_complete(LedgerMachine.client.aclose())
        loop.close()
