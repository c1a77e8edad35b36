"""Stream events to pub/sub notifications: a pure translator (no Redis, no clock, no await).

The engine process feeds every event of a region's stream, in stream order, to that region's
`Notifier`, and publishes what comes back. The Notifier keeps only what addressing needs and
the events do not carry: who placed each open bid and the live contracts (so a settlement or an
extension can reach the renter's user channel and the node's channel with the whole contract).

Every message is JSON `{"channel": <WebSocket channel name>, "data": {...}}`, published on a Redis
channel named by `engine.keys.Keys`:

| Redis channel          | ws channel    | data                                                       |
| ---------------------- | ------------- | ---------------------------------------------------------- |
| `trades_channel(r)`    | `trades:<r>`  | `{contract_id, node_id, region, price_pusd, ram_gb, vram_gb, duration_s, ts_ms}` for every new contract except a failover successor (that is not a trade) |
| `user_channel(user)`   | `fills`       | the `ContractCreated` event of each of the renter's new contracts (successors excluded) |
|                        | `bids`        | `BidPlaced`, `BidCancelled`, `BidExpired`, and `ContractCreated` carrying a `bid_id` |
|                        | `contracts`   | `ContractExtended`, `ContractSettled` (any final status), and a failover notice `{type: "contract_failed_over", event_id, region, ts_ms, contract_id: <old>, successor: <new contract>}` |
| `node_channel(node)`   | `node:<id>`   | `{notice, contract}`; notice is `contract_started`, `contract_extended`, `contract_ending` (sent `ENDING_NOTICE_LEAD_MS` before the end, or at the start of a shorter contract), `contract_ended` (completed or failed) or `contract_failed_over` (to the node that lost it) |
| `market_channel`       | `market`      | `{region, nodes, available_ram_gb, available_vram_gb, best_ask_pusd}` (see `market_summary`) |

`contract_ending` is sent once per end time: an extension pushes the end back and re-arms it.
"""

from __future__ import annotations

import heapq
from typing import Any, assert_never

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
    HeartbeatsApplied,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
)

__all__ = ["ENDING_NOTICE_LEAD_MS", "Message", "Notifier", "encode_message", "market_summary"]

ENDING_NOTICE_LEAD_MS = 65_000
"""`contract_ending` goes out this long before `end_ms`: the promise is at least 60 s, and the
5 s margin absorbs the engine's tick and publishing lag."""

Message = tuple[str, bytes]
"""(Redis channel, encoded JSON payload)."""

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
    """The `market` channel's per-region summary (nodes counts active nodes; capacity is free
    capacity of active nodes whose ask has not expired; best ask is the lowest such price)."""
    return {
        "region": region,
        "nodes": nodes,
        "available_ram_gb": available_ram_gb,
        "available_vram_gb": available_vram_gb,
        "best_ask_pusd": best_ask_pusd,
    }


class Notifier:
    """Translates one region's events into notifications. Feed events in stream order.

    Unknown ids (an event about a bid or contract the Notifier never saw) yield only the
    messages that need nothing more than the event; the caller may `remember()` the object first
    to get the rest (the engine looks it up in Redis).
    """

    def __init__(self, keys: Keys, region: str) -> None:
        self.keys = keys
        self.region = region
        self._bid_users: dict[str, str] = {}
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
            self._bid_users[obj.bid_id] = obj.user_id
        else:
            self._contracts[obj.contract_id] = obj
            if obj.status == "active":
                self._arm(obj)

    def knows_bid(self, bid_id: str) -> bool:
        return bid_id in self._bid_users

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
            case BidPlaced():
                self._bid_users[event.bid.bid_id] = event.bid.user_id
                return [(self.keys.user_channel(event.bid.user_id), encode_message("bids", event))]
            case BidCancelled() | BidExpired():
                user_id = self._bid_users.pop(event.bid_id, None)
                if user_id is None:
                    return []
                return [(self.keys.user_channel(user_id), encode_message("bids", event))]
            case (
                NodeRegistered()
                | NodeUpdated()
                | NodeDeactivated()
                | HeartbeatsApplied()
                | NodeOffline()
            ):
                return []  # the node's owner hears of its nodes from the gateway, not from here
            case _:
                assert_never(event)

    def _created(self, event: ContractCreated) -> list[Message]:
        c = event.contract
        self._contracts[c.contract_id] = c
        self._arm(c)
        user = self.keys.user_channel(c.user_id)
        out: list[Message] = []
        if c.predecessor_id is None:
            trade = {
                "contract_id": c.contract_id,
                "node_id": c.node_id,
                "region": c.region,
                "price_pusd": c.price_pusd,
                "ram_gb": c.ram_gb,
                "vram_gb": c.vram_gb,
                "duration_s": c.duration_s,
                "ts_ms": event.ts_ms,
            }
            out.append(
                (self.keys.trades_channel(c.region), encode_message(f"trades:{c.region}", trade))
            )
            out.append((user, encode_message("fills", event)))
        else:
            notice = {
                "type": "contract_failed_over",
                "event_id": event.event_id,
                "region": event.region,
                "ts_ms": event.ts_ms,
                "contract_id": c.predecessor_id,
                "successor": c,
            }
            out.append((user, encode_message("contracts", notice)))
        if event.bid_id is not None:
            out.append((user, encode_message("bids", event)))
            if event.bid_status != "open":
                self._bid_users.pop(event.bid_id, None)
        out.append(self._node_notice("contract_started", c))
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
            (self.keys.user_channel(c.user_id), encode_message("contracts", event)),
            self._node_notice("contract_extended", c),
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
        notice = "contract_failed_over" if event.status == "failed_over" else "contract_ended"
        return [
            (self.keys.user_channel(c.user_id), encode_message("contracts", event)),
            self._node_notice(notice, c),
        ]

    def _node_notice(self, notice: str, contract: Contract) -> Message:
        data = {"notice": notice, "contract": contract}
        return (
            self.keys.node_channel(contract.node_id),
            encode_message(f"node:{contract.node_id}", data),
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
                out.append(self._node_notice("contract_ending", c))
        return out

    def forget_all(self) -> None:
        """Drop all state (the region was handed to another engine)."""
        self._bid_users.clear()
        self._contracts.clear()
        self._ending.clear()
        self._ending_sent.clear()
