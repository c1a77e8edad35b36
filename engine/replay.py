"""Rebuilding a region's live state from its event log, and a canonical snapshot to compare.

Every change to the live market is one script that appends the event describing it, so the
stream is a complete change log: folding a region's events in order (`RegionImage.apply`) gives
exactly the keys the scripts left — node and bid hashes, contracts (JSON), the asks/expiry/heartbeat/
bid/end/fill indexes, per-node and per-client contract sets, the GEO set, the `seq` and
`arrival` counters, the directory entries of ids that carry no region tag (`engine.keys`) and
the region's place in the `regions` set, each node's uptime accounting (a heartbeat's is
computed here as the heartbeat script computes it, `engine.trust`; windows closed, sweeps and
maintenance come as TrustUpdated events), and the money (issue 14): wallets (each money event
carries the wallet after it), holds on contracts and bids, the open counts (derived from the
open contracts and bids), the transfers sent and received, outbox entries and credit keys.
The funding slot (`engine.keys.FUNDING`) replays like a region. `replay()` writes that image
into Redis; `settle_transfers` first drops from the outboxes the transfers their destination
received (the sender's last step writes no event).

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

from engine import core, trust
from engine import log as event_log
from engine.keys import Keys, id_tag
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
    LeaseChanged,
    Node,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
    StakeChanged,
    TransferReceived,
    TransferSent,
    TrustEntry,
    TrustUpdated,
    WalletCredited,
    WalletDebited,
    WalletState,
)

__all__ = [
    "TRANSFERS_KEPT_MS",
    "RegionImage",
    "outbox_entry",
    "region_snapshot",
    "replay",
    "settle_transfers",
    "snapshot_digest",
]

_replace = msgspec.structs.replace


HOT_NODE_FIELDS = (
    "owner_id",
    "status",
    "last_heartbeat_ms",
    "total_ram_gb",
    "total_vram_gb",
    "reserved_ram_gb",
    "reserved_vram_gb",
    "offered_ram_gb",
    "offered_vram_gb",
    "ask_expires_ms",
    "heartbeat_interval_s",
    "suspended_ms",
)
"""The fields the heartbeat script reads from a node on every beat, in its order: first in a
node's hash (`hset` in engine/lua/_lib.lua does the same; a listpack is searched from its head)."""


def _mapping(obj: Node | Bid) -> dict[Any, Any]:
    fields = core.to_fields(obj)
    if not isinstance(obj, Node):
        return dict(fields)
    out = {k: fields[k] for k in HOT_NODE_FIELDS if k in fields}
    out.update(fields)  # the rest after them (an update keeps the keys' first positions)
    return out


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
        self.lease_pending: dict[str, int] = {}
        self.lease_closing: dict[str, int] = {}
        self.lease_meters: dict[str, str] = {}
        self.seq = 0
        self.arrival = 0
        # money (issue 14): wallets by client, outbox entries by transfer id, the transfers
        # zset ("out:<id>" / "in:<id>" -> ts), credit/debit keys -> event id
        self.wallets: dict[str, WalletState] = {}
        self.outbox: dict[str, str] = {}
        self.transfers: dict[str, int] = {}
        self.ops: dict[str, str] = {}
        self.closed: set[str] = set()
        """Ids of closed bids and contracts (their keys carry the retention TTL)."""
        self.uptime: dict[str, trust.Uptime] = {}
        self.trust_due: dict[str, int] = {}
        self.stake_ops: dict[str, str] = {}

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
                for index in (self.asks, self.ask_exp, self.geo, self.hb, self.trust_due):
                    index.pop(node_id, None)
            case NodeOffline(node_id=node_id):
                self.nodes[node_id] = _replace(self.nodes[node_id], status="offline")
                for index in (self.asks, self.ask_exp, self.hb):
                    index.pop(node_id, None)
                self.trust_due[node_id] = now
            case HeartbeatsApplied(entries=entries):
                for m in event.meters:
                    if (held := self.lease_meters.get(m.contract_id)) is not None:
                        node_id = held.partition(" ")[0]
                        base = m.egress_bytes - m.counter_bytes
                        self.lease_meters[m.contract_id] = (
                            f"{node_id} {base} {m.counter_bytes} {m.peak_memory_bytes}"
                        )
                for e in entries:
                    self._beat_uptime(e.node_id, now)
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
                self._wallet(event.wallet)
                self.bids[bid.bid_id] = bid
                self.arrival = max(self.arrival, bid.seq)
                self.book[core.bid_member(bid.seq, bid.bid_id)] = core.bid_score(bid.max_price_pusd)
                if bid.expires_ms > 0:
                    self.bid_exp[bid.bid_id] = bid.expires_ms
            case BidCancelled(bid_id=bid_id):
                self._wallet(event.wallet)
                hold = 0 if event.wallet is not None else self.bids[bid_id].hold_pusd
                self.bids[bid_id] = _replace(self.bids[bid_id], status="cancelled", hold_pusd=hold)
                self._unbook(self.bids[bid_id])
            case BidExpired(bid_id=bid_id):
                self._wallet(event.wallet)
                hold = 0 if event.wallet is not None else self.bids[bid_id].hold_pusd
                self.bids[bid_id] = _replace(self.bids[bid_id], status="expired", hold_pusd=hold)
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
                if event.wallet is not None:
                    self.contracts[c.contract_id] = _replace(
                        self.contracts[c.contract_id],
                        hold_pusd=c.hold_pusd + event.hold_pusd,
                        hold_month=event.hold_month,
                    )
                self._wallet(event.wallet)
                self.ends[c.contract_id] = event.end_ms
                node = self.nodes[c.node_id]
                self.nodes[c.node_id] = _replace(
                    node, lease_value_pusd=node.lease_value_pusd + event.hold_pusd
                )
            case LeaseChanged():
                self._lease_changed(event)
            case ContractSettled():
                self._settled(event)
            case TrustUpdated():
                self._trust(event)
            case StakeChanged():
                self.nodes[event.node_id] = _replace(
                    self.nodes[event.node_id],
                    stake_pusd=event.node_stake_pusd,
                    stake_held_pusd=event.node_stake_held_pusd,
                )
                if event.key is not None:
                    self.stake_ops[event.key] = event.event_id
            case WalletCredited() | WalletDebited():
                self._wallet(event.wallet)
                self.ops[event.key] = event.event_id
            case TransferSent():
                self._wallet(event.wallet)
                self.outbox[event.transfer_id] = outbox_entry(event)
                self._transferred(f"out:{event.transfer_id}", now)
            case TransferReceived():
                self._wallet(event.wallet)
                self._transferred(f"in:{event.transfer_id}", now)
            case _:
                assert_never(event)

    def _wallet(self, state: WalletState | None) -> None:
        if state is not None:
            self.wallets[state.client_id] = state

    def _transferred(self, member: str, now_ms: int) -> None:
        self.transfers[member] = now_ms
        horizon = now_ms - TRANSFERS_KEPT_MS
        self.transfers = {m: ts for m, ts in self.transfers.items() if ts > horizon}

    def _lease_changed(self, event: LeaseChanged) -> None:
        cid = event.contract_id
        before = self.contracts[cid]
        u = self.uptime.get(before.node_id)
        if event.change == "ready" and before.lease_state == "ready" and u is not None:
            # lease_ready.lua: a ready lease whose server was restarted fails the node's hour
            self.uptime[before.node_id] = msgspec.structs.replace(
                u, fail_win=event.ts_ms // trust.WINDOW_MS
            )
        self.contracts[cid] = _replace(
            self.contracts[cid],
            lease_state=event.lease_state,
            version=event.version,
            ready_ms=event.ready_ms,
            lease_host=event.lease_host,
            lease_port=event.lease_port,
            lease_tls=event.lease_tls,
            closing_ms=event.closing_ms,
            reported_ms=event.reported_ms,
            egress_bytes=event.egress_bytes,
            peak_memory_bytes=event.peak_memory_bytes,
            claimed_egress_mgb=event.claimed_egress_mgb,
            lease_digest=event.lease_digest,
        )
        self.lease_pending.pop(cid, None)
        if event.change == "closing":
            self.lease_closing[cid] = event.closing_ms
            self.ends.pop(cid, None)
        elif event.change == "reported":
            self.lease_closing[cid] = 0
            self.ends.pop(cid, None)

    # -- trust: what the scripts' up_beat / up_save (engine/lua/_lib.lua) do

    def _accounting(self, node: Node) -> trust.Uptime:
        u = self.uptime.get(node.node_id)
        if u is not None:
            return u
        return trust.start(node.last_heartbeat_ms or node.created_ms)

    def _beat_uptime(self, node_id: str, now: int) -> None:
        """A beat's accounting (the script's fast check, else up_beat), before it is applied."""
        node = self.nodes[node_id]
        last = node.last_heartbeat_ms
        if trust.on_time(last, node.heartbeat_interval_s, now):
            return
        grace = trust.grace_ms(node.heartbeat_interval_s)
        adv = trust.advance(
            self._accounting(node),
            now,
            (last or node.created_ms) + grace,
            (node.maint_start_ms, node.maint_end_ms),
        )
        self._store_uptime(node_id, adv.uptime, adv.centi)
        if node.status == "offline":
            self.trust_due.pop(node_id, None)

    def _store_uptime(self, node_id: str, u: trust.Uptime, centi: int) -> None:
        self.uptime[node_id] = u
        self.nodes[node_id] = _replace(
            self.nodes[node_id],
            uptime_windows=u.windows,
            uptime_score=centi / 100,
            suspend_at_ms=u.suspend_at_ms,
            suspended_ms=u.suspended_ms,
        )

    def _trust(self, event: TrustUpdated) -> None:
        now = event.ts_ms
        for e in event.entries:
            if e.up_win is None:
                continue  # a heartbeat's: `_beat_uptime` computed it already
            node = self.nodes[e.node_id]
            ring = bytearray(self._accounting(node).ring.ljust(trust.PERIOD_WINDOWS, b"\0"))
            if e.reset:
                ring = bytearray(trust.PERIOD_WINDOWS)
            for w, value, _score in e.closed:
                ring[w % trust.PERIOD_WINDOWS] = value + 1 if value >= 0 else 0
            self._store_uptime(
                e.node_id, _entry_uptime(e, bytes(ring)), round(e.uptime_score * 100)
            )
            self.nodes[e.node_id] = _replace(
                self.nodes[e.node_id],
                maint_start_ms=e.maint_start_ms or 0,
                maint_end_ms=e.maint_end_ms or 0,
                maint_last_ms=e.maint_last_ms or 0,
            )
            if event.sweep:
                last = node.last_heartbeat_ms or node.created_ms
                if now - last > (trust.PERIOD_WINDOWS + 1) * trust.WINDOW_MS:
                    self.trust_due.pop(e.node_id, None)
                else:
                    self.trust_due[e.node_id] = (now // trust.WINDOW_MS + 1) * trust.WINDOW_MS
            self._sync_ask(e.node_id, now)
        for node_id in event.dropped:
            self.trust_due.pop(node_id, None)

    def _created(self, event: ContractCreated) -> None:
        c = event.contract
        self.contracts[c.contract_id] = c
        self._wallet(event.wallet)
        node = self.nodes[c.node_id]
        self.nodes[c.node_id] = _replace(
            node,
            reserved_ram_gb=event.node_reserved_ram_gb,
            reserved_vram_gb=event.node_reserved_vram_gb,
            lease_value_pusd=node.lease_value_pusd + c.hold_pusd,
        )
        self.node_contracts.setdefault(c.node_id, set()).add(c.contract_id)
        self.client_contracts.setdefault(c.client_id, set()).add(c.contract_id)
        self.ends[c.contract_id] = c.end_ms
        if c.lease_state == "pending":
            self.lease_pending[c.contract_id] = event.ts_ms
            self.lease_meters[c.contract_id] = f"{c.node_id} 0 0 0"
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
            if event.wallet is not None and self.bids[event.bid_id].hold_pusd:
                bid = _replace(bid, hold_pusd=event.bid_hold_pusd)
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
            hold_pusd=0 if event.wallet is not None else c.hold_pusd,
            lease_state=event.lease_state or c.lease_state,
        )
        node = self.nodes[c.node_id]
        u = self.uptime.get(c.node_id)
        if event.status != "completed" and c.lease_state == "pending" and u is not None:
            # stake_close (_lib.lua): a lease its node never made ready fails its hour
            self.uptime[c.node_id] = msgspec.structs.replace(
                u, fail_win=event.ts_ms // trust.WINDOW_MS
            )
        delivered, cut = node.delivered_contracts, node.cut_contracts
        if event.status == "completed":
            delivered += 1
        else:
            cut += 1
        self._wallet(event.wallet)
        for index in (self.lease_pending, self.lease_closing, self.lease_meters):
            index.pop(c.contract_id, None)
        self.nodes[c.node_id] = _replace(
            node,
            reserved_ram_gb=event.node_reserved_ram_gb,
            reserved_vram_gb=event.node_reserved_vram_gb,
            delivered_contracts=delivered,
            cut_contracts=cut,
            reputation_score=trust.reputation(delivered, cut),
            lease_value_pusd=max(0, node.lease_value_pusd - event.hold_pusd),
        )
        if event.node_stake_pusd is not None:
            self.nodes[c.node_id] = _replace(
                self.nodes[c.node_id],
                stake_pusd=event.node_stake_pusd,
                stake_held_pusd=event.node_stake_held_pusd or 0,
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
            (keys.lease_pending(r), self.lease_pending),
            (keys.lease_closing(r), self.lease_closing),
        ):
            if index:
                pipe.zadd(key, dict(index))
        if self.lease_meters:
            meters: dict[Any, Any] = dict(self.lease_meters)
            pipe.hset(keys.lease_meters(r), mapping=meters)
        if self.geo:
            places: list[Any] = []
            for node_id, (lng, lat) in self.geo.items():
                places += [lng, core.geo_lat(lat), node_id]
            pipe.geoadd(keys.geo(r), places)
        self._write_money(pipe, keys)
        if self.seq:
            pipe.set(keys.seq(r), self.seq)
        if self.arrival:
            pipe.set(keys.arrival(r), self.arrival)
        if self.uptime:
            nodes = self.nodes
            pipe.hset(
                keys.uptime(r),
                mapping={
                    node_id: trust.pack(
                        u, (nodes[node_id].maint_start_ms, nodes[node_id].maint_end_ms)
                    )
                    for node_id, u in self.uptime.items()
                },
            )
        if self.trust_due:
            pipe.zadd(keys.trust_due(r), dict(self.trust_due))
        if self.stake_ops:
            ops: dict[Any, Any] = dict(self.stake_ops)
            pipe.hset(keys.stake_ops(r), mapping=ops)
        legacy = [i for i in ids if id_tag(i) is None]  # ids that carry their region need none
        if legacy:
            pipe.hset(keys.directory, mapping=dict.fromkeys(legacy, r))
        if self.nodes or self.bids:
            pipe.sadd(keys.regions, r)
        await pipe.execute()

    def _write_money(self, pipe: Any, keys: Keys) -> None:
        r = self.region
        wallets: dict[str, str] = {}
        for c, w in self.wallets.items():
            wallets[c] = str(w.avail_pusd)
            wallets[f"{c}:h"] = str(w.held_pusd)
            wallets[f"{c}:a"] = str(w.allow_pusd)
            wallets[f"{c}:m"] = w.month
        if wallets:
            pipe.hset(keys.wallets(r), mapping=wallets)
        counts: dict[str, int] = {}
        for contract in self.contracts.values():
            if contract.status == "active":  # a closing lease is open until it settles
                counts[f"{contract.user_id}:c"] = counts.get(f"{contract.user_id}:c", 0) + 1
        for member in self.book:
            user = self.bids[core.parse_bid_member(member)[1]].user_id
            counts[f"{user}:b"] = counts.get(f"{user}:b", 0) + 1
        if counts:
            pipe.hset(keys.open_counts(r), mapping=counts)
        if self.outbox:
            pipe.hset(keys.outbox(r), mapping=self.outbox)
        if self.transfers:
            pipe.zadd(keys.transfers(r), dict(self.transfers))
        if self.ops:
            pipe.hset(keys.ops(r), mapping=self.ops)


TRANSFERS_KEPT_MS = 30 * 86_400_000
"""How long a slot remembers the transfers it sent and received (transfer_*.lua)."""


def outbox_entry(event: TransferSent) -> str:
    """An outbox entry's text, as transfer_out.lua writes it."""
    return (
        f'{{"client_id":"{event.client_id}","to_slot":"{event.to_slot}",'
        f'"amount_pusd":"{event.amount_pusd}","allow_pusd":"{event.allow_pusd}",'
        f'"month":"{event.month}","ts_ms":{event.ts_ms}}}'
    )


def settle_transfers(images: Mapping[str, RegionImage]) -> None:
    """Drop from the images' outboxes the transfers their destination has received (the
    sender's step 3 leaves no event: a crash between steps 2 and 3 leaves an entry that the
    repair loop would clear anyway)."""
    for image in images.values():
        for transfer_id, entry in list(image.outbox.items()):
            to = msgspec.json.decode(entry)["to_slot"]
            dest = images.get(to)
            if dest is not None and f"in:{transfer_id}" in dest.transfers:
                del image.outbox[transfer_id]


def _entry_uptime(e: TrustEntry, ring: bytes) -> trust.Uptime:
    assert e.up_win is not None
    return trust.Uptime(
        win=e.up_win,
        down_ms=e.down_ms,
        exc_ms=e.exc_ms,
        at_ms=e.at_ms,
        from_ms=e.from_ms,
        fail_win=e.fail_win,
        total=e.total,
        windows=e.uptime_windows,
        ring=ring,
        suspend_at_ms=e.suspend_at_ms,
        suspended_ms=e.suspended_ms,
    )


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
    settle_transfers(images)
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
