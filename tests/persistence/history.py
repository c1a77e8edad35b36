"""A random but consistent market history, as the engine's scripts would have logged it.

`History` plays a small market (nodes registering, heartbeating, going offline; bids resting,
filling, being cancelled; contracts created, extended, settled, failed over) and records every
change as an `engine.types` event with a per-region sequence id, the same JSON the Lua scripts
XADD. Accounts the events point at (users, clients) are created in Postgres by `seed_accounts`.
Used by the journal and analytics tests and by the journal benchmark.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg
import msgspec

from engine.keys import Keys
from engine.types import (
    Bid,
    BidCancelled,
    BidExpired,
    BidPlaced,
    Contract,
    ContractCreated,
    ContractExtended,
    ContractSettled,
    Event,
    HeartbeatEntry,
    HeartbeatsApplied,
    Node,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
)

_encode = msgspec.json.Encoder().encode
NODE_TYPES = ("datacenter", "edge_cluster", "mist_node")


def _id(rng: random.Random) -> str:
    return uuid.UUID(int=rng.getrandbits(128), version=4).hex


@dataclass
class History:
    """Generate with `History.generate(...)`; `events` is in the order the scripts made them."""

    regions: list[str]
    providers: list[str]
    renters: list[tuple[str, str]]  # (user_id, client_id)
    events: list[Event] = field(default_factory=list)

    @classmethod
    def generate(
        cls,
        seed: int,
        n_events: int,
        *,
        regions: Sequence[str] = ("us-east-2", "eu-west-1"),
        start_ms: int | None = None,
        heartbeat_weight: int = 6,
        max_entries: int = 4,
        max_nodes: int = 12,
    ) -> History:
        rng = random.Random(seed)
        providers = [_id(rng) for _ in range(3)]
        renters = [(_id(rng), _id(rng)) for _ in range(3)]
        h = cls(list(regions), providers, renters)
        _Market(h, rng, start_ms, heartbeat_weight, max_entries, max_nodes).run(n_events)
        return h

    def encoded(self) -> list[tuple[str, bytes]]:
        """(region, event JSON) in log order."""
        return [(e.region, _encode(e)) for e in self.events]


class _Market:
    def __init__(
        self,
        h: History,
        rng: random.Random,
        start_ms: int | None,
        heartbeat_weight: int,
        max_entries: int,
        max_nodes: int,
    ) -> None:
        self.h = h
        self.rng = rng
        # Recent enough that the metrics partitions the journal creates survive retention.
        self.now = start_ms if start_ms is not None else int(time.time() * 1000) - 3_600_000
        self.seq = dict.fromkeys(h.regions, 0)
        self.arrival = dict.fromkeys(h.regions, 0)
        self.nodes: dict[str, Node] = {}
        self.bids: dict[str, Bid] = {}
        self.contracts: dict[str, Contract] = {}
        self.heartbeat_weight = heartbeat_weight
        self.max_entries = max_entries
        self.max_nodes = max_nodes

    def _eid(self, region: str) -> str:
        self.seq[region] += 1
        return f"{region}:{self.seq[region]}"

    def emit(self, event_type: type, region: str, **fields: object) -> None:
        self.h.events.append(
            event_type(event_id=self._eid(region), region=region, ts_ms=self.now, **fields)
        )

    def run(self, n: int) -> None:
        actions = [
            (self.register, 3),
            (self.update, 1),
            (self.heartbeat, self.heartbeat_weight),
            (self.offline, 1),
            (self.deactivate, 1),
            (self.place_bid, 2),
            (self.end_bid, 1),
            (self.reserve, 4),
            (self.extend, 1),
            (self.settle, 3),
            (self.failover, 1),
        ]
        funcs = [a for a, _ in actions]
        weights = [w for _, w in actions]
        while len(self.h.events) < n:
            self.now += self.rng.randint(0, 4000)
            self.rng.choices(funcs, weights)[0]()

    # -- helpers ------------------------------------------------------------------------------

    def _live(self, region: str | None = None, *, active: bool = False) -> list[Node]:
        return [
            n
            for n in self.nodes.values()
            if n.status != "deactivated"
            and (region is None or n.region == region)
            and (not active or n.status == "active")
        ]

    def _region(self) -> str:
        return self.rng.choice(self.h.regions)

    # -- actions ------------------------------------------------------------------------------

    def register(self) -> None:
        region = self._region()
        if len(self._live(region)) >= self.max_nodes:
            return self.heartbeat()
        rng = self.rng
        total_ram, total_vram = rng.choice([16, 32, 64, 128]), rng.choice([0, 12, 24, 48])
        self.arrival[region] += 1
        node = Node(
            node_id=_id(rng),
            owner_id=rng.choice(self.h.providers),
            region=region,
            node_type=rng.choice(NODE_TYPES),
            name=f"node-{rng.randrange(10**6)}",
            lat=round(40 + rng.uniform(-2, 2), 7),
            lng=round(-73 + rng.uniform(-2, 2), 7),
            total_ram_gb=total_ram,
            total_vram_gb=total_vram,
            offered_ram_gb=rng.randint(total_ram // 2, total_ram),
            offered_vram_gb=rng.randint(total_vram // 2, total_vram),
            bandwidth_mbps=rng.choice([100, 1000, 10000]),
            base_latency_ms=round(rng.uniform(0.2, 30), 3),
            uptime_score=round(rng.uniform(90, 100), 2),
            price_pusd=rng.randint(200_000, 2_000_000),
            egress_price_pusd=rng.choice([0, 10**9, 5 * 10**9]),
            heartbeat_interval_s=60.0,
            last_heartbeat_ms=self.now,
            arrival_seq=self.arrival[region],
            created_ms=self.now,
            metadata={"gpu_model": rng.choice(["RTX 4090", "A100", "none"])},
        )
        self.nodes[node.node_id] = node
        self.emit(NodeRegistered, region, node=node)

    def update(self) -> None:
        live = self._live()
        if not live:
            return self.register()
        node = self.rng.choice(live)
        status = node.status
        if status in ("active", "maintenance"):
            status = self.rng.choice(["active", "active", "maintenance"])
        node = msgspec.structs.replace(
            node,
            price_pusd=self.rng.randint(200_000, 2_000_000),
            status=status,
            name=node.name + "'",
            ask_expires_ms=self.rng.choice([0, self.now + 3_600_000]),
        )
        self.nodes[node.node_id] = node
        self.emit(NodeUpdated, node.region, node=node)

    def heartbeat(self) -> None:
        region = self._region()
        candidates = self._live(region)
        if not candidates:
            return self.register()
        rng = self.rng
        picked = rng.sample(candidates, min(len(candidates), rng.randint(1, self.max_entries)))
        entries = []
        for node in picked:
            avail_ram = rng.randint(0, node.total_ram_gb)
            avail_vram = rng.randint(0, node.total_vram_gb)
            offered_ram = min(node.total_ram_gb, avail_ram + node.reserved_ram_gb)
            offered_vram = min(node.total_vram_gb, avail_vram + node.reserved_vram_gb)
            status = "active" if node.status == "offline" else node.status
            moved = rng.random() < 0.2
            lat = round(node.lat + rng.uniform(-0.01, 0.01), 7) if moved else None
            lng = round(node.lng + rng.uniform(-0.01, 0.01), 7) if moved else None
            node = msgspec.structs.replace(
                node,
                offered_ram_gb=offered_ram,
                offered_vram_gb=offered_vram,
                status=status,
                last_heartbeat_ms=self.now,
                lat=lat if lat is not None else node.lat,
                lng=lng if lng is not None else node.lng,
            )
            self.nodes[node.node_id] = node
            entries.append(
                HeartbeatEntry(
                    node_id=node.node_id,
                    offered_ram_gb=offered_ram,
                    offered_vram_gb=offered_vram,
                    available_ram_gb=offered_ram - node.reserved_ram_gb,
                    available_vram_gb=offered_vram - node.reserved_vram_gb,
                    cpu_usage_pct=rng.choice([None, round(rng.uniform(0, 100), 3)]),
                    gpu_usage_pct=rng.choice([None, round(rng.uniform(0, 100), 3)]),
                    temperature_c=rng.choice([None, rng.randint(30, 90)]),
                    bandwidth_mbps=rng.choice([None, 1000]),
                    lat=lat,
                    lng=lng,
                    status=status,
                )
            )
        self.emit(HeartbeatsApplied, region, entries=entries)

    def offline(self) -> None:
        active = self._live(active=True)
        if not active:
            return
        node = self.rng.choice(active)
        node = msgspec.structs.replace(node, status="offline")
        self.nodes[node.node_id] = node
        self.emit(
            NodeOffline, node.region, node_id=node.node_id, last_heartbeat_ms=node.last_heartbeat_ms
        )
        for c in [c for c in self.contracts.values() if c.node_id == node.node_id]:
            self._end(c, "failed")

    def deactivate(self) -> None:
        live = self._live()
        if len(live) < 4:
            return
        node = self.rng.choice(live)
        self.nodes[node.node_id] = msgspec.structs.replace(node, status="deactivated")
        self.emit(NodeDeactivated, node.region, node_id=node.node_id)

    def place_bid(self) -> None:
        region = self._region()
        user_id, client_id = self.rng.choice(self.h.renters)
        self.arrival[region] += 1
        bid = Bid(
            bid_id=_id(self.rng),
            region=region,
            client_id=client_id,
            user_id=user_id,
            ram_gb=self.rng.randint(1, 16),
            vram_gb=self.rng.randint(0, 8),
            duration_s=self.rng.choice([60, 600, 3600]),
            max_price_pusd=self.rng.randint(500_000, 3_000_000),
            lat=self.rng.choice([None, 40.5]),
            lng=-73.5,
            allow_split=self.rng.random() < 0.3,
            created_ms=self.now,
            expires_ms=self.rng.choice([0, self.now + 600_000]),
            seq=self.arrival[region],
        )
        self.bids[bid.bid_id] = bid
        self.emit(BidPlaced, region, bid=bid)

    def end_bid(self) -> None:
        if not self.bids:
            return self.place_bid()
        bid = self.bids.pop(self.rng.choice(sorted(self.bids)))
        kind = self.rng.choice([BidCancelled, BidExpired])
        self.emit(kind, bid.region, bid_id=bid.bid_id)

    def reserve(self) -> None:
        rng = self.rng
        candidates = [n for n in self._live(active=True) if n.available_ram_gb > 0]
        if not candidates:
            return self.register()
        node = rng.choice(candidates)
        bid = None
        region_bids = [b for b in self.bids.values() if b.region == node.region]
        if region_bids and rng.random() < 0.5:
            bid = rng.choice(region_bids)
            ram = min(bid.remaining_ram_gb, node.available_ram_gb)
            vram = min(bid.remaining_vram_gb, node.available_vram_gb)
            if ram + vram == 0:
                bid = None
        if bid is None:
            user_id, client_id = rng.choice(self.h.renters)
            ram = rng.randint(1, node.available_ram_gb)
            vram = rng.randint(0, node.available_vram_gb)
            duration = rng.choice([60, 300, 3600])
            cap = node.price_pusd + rng.randint(0, 10**6)
        else:
            user_id, client_id = bid.user_id, bid.client_id
            duration, cap = bid.duration_s, bid.max_price_pusd
        self._create(node, client_id, user_id, ram, vram, duration, cap, bid)

    def _create(
        self,
        node: Node,
        client_id: str,
        user_id: str,
        ram: int,
        vram: int,
        duration: int,
        cap: int,
        bid: Bid | None,
        predecessor_id: str | None = None,
        contract_id: str | None = None,
    ) -> Contract:
        c = Contract(
            contract_id=contract_id or _id(self.rng),
            region=node.region,
            client_id=client_id,
            user_id=user_id,
            node_id=node.node_id,
            owner_id=node.owner_id,
            ram_gb=ram,
            vram_gb=vram,
            duration_s=duration,
            start_ms=self.now,
            end_ms=self.now + duration * 1000,
            price_pusd=node.price_pusd,
            egress_price_pusd=node.egress_price_pusd,
            max_price_pusd=cap,
            bid_id=bid.bid_id if bid else None,
            predecessor_id=predecessor_id,
            version=1,
        )
        node = msgspec.structs.replace(
            node,
            reserved_ram_gb=node.reserved_ram_gb + ram,
            reserved_vram_gb=node.reserved_vram_gb + vram,
        )
        self.nodes[node.node_id] = node
        self.contracts[c.contract_id] = c
        fill: dict[str, object] = {}
        if bid is not None:
            bid = msgspec.structs.replace(
                bid,
                filled_ram_gb=bid.filled_ram_gb + ram,
                filled_vram_gb=bid.filled_vram_gb + vram,
                contract_ids=[*bid.contract_ids, c.contract_id],
            )
            done = bid.remaining_ram_gb == 0 and bid.remaining_vram_gb == 0
            done = done or not bid.allow_split
            status = "filled" if done else "open"
            if done:
                self.bids.pop(bid.bid_id, None)
            else:
                self.bids[bid.bid_id] = bid
            fill = {
                "bid_id": bid.bid_id,
                "bid_filled_ram_gb": bid.filled_ram_gb,
                "bid_filled_vram_gb": bid.filled_vram_gb,
                "bid_status": status,
            }
        self.emit(
            ContractCreated,
            node.region,
            contract=c,
            node_reserved_ram_gb=node.reserved_ram_gb,
            node_reserved_vram_gb=node.reserved_vram_gb,
            **fill,
        )
        return c

    def extend(self) -> None:
        if not self.contracts:
            return self.reserve()
        c = self.contracts[self.rng.choice(sorted(self.contracts))]
        extra = self.rng.choice([60, 600])
        c = msgspec.structs.replace(
            c,
            duration_s=c.duration_s + extra,
            end_ms=c.end_ms + extra * 1000,
            version=c.version + 1,
        )
        self.contracts[c.contract_id] = c
        self.emit(
            ContractExtended,
            c.region,
            contract_id=c.contract_id,
            duration_s=c.duration_s,
            end_ms=c.end_ms,
            version=c.version,
        )

    def _end(self, c: Contract, status: str, successor_id: str | None = None) -> None:
        self.contracts.pop(c.contract_id, None)
        used = min(c.duration_s, max(0, -(-(self.now - c.start_ms) // 1000)))
        egress_mgb = self.rng.choice([0, 0, 1500, 2400]) if status == "completed" else 0
        cost = (
            c.ram_gb + c.vram_gb
        ) * used * c.price_pusd + egress_mgb * c.egress_price_pusd // 1000
        node = self.nodes[c.node_id]
        node = msgspec.structs.replace(
            node,
            reserved_ram_gb=node.reserved_ram_gb - c.ram_gb,
            reserved_vram_gb=node.reserved_vram_gb - c.vram_gb,
        )
        self.nodes[node.node_id] = node
        self.emit(
            ContractSettled,
            c.region,
            contract_id=c.contract_id,
            node_id=c.node_id,
            client_id=c.client_id,
            ram_gb=c.ram_gb,
            vram_gb=c.vram_gb,
            status=status,
            used_s=used,
            egress_mgb=egress_mgb,
            cost_pusd=cost,
            settlement_hash=f"{self.rng.getrandbits(256):064x}",
            completed_ms=self.now,
            successor_id=successor_id,
            node_reserved_ram_gb=node.reserved_ram_gb,
            node_reserved_vram_gb=node.reserved_vram_gb,
        )

    def settle(self) -> None:
        if not self.contracts:
            return self.reserve()
        c = self.contracts[self.rng.choice(sorted(self.contracts))]
        self._end(c, self.rng.choice(["completed", "completed", "failed"]))

    def failover(self) -> None:
        if not self.contracts:
            return self.reserve()
        c = self.contracts[self.rng.choice(sorted(self.contracts))]
        targets = [
            n
            for n in self._live(c.region, active=True)
            if n.node_id != c.node_id
            and n.available_ram_gb >= c.ram_gb
            and n.available_vram_gb >= c.vram_gb
        ]
        if not targets:
            return self._end(c, "failed")
        target = self.rng.choice(targets)
        remaining_s = max(1, (c.end_ms - self.now) // 1000)
        successor_id = _id(self.rng)
        # The script settles the old contract and creates the new one in one call; the log has
        # the settle first, naming the successor.
        self._end(c, "failed_over", successor_id)
        self._create(
            target,
            c.client_id,
            c.user_id,
            c.ram_gb,
            c.vram_gb,
            remaining_s,
            c.max_price_pusd,
            None,
            predecessor_id=c.contract_id,
            contract_id=successor_id,
        )


async def seed_accounts(conn: asyncpg.Connection, h: History) -> None:
    """Create the users and clients the history's events point at."""
    users = [(p, "provider") for p in h.providers] + [(u, "user") for u, _ in h.renters]
    await conn.executemany(
        "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'x', $3) "
        "ON CONFLICT DO NOTHING",
        [(uid, f"{uid}@example.test", role) for uid, role in users],
    )
    await conn.executemany(
        "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'org') ON CONFLICT DO NOTHING",
        [(cid, uid) for uid, cid in h.renters],
    )


async def xadd_all(redis: object, keys: Keys, encoded: Iterable[tuple[str, bytes]]) -> None:
    """Append events to their regions' streams (and the `regions` set), like the scripts do."""
    batch = list(encoded)
    regions = sorted({r for r, _ in batch})
    if regions:
        await redis.sadd(keys.regions, *regions)  # type: ignore[attr-defined]
    for i in range(0, len(batch), 1000):
        async with redis.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
            for region, payload in batch[i : i + 1000]:
                pipe.xadd(keys.events(region), {"e": payload})
            await pipe.execute()
