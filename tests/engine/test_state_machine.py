"""Random sequences of market operations: the Lua scripts never diverge from the plain model.

A Hypothesis state machine drives the real `Market` (real Redis, the real scripts) and
`tests.engine.model.ModelMarket` side by side through register, update, heartbeat, deactivate,
place/cancel/expire bid, reserve (plain and filling a bid), extend, settle, fail, failover,
mark offline, ask expiry and the passage of time. After every step it compares the call's
outcome (the returned objects, or the refusal's class, message and field), the whole state of
both regions (every hash, index, counter and directory entry), and capacity conservation
(`reserved + available == offered <= total`, nothing negative, `reserved` = the sum over the
node's active contracts). At the end of each sequence the regions' event streams are replayed
into an empty key space and must reproduce the same state, GEO scores included. The scripts run
in their test mode (tests/engine/conftest.py): on every path a sequence takes, a script that
touches a key its call did not declare in KEYS fails the step.

Sequences per run: `MNEMO_SM_EXAMPLES` (default 200; CI runs 2000), steps per sequence:
`MNEMO_SM_STEPS` (default 40). `MNEMO_SM_STATS=1` with `pytest -s` prints how often each
operation ended in each outcome. One event loop and one Redis client serve the whole run.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine import core
from engine.connection import open_redis
from engine.errors import MarketError
from engine.keys import FUNDING, Keys
from engine.market import Market, ReserveRequest
from engine.replay import region_snapshot
from engine.types import Bid, Contract, Heartbeat, Node, NodeChanges
from tests.engine.claims import without_empty_claims
from tests.engine.model import ModelMarket

EXAMPLES = int(os.environ.get("MNEMO_SM_EXAMPLES", "200"))
STEPS = int(os.environ.get("MNEMO_SM_STEPS", "40"))

REGIONS = ("eu", "us")
NODE_IDS = ("n0", "n1", "n2", "n3", "n4", "b3")  # "b3" collides with a bid id on purpose
BID_IDS = ("b0", "b1", "b2", "b3", "n0")
OWNERS = ("o0", "o1")
CLIENTS = ("c0", "c1", "c2")
PRICES = (100, 200, 300)
CAPS = (150, 250, 400)
DURATIONS = (1, 60, 600, 3600)
T0 = 1_700_000_000_000

COVERAGE: Counter[str] = Counter()
"""Outcomes seen per operation (printed with MNEMO_SM_STATS=1 and `pytest -s`)."""

Outcome = Any


def _same(got: Outcome, want: Outcome) -> None:
    if isinstance(got, MarketError) or isinstance(want, MarketError):
        assert (type(got), str(got), getattr(got, "field", None)) == (
            type(want),
            str(want),
            getattr(want, "field", None),
        ), f"real {got!r} model {want!r}"
    else:
        assert got == want


def _suffixes(model: ModelMarket, contract_ids: set[str]) -> set[str]:
    """Every key suffix the scripts may have written for these objects."""
    names = {"asks", "ask-exp", "geo", "hb", "bids", "bid-exp", "ends", "fills", "seq", "arrival"}
    names |= {"uptime", "trust-due"}
    names |= {"wallets", "open", "outbox", "transfers", "ops"}
    for i in {*NODE_IDS, *BID_IDS, *model.directory}:
        names |= {f"node:{i}", f"node:{i}:contracts", f"bid:{i}"}
    names |= {f"contract:{c}" for c in contract_ids | set(model.contracts)}
    names |= {f"client:{c}:contracts" for c in CLIENTS}
    return names


class MarketMachine(RuleBasedStateMachine):
    loop: asyncio.AbstractEventLoop
    client: aioredis.Redis

    def __init__(self) -> None:
        super().__init__()
        self.keys = Keys(f"sm{uuid.uuid4().hex[:10]}:")
        self.market = Market(self.client, self.keys, max_open_contracts=4, max_open_bids=2)
        self.model = ModelMarket(max_open_contracts=4, max_open_bids=2)
        self.now = T0
        self.contract_ids: list[str] = []

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def call(
        self,
        label: str,
        real: Callable[[], Coroutine[Any, Any, Any]],
        model: Callable[[Outcome], Any],
    ) -> Outcome:
        """Run the operation on Redis, then on the model (which may use the real result, e.g.
        to learn the contract id the adapter chose); the outcomes must be equal."""
        try:
            got: Outcome = self.run(real())
        except MarketError as exc:
            got = exc
        COVERAGE[f"{label} -> {type(got).__name__}: {got}" if isinstance(got, MarketError)
                 else f"{label} -> ok"] += 1  # fmt: skip
        try:
            want: Outcome = model(got)
        except MarketError as exc:
            want = exc
        _same(got, want)
        return got

    # Objects are picked by index: mostly existing ones, sometimes an unknown id.

    def node_id(self, i: int) -> str:
        known = sorted(self.model.nodes)
        return known[i % len(known)] if known and i % 6 else NODE_IDS[i % len(NODE_IDS)]

    def bid_id(self, i: int) -> str:
        known = sorted(self.model.bids)
        return known[i % len(known)] if known and i % 6 else BID_IDS[i % len(BID_IDS)]

    def contract_id(self, i: int) -> str:
        active = [c for c in self.contract_ids if self.model.contracts[c].status == "active"]
        if active and i % 8:
            return active[i % len(active)]
        return self.contract_ids[i % len(self.contract_ids)] if i % 7 else "c-unknown"

    # -- rules ----------------------------------------------------------------------------

    @initialize(
        nodes=st.lists(
            st.tuples(
                st.sampled_from(NODE_IDS[:5]),
                st.sampled_from(REGIONS),
                st.sampled_from(OWNERS),
                st.integers(4, 24),
                st.integers(0, 16),
                st.sampled_from(PRICES),
            ),
            min_size=2,
            max_size=5,
            unique_by=lambda t: t[0],
        ),
        bids=st.lists(
            st.tuples(st.sampled_from(BID_IDS[:4]), st.sampled_from(REGIONS), st.booleans()),
            min_size=1,
            max_size=3,
            unique_by=lambda t: t[0],
        ),
        leases=st.integers(1, 4),
    )
    def populate(
        self, nodes: list[tuple[Any, ...]], bids: list[tuple[str, str, bool]], leases: int
    ) -> None:
        """Every sequence starts with a few nodes offering capacity, a few resting bids and a
        few contracts."""
        self.run(self.market.load_scripts())
        now = self.now
        for client in CLIENTS:
            self.credit(client, 10**9, 0)
            for region in REGIONS:
                self.move(client, region, 2 * 10**6, True)
        for node_id, region, owner, ram, vram, price in nodes:
            node = Node(
                node_id=node_id, owner_id=owner, region=region, node_type="mist_node",
                name=node_id, lat=40.7, lng=-73.9, total_ram_gb=ram, total_vram_gb=vram,
                offered_ram_gb=ram, offered_vram_gb=vram, price_pusd=price, min_duration_s=1,
                max_duration_s=3600, heartbeat_interval_s=10.0,
            )  # fmt: skip
            self.call("register", lambda n=node: self.market.register_node(n, now),
                      lambda _, n=node: self.model.register_node(n, now))  # fmt: skip
        for bid_id, region, split in bids:
            bid = Bid(
                bid_id=bid_id, region=region, client_id="c1", user_id="u-c1", ram_gb=6,
                vram_gb=2, duration_s=60, max_price_pusd=250, allow_split=split, min_fill_gb=2,
            )  # fmt: skip
            self.call("place_bid", lambda b=bid: self.market.place_bid(b, now),
                      lambda _, b=bid: self.model.place_bid(b, now))  # fmt: skip
        for k in range(leases):
            self.take(k, k % 2, 600)

    @rule(i=st.integers(0, 99), vram=st.integers(0, 1), duration=st.sampled_from(DURATIONS))
    def take(self, i: int, vram: int, duration: int) -> None:
        """A renter takes a small lease on a known node at any price (usually succeeds)."""
        client = CLIENTS[i % len(CLIENTS)]
        self._reserve("take", node_id=self.node_id(i), client_id=client, user_id=f"u-{client}",
                      ram_gb=1 + i % 3, vram_gb=vram, duration_s=duration,
                      max_price_pusd=400)  # fmt: skip

    @rule(
        client=st.sampled_from(CLIENTS),
        amount=st.sampled_from((1, 10**5, 10**6, 10**7)),
        repeat=st.integers(0, 3),
        debit=st.booleans(),
    )
    def credit(self, client: str, amount: int, repeat: int, debit: bool = False) -> None:
        """Money in (or out) of a renter's funding wallet; a key may come again (a retry)."""
        key = f"k{repeat}" if repeat else uuid.uuid4().hex
        key = f"{client}:{'d' if debit else 'c'}:{key}"
        now = self.now
        if debit:
            self.call("debit",
                      lambda: self.market.debit(client, amount, key=key, rail="operator", now_ms=now),
                      lambda _: self.model.credit(client, amount, key=key, now_ms=now, debit=True))  # fmt: skip
        else:
            self.call("credit",
                      lambda: self.market.credit(client, amount, key=key, rail="operator", now_ms=now),
                      lambda _: self.model.credit(client, amount, key=key, now_ms=now))  # fmt: skip

    @rule(
        client=st.sampled_from(CLIENTS),
        region=st.sampled_from(REGIONS),
        amount=st.sampled_from((0, 10**4, 10**6, 10**7)),
        inward=st.booleans(),
    )
    def move(self, client: str, region: str, amount: int, inward: bool) -> None:
        """A transfer between the funding wallet and a region's (either way), with as much
        allowance; sometimes more than there is."""
        source, dest = (FUNDING, region) if inward else (region, FUNDING)
        now = self.now

        def model(got: Outcome) -> Any:
            tid = got if isinstance(got, str) else "never"
            return self.model.transfer(client, transfer_id=tid, from_slot=source, to_slot=dest,
                                       amount_pusd=amount, allow_pusd=amount, now_ms=now)  # fmt: skip

        self.call("transfer", lambda: self.market.transfer(
            client, from_slot=source, to_slot=dest, amount_pusd=amount, allow_pusd=amount,
            now_ms=now), model)  # fmt: skip

    @rule(dt=st.sampled_from((0, 1, 499, 1000, 5_000, 30_000, 200_000, 700_000)))
    def tick(self, dt: int) -> None:
        self.now += dt

    @rule(
        node_id=st.sampled_from(NODE_IDS),
        region=st.sampled_from(REGIONS),
        owner=st.sampled_from(OWNERS),
        node_type=st.sampled_from(("datacenter", "edge_cluster", "mist_node")),
        total=st.tuples(st.integers(0, 24), st.integers(0, 16)),
        offered=st.tuples(st.integers(0, 30), st.integers(0, 20)),
        price=st.sampled_from(PRICES),
        terms=st.sampled_from(((1, 3600), (30, 600), (60, 60), (1, 30))),
        ask_in=st.sampled_from((0, 0, 1_000, 60_000)),
        interval=st.sampled_from((1.0, 10.0, 0.3)),
        lat=st.sampled_from((40.7, -33.9, 89.5)),
    )
    def register(self, node_id, region, owner, node_type, total, offered, price, terms,
                 ask_in, interval, lat) -> None:  # fmt: skip
        node = Node(
            node_id=node_id, owner_id=owner, region=region, node_type=node_type,
            name=f"node {node_id}", lat=lat, lng=-73.9, total_ram_gb=total[0],
            total_vram_gb=total[1], offered_ram_gb=offered[0], offered_vram_gb=offered[1],
            price_pusd=price, egress_price_pusd=7, min_duration_s=terms[0],
            max_duration_s=terms[1], ask_expires_ms=self.now + ask_in if ask_in else 0,
            heartbeat_interval_s=interval, metadata={"gpu": "rtx", "a": "1"},
        )  # fmt: skip
        now = self.now
        self.call("register", lambda: self.market.register_node(node, now),
                  lambda _: self.model.register_node(node, now))  # fmt: skip

    @rule(
        i=st.integers(0, 99),
        price=st.none() | st.sampled_from(PRICES),
        status=st.none() | st.sampled_from(("active", "maintenance")),
        ask_in=st.none() | st.sampled_from((0, 500, 50_000)),
        terms=st.none() | st.sampled_from(((1, 600), (60, 30), (30, 3600))),
        move=st.booleans(),
    )
    def update(self, i, price, status, ask_in, terms, move) -> None:  # fmt: skip
        node_id = self.node_id(i)
        changes = NodeChanges(
            price_pusd=price, status=status,
            ask_expires_ms=None if ask_in is None else (self.now + ask_in if ask_in else 0),
            min_duration_s=terms[0] if terms else None, max_duration_s=terms[1] if terms else None,
            lat=51.5 if move else None, lng=-0.1 if move else None,
            metadata={"moved": "yes"} if move else None,
        )  # fmt: skip
        now = self.now
        self.call("update", lambda: self.market.update_node(node_id, changes, now),
                  lambda _: self.model.update_node(node_id, changes, now))  # fmt: skip

    @rule(i=st.integers(0, 99), rarely=st.integers(0, 2))
    def deactivate(self, i: int, rarely: int) -> None:
        if rarely:  # deactivation ends a node for good: keep it rare
            return
        node_id = self.node_id(i)
        now = self.now
        self.call("deactivate", lambda: self.market.deactivate_node(node_id, now),
                  lambda _: self.model.deactivate_node(node_id, now))  # fmt: skip

    @rule(
        owner=st.sampled_from(OWNERS),
        beats=st.lists(
            st.tuples(st.integers(0, 99), st.integers(0, 30), st.integers(0, 20), st.booleans()),
            min_size=1,
            max_size=4,
        ),
        min_interval=st.sampled_from((0, 1_000, 30_000)),
    )
    def heartbeat(self, owner, beats, min_interval) -> None:  # fmt: skip
        batch = [
            Heartbeat(node_id=self.node_id(i) if i % 9 else "ghost", available_ram_gb=r,
                      available_vram_gb=v, cpu_usage_pct=12.5, temperature_c=40,
                      bandwidth_mbps=900 if moved else None, lat=48.85 if moved else None,
                      lng=2.35 if moved else None)
            for i, r, v, moved in beats
        ]  # fmt: skip
        now = self.now
        self.call("heartbeat", lambda: self.market.heartbeat(owner, batch, now, min_interval),
                  lambda _: self.model.heartbeat(owner, batch, now, min_interval))  # fmt: skip

    @rule(
        bid_id=st.sampled_from(BID_IDS),
        region=st.sampled_from(REGIONS),
        client=st.sampled_from(CLIENTS),
        size=st.tuples(st.integers(0, 12), st.integers(0, 8)),
        duration=st.sampled_from(DURATIONS),
        price=st.sampled_from(CAPS),
        split=st.tuples(st.booleans(), st.sampled_from((0, 2, 5))),
        expires_in=st.sampled_from((0, 0, 2_000, 100_000)),
    )
    def place_bid(self, bid_id, region, client, size, duration, price, split,
                  expires_in) -> None:  # fmt: skip
        bid = Bid(
            bid_id=bid_id, region=region, client_id=client, user_id=f"u-{client}",
            ram_gb=size[0], vram_gb=size[1], duration_s=duration, max_price_pusd=price,
            allow_split=split[0], min_fill_gb=split[1],
            expires_ms=self.now + expires_in if expires_in else 0,
        )  # fmt: skip
        now = self.now
        self.call("place_bid", lambda: self.market.place_bid(bid, now),
                  lambda _: self.model.place_bid(bid, now))  # fmt: skip

    @rule(i=st.integers(0, 99))
    def cancel_bid(self, i: int) -> None:
        bid_id = self.bid_id(i)
        now = self.now
        self.call("cancel_bid", lambda: self.market.cancel_bid(bid_id, now),
                  lambda _: self.model.cancel_bid(bid_id, now))  # fmt: skip

    @rule(region=st.sampled_from(REGIONS), limit=st.sampled_from((1, 500)))
    def expire(self, region: str, limit: int) -> None:
        now = self.now
        self.call("expire_bids", lambda: self.market.expire_bids(region, now, limit),
                  lambda _: self.model.expire_bids(region, now, limit))  # fmt: skip
        self.call("expire_asks", lambda: self.market.expire_asks(region, now, limit),
                  lambda _: self.model.expire_asks(region, now, limit))  # fmt: skip

    def _reserve(self, label: str, **kw: Any) -> None:
        now = self.now

        def model(got: Outcome) -> Contract:
            cid = "never" if isinstance(got, MarketError) else got.contract_id
            return self.model.reserve(contract_id=cid, now_ms=now, **kw)

        got = self.call(label, lambda: self.market.reserve(now_ms=now, **kw), model)
        if isinstance(got, Contract):
            self.contract_ids.append(got.contract_id)

    @rule(
        i=st.integers(0, 99),
        client=st.sampled_from(CLIENTS),
        size=st.tuples(st.integers(0, 10), st.integers(0, 6)),
        duration=st.sampled_from(DURATIONS),
        cap=st.sampled_from(CAPS),
    )
    def reserve(self, i, client, size, duration, cap) -> None:  # fmt: skip
        self._reserve("reserve", node_id=self.node_id(i), client_id=client,
                      user_id=f"u-{client}", ram_gb=size[0], vram_gb=size[1],
                      duration_s=duration, max_price_pusd=cap)  # fmt: skip

    @rule(
        i=st.integers(0, 99),
        j=st.integers(0, 99),
        how=st.sampled_from(("largest", "largest", "whole", "one", "wrong_client")),
    )
    def fill_bid(self, i: int, j: int, how: str) -> None:
        open_bids = sorted(b.bid_id for b in self.model.bids.values() if b.status == "open")
        bid_id = open_bids[j % len(open_bids)] if open_bids and j % 4 else self.bid_id(j)
        bid = self.model.bids.get(bid_id)
        near = sorted(
            n.node_id for n in self.model.nodes.values() if bid and n.region == bid.region
        )
        node_id = near[i % len(near)] if near and i % 3 else self.node_id(i)
        node = self.model.nodes.get(node_id)
        if bid is None:
            self._reserve("fill", node_id=node_id, client_id="c0", user_id="u-c0", ram_gb=1,
                          vram_gb=0, duration_s=60, max_price_pusd=250, bid_id=bid_id)  # fmt: skip
            return
        size = (bid.remaining_ram_gb, bid.remaining_vram_gb)
        if how == "largest" and node is not None:
            size = core.fill_size(bid, node.available_ram_gb, node.available_vram_gb) or size
        elif how == "one":
            size = (1, 0) if bid.remaining_ram_gb else (0, 1)
        client = "c2" if how == "wrong_client" and bid.client_id != "c2" else bid.client_id
        self._reserve("fill", node_id=node_id, client_id=client, user_id=f"u-{client}",
                      ram_gb=size[0], vram_gb=size[1], duration_s=bid.duration_s,
                      max_price_pusd=bid.max_price_pusd, bid_id=bid_id)  # fmt: skip

    @rule(
        picks=st.lists(
            st.tuples(st.integers(0, 99), st.integers(0, 99), st.booleans()),
            min_size=2,
            max_size=6,
        )
    )
    def reserve_batch(self, picks: list[tuple[int, int, bool]]) -> None:
        """Plain reserves and bid fills in one `reserve_many` call (the script keeps the nodes
        and bids it read and writes them at the end): each slot as if made alone, in order. The
        requests are drawn from the state before the batch, so later ones meet earlier ones'
        leases and fills (the same node or bid often appears twice)."""
        now = self.now
        requests = []
        for i, j, fill in picks:
            open_bids = sorted(b.bid_id for b in self.model.bids.values() if b.status == "open")
            if fill and open_bids:
                bid = self.model.bids[open_bids[j % len(open_bids)]]
                near = sorted(
                    n.node_id for n in self.model.nodes.values() if n.region == bid.region
                )
                node_id = near[i % len(near)] if near else self.node_id(i)
                ram, vram = bid.remaining_ram_gb, bid.remaining_vram_gb
                if i % 3 and ram + vram > 1:
                    ram, vram = (1, 0) if ram else (0, 1)
                requests.append(
                    ReserveRequest(
                        node_id=node_id,
                        client_id=bid.client_id,
                        user_id=bid.user_id,
                        ram_gb=ram,
                        vram_gb=vram,
                        duration_s=bid.duration_s,
                        max_price_pusd=bid.max_price_pusd,
                        bid_id=bid.bid_id,
                    )
                )
            else:
                client = CLIENTS[j % len(CLIENTS)]
                requests.append(
                    ReserveRequest(
                        node_id=self.node_id(i),
                        client_id=client,
                        user_id=f"u-{client}",
                        ram_gb=j % 5,
                        vram_gb=j % 3,
                        duration_s=DURATIONS[j % len(DURATIONS)],
                        max_price_pusd=CAPS[i % len(CAPS)],
                    )
                )
        got_all = self.run(self.market.reserve_many(requests, now))
        for request, got in zip(requests, got_all, strict=True):
            COVERAGE[f"reserve_batch -> {type(got).__name__}: {got}" if isinstance(got, MarketError)
                     else "reserve_batch -> ok"] += 1  # fmt: skip
            cid = got.contract_id if isinstance(got, Contract) else "never"
            try:
                want: Outcome = self.model.reserve(
                    contract_id=cid, now_ms=now, **msgspec.structs.asdict(request)
                )
            except MarketError as exc:
                want = exc
            _same(got, want)
            if isinstance(got, Contract):
                self.contract_ids.append(got.contract_id)

    @precondition(lambda self: bool(self.contract_ids))
    @rule(i=st.integers(0, 99), extra=st.sampled_from((1, 60, 600)))
    def extend(self, i: int, extra: int) -> None:
        cid, now = self.contract_id(i), self.now
        self.call("extend", lambda: self.market.extend(cid, extra, now),
                  lambda _: self.model.extend(cid, extra, now))  # fmt: skip

    @precondition(lambda self: bool(self.contract_ids))
    @rule(i=st.integers(0, 99), egress=st.sampled_from((0, 0.0015, 2.4)))
    def settle(self, i: int, egress: float) -> None:
        cid, now = self.contract_id(i), self.now
        self.call("settle", lambda: self.market.settle(cid, egress, now),
                  lambda _: self.model.settle(cid, egress, now))  # fmt: skip

    @precondition(lambda self: bool(self.contract_ids))
    @rule(i=st.integers(0, 99))
    def fail(self, i: int) -> None:
        cid, now = self.contract_id(i), self.now
        self.call("fail", lambda: self.market.fail_contract(cid, now),
                  lambda _: self.model.fail_contract(cid, now))  # fmt: skip

    @precondition(lambda self: bool(self.contract_ids))
    @rule(i=st.integers(0, 99), j=st.integers(0, 99))
    def failover(self, i: int, j: int) -> None:
        cid, now = self.contract_id(i), self.now
        old = self.model.contracts.get(cid)
        near = sorted(
            n.node_id for n in self.model.nodes.values() if old and n.region == old.region
        )
        node_id = near[j % len(near)] if near and j % 4 else self.node_id(j)

        def model(got: Outcome) -> Any:
            successor = "never" if isinstance(got, MarketError) else got[1].contract_id
            return self.model.failover(cid, node_id, now, successor_id=successor)

        got = self.call("failover", lambda: self.market.failover(cid, node_id, now), model)
        if not isinstance(got, MarketError):
            self.contract_ids.append(got[1].contract_id)

    @rule(i=st.integers(0, 99))
    def mark_offline(self, i: int) -> None:
        node_id, now = self.node_id(i), self.now
        self.call("mark_offline", lambda: self.market.mark_offline(node_id, now),
                  lambda _: self.model.mark_offline(node_id, now))  # fmt: skip

    @rule(region=st.sampled_from(REGIONS), limit=st.sampled_from((1, 500)))
    def sweeps(self, region: str, limit: int) -> None:
        """The engine's scans: due contracts and stale nodes."""
        now = self.now
        assert self.run(self.market.due_contracts(region, now, limit)) == (
            self.model.due_contracts(region, now, limit)
        )
        assert self.run(self.market.stale_nodes(region, now, limit)) == (
            self.model.stale_nodes(region, now, limit)
        )

    # -- invariants -----------------------------------------------------------------------

    def snapshots(self, *, geo_scores: bool = False, keys: Keys | None = None) -> dict[str, Any]:
        suffixes = _suffixes(self.model, set(self.contract_ids))

        async def read() -> dict[str, Any]:
            found = await asyncio.gather(
                *(
                    region_snapshot(
                        self.client,
                        keys or self.keys,
                        region,
                        suffixes=suffixes,
                        geo_scores=geo_scores,
                    )
                    for region in (*REGIONS, FUNDING)
                )
            )
            return dict(zip((*REGIONS, FUNDING), found, strict=True))

        return self.run(read())

    @invariant()
    def same_state_and_capacity_conserved(self) -> None:
        real = self.snapshots()
        assert real[FUNDING] == self.model.snapshot(FUNDING)
        for region in REGIONS:
            assert real[region] == self.model.snapshot(region), region
            for name, fields in real[region].items():
                if not (name.startswith("node:") and isinstance(fields, dict)):
                    continue
                node = core.from_fields(Node, fields)
                assert 0 <= node.reserved_ram_gb <= node.offered_ram_gb <= node.total_ram_gb
                assert 0 <= node.reserved_vram_gb <= node.offered_vram_gb <= node.total_vram_gb
                assert node.available_ram_gb + node.reserved_ram_gb == node.offered_ram_gb
                assert node.available_vram_gb + node.reserved_vram_gb == node.offered_vram_gb
                members = real[region].get(f"node:{node.node_id}:contracts", [])
                held = [core.from_fields(Contract, real[region][f"contract:{c}"]) for c in members]
                assert sum(c.ram_gb for c in held) == node.reserved_ram_gb
                assert sum(c.vram_gb for c in held) == node.reserved_vram_gb

    def teardown(self) -> None:
        replayed = Keys(f"rp{uuid.uuid4().hex[:10]}:")
        try:
            events = []
            for region in (*REGIONS, FUNDING):
                events += self.run(self.market.read_events(region))
            self.run(Market(self.client, replayed).replay(events))
            rebuilt = self.snapshots(geo_scores=True, keys=replayed)
            assert rebuilt == without_empty_claims(self.snapshots(geo_scores=True), rebuilt)
        finally:
            for keys in (self.keys, replayed):
                self.run(_drop(self.client, keys, _suffixes(self.model, set(self.contract_ids))))


async def _drop(client: aioredis.Redis, keys: Keys, suffixes: set[str]) -> None:
    names = [keys.directory, keys.regions]
    for region in (*REGIONS, FUNDING):
        names += [keys.tag(region) + s for s in suffixes] + [keys.events(region)]
    await client.unlink(*names)


# The suite's per-test limit (300 s) is for a test that hangs; this one's run time grows with the
# number of sequences (CI draws 2,000: several minutes on two busy cores, more since the scripts
# move money), so its limit grows with it.
@pytest.mark.timeout(300 + EXAMPLES)
def test_scripts_agree_with_the_model(redis_url: str) -> None:
    """Random operation sequences: same outcomes, same state, capacity conserved, replayable."""
    loop = asyncio.new_event_loop()
    client = open_redis(redis_url)
    MarketMachine.loop = loop
    MarketMachine.client = client
    try:
        run_state_machine_as_test(
            MarketMachine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
    if os.environ.get("MNEMO_SM_STATS"):
        print("\n".join(f"{n:7d}  {label}" for label, n in sorted(COVERAGE.items())))
