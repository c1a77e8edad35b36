"""The market on a real Redis Cluster while operations change it under load.

A cluster of 3 primaries with one replica each (`scripts.cluster`, ports 44000-44999) is started
for this module. Renters reserve and providers beat in four regions spread over the shards while
a region's slot migrates to another primary (the clients see ASK, TRYAGAIN, then MOVED), a
primary hands over to its replica (`CLUSTER FAILOVER`) and another primary is killed outright
(its replica is elected). The market waits for one replica to confirm every change
(`ack_replicas=1`), so a reserve reported made is on two servers before its caller hears of it.

What must hold afterwards: every contract a caller was told of is there exactly once (in the
live market and once in its region's event log), no request made two contracts (none is ever
resent), and no node has more GB leased than its contracts add up to, or than it offers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from engine.connection import open_redis
from engine.errors import MarketError
from engine.keys import Keys, mint_id
from engine.market import Market
from engine.types import Contract, ContractCreated, Heartbeat
from scripts.cluster import LocalCluster
from tests.engine.conftest import fund
from tests.engine.test_market import T0, a_node

REGIONS = ("us-east-2", "eu-west-1", "ap-south-1", "sa-east-1")
NODES_PER_REGION = 6
NODE_RAM_GB = 4096  # room for every reserve of the run: refusals would hide a stall


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with tempfile.TemporaryDirectory(prefix="mnemo-ops-") as tmp:
        with LocalCluster(Path(tmp), masters=3, replicas=1) as c:
            yield c


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[aioredis.Redis]:
    c = open_redis(cluster.url)
    try:
        yield c
    finally:
        await c.aclose()


class Load:
    """Reserves and heartbeats from several clients until `stop`; what each reserve got."""

    def __init__(self, url: str, keys: Keys, nodes: dict[str, list[str]]) -> None:
        self.url = url
        self.keys = keys
        self.nodes = nodes
        self.stop = asyncio.Event()
        self.acked: list[Contract] = []
        self.unknown = 0  # calls whose outcome the caller could not learn (connection lost)
        self.refused = 0
        self.beats = 0
        self.requests = 0

    async def reserver(self, seed: int) -> None:
        rng = random.Random(seed)
        market = Market(open_redis(self.url), self.keys, ack_replicas=1)
        renter = f"renter-{seed}"
        try:
            for region in REGIONS:  # the contracts' holds (issue 14), before the load
                await fund(market, renter, region)
            while not self.stop.is_set():
                region = rng.choice(REGIONS)
                self.requests += 1
                try:
                    contract = await market.reserve(
                        node_id=rng.choice(self.nodes[region]),
                        client_id=renter,
                        user_id=f"req-{seed}-{self.requests}",  # one user per request
                        ram_gb=rng.randint(1, 8),
                        vram_gb=0,
                        duration_s=3600,
                        max_price_pusd=10**7,
                        now_ms=T0 + 1000,
                    )
                except MarketError:
                    self.refused += 1
                except Exception:  # a lost reply, a replica's timeout: the outcome is unknown
                    self.unknown += 1
                    await asyncio.sleep(0.05)
                else:
                    self.acked.append(contract)
        finally:
            await market.redis.aclose()

    async def beater(self) -> None:
        market = Market(open_redis(self.url), self.keys, ack_replicas=1)
        now_ms = T0 + 1000
        try:
            while not self.stop.is_set():
                now_ms += 1000
                for region in REGIONS:
                    beats = [
                        Heartbeat(node_id=n, available_ram_gb=NODE_RAM_GB, available_vram_gb=0)
                        for n in self.nodes[region]
                    ]
                    try:
                        await market.heartbeat("alice", beats, now_ms, 0)
                        self.beats += len(beats)
                    except Exception:  # as a reserve's
                        await asyncio.sleep(0.05)
                await asyncio.sleep(0.02)
        finally:
            await market.redis.aclose()


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def test_slot_migration_and_failovers_lose_no_acknowledged_contract(
    cluster: LocalCluster, client: aioredis.Redis
) -> None:
    """0 acknowledged contracts lost or doubled, 0 GB double-booked, through a slot migration,
    a manual fail-over and a killed primary, all under load."""
    keys = Keys("ops:")
    market = Market(client, keys, ack_replicas=1)
    await market.load_scripts()
    nodes: dict[str, list[str]] = {}
    for region in REGIONS:
        batch = [
            a_node(
                mint_id(region),
                region=region,
                total_ram_gb=NODE_RAM_GB,
                offered_ram_gb=NODE_RAM_GB,
                total_vram_gb=0,
                offered_vram_gb=0,
                max_duration_s=10**6,
            )
            for _ in range(NODES_PER_REGION)
        ]
        nodes[region] = [n.node_id for n in await market.register_many(batch, T0)]
    slots = {r: key_slot(keys.seq(r).encode()) for r in REGIONS}
    owners = {r: cluster.owner(slots[r]) for r in REGIONS}
    assert len({s.port for s in owners.values()}) >= 2, "the regions should span shards"

    load = Load(cluster.url, keys, nodes)
    workers = [asyncio.create_task(load.reserver(i)) for i in range(4)]
    workers.append(asyncio.create_task(load.beater()))
    try:
        await asyncio.sleep(1.0)
        # 1. a region's slot moves to another primary, a few keys at a time
        moving = REGIONS[0]
        target = next(s for s in cluster.primaries() if s.port != owners[moving].port)
        before = len(load.acked)
        moved = await _in_thread(
            lambda: cluster.move_slot(slots[moving], target, batch=5, pause_s=0.05)
        )
        assert moved > 0 and cluster.owner(slots[moving]).port == target.port
        await asyncio.sleep(1.0)
        assert len(load.acked) > before, "reserves go on after the migration"
        # 2. a primary hands over to its replica
        primary = cluster.owner(slots[REGIONS[1]])
        promoted = await _in_thread(cluster.failover, primary)
        assert cluster.owner(slots[REGIONS[1]]).port == promoted.port
        await asyncio.sleep(1.0)
        # 3. a primary is killed; its replica is elected (node timeout, then an election)
        victim = cluster.owner(slots[REGIONS[2]])
        await _in_thread(cluster.kill, victim)
        deadline = time.monotonic() + 30
        while cluster.owner(slots[REGIONS[2]]).port == victim.port:
            assert time.monotonic() < deadline, "no replica took over"
            await asyncio.sleep(0.2)
        # the killed server comes back as the new primary's replica (WAIT 1 is met again)
        await _in_thread(cluster.restart, victim)
        await _in_thread(cluster.wait_ok)
        after = len(load.acked)
        await asyncio.sleep(2.0)
        assert len(load.acked) > after, "reserves go on after the fail-overs"
    finally:
        load.stop.set()
        await asyncio.gather(*workers)

    # every acknowledged contract is there once, in the market and in its region's log
    created: dict[str, int] = {}
    for region in REGIONS:
        for event in await market.read_events(region):
            if isinstance(event, ContractCreated):
                cid = event.contract.contract_id
                created[cid] = created.get(cid, 0) + 1
    lost = [c.contract_id for c in load.acked if created.get(c.contract_id) != 1]
    live = {c.contract_id: c for c in await market.contracts()}
    missing = [c.contract_id for c in load.acked if c.contract_id not in live]
    assert lost == [] and missing == []
    # no request made two contracts (each request had a user of its own)
    per_request: dict[str, int] = {}
    for c in live.values():
        per_request[c.user_id] = per_request.get(c.user_id, 0) + 1
    assert max(per_request.values()) == 1
    assert set(created) == set(live)
    # no GB counted twice: each node's reserved GB are its live contracts', within its offer
    double_booked = 0
    for node in await market.nodes():
        leased = sum(c.ram_gb for c in live.values() if c.node_id == node.node_id)
        assert node.reserved_ram_gb == leased, node.node_id
        double_booked += max(0, leased - node.offered_ram_gb)
    assert double_booked == 0
    assert load.beats > 0 and len(load.acked) > 20
    print(
        f"\nacknowledged {len(load.acked)}, refused {load.refused}, unknown {load.unknown}, "
        f"contracts {len(live)}, beats {load.beats}, keys moved {moved}"
    )
    with contextlib.suppress(Exception):
        await client.delete(keys.regions)


async def test_calls_follow_ask_while_a_slot_migrates_and_moved_after(
    cluster: LocalCluster, client: aioredis.Redis
) -> None:
    """With a region's keys already on the importing primary but the slot not yet handed over,
    the old primary answers ASK: a script call whose keys all exist (an extension) and plain
    reads follow it (ASKING first). A call that would create a key (a reserve's new contract)
    gets TRYAGAIN there until the slot is handed over (Redis runs no multi-key command on a
    half-moved slot), and goes through right after, following MOVED. Nothing runs twice."""
    keys = Keys("ask:")
    region = "ask-region"
    market = Market(client, keys)
    await market.load_scripts()
    node = await market.register_node(a_node(mint_id(region), region=region), T0)
    for renter in ("c1", "c2", "c3"):  # their wallets exist before the slot moves
        await fund(market, renter, region, usd=1000)
    first = await market.reserve(
        node_id=node.node_id, client_id="c1", user_id="u", ram_gb=4, vram_gb=0,
        duration_s=600, max_price_pusd=10**7, now_ms=T0 + 1,
    )  # fmt: skip
    slot = key_slot(keys.seq(region).encode())
    source = cluster.owner(slot)
    target = next(s for s in cluster.primaries() if s.port != source.port)
    await _in_thread(cluster.begin_move, slot, source, target)
    try:
        assert await _in_thread(cluster.migrate_keys, slot, source, target) > 0
        # every key of the region is on the target now; the source still owns the slot
        extended = await market.extend(first.contract_id, 60, T0 + 2)
        assert extended.duration_s == 660
        assert (await market.get_contract(first.contract_id)) == extended
        waiting = asyncio.create_task(
            market.reserve(
                node_id=node.node_id,
                client_id="c2",
                user_id="u",
                ram_gb=4,
                vram_gb=0,
                duration_s=600,
                max_price_pusd=10**7,
                now_ms=T0 + 3,
            )
        )
        await asyncio.sleep(0.5)
        assert not waiting.done()  # TRYAGAIN, waited out
    finally:
        await _in_thread(cluster.finish_move, slot, source, target)
    second = await asyncio.wait_for(waiting, 30)
    third = await market.reserve(
        node_id=node.node_id, client_id="c3", user_id="u", ram_gb=4, vram_gb=0,
        duration_s=600, max_price_pusd=10**7, now_ms=T0 + 4,
    )  # fmt: skip
    stored = await market.get_node(node.node_id)
    assert stored is not None and stored.reserved_ram_gb == 12
    created = [
        e.contract.contract_id
        for e in await market.read_events(region)
        if isinstance(e, ContractCreated)
    ]
    assert created == [first.contract_id, second.contract_id, third.contract_id]
