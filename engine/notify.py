"""Stream events to pub/sub notes: a pure translator (no Redis, no clock, no await).

The engine process feeds every event of a region's stream, in stream order, to that region's
`Notifier`, and publishes what comes back. The Notifier keeps only what addressing needs and
the events do not carry: each open bid (so a fill, a cancellation or an expiry reaches the
bidder with the whole bid) and the live contracts (so a settlement or an extension reaches the
renter's user channel and the node's channel with the whole contract).

Every message is JSON `{"channel": <WebSocket channel name>, "data": <note>}`, published on a
Redis channel named by `engine.keys.Keys`. The notes are internal, in the engine's types and
units, like the events: the gateway maps each to the channel's public event (`gateway.events`,
`gateway.protocol`) before a client sees it, so the notes follow the internal rules of
`engine.types` (new fields get defaults, a field's type never changes) and bind no client.

| Redis channel          | ws channel    | data                                                       |
| ---------------------- | ------------- | ---------------------------------------------------------- |
| `quotes_channel(r)`    | `quotes:<r>`  | `engine.types.Quote` (published by the engine's loop)      |
| `trades_channel(r)`    | `trades:<r>`  | `TradeNote` for every new contract except a failover successor (that is not a trade) |
| `user_channel(user)`   | `fills`       | the `Contract` of each of the renter's new contracts (successors excluded) |
|                        | `bids`        | `BidNote`: `bid_placed`, `bid_filled` (with the fill), `bid_cancelled`, `bid_expired` |
|                        | `contracts`   | `ContractNote`: `contract_extended`, `contract_ended` (completed or failed), `contract_failed_over` (the old contract, settled), `contract_started` (its successor) |
|                        | `leases`      | `LeaseNote` of the renter's delivered leases: `lease_ready` (first ready report), `lease_moved` (a failover successor's first ready report: a new endpoint), `lease_failed` (failed, no successor), `lease_closed` (settled after delivery) |
| `node_channel(node)`   | `node:<id>`   | `ContractNote`: `contract_started`, `contract_extended`, `contract_ending` (sent `ENDING_NOTICE_LEAD_MS` before the end, or at the start of a shorter contract), `contract_ended` (completed or failed) or `contract_failed_over` (to the node that lost it); `TrustNote`: the node's standing changed (`warned`, `cleared`, `suspended`, `reinstated`; engine.trust) |
|                        | `leases:<id>` | `LeaseNote`, orders to the node's agent: `lease_open` (a delivered lease was made on the node), `lease_close` (stop, wipe and report it: the close was ordered, or the lease failed or moved away) |
| `market_channel`       | `market`      | `SummaryNote` (see `market_summary`)                       |

`contract_ending` is sent once per end time: an extension pushes the end back and re-arms it.
"""

from __future__ import annotations

import heapq
from typing import Any, Literal, assert_never

import msgspec

from engine.keys import Keys
from engine.trust import Notice
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
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
    StakeChanged,
    TransferReceived,
    TransferSent,
    TrustUpdated,
    WalletCredited,
    WalletDebited,
)

__all__ = [
    "ENDING_NOTICE_LEAD_MS",
    "BidNote",
    "ContractNote",
    "LeaseNote",
    "Message",
    "Notifier",
    "SummaryNote",
    "TradeNote",
    "TrustNote",
    "encode_message",
    "market_summary",
]

ENDING_NOTICE_LEAD_MS = 65_000
"""`contract_ending` goes out this long before `end_ms`: the promise is at least 60 s, and the
5 s margin absorbs the engine's tick and publishing lag."""

Message = tuple[str, bytes]
"""(Redis channel, encoded JSON payload)."""

ContractNoticeKind = Literal[
    "contract_started",
    "contract_extended",
    "contract_ending",
    "contract_ended",
    "contract_failed_over",
]
BidNoticeKind = Literal["bid_placed", "bid_filled", "bid_cancelled", "bid_expired"]
LeaseNoticeKind = Literal[
    "lease_open", "lease_ready", "lease_moved", "lease_failed", "lease_close", "lease_closed"
]


class TradeNote(msgspec.Struct, frozen=True, kw_only=True):
    """A contract made by a reserve, for the region's public tape."""

    contract_id: str
    node_id: str
    region: str
    price_pusd: int
    ram_gb: int
    vram_gb: int
    duration_s: int
    ts_ms: int


class SummaryNote(msgspec.Struct, frozen=True, kw_only=True):
    """The `market` channel's per-region summary: `nodes` counts active nodes; capacity is the
    free capacity of active nodes whose ask has not expired; the best ask is the lowest such
    price (None: nothing listed)."""

    region: str
    nodes: int
    available_ram_gb: int
    available_vram_gb: int
    best_ask_pusd: int | None


class BidNote(msgspec.Struct, frozen=True, kw_only=True):
    """A change to a bid: `bid` as it is after it; with `bid_filled`, `contract` is the fill."""

    notice: BidNoticeKind
    ts_ms: int
    bid: Bid
    contract: Contract | None = None


class TrustNote(msgspec.Struct, frozen=True, kw_only=True):
    """A change of a node's standing (engine.trust.Notice), with its uptime after it."""

    notice: Notice
    ts_ms: int
    node_id: str
    uptime_score: float
    uptime_windows: int
    suspend_at_ms: int = 0
    suspended_ms: int = 0


class ContractNote(msgspec.Struct, frozen=True, kw_only=True):
    """A change to a contract: `contract` as it is after it."""

    notice: ContractNoticeKind
    ts_ms: int
    contract: Contract


class LeaseNote(msgspec.Struct, frozen=True, kw_only=True):
    """A change to a delivered lease: `contract` as it is after it (its endpoint, never a
    secret: the exchange stores none)."""

    notice: LeaseNoticeKind
    ts_ms: int
    contract: Contract


_encoder = msgspec.json.Encoder()


def encode_message(ws_channel: str, data: Any) -> bytes:
    """The wire form of one notification: `{"channel": ws_channel, "data": data}`."""
    return _encoder.encode({"channel": ws_channel, "data": data})


def market_summary(
    region: str,
    nodes: int,
    available_ram_gb: int,
    available_vram_gb: int,
    best_ask_pusd: int | None,
) -> dict[str, Any]:
    """The `market` channel's per-region summary: a `SummaryNote`'s fields, as a dict (the
    engine compares it with the last one it published)."""
    note = SummaryNote(
        region=region,
        nodes=nodes,
        available_ram_gb=available_ram_gb,
        available_vram_gb=available_vram_gb,
        best_ask_pusd=best_ask_pusd,
    )
    return msgspec.structs.asdict(note)


class Notifier:
    """Translates one region's events into notifications. Feed events in stream order.

    Unknown ids (an event about a bid or contract the Notifier never saw) yield only the
    messages that need nothing more than the event; the caller may `remember()` the object first
    to get the rest (the engine looks it up in Redis).
    """

    def __init__(self, keys: Keys, region: str) -> None:
        self.keys = keys
        self.region = region
        self._bids: dict[str, Bid] = {}
        self._contracts: dict[str, Contract] = {}
        # (notice_at_ms, contract_id, end_ms): lazily invalidated when end_ms no longer matches
        self._ending: list[tuple[int, str, int]] = []
        self._ending_sent: dict[str, int] = {}  # contract id -> end_ms already announced

    # -- state ------------------------------------------------------------------------------

    def remember(self, obj: Bid | Contract) -> None:
        """Learn a bid or a contract (start-up snapshot, or a lookup when an event names one the
        Notifier never saw: then it may already be closed, and the event's message still goes
        out). Only an active contract is armed for its ending notice."""
        if isinstance(obj, Bid):
            self._bids[obj.bid_id] = obj
        else:
            self._contracts[obj.contract_id] = obj
            if obj.status == "active":
                self._arm(obj)

    def knows_bid(self, bid_id: str) -> bool:
        return bid_id in self._bids

    def knows_contract(self, contract_id: str) -> bool:
        return contract_id in self._contracts

    def contract(self, contract_id: str) -> Contract | None:
        """The live contract as the Notifier last saw it."""
        return self._contracts.get(contract_id)

    @property
    def live_contracts(self) -> int:
        return len(self._contracts)

    def _arm(self, contract: Contract) -> None:
        at = contract.end_ms - ENDING_NOTICE_LEAD_MS
        heapq.heappush(self._ending, (at, contract.contract_id, contract.end_ms))

    # -- translation --------------------------------------------------------------------------

    def on_event(self, event: Event) -> list[Message]:
        """The notifications one event causes (possibly none)."""
        match event:
            case ContractCreated():
                return self._created(event)
            case ContractExtended():
                return self._extended(event)
            case ContractSettled():
                return self._settled(event)
            case LeaseChanged():
                return self._lease_changed(event)
            case BidPlaced(bid=bid):
                if bid.status == "open":
                    self._bids[bid.bid_id] = bid
                return [self._bid_note("bid_placed", event.ts_ms, bid)]
            case BidCancelled() | BidExpired():
                known = self._bids.pop(event.bid_id, None)
                if known is None:
                    return []
                if isinstance(event, BidCancelled):
                    gone = msgspec.structs.replace(known, status="cancelled")
                    return [self._bid_note("bid_cancelled", event.ts_ms, gone)]
                gone = msgspec.structs.replace(known, status="expired")
                return [self._bid_note("bid_expired", event.ts_ms, gone)]
            case TrustUpdated(entries=entries):
                return [
                    (
                        self.keys.node_channel(e.node_id),
                        encode_message(
                            f"node:{e.node_id}",
                            TrustNote(
                                notice=e.notice,
                                ts_ms=event.ts_ms,
                                node_id=e.node_id,
                                uptime_score=e.uptime_score,
                                uptime_windows=e.uptime_windows,
                                suspend_at_ms=e.suspend_at_ms,
                                suspended_ms=e.suspended_ms,
                            ),
                        ),
                    )
                    for e in entries
                    if e.notice is not None
                ]
            case (
                NodeRegistered()
                | NodeUpdated()
                | NodeDeactivated()
                | HeartbeatsApplied()
                | NodeOffline()
                | StakeChanged()
            ):
                return []  # the node's owner hears of its nodes from the gateway, not from here
            case WalletCredited() | WalletDebited() | TransferSent() | TransferReceived():
                return []  # money has no market notice (the wallet is read through the API)
            case _:
                assert_never(event)

    def _bid_note(
        self, notice: BidNoticeKind, ts_ms: int, bid: Bid, contract: Contract | None = None
    ) -> Message:
        note = BidNote(notice=notice, ts_ms=ts_ms, bid=bid, contract=contract)
        return (self.keys.user_channel(bid.user_id), encode_message("bids", note))

    def _created(self, event: ContractCreated) -> list[Message]:
        c = event.contract
        self._contracts[c.contract_id] = c
        self._arm(c)
        user = self.keys.user_channel(c.user_id)
        out: list[Message] = []
        if c.predecessor_id is None:
            trade = TradeNote(
                contract_id=c.contract_id,
                node_id=c.node_id,
                region=c.region,
                price_pusd=c.price_pusd,
                ram_gb=c.ram_gb,
                vram_gb=c.vram_gb,
                duration_s=c.duration_s,
                ts_ms=event.ts_ms,
            )
            out.append(
                (self.keys.trades_channel(c.region), encode_message(f"trades:{c.region}", trade))
            )
            out.append((user, encode_message("fills", c)))
        else:
            # A failover's successor: the renter learnt of the old contract's end just before.
            note = ContractNote(notice="contract_started", ts_ms=event.ts_ms, contract=c)
            out.append((user, encode_message("contracts", note)))
        if event.bid_id is not None and (bid := self._bids.get(event.bid_id)) is not None:
            ids = bid.contract_ids
            if c.contract_id not in ids:
                ids = [*ids, c.contract_id]
            bid = msgspec.structs.replace(
                bid,
                filled_ram_gb=event.bid_filled_ram_gb,
                filled_vram_gb=event.bid_filled_vram_gb,
                status=event.bid_status or bid.status,
                contract_ids=ids,
            )
            if bid.status == "open":
                self._bids[bid.bid_id] = bid
            else:
                del self._bids[bid.bid_id]
            out.append(self._bid_note("bid_filled", event.ts_ms, bid, c))
        out.append(self._node_notice("contract_started", c, event.ts_ms))
        if c.lease_state == "pending":
            out.append(self._lease_order("lease_open", c, event.ts_ms))
        return out

    def _extended(self, event: ContractExtended) -> list[Message]:
        c = self._contracts.get(event.contract_id)
        if c is None:
            return []
        c = msgspec.structs.replace(
            c,
            duration_s=event.duration_s,
            end_ms=event.end_ms,
            version=event.version,
            extensions=c.extensions + 1,
        )
        self._contracts[c.contract_id] = c
        self._arm(c)
        return [
            self._renter_notice("contract_extended", c, event.ts_ms),
            self._node_notice("contract_extended", c, event.ts_ms),
        ]

    def _settled(self, event: ContractSettled) -> list[Message]:
        c = self._contracts.pop(event.contract_id, None)
        self._ending_sent.pop(event.contract_id, None)
        if c is None:
            return []
        c = msgspec.structs.replace(
            c,
            status=event.status,
            used_s=event.used_s,
            egress_mgb=event.egress_mgb,
            cost_pusd=event.cost_pusd,
            settlement_hash=event.settlement_hash,
            completed_ms=event.completed_ms,
            successor_id=event.successor_id,
        )
        was = c.lease_state
        if event.lease_state is not None:
            c = msgspec.structs.replace(c, lease_state=event.lease_state)
        notice: ContractNoticeKind = (
            "contract_failed_over" if event.status == "failed_over" else "contract_ended"
        )
        out = [
            self._renter_notice(notice, c, event.ts_ms),
            self._node_notice(notice, c, event.ts_ms),
        ]
        if event.lease_state is not None:
            if was != "closing":
                out.append(self._lease_order("lease_close", c, event.ts_ms))
            if event.lease_state == "closed":
                out.append(self._lease_notice("lease_closed", c, event.ts_ms))
            elif event.status == "failed":
                out.append(self._lease_notice("lease_failed", c, event.ts_ms))
        return out

    def _lease_changed(self, event: LeaseChanged) -> list[Message]:
        c = self._contracts.get(event.contract_id)
        if c is None:
            return []
        was = c.lease_state
        c = msgspec.structs.replace(
            c,
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
        self._contracts[c.contract_id] = c
        match event.change:
            case "ready":
                moved = was == "pending" and c.predecessor_id is not None
                return [
                    self._lease_notice("lease_moved" if moved else "lease_ready", c, event.ts_ms)
                ]
            case "closing":
                return [self._lease_order("lease_close", c, event.ts_ms)]
            case "reported":
                return []
            case other:
                assert_never(other)

    def _lease_notice(self, notice: LeaseNoticeKind, contract: Contract, ts_ms: int) -> Message:
        note = LeaseNote(notice=notice, ts_ms=ts_ms, contract=contract)
        return (self.keys.user_channel(contract.user_id), encode_message("leases", note))

    def _lease_order(self, notice: LeaseNoticeKind, contract: Contract, ts_ms: int) -> Message:
        note = LeaseNote(notice=notice, ts_ms=ts_ms, contract=contract)
        return (
            self.keys.node_channel(contract.node_id),
            encode_message(f"leases:{contract.node_id}", note),
        )

    def _renter_notice(self, notice: ContractNoticeKind, contract: Contract, ts_ms: int) -> Message:
        note = ContractNote(notice=notice, ts_ms=ts_ms, contract=contract)
        return (self.keys.user_channel(contract.user_id), encode_message("contracts", note))

    def _node_notice(self, notice: ContractNoticeKind, contract: Contract, ts_ms: int) -> Message:
        note = ContractNote(notice=notice, ts_ms=ts_ms, contract=contract)
        return (
            self.keys.node_channel(contract.node_id),
            encode_message(f"node:{contract.node_id}", note),
        )

    # -- time-driven notices ----------------------------------------------------------------

    def next_notice_ms(self) -> int | None:
        """When `due_notices` next has something to say (None: nothing scheduled)."""
        while self._ending:
            at, contract_id, end_ms = self._ending[0]
            c = self._contracts.get(contract_id)
            if c is not None and c.end_ms == end_ms:
                return at
            heapq.heappop(self._ending)
        return None

    def due_notices(self, now_ms: int) -> list[Message]:
        """`contract_ending` notices whose time has come (each sent once per end time)."""
        out: list[Message] = []
        while self._ending and self._ending[0][0] <= now_ms:
            _, contract_id, end_ms = heapq.heappop(self._ending)
            c = self._contracts.get(contract_id)
            if (
                c is not None
                and c.end_ms == end_ms
                and end_ms > now_ms
                and self._ending_sent.get(contract_id) != end_ms
            ):
                self._ending_sent[contract_id] = end_ms
                out.append(self._node_notice("contract_ending", c, now_ms))
        return out

    def forget_all(self) -> None:
        """Drop all state (the region was handed to another engine)."""
        self._bids.clear()
        self._contracts.clear()
        self._ending.clear()
        self._ending_sent.clear()
