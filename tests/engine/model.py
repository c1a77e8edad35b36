"""A plain Python model of the live market, to check the Lua scripts against.

It keeps the primary objects (nodes, bids, contracts, the directory, counters) in dicts and
applies each operation the way `engine.market.Market` documents it, using the pure rules of
`engine.core`. Unlike the scripts, it does not maintain the indexes incrementally: `snapshot()`
derives them from the objects (asks from each node's listing as of its last change, heartbeat
deadlines, the bid book, ends, per-node and per-client contract sets...), in the same shape as
`engine.replay.region_snapshot(..., geo_scores=False)`, so a test can compare the two whole.
Contract ids are chosen by the adapter, so operations that create contracts take them as
arguments (the test passes the ids the adapter returned).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import msgspec

from engine import core, trust
from engine.errors import (
    BudgetExceeded,
    Conflict,
    InsufficientFunds,
    InvalidRequest,
    NotFound,
    OutsideTerms,
    Unavailable,
)
from engine.keys import FUNDING, id_tag
from engine.market import HEARTBEAT_BATCH, CreditResult, HeartbeatOutcome
from engine.replay import TRANSFERS_KEPT_MS
from engine.types import Bid, Contract, Heartbeat, Node, NodeChanges, WalletState

_replace = msgspec.structs.replace


class ModelMarket:
    """The market as plain data. Methods mirror `Market`'s (synchronous, same refusals)."""

    def __init__(
        self,
        *,
        missed_heartbeats_offline: int = 3,
        max_open_contracts: int = 0,
        max_open_bids: int = 0,
        fee_bps: int = 1000,
    ) -> None:
        self.missed = missed_heartbeats_offline
        self.fee_bps = fee_bps
        self.nodes: dict[str, Node] = {}
        self.bids: dict[str, Bid] = {}
        self.contracts: dict[str, Contract] = {}
        self.directory: dict[str, str] = {}
        self.regions: set[str] = set()
        self.seq: dict[str, int] = defaultdict(int)
        self.arrival: dict[str, int] = defaultdict(int)
        self._closing = False
        self.listed: dict[str, bool] = {}
        """Each node's listing, by the rule, as of the last change to the node."""
        self.deadline: dict[str, int] = {}
        self.fills: dict[str, dict[str, int]] = defaultdict(dict)
        self.uptime: dict[str, trust.Uptime] = {}
        """Each node's uptime accounting (engine.trust), once its first beat began it."""
        self.trust_due: dict[str, int] = {}
        # money (issue 14): (slot, client) -> [available, held, allowance, month]; the funding
        # slot's credit keys; each slot's transfers ("out:<id>"/"in:<id>" -> ms) and outbox
        self.wallets: dict[tuple[str, str], list[Any]] = {}
        self.ops: dict[str, str] = {}
        self.transfers: dict[str, dict[str, int]] = defaultdict(dict)
        self.outbox: dict[str, dict[str, str]] = defaultdict(dict)
        self.max_open_contracts = max_open_contracts
        self.max_open_bids = max_open_bids

    # -- helpers --------------------------------------------------------------------------

    def _touch(self, node_id: str, now_ms: int) -> None:
        self.listed[node_id] = core.ask_listed(self.nodes[node_id], now_ms)

    def _node(self, node_id: str) -> Node:
        node = self.nodes.get(node_id) if node_id in self.directory else None
        if node is None:
            raise NotFound(core.NODE_NOT_FOUND, field="node_id")
        return node

    def _contract(self, contract_id: str) -> Contract:
        contract = self.contracts.get(contract_id) if contract_id in self.directory else None
        if contract is None:
            raise NotFound(core.CONTRACT_NOT_FOUND, field="contract_id")
        return contract

    def _active(self, contract_id: str) -> Contract:
        contract = self._contract(contract_id)
        if contract.status != "active":
            raise Conflict(f"contract is {contract.status}", field="contract_id")
        return contract

    def _event(self, region: str, count: int = 1) -> None:
        self.seq[region] += count

    def _open(self, contract: Contract, now_ms: int, *, trade: bool) -> None:
        node = self.nodes[contract.node_id]
        self.nodes[node.node_id] = _replace(
            node,
            reserved_ram_gb=node.reserved_ram_gb + contract.ram_gb,
            reserved_vram_gb=node.reserved_vram_gb + contract.vram_gb,
            lease_value_pusd=node.lease_value_pusd + contract.hold_pusd,
        )
        self.contracts[contract.contract_id] = contract
        self.directory[contract.contract_id] = contract.region
        self._touch(node.node_id, now_ms)
        if trade:
            fills = self.fills[contract.region]
            gb_s = (contract.ram_gb + contract.vram_gb) * contract.duration_s
            fills[f"{contract.contract_id}:{contract.price_pusd}:{gb_s}"] = now_ms
            horizon = now_ms - core.FILLS_WINDOW_MS
            self.fills[contract.region] = {m: t for m, t in fills.items() if t > horizon}

    def _close(self, closed: Contract, now_ms: int, hold: int) -> None:
        node = self.nodes[closed.node_id]
        delivered = node.delivered_contracts + (closed.status == "completed")
        cut = node.cut_contracts + (closed.status != "completed")
        done = trust.stake_close(
            lease_value_pusd=node.lease_value_pusd,
            stake_pusd=node.stake_pusd,
            stake_held_pusd=node.stake_held_pusd,
            hold_pusd=hold,
            status=closed.status,
            used_s=closed.used_s,
            duration_s=closed.duration_s,
            cost_pusd=closed.cost_pusd,
            fee_pusd=core.platform_fee_pusd(closed.cost_pusd, self.fee_bps),
            in_maintenance=node.maint_start_ms <= now_ms < node.maint_end_ms,
        )
        if done.credit_pusd:
            w = self._wallet(closed.region, closed.client_id, now_ms)
            w[0] += done.credit_pusd
            self.wallets[(closed.region, closed.client_id)] = w
        self.nodes[node.node_id] = _replace(
            node,
            reserved_ram_gb=node.reserved_ram_gb - closed.ram_gb,
            reserved_vram_gb=node.reserved_vram_gb - closed.vram_gb,
            delivered_contracts=delivered,
            cut_contracts=cut,
            reputation_score=trust.reputation(delivered, cut),
            lease_value_pusd=done.lease_value_pusd,
            stake_pusd=done.stake_pusd,
            stake_held_pusd=done.stake_held_pusd,
        )
        self.contracts[closed.contract_id] = closed
        self._touch(node.node_id, now_ms)

    # -- money (the scripts' `wallet`, `hold`, `release`, `settle_money`) ----------------------

    def _wallet(self, slot: str, client: str, now_ms: int) -> list[Any]:
        w = list(self.wallets.get((slot, client), [0, 0, 0, ""]))
        month = core.month_of(now_ms)
        if w[3] != month:
            w[2], w[3] = 0, month
        return w

    @staticmethod
    def _hold(w: list[Any], amount: int) -> None:
        w[0] -= amount
        w[1] += amount
        w[2] -= amount

    @staticmethod
    def _release(w: list[Any], amount: int, month: str) -> None:
        w[0] += amount
        w[1] -= amount
        if month == w[3]:
            w[2] += amount

    def _open_count(self, region: str, user_id: str, kind: str) -> int:
        if kind == "c":
            return sum(
                1
                for c in self.contracts.values()
                if c.region == region and c.user_id == user_id and c.status == "active"
            )
        return sum(
            1
            for b in self.bids.values()
            if b.region == region and b.user_id == user_id and b.status == "open"
        )

    def _settle_money(self, contract: Contract, cost: int, now_ms: int, *, moving: bool) -> int:
        w = self._wallet(contract.region, contract.client_id, now_ms)
        h = contract.hold_pusd
        used = min(cost, h)
        left, charged = h - used, cost - used
        released, moved = (0, left) if moving else (left, 0)
        w[1] -= used
        self._release(w, released, contract.hold_month)
        w[0] -= charged
        w[2] -= charged
        self.wallets[(contract.region, contract.client_id)] = w
        return moved

    def _transferred(self, slot: str, member: str, now_ms: int) -> None:
        self.transfers[slot][member] = now_ms
        horizon = now_ms - TRANSFERS_KEPT_MS
        self.transfers[slot] = {m: t for m, t in self.transfers[slot].items() if t > horizon}

    def credit(
        self,
        client: str,
        amount: int,
        *,
        key: str,
        now_ms: int,
        debit: bool = False,
        allow_negative: bool = False,
    ) -> CreditResult:
        w = self._wallet(FUNDING, client, now_ms)
        if key in self.ops:
            return CreditResult(applied=False, balance_pusd=w[0], event_id=self.ops[key])
        if debit and not allow_negative and w[0] < amount:
            spendable = max(w[0], 0)
            raise InsufficientFunds(
                f"the funding balance holds {spendable} pico-USD, less than the {amount} to debit",
                field="amount",
                shortfall_pusd=amount - spendable,
            )
        w[0] += -amount if debit else amount
        self.wallets[(FUNDING, client)] = w
        self._event(FUNDING)
        self.ops[key] = f"{FUNDING}:{self.seq[FUNDING]}"
        return CreditResult(applied=True, balance_pusd=w[0], event_id=self.ops[key])

    def transfer(
        self,
        client: str,
        *,
        transfer_id: str,
        from_slot: str,
        to_slot: str,
        amount_pusd: int,
        allow_pusd: int,
        now_ms: int,
        credit_line_pusd: int = 0,
        budget_pusd: int | None = None,
    ) -> str | None:
        """All three steps (`Market.transfer`), with the id the adapter chose."""
        if amount_pusd == 0 and allow_pusd == 0:
            return None
        w = self._wallet(from_slot, client, now_ms)
        funding = from_slot == FUNDING
        floor = -credit_line_pusd if funding else 0
        if w[0] - amount_pusd < floor:
            short = floor - (w[0] - amount_pusd)
            raise InsufficientFunds(
                f"the balance cannot cover {amount_pusd} pico-USD (short by {short})",
                field="amount",
                shortfall_pusd=short,
            )
        allow = allow_pusd
        if funding:
            if budget_pusd is not None and w[2] + allow - budget_pusd > 0:
                over = w[2] + allow - budget_pusd
                raise BudgetExceeded(
                    f"this would take the month's spend past the monthly budget (over by {over})",
                    field="amount",
                    shortfall_pusd=over,
                )
            w[2] += allow
        else:
            if w[2] < allow:
                allow = max(w[2], 0)
            w[2] -= allow
        w[0] -= amount_pusd
        self.wallets[(from_slot, client)] = w
        self._transferred(from_slot, f"out:{transfer_id}", now_ms)
        self._event(from_slot)
        month = w[3]
        d = self._wallet(to_slot, client, now_ms)
        if month != d[3]:
            allow = 0
        d[2] += -allow if to_slot == FUNDING else allow
        d[0] += amount_pusd
        self.wallets[(to_slot, client)] = d
        self._transferred(to_slot, f"in:{transfer_id}", now_ms)
        self._event(to_slot)
        return transfer_id

    def wallet(self, slot: str, client: str, now_ms: int) -> WalletState:
        w = self._wallet(slot, client, now_ms)
        return WalletState(
            client_id=client, avail_pusd=w[0], held_pusd=w[1], allow_pusd=w[2], month=w[3]
        )

    # -- nodes ----------------------------------------------------------------------------

    def register_node(self, node: Node, now_ms: int) -> Node:
        stored = core.new_node(node, now_ms)
        region = stored.region
        # an id names one node (the script), in one region (the directory's claim)
        if stored.node_id in self.nodes or self.directory.get(stored.node_id, region) != region:
            raise Conflict(core.ID_IN_USE, field="node_id")
        self.arrival[region] += 1
        stored = _replace(stored, arrival_seq=self.arrival[region])
        self.nodes[stored.node_id] = stored
        self.directory[stored.node_id] = region
        self.regions.add(region)
        self.deadline[stored.node_id] = core.hb_deadline_ms(
            now_ms, stored.heartbeat_interval_s, self.missed
        )
        self._touch(stored.node_id, now_ms)
        self._event(region)
        return stored

    def update_node(self, node_id: str, changes: NodeChanges, now_ms: int) -> Node:
        changes = core.validate_changes(changes)
        node = self._node(node_id)
        if node.status == "deactivated":
            raise Conflict("node is deactivated", field="node_id")
        if changes.status is not None and node.status == "offline":
            raise Conflict("node is offline", field="status")
        given = {
            name: getattr(changes, name)
            for name in changes.__struct_fields__
            if getattr(changes, name) is not None
        }
        updated = _replace(node, **given)
        if updated.min_duration_s > updated.max_duration_s:
            raise InvalidRequest(core.MIN_OVER_MAX, field="min_duration_s")
        self.nodes[node_id] = updated
        self._touch(node_id, now_ms)
        self._event(node.region)
        return updated

    def deactivate_node(self, node_id: str, now_ms: int) -> Node:
        node = self._node(node_id)
        if node.status == "deactivated":
            raise Conflict("node is deactivated", field="node_id")
        node = self.nodes[node_id] = _replace(node, status="deactivated")
        self.trust_due.pop(node_id, None)
        self._touch(node_id, now_ms)
        self._event(node.region)
        return node

    def heartbeat(
        self, owner_id: str, beats: list[Heartbeat], now_ms: int, min_interval_ms: int
    ) -> list[HeartbeatOutcome]:
        beats = [core.validate_heartbeat(b) for b in beats]
        outcomes: list[HeartbeatOutcome | None] = [None] * len(beats)
        groups: dict[str, list[int]] = {}
        for i, beat in enumerate(beats):
            region = self.directory.get(beat.node_id)
            if region is None:
                outcomes[i] = HeartbeatOutcome(beat.node_id, "not_found")
            else:
                groups.setdefault(region, []).append(i)
        for region, idx in groups.items():
            for start in range(0, len(idx), HEARTBEAT_BATCH):
                accepted = 0
                self._closing = False
                for i in idx[start : start + HEARTBEAT_BATCH]:
                    outcomes[i] = self._beat(owner_id, beats[i], now_ms, min_interval_ms)
                    accepted += outcomes[i].outcome == "ok"  # type: ignore[union-attr]
                if accepted:
                    self._event(region, 2 if self._closing else 1)
        return outcomes  # type: ignore[return-value]

    def _beat(
        self, owner_id: str, beat: Heartbeat, now_ms: int, min_interval_ms: int
    ) -> HeartbeatOutcome:
        node = self.nodes.get(beat.node_id)
        if node is None:
            return HeartbeatOutcome(beat.node_id, "not_found")
        if node.owner_id != owner_id:
            return HeartbeatOutcome(beat.node_id, "forbidden")
        if node.status == "deactivated":
            return HeartbeatOutcome(beat.node_id, "deactivated")
        last = node.last_heartbeat_ms
        if last != 0 and now_ms - last < min_interval_ms:
            return HeartbeatOutcome(beat.node_id, "too_soon", last + min_interval_ms - now_ms)
        node = self._account(node, now_ms)
        node = _replace(
            node,
            offered_ram_gb=core.offered_after_heartbeat(
                node.total_ram_gb, beat.available_ram_gb, node.reserved_ram_gb
            ),
            offered_vram_gb=core.offered_after_heartbeat(
                node.total_vram_gb, beat.available_vram_gb, node.reserved_vram_gb
            ),
            last_heartbeat_ms=now_ms,
            status="active" if node.status == "offline" else node.status,
        )
        if beat.bandwidth_mbps is not None:
            node = _replace(node, bandwidth_mbps=beat.bandwidth_mbps)
        if beat.lat is not None and beat.lng is not None:
            node = _replace(node, lat=beat.lat, lng=beat.lng)
        self.nodes[node.node_id] = node
        self.deadline[node.node_id] = core.hb_deadline_ms(
            now_ms, node.heartbeat_interval_s, self.missed
        )
        self._touch(node.node_id, now_ms)
        return HeartbeatOutcome(beat.node_id, "ok")

    def _account(self, node: Node, now_ms: int) -> Node:
        """A beat's uptime accounting (engine.trust), unless it is on time in its window."""
        last = node.last_heartbeat_ms
        if trust.on_time(last, node.heartbeat_interval_s, now_ms):
            return node
        u = self.uptime.get(node.node_id) or trust.start(last or node.created_ms)
        grace = trust.grace_ms(node.heartbeat_interval_s)
        maint = (node.maint_start_ms, node.maint_end_ms)
        adv = trust.advance(u, now_ms, (last or node.created_ms) + grace, maint)
        self.uptime[node.node_id] = adv.uptime
        self._closing = self._closing or bool(adv.closed)
        if node.status == "offline":
            self.trust_due.pop(node.node_id, None)
        return _replace(
            node,
            uptime_windows=adv.uptime.windows,
            uptime_score=adv.centi / 100,
            suspend_at_ms=adv.uptime.suspend_at_ms,
            suspended_ms=adv.uptime.suspended_ms,
        )

    def mark_offline(self, node_id: str, now_ms: int) -> list[Contract]:
        node = self._node(node_id)
        if node.status not in ("active", "maintenance"):
            raise Conflict(f"node is {node.status}", field="node_id")
        if self.deadline[node_id] > now_ms:
            raise Conflict(core.NOT_STALE, field="node_id")
        self.nodes[node_id] = _replace(node, status="offline")
        self.trust_due[node_id] = now_ms
        self._touch(node_id, now_ms)
        self._event(node.region)
        return sorted(
            (c for c in self.contracts.values() if c.node_id == node_id and c.status == "active"),
            key=lambda c: c.contract_id,
        )

    def expire_asks(self, region: str, now_ms: int, limit: int) -> list[Node]:
        due = sorted(
            (n.ask_expires_ms, n.node_id)
            for n in self.nodes.values()
            if n.region == region and self.listed.get(n.node_id) and 0 < n.ask_expires_ms <= now_ms
        )[:limit]
        for _, node_id in due:
            self.listed[node_id] = False
            self._event(region)
        return [self.nodes[node_id] for _, node_id in due]

    # -- bids -----------------------------------------------------------------------------

    def place_bid(self, bid: Bid, now_ms: int, *, budgeted: bool = False) -> Bid:
        stored = core.new_bid(bid, now_ms)
        hold = core.hold_pusd(
            stored.ram_gb + stored.vram_gb, stored.duration_s, stored.max_price_pusd
        )
        region = stored.region
        if stored.bid_id in self.bids or self.directory.get(stored.bid_id, region) != region:
            raise Conflict(core.ID_IN_USE, field="bid_id")
        # the market claims an id without a region tag, and lists the region, before the
        # script: both stay when the script refuses the bid (money, caps)
        self.directory.setdefault(stored.bid_id, region)
        self.regions.add(region)
        w = self._wallet(region, stored.client_id, now_ms)
        refusal = core.hold_refusal(
            hold, w[0], w[2], budgeted=budgeted, field="client_id"
        ) or core.open_refusal(
            self._open_count(region, stored.user_id, "b"), self.max_open_bids, "b", "client_id"
        )
        if refusal is not None:
            raise refusal
        self._hold(w, hold)
        self.wallets[(region, stored.client_id)] = w
        self.arrival[region] += 1
        stored = _replace(
            stored, seq=self.arrival[region], hold_pusd=hold, hold_month=core.month_of(now_ms)
        )
        self.bids[stored.bid_id] = stored
        self.directory[stored.bid_id] = region
        self.regions.add(region)
        self._event(region)
        return stored

    def _open_bid(self, bid_id: str) -> Bid:
        bid = self.bids.get(bid_id) if bid_id in self.directory else None
        if bid is None:
            raise NotFound(core.BID_NOT_FOUND, field="bid_id")
        if bid.status != "open":
            raise Conflict(f"bid is {bid.status}", field="bid_id")
        return bid

    def _release_bid(self, bid: Bid, now_ms: int) -> Bid:
        w = self._wallet(bid.region, bid.client_id, now_ms)
        self._release(w, bid.hold_pusd, bid.hold_month)
        self.wallets[(bid.region, bid.client_id)] = w
        return _replace(bid, hold_pusd=0)

    def cancel_bid(self, bid_id: str, now_ms: int) -> Bid:
        bid = _replace(self._open_bid(bid_id), status="cancelled")
        bid = self.bids[bid_id] = self._release_bid(bid, now_ms)
        self._event(bid.region)
        return bid

    def expire_bids(self, region: str, now_ms: int, limit: int) -> list[Bid]:
        due = sorted(
            (b.expires_ms, b.bid_id)
            for b in self.bids.values()
            if b.region == region and b.status == "open" and 0 < b.expires_ms <= now_ms
        )[:limit]
        out = []
        for _, bid_id in due:
            out.append(self._release_bid(_replace(self.bids[bid_id], status="expired"), now_ms))
            self.bids[bid_id] = out[-1]
            self._event(region)
        return out

    # -- contracts ------------------------------------------------------------------------

    def reserve(
        self,
        *,
        contract_id: str,
        node_id: str,
        client_id: str,
        user_id: str,
        ram_gb: int,
        vram_gb: int,
        duration_s: int,
        max_price_pusd: int,
        now_ms: int,
        bid_id: str | None = None,
        budgeted: bool = False,
    ) -> Contract:
        core.validate_reserve(
            node_id=node_id,
            client_id=client_id,
            user_id=user_id,
            ram_gb=ram_gb,
            vram_gb=vram_gb,
            duration_s=duration_s,
            max_price_pusd=max_price_pusd,
        )
        region = self.directory.get(node_id)
        if region is None:
            raise NotFound(core.NODE_NOT_FOUND, field="node_id")
        if bid_id is not None:
            bid_region = self.directory.get(bid_id)
            if bid_region is None:
                raise NotFound(core.BID_NOT_FOUND, field="bid_id")
            if bid_region != region:
                raise InvalidRequest(
                    "the bid and the node are in different regions", field="bid_id"
                )
        node = self._node(node_id)
        terms = dict(
            client_id=client_id,
            user_id=user_id,
            ram_gb=ram_gb,
            vram_gb=vram_gb,
            duration_s=duration_s,
            max_price_pusd=max_price_pusd,
            now_ms=now_ms,
        )
        if bid_id is not None:
            refusal = core.bid_refusal(self.bids.get(bid_id), **terms)  # type: ignore[arg-type]
            if refusal is not None:
                raise refusal
        refusal = core.reserve_refusal(
            node,
            ram_gb=ram_gb,
            vram_gb=vram_gb,
            duration_s=duration_s,
            max_price_pusd=max_price_pusd,
            now_ms=now_ms,
        )
        if refusal is not None:
            raise refusal
        gb_s = (ram_gb + vram_gb) * duration_s
        hold = gb_s * node.price_pusd
        w = self._wallet(region, client_id, now_ms)
        month = w[3]
        if bid_id is not None:
            bid = self.bids[bid_id]
            take = gb_s * bid.max_price_pusd
            self._release(w, take - hold, bid.hold_month)
            self.bids[bid_id] = _replace(bid, hold_pusd=bid.hold_pusd - take)
            month = bid.hold_month
        else:
            refusal = core.hold_refusal(
                hold, w[0], w[2], budgeted=budgeted, field="client_id"
            ) or core.open_refusal(
                self._open_count(region, user_id, "c"), self.max_open_contracts, "c", "client_id"
            )
            if refusal is not None:
                raise refusal
            self._hold(w, hold)
        self.wallets[(region, client_id)] = w
        contract = Contract(
            hold_pusd=hold,
            hold_month=month,
            contract_id=contract_id,
            region=region,
            client_id=client_id,
            user_id=user_id,
            node_id=node_id,
            owner_id=node.owner_id,
            ram_gb=ram_gb,
            vram_gb=vram_gb,
            duration_s=duration_s,
            start_ms=now_ms,
            end_ms=now_ms + duration_s * 1000,
            price_pusd=node.price_pusd,
            egress_price_pusd=node.egress_price_pusd,
            max_price_pusd=max_price_pusd,
            bid_id=bid_id,
            version=1,
        )
        self._open(contract, now_ms, trade=True)
        if bid_id is not None:
            self.bids[bid_id] = core.apply_fill(self.bids[bid_id], ram_gb, vram_gb, contract_id)
        self._event(region)
        return contract

    def extend(self, contract_id: str, extra_s: int, now_ms: int) -> Contract:
        if not 1 <= extra_s <= core.MAX_DURATION_S:
            raise InvalidRequest(
                f"must be an integer between 1 and {core.MAX_DURATION_S}", field="extra_s"
            )
        contract = self._active(contract_id)
        if now_ms >= contract.end_ms:
            raise Conflict(core.CONTRACT_ENDED, field="contract_id")
        node = self.nodes[contract.node_id]
        if node.status != "active":
            raise Unavailable(f"node is {node.status}", field="contract_id")
        duration = contract.duration_s + extra_s
        if duration > node.max_duration_s:
            raise OutsideTerms(
                f"the contract would last {duration} s, over the node's max_duration_sec of "
                f"{node.max_duration_s} s",
                field="extra_s",
            )
        size = contract.ram_gb + contract.vram_gb
        if duration > core.longest_lease_s(size, contract.max_price_pusd or contract.price_pusd):
            raise InvalidRequest(
                "the lease would be worth over 1,000,000 USD (size x duration x price cap) at "
                f"{duration} s",
                field="extra_s",
            )
        extra_hold = size * extra_s * contract.price_pusd
        w = self._wallet(contract.region, contract.client_id, now_ms)
        refusal = core.hold_refusal(extra_hold, w[0], w[2], budgeted=False, field="extra_s")
        if refusal is not None:
            raise refusal
        self._hold(w, extra_hold)
        self.wallets[(contract.region, contract.client_id)] = w
        node = self.nodes[contract.node_id]
        self.nodes[node.node_id] = _replace(
            node, lease_value_pusd=node.lease_value_pusd + extra_hold
        )
        extended = self.contracts[contract_id] = _replace(
            contract,
            hold_pusd=contract.hold_pusd + extra_hold,
            hold_month=w[3],
            duration_s=duration,
            end_ms=contract.end_ms + extra_s * 1000,
            extensions=contract.extensions + 1,
            version=contract.version + 1,
        )
        self._event(contract.region)
        return extended

    def settle(self, contract_id: str, egress_gb: float, now_ms: int) -> Contract:
        return self._close_now(contract_id, now_ms, "completed", core.egress_mgb(egress_gb))

    def fail_contract(self, contract_id: str, now_ms: int) -> Contract:
        return self._close_now(contract_id, now_ms, "failed", 0)

    def _close_now(self, contract_id: str, now_ms: int, status: str, egress: int) -> Contract:
        contract = self._active(contract_id)
        closed = core.close_contract(contract, now_ms=now_ms, status=status, egress_mgb=egress)
        self._settle_money(contract, closed.cost_pusd, now_ms, moving=False)
        closed = _replace(closed, hold_pusd=0)
        self._close(closed, now_ms, contract.hold_pusd)
        self._event(contract.region)
        return closed

    def failover(
        self, contract_id: str, new_node_id: str, now_ms: int, *, successor_id: str
    ) -> tuple[Contract, Contract]:
        old = self._active(contract_id)
        remaining = core.successor_duration_s(old, now_ms)
        if remaining <= 0:
            raise Conflict(core.CONTRACT_ENDED, field="contract_id")
        new_region = self.directory.get(new_node_id)
        if new_region is None:
            raise NotFound(core.NODE_NOT_FOUND, field="node_id")
        if new_region != old.region:
            raise InvalidRequest("failover stays in the contract's region", field="node_id")
        if new_node_id == old.node_id:
            raise InvalidRequest(core.SAME_NODE, field="node_id")
        node = self._node(new_node_id)
        refusal = core.reserve_refusal(
            node,
            ram_gb=old.ram_gb,
            vram_gb=old.vram_gb,
            duration_s=remaining,
            max_price_pusd=old.max_price_pusd,
            now_ms=now_ms,
        )
        if refusal is not None:
            raise refusal
        closed = core.close_contract(
            old, now_ms=now_ms, status="failed_over", successor_id=successor_id
        )
        moved = self._settle_money(old, closed.cost_pusd, now_ms, moving=True)
        closed = _replace(closed, hold_pusd=0)
        self._close(closed, now_ms, old.hold_pusd)
        successor = Contract(
            hold_pusd=moved,
            hold_month=old.hold_month,
            contract_id=successor_id,
            region=old.region,
            client_id=old.client_id,
            user_id=old.user_id,
            node_id=new_node_id,
            owner_id=node.owner_id,
            ram_gb=old.ram_gb,
            vram_gb=old.vram_gb,
            duration_s=remaining,
            start_ms=now_ms,
            end_ms=now_ms + remaining * 1000,
            price_pusd=node.price_pusd,
            egress_price_pusd=node.egress_price_pusd,
            max_price_pusd=old.max_price_pusd,
            predecessor_id=contract_id,
            version=1,
        )
        self._open(successor, now_ms, trade=False)
        self._event(old.region, 2)
        return closed, successor

    # -- reads ----------------------------------------------------------------------------

    def due_contracts(self, region: str, now_ms: int, limit: int) -> list[str]:
        return [
            cid
            for _, cid in sorted(
                (c.end_ms, c.contract_id)
                for c in self.contracts.values()
                if c.region == region and c.status == "active" and c.end_ms <= now_ms
            )[:limit]
        ]

    def _tracked(self, node: Node) -> bool:
        return node.status in ("active", "maintenance")

    def stale_nodes(self, region: str, now_ms: int, limit: int) -> list[str]:
        return [
            nid
            for _, nid in sorted(
                (self.deadline[n.node_id], n.node_id)
                for n in self.nodes.values()
                if n.region == region and self._tracked(n) and self.deadline[n.node_id] <= now_ms
            )[:limit]
        ]

    def snapshot(self, region: str) -> dict[str, Any]:
        """The region as `engine.replay.region_snapshot(..., geo_scores=False)` reads it."""
        out: dict[str, Any] = {}

        def zset(name: str, pairs: list[tuple[str, float]]) -> None:
            if pairs:
                out[name] = [[m, float(s)] for s, m in sorted((s, m) for m, s in pairs)]

        nodes = [n for n in self.nodes.values() if n.region == region]
        bids = [b for b in self.bids.values() if b.region == region]
        contracts = [c for c in self.contracts.values() if c.region == region]
        active = [c for c in contracts if c.status == "active"]
        for obj, name in (
            *((n, f"node:{n.node_id}") for n in nodes),
            *((b, f"bid:{b.bid_id}") for b in bids),
            *((c, f"contract:{c.contract_id}") for c in contracts),
        ):
            out[name] = dict(sorted(core.to_fields(obj).items()))
        sets: dict[str, set[str]] = defaultdict(set)
        for c in active:
            sets[f"node:{c.node_id}:contracts"].add(c.contract_id)
            sets[f"client:{c.client_id}:contracts"].add(c.contract_id)
        out.update({name: sorted(members) for name, members in sets.items()})
        listed = [n for n in nodes if self.listed.get(n.node_id)]
        zset("asks", [(n.node_id, n.price_pusd) for n in listed])
        zset("ask-exp", [(n.node_id, n.ask_expires_ms) for n in listed if n.ask_expires_ms > 0])
        zset("hb", [(n.node_id, self.deadline[n.node_id]) for n in nodes if self._tracked(n)])
        geo = sorted(n.node_id for n in nodes if n.status != "deactivated")
        if geo:
            out["geo"] = geo
        open_bids = [b for b in bids if b.status == "open"]
        zset("bids", [(core.bid_member(b.seq, b.bid_id), -b.max_price_pusd) for b in open_bids])
        zset("bid-exp", [(b.bid_id, b.expires_ms) for b in open_bids if b.expires_ms > 0])
        zset("ends", [(c.contract_id, c.end_ms) for c in active])
        zset("fills", list(self.fills[region].items()))
        zset(
            "trust-due",
            [(n.node_id, self.trust_due[n.node_id]) for n in nodes if n.node_id in self.trust_due],
        )
        tracked = {
            n.node_id: trust.pack(
                self.uptime[n.node_id], (n.maint_start_ms, n.maint_end_ms)
            ).decode()
            for n in nodes
            if n.node_id in self.uptime
        }
        if tracked:
            out["uptime"] = dict(sorted(tracked.items()))
        wallets: dict[str, str] = {}
        for (slot, client), (avail, held, allow, month) in self.wallets.items():
            if slot == region:
                wallets.update(
                    {client: str(avail), f"{client}:h": str(held), f"{client}:a": str(allow),
                     f"{client}:m": month}
                )  # fmt: skip
        if wallets:
            out["wallets"] = dict(sorted(wallets.items()))
        counts: dict[str, str] = {}
        for c in active:
            counts[f"{c.user_id}:c"] = str(int(counts.get(f"{c.user_id}:c", "0")) + 1)
        for b in open_bids:
            counts[f"{b.user_id}:b"] = str(int(counts.get(f"{b.user_id}:b", "0")) + 1)
        if counts:
            out["open"] = dict(sorted(counts.items()))
        zset("transfers", list(self.transfers[region].items()))
        if self.outbox[region]:
            out["outbox"] = dict(sorted(self.outbox[region].items()))
        if region == FUNDING and self.ops:
            out["ops"] = dict(sorted(self.ops.items()))
        if self.seq[region]:
            out["seq"] = str(self.seq[region])
        if self.arrival[region]:
            out["arrival"] = str(self.arrival[region])
        # the `dir` hash holds the ids that carry no region tag (the market mints contracts'
        # with one: engine.keys.mint_id)
        out["@dir"] = {
            i: region
            for i, r in sorted(self.directory.items())
            if r == region and id_tag(i) is None
        }
        out["@regions"] = region in self.regions
        return out
