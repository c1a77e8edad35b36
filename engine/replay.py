"""Rebuilding a region's live state from its event log, and a canonical snapshot to compare.

Every change to the live market is one script that appends the event describing it, so the
stream is a complete change log: folding a region's events in order (`RegionImage.apply`) gives
exactly the keys the scripts left — node and bid hashes, contracts (JSON), the asks/expiry/heartbeat/
bid/end/fill indexes, per-node and per-client contract sets, the GEO set, the `seq` and
`arrival` counters and the directory entries. `replay()` writes that image into Redis.

- The image follows the scripts' rules (`engine.core`): an ask is (de)listed by the rule as of
  each event touching its node, with the event's `ts_ms` as "now"; heartbeat deadlines use
  `missed_heartbeats_offline` (pass the setting the scripts ran with).
- The log must be complete from the region's first event (the journal trims the stream only
  after persisting it; from Postgres, replay the `events` table in `seq` order).
- Closed bids and contracts get the retention TTL again, counted from the replay.
- Replaying into a key space that already holds the region merges into it (no deletes): replay
  into an empty one.

`region_snapshot()` reads a region's keys into plain data (the event stream left out), and
`snapshot_digest()` hashes it canonically: equal digests, equal live state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, assert_never

import msgspec
import redis.asyncio as aioredis

from engine import core
from engine import log as event_log
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
    HeartbeatsApplied,
    Node,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
)

__all__ = ["RegionImage", "region_snapshot", "replay", "snapshot_digest"]

_replace = msgspec.structs.replace


def _mapping(obj: Node | Bid) -> dict[Any, Any]:
    return dict(core.to_fields(obj))


_encode = msgspec.json.Encoder().encode
_decode_contract = msgspec.json.Decoder(Contract, strict=False).decode


def _contract_json(contract: Contract) -> bytes:
    """A contract as the scripts store it (`contract:<id>`): its fields as decimal strings, as in
    a hash, but `end_ms`, a number."""
    fields: dict[str, Any] = core.to_fields(contract)
    fields["end_ms"] = contract.end_ms
    return _encode(fields)


class RegionImage:
    """The live state of one region, folded from its events in stream order."""

    def __init__(self, region: str, *, missed_heartbeats_offline: int = 3) -> None:
        self.region = region
        self.missed = missed_heartbeats_offline
        self.nodes: dict[str, Node] = {}
        self.bids: dict[str, Bid] = {}
        self.contracts: dict[str, Contract] = {}
        self.asks: dict[str, int] = {}
        self.ask_exp: dict[str, int] = {}
        self.hb: dict[str, int] = {}
        self.geo: dict[str, tuple[float, float]] = {}
        self.book: dict[str, int] = {}
        self.bid_exp: dict[str, int] = {}
        self.ends: dict[str, int] = {}
        self.node_contracts: dict[str, set[str]] = {}
        self.client_contracts: dict[str, set[str]] = {}
        self.fills: dict[str, int] = {}
        self.seq = 0
        self.arrival = 0
        self.closed: set[str] = set()
        """Ids of closed bids and contracts (their keys carry the retention TTL)."""

    def _sync_ask(self, node_id: str, now_ms: int) -> None:
        node = self.nodes[node_id]
        if core.ask_listed(node, now_ms):
            self.asks[node_id] = node.price_pusd
            if node.ask_expires_ms > 0:
                self.ask_exp[node_id] = node.ask_expires_ms
            else:
                self.ask_exp.pop(node_id, None)
        else:
            self.asks.pop(node_id, None)
            self.ask_exp.pop(node_id, None)

    def _deadline(self, node: Node, now_ms: int) -> int:
        return core.hb_deadline_ms(now_ms, node.heartbeat_interval_s, self.missed)

    def _unbook(self, bid: Bid) -> None:
        self.book.pop(core.bid_member(bid.seq, bid.bid_id), None)
        self.bid_exp.pop(bid.bid_id, None)
        self.closed.add(bid.bid_id)

    def apply(self, event: Event) -> None:
        """Fold one event (of this region, in stream order) into the image."""
        if event.region != self.region:
            raise ValueError(f"event {event.event_id} is not of region {self.region}")
        self.seq = event_log.seq_of(event.event_id)
        now = event.ts_ms
        match event:
            case NodeRegistered(node=node):
                self.nodes[node.node_id] = node
                self.arrival = max(self.arrival, node.arrival_seq)
                self.geo[node.node_id] = (node.lng, node.lat)
                self.hb[node.node_id] = self._deadline(node, now)
                self._sync_ask(node.node_id, now)
            case NodeUpdated(node=node):
                self.nodes[node.node_id] = node
                self.geo[node.node_id] = (node.lng, node.lat)
                self._sync_ask(node.node_id, now)
            case NodeDeactivated(node_id=node_id):
                self.nodes[node_id] = _replace(self.nodes[node_id], status="deactivated")
                for index in (self.asks, self.ask_exp, self.geo, self.hb):
                    index.pop(node_id, None)
            case NodeOffline(node_id=node_id):
                self.nodes[node_id] = _replace(self.nodes[node_id], status="offline")
                for index in (self.asks, self.ask_exp, self.hb):
                    index.pop(node_id, None)
            case HeartbeatsApplied(entries=entries):
                for e in entries:
                    node = _replace(
                        self.nodes[e.node_id],
                        offered_ram_gb=e.offered_ram_gb,
                        offered_vram_gb=e.offered_vram_gb,
                        last_heartbeat_ms=now,
                        status=e.status,
                    )
                    if e.bandwidth_mbps is not None:
                        node = _replace(node, bandwidth_mbps=e.bandwidth_mbps)
                    if e.lat is not None and e.lng is not None:
                        node = _replace(node, lat=e.lat, lng=e.lng)
                        self.geo[e.node_id] = (e.lng, e.lat)
                    self.nodes[e.node_id] = node
                    self.hb[e.node_id] = self._deadline(node, now)
                    self._sync_ask(e.node_id, now)
            case BidPlaced(bid=bid):
                self.bids[bid.bid_id] = bid
                self.arrival = max(self.arrival, bid.seq)
                self.book[core.bid_member(bid.seq, bid.bid_id)] = core.bid_score(bid.max_price_pusd)
                if bid.expires_ms > 0:
                    self.bid_exp[bid.bid_id] = bid.expires_ms
            case BidCancelled(bid_id=bid_id):
                self.bids[bid_id] = _replace(self.bids[bid_id], status="cancelled")
                self._unbook(self.bids[bid_id])
            case BidExpired(bid_id=bid_id):
                self.bids[bid_id] = _replace(self.bids[bid_id], status="expired")
                self._unbook(self.bids[bid_id])
            case ContractCreated():
                self._created(event)
            case ContractExtended():
                c = self.contracts[event.contract_id]
                self.contracts[c.contract_id] = _replace(
                    c,
                    duration_s=event.duration_s,
                    end_ms=event.end_ms,
                    version=event.version,
                    extensions=c.extensions + 1,
                )
                self.ends[c.contract_id] = event.end_ms
            case ContractSettled():
                self._settled(event)
            case _:
                assert_never(event)

    def _created(self, event: ContractCreated) -> None:
        c = event.contract
        self.contracts[c.contract_id] = c
        self.nodes[c.node_id] = _replace(
            self.nodes[c.node_id],
            reserved_ram_gb=event.node_reserved_ram_gb,
            reserved_vram_gb=event.node_reserved_vram_gb,
        )
        self.node_contracts.setdefault(c.node_id, set()).add(c.contract_id)
        self.client_contracts.setdefault(c.client_id, set()).add(c.contract_id)
        self.ends[c.contract_id] = c.end_ms
        self._sync_ask(c.node_id, event.ts_ms)
        if c.predecessor_id is None:  # a trade (a failover successor is not one)
            gb_s = (c.ram_gb + c.vram_gb) * c.duration_s
            self.fills[f"{c.contract_id}:{c.price_pusd}:{gb_s}"] = event.ts_ms
            horizon = event.ts_ms - core.FILLS_WINDOW_MS
            self.fills = {m: ts for m, ts in self.fills.items() if ts > horizon}
        if event.bid_id is not None:
            bid = _replace(
                self.bids[event.bid_id],
                filled_ram_gb=event.bid_filled_ram_gb,
                filled_vram_gb=event.bid_filled_vram_gb,
                status=event.bid_status or "open",
                contract_ids=[*self.bids[event.bid_id].contract_ids, c.contract_id],
            )
            self.bids[bid.bid_id] = bid
            if bid.status == "filled":
                self._unbook(bid)

    def _settled(self, event: ContractSettled) -> None:
        c = self.contracts[event.contract_id]
        self.contracts[c.contract_id] = _replace(
            c,
            status=event.status,
            used_s=event.used_s,
            egress_mgb=event.egress_mgb,
            cost_pusd=event.cost_pusd,
            settlement_hash=event.settlement_hash,
            completed_ms=event.completed_ms,
            successor_id=event.successor_id,
            version=c.version + 1,
        )
        self.nodes[c.node_id] = _replace(
            self.nodes[c.node_id],
            reserved_ram_gb=event.node_reserved_ram_gb,
            reserved_vram_gb=event.node_reserved_vram_gb,
        )
        self.node_contracts.get(c.node_id, set()).discard(c.contract_id)
        self.client_contracts.get(c.client_id, set()).discard(c.contract_id)
        self.ends.pop(c.contract_id, None)
        self.closed.add(c.contract_id)
        self._sync_ask(c.node_id, event.ts_ms)

    async def write(self, redis: aioredis.Redis, keys: Keys, *, retention_ms: int) -> None:
        """Write the image into Redis (pipelined, not atomic: replay into an empty key space)."""
        r = self.region
        pipe = redis.pipeline(transaction=False)
        ids: list[str] = []
        for node_id, node in self.nodes.items():
            pipe.hset(keys.node(r, node_id), mapping=_mapping(node))
            ids.append(node_id)
        for bid_id, bid in self.bids.items():
            pipe.hset(keys.bid(r, bid_id), mapping=_mapping(bid))
            ids.append(bid_id)
            if bid_id in self.closed:
                pipe.pexpire(keys.bid(r, bid_id), retention_ms)
        for contract_id, contract in self.contracts.items():
            ttl = retention_ms if contract_id in self.closed else None
            pipe.set(keys.contract(r, contract_id), _contract_json(contract), px=ttl)
            ids.append(contract_id)
        for node_id, members in self.node_contracts.items():
            if members:
                pipe.sadd(keys.node_contracts(r, node_id), *members)
        for client_id, members in self.client_contracts.items():
            if members:
                pipe.sadd(keys.client_contracts(r, client_id), *members)
        for key, index in (
            (keys.asks(r), self.asks),
            (keys.ask_expiry(r), self.ask_exp),
            (keys.heartbeats(r), self.hb),
            (keys.bids(r), self.book),
            (keys.bid_expiry(r), self.bid_exp),
            (keys.ends(r), self.ends),
            (keys.fills(r), self.fills),
        ):
            if index:
                pipe.zadd(key, dict(index))
        if self.geo:
            places: list[Any] = []
            for node_id, (lng, lat) in self.geo.items():
                places += [lng, core.geo_lat(lat), node_id]
            pipe.geoadd(keys.geo(r), places)
        if self.seq:
            pipe.set(keys.seq(r), self.seq)
        if self.arrival:
            pipe.set(keys.arrival(r), self.arrival)
        if ids:
            pipe.hset(keys.directory, mapping=dict.fromkeys(ids, r))
        if self.nodes or self.bids:
            pipe.sadd(keys.regions, r)
        await pipe.execute()


async def replay(
    redis: aioredis.Redis,
    keys: Keys,
    events: Iterable[Event],
    *,
    missed_heartbeats_offline: int = 3,
    retention_ms: int = 86_400_000,
) -> dict[str, RegionImage]:
    """Fold the events (any regions, each region's in stream order) and write each region's
    image into Redis under `keys`. Returns the images."""
    images: dict[str, RegionImage] = {}
    for event in events:
        image = images.get(event.region)
        if image is None:
            image = images[event.region] = RegionImage(
                event.region, missed_heartbeats_offline=missed_heartbeats_offline
            )
        image.apply(event)
    for image in images.values():
        await image.write(redis, keys, retention_ms=retention_ms)
    return images


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@cache
def _snapshot_source() -> str:
    return (Path(__file__).with_name("lua") / "snapshot.lua").read_text()


async def region_snapshot(
    redis: aioredis.Redis,
    keys: Keys,
    region: str,
    *,
    suffixes: Iterable[str] | None = None,
    geo_scores: bool = True,
) -> dict[str, Any]:
    """Every key of the region (but its event stream) as plain data, keyed by the part after
    the region's tag, plus the region's `dir` entries and whether it is in `regions`.

    Hashes are dicts, sets sorted lists, sorted sets `[member, score]` lists in their order,
    strings strings, but contracts (stored as JSON) the dict of their fields as text
    (`engine.core.to_fields`); missing or empty keys are left out. `suffixes` names the keys to read
    (else the region's keys are found by SCAN, which walks the whole key space); they are read
    in one server-side call. `geo_scores=False` lists the GEO set's members only.
    """
    tag = keys.tag(region)
    if suffixes is None:
        found = [_text(k) async for k in redis.scan_iter(match=f"{tag}*", count=1000)]
        names = sorted(k[len(tag) :] for k in found)
    else:
        names = sorted(set(suffixes))
    # every key but the event stream: the suffixes of its keys' names, as Keys builds them
    events, geo = keys.events(region)[len(tag) :], keys.geo(region)[len(tag) :]
    contract = keys.contract(region, "")[len(tag) :]
    names = [n for n in names if n != events]
    pipe = redis.pipeline(transaction=False)
    pipe.eval(_snapshot_source(), len(names), *(tag + name for name in names))
    pipe.hgetall(keys.directory)
    pipe.sismember(keys.regions, region)
    contents, directory, member = await pipe.execute()
    out: dict[str, Any] = {}
    for name, (kind, data) in zip(names, contents, strict=True):
        kind, data = _text(kind), [_text(d) for d in data]
        if kind == "hash":
            out[name] = dict(sorted(zip(data[::2], data[1::2], strict=True)))
        elif kind == "set":
            out[name] = sorted(data)
        elif kind == "zset":
            pairs = [[m, float(s)] for m, s in zip(data[::2], data[1::2], strict=True)]
            out[name] = sorted(m for m, _ in pairs) if name == geo and not geo_scores else pairs
        elif kind == "string" and name.startswith(contract):
            # stored as JSON: compared as the fields of its hash form (the text may differ)
            out[name] = dict(sorted(core.to_fields(_decode_contract(data[0])).items()))
        elif kind == "string":
            out[name] = data[0]
        elif kind != "none":
            out[name] = {"unexpected type": kind}
    out["@dir"] = {_text(k): region for k, v in sorted(directory.items()) if _text(v) == region}
    out["@regions"] = bool(member)
    return out


def snapshot_digest(snapshot: Mapping[str, Any]) -> str:
    """SHA-256 hex of the snapshot's canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(snapshot, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
