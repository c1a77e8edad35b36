"""A region's quote and supply summary, kept from its events (pure: no Redis, no clock).

`QuoteBook` answers what `Market.quote(region, now_ms)` answers — best ask and bid, depth by price
level, last fill price, 24 h volume — without reading Redis: the engine feeds it the region's
events (after a snapshot), so publishing a quote ten times a second costs nothing on the server.
It also gives the `market` channel's summary and tells the crossing loop when an event may have
made room for a resting bid.

Rules (the same as the scripts, `engine/lua/quote.lua` and `engine.core`):
- An ask is listed iff its node is `active`, has free capacity
  (`offered_ram - reserved_ram + offered_vram - reserved_vram > 0`) and its ask has not expired
  (`ask_expires_ms == 0 or now_ms < ask_expires_ms`). Ask depth: free GB (ram + vram) summed per
  price level, cheapest first.
- A bid counts while open and not expired (`expires_ms == 0 or now_ms < expires_ms`). Bid depth:
  remaining GB (ram + vram) summed per price level, highest first.
- Fills are the contracts made by a reserve (a failover successor is not a fill). Last fill: the
  greatest `(ts_ms, "<contract_id>:<price_pusd>:<gb_s>")` ever seen (the scripts' sorted set
  order); volume: sum of `(ram_gb + vram_gb) * duration_s` over fills with `ts_ms > now - 24 h`.
- At most `levels` levels per side. The script reads at most a few thousand entries per side;
  this book has no such cut-off, so on a book deeper than that the two may differ.

Time only moves forward here: asking for an earlier `now_ms` than before answers as of the
latest (an expiry already applied stays applied).

Cost: each event is O(1) per node or bid it touches (plus O(log n) for expiry heaps); a quote is
O(L log levels) over the L distinct price levels; the summary is O(L).
"""

from __future__ import annotations

import heapq
from typing import Any, assert_never

from engine.core import FILLS_WINDOW_MS
from engine.notify import market_summary
from engine.types import (
    Bid,
    BidCancelled,
    BidExpired,
    BidPlaced,
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
    Quote,
    StakeChanged,
    TransferReceived,
    TransferSent,
    TrustUpdated,
    WalletCredited,
    WalletDebited,
)

__all__ = ["QUOTE_LEVELS", "QuoteBook"]

QUOTE_LEVELS = 20

# node row: status, offered_ram, offered_vram, reserved_ram, reserved_vram, price, expires, expired,
# held (suspended from new leases, engine.trust)
_STATUS, _O_RAM, _O_VRAM, _R_RAM, _R_VRAM, _PRICE, _EXPIRES, _EXPIRED, _HELD = range(9)
# bid row: price, total GB (ram + vram), filled GB, expires, expired
_B_PRICE, _B_TOTAL, _B_FILLED, _B_EXPIRES, _B_EXPIRED = range(5)


class QuoteBook:
    """One region's asks, bids and fills as aggregates (see the module docstring)."""

    def __init__(self, region: str, levels: int = QUOTE_LEVELS) -> None:
        self.region = region
        self.levels = levels
        self._nodes: dict[str, list[Any]] = {}
        self._ask_levels: dict[int, int] = {}  # price -> free GB of listed asks
        self._ask_count: dict[int, int] = {}  # price -> listed asks (a level may hold 0 GB)
        self._listed_ram = 0
        self._listed_vram = 0
        self._active = 0
        self._ask_expiry: list[tuple[int, str]] = []
        # bid id -> [price, total GB, filled GB, expires, expired]
        self._bids: dict[str, list[Any]] = {}
        self._bid_levels: dict[int, int] = {}
        self._bid_count: dict[int, int] = {}
        self._bid_expiry: list[tuple[int, str]] = []
        self._fills: list[tuple[int, int]] = []  # heap of (ts_ms, gb_s) inside the window
        self._volume = 0
        self._last_fill: tuple[int, str] | None = None
        self._now_ms = 0  # latest time seen by `_advance`
        self._improved: set[str] = set()

    # -- asks ---------------------------------------------------------------------------------

    def _ask(self, row: list[Any], sign: int) -> None:
        """Add (sign 1) or remove (sign -1) the node's contribution, if it is listed."""
        if row[_STATUS] == "active":
            self._active += sign
        if row[_STATUS] != "active" or row[_EXPIRED] or row[_HELD]:
            return
        free_ram = row[_O_RAM] - row[_R_RAM]
        free_vram = row[_O_VRAM] - row[_R_VRAM]
        if free_ram + free_vram <= 0:
            return
        price = row[_PRICE]
        self._ask_levels[price] = self._ask_levels.get(price, 0) + sign * (free_ram + free_vram)
        count = self._ask_count.get(price, 0) + sign
        if count:
            self._ask_count[price] = count
        else:
            del self._ask_count[price]
            del self._ask_levels[price]
        self._listed_ram += sign * free_ram
        self._listed_vram += sign * free_vram

    def upsert_node(self, node: Node) -> bool:
        """Insert or replace a node; True if it now offers something it did not."""
        old = self._nodes.get(node.node_id)
        before = self._offer(old)
        if old is not None:
            self._ask(old, -1)
        expires = node.ask_expires_ms
        row = [
            node.status,
            node.offered_ram_gb,
            node.offered_vram_gb,
            node.reserved_ram_gb,
            node.reserved_vram_gb,
            node.price_pusd,
            expires,
            expires != 0 and self._now_ms >= expires,
            node.suspended_ms != 0,
        ]
        self._nodes[node.node_id] = row
        self._ask(row, 1)
        if expires and not row[_EXPIRED]:
            heapq.heappush(self._ask_expiry, (expires, node.node_id))
        # a registration or a change of terms (durations, expiry) may widen who can fill here
        return self._note(node.node_id, before, self._offer(row), terms=True)

    @staticmethod
    def _offer(row: list[Any] | None) -> tuple[int, int, int] | None:
        """(price, free ram, free vram) of a listed ask, else None."""
        if row is None or row[_STATUS] != "active" or row[_EXPIRED] or row[_HELD]:
            return None
        free_ram, free_vram = row[_O_RAM] - row[_R_RAM], row[_O_VRAM] - row[_R_VRAM]
        if free_ram + free_vram <= 0:
            return None
        return row[_PRICE], free_ram, free_vram

    def _change(self, node_id: str, **values: Any) -> bool:
        row = self._nodes.get(node_id)
        if row is None:
            return False
        before = self._offer(row)
        self._ask(row, -1)
        for index, value in values.items():
            row[_FIELDS[index]] = value
        self._ask(row, 1)
        return self._note(node_id, before, self._offer(row))

    def _note(
        self,
        node_id: str,
        before: tuple[int, int, int] | None,
        after: tuple[int, int, int] | None,
        terms: bool = False,
    ) -> bool:
        """Whether the node's ask got better (listed anew, cheaper, more free capacity, or new
        terms); remembered for `take_improved`."""
        better = after is not None and (
            terms
            or before is None
            or after[0] < before[0]
            or after[1] > before[1]
            or after[2] > before[2]
        )
        if better:
            self._improved.add(node_id)
        return better

    def take_improved(self, now_ms: int) -> tuple[int, int, int, int] | None:
        """Bounds over the asks that got better since the last call and are still listed:
        (lowest price, most free RAM, most free VRAM, most free RAM + VRAM); None if there are
        none. A resting bid that none of these bounds admit cannot have been helped."""
        self._advance(now_ms)
        offers = [self._offer(self._nodes.get(i)) for i in self._improved]
        self._improved.clear()
        listed = [o for o in offers if o is not None]
        if not listed:
            return None
        return (
            min(o[0] for o in listed),
            max(o[1] for o in listed),
            max(o[2] for o in listed),
            max(o[1] + o[2] for o in listed),
        )

    def reserved(self, node_id: str) -> tuple[int, int] | None:
        """(reserved RAM, reserved VRAM) of a known node."""
        row = self._nodes.get(node_id)
        return None if row is None else (row[_R_RAM], row[_R_VRAM])

    def set_reserved(self, node_id: str, reserved_ram_gb: int, reserved_vram_gb: int) -> bool:
        """A node's reserved capacity changed; True if that freed some."""
        return self._change(node_id, r_ram=reserved_ram_gb, r_vram=reserved_vram_gb)

    def set_status(self, node_id: str, status: str) -> bool:
        return self._change(node_id, status=status)

    # -- bids ---------------------------------------------------------------------------------

    def _bid(self, row: list[Any], sign: int) -> None:
        remaining = row[_B_TOTAL] - row[_B_FILLED]
        if row[_B_EXPIRED] or remaining <= 0:
            return
        price = row[_B_PRICE]
        self._bid_levels[price] = self._bid_levels.get(price, 0) + sign * remaining
        count = self._bid_count.get(price, 0) + sign
        if count:
            self._bid_count[price] = count
        else:
            del self._bid_count[price]
            del self._bid_levels[price]

    def add_bid(self, bid: Bid) -> None:
        """An open bid (snapshot or BidPlaced); replaces what was known of it."""
        self.remove_bid(bid.bid_id)
        if bid.status != "open":
            return
        expired = bid.expires_ms != 0 and self._now_ms >= bid.expires_ms
        row = [
            bid.max_price_pusd,
            bid.ram_gb + bid.vram_gb,
            bid.filled_ram_gb + bid.filled_vram_gb,
            bid.expires_ms,
            expired,
        ]
        self._bids[bid.bid_id] = row
        self._bid(row, 1)
        if bid.expires_ms and not expired:
            heapq.heappush(self._bid_expiry, (bid.expires_ms, bid.bid_id))

    def remove_bid(self, bid_id: str) -> None:
        row = self._bids.pop(bid_id, None)
        if row is not None:
            self._bid(row, -1)

    def bid_filled(self, bid_id: str, filled_gb: int, still_open: bool) -> None:
        """A fill brought the bid to `filled_gb` (ram + vram) in total."""
        row = self._bids.get(bid_id)
        if row is None:
            return
        if not still_open:
            self.remove_bid(bid_id)
            return
        self._bid(row, -1)
        row[_B_FILLED] = filled_gb
        self._bid(row, 1)

    # -- fills --------------------------------------------------------------------------------

    def add_fill(self, ts_ms: int, contract_id: str, price_pusd: int, gb_s: int) -> None:
        """A contract made by a reserve (its `ts_ms` is the script's time)."""
        member = (ts_ms, f"{contract_id}:{price_pusd}:{gb_s}")
        if self._last_fill is None or member > self._last_fill:
            self._last_fill = member
        heapq.heappush(self._fills, (ts_ms, gb_s))
        self._volume += gb_s

    def load_fill(self, member: str, ts_ms: int) -> None:
        """A fill as the region's `fills` sorted set holds it (snapshot)."""
        contract_id, price, gb_s = member.rsplit(":", 2)
        self.add_fill(ts_ms, contract_id, int(price), int(gb_s))

    # -- events -------------------------------------------------------------------------------

    def apply(self, event: Event) -> bool:
        """Apply one event of the region; True if it may let a resting bid fill (an ask appeared,
        got cheaper, or has more free capacity)."""
        match event:
            case NodeRegistered(node=node) | NodeUpdated(node=node):
                return self.upsert_node(node)
            case HeartbeatsApplied(entries=entries):
                more = False
                for e in entries:
                    changed = self._change(
                        e.node_id,
                        status=e.status,
                        o_ram=e.offered_ram_gb,
                        o_vram=e.offered_vram_gb,
                        r_ram=e.offered_ram_gb - e.available_ram_gb,
                        r_vram=e.offered_vram_gb - e.available_vram_gb,
                    )
                    more = more or changed
                return more
            case ContractCreated(contract=c):
                self.set_reserved(
                    c.node_id, event.node_reserved_ram_gb, event.node_reserved_vram_gb
                )
                if c.predecessor_id is None:
                    self.add_fill(
                        event.ts_ms,
                        c.contract_id,
                        c.price_pusd,
                        (c.ram_gb + c.vram_gb) * c.duration_s,
                    )
                if event.bid_id is not None:
                    self.bid_filled(
                        event.bid_id,
                        event.bid_filled_ram_gb + event.bid_filled_vram_gb,
                        event.bid_status == "open",
                    )
                return False
            case ContractSettled():
                return self.set_reserved(
                    event.node_id, event.node_reserved_ram_gb, event.node_reserved_vram_gb
                )
            case NodeOffline(node_id=node_id):
                return self.set_status(node_id, "offline")
            case NodeDeactivated(node_id=node_id):
                return self.set_status(node_id, "deactivated")
            case BidPlaced(bid=bid):
                self.add_bid(bid)
                return False
            case BidCancelled(bid_id=bid_id) | BidExpired(bid_id=bid_id):
                self.remove_bid(bid_id)
                return False
            case ContractExtended() | LeaseChanged():
                return False  # the node's capacity stays reserved; no price or size moves
            case StakeChanged():
                return False  # the reserve checks the stake
            case TrustUpdated(entries=trusted):
                more = False
                for t in trusted:
                    more = self._change(t.node_id, held=t.suspended_ms != 0) or more
                return more
            case WalletCredited() | WalletDebited() | TransferSent() | TransferReceived():
                return False  # money moves no price or size
            case _:
                assert_never(event)

    # -- time ---------------------------------------------------------------------------------

    def _advance(self, now_ms: int) -> None:
        """Apply what time alone changes: asks and bids that expired, fills leaving the window."""
        self._now_ms = max(self._now_ms, now_ms)
        while self._ask_expiry and self._ask_expiry[0][0] <= now_ms:
            expires, node_id = heapq.heappop(self._ask_expiry)
            row = self._nodes.get(node_id)
            if row is not None and row[_EXPIRES] == expires and not row[_EXPIRED]:
                self._ask(row, -1)
                row[_EXPIRED] = True
                self._ask(row, 1)
        while self._bid_expiry and self._bid_expiry[0][0] <= now_ms:
            expires, bid_id = heapq.heappop(self._bid_expiry)
            row = self._bids.get(bid_id)
            if row is not None and row[_B_EXPIRES] == expires and not row[_B_EXPIRED]:
                self._bid(row, -1)
                row[_B_EXPIRED] = True
        horizon = now_ms - FILLS_WINDOW_MS
        while self._fills and self._fills[0][0] <= horizon:
            self._volume -= heapq.heappop(self._fills)[1]

    def quote(self, now_ms: int) -> Quote:
        """The region's quote at `now_ms` (what `Market.quote` would say)."""
        self._advance(now_ms)
        asks = heapq.nsmallest(self.levels, self._ask_levels)
        bids = heapq.nlargest(self.levels, self._bid_levels)
        ask_depth = [(p, self._ask_levels[p]) for p in asks]
        bid_depth = [(p, self._bid_levels[p]) for p in bids]
        return Quote(
            region=self.region,
            ts_ms=now_ms,
            best_ask_pusd=asks[0] if asks else None,
            best_bid_pusd=bids[0] if bids else None,
            ask_depth=ask_depth,
            bid_depth=bid_depth,
            last_fill_pusd=int(self._last_fill[1].split(":")[1]) if self._last_fill else None,
            volume_24h_gb_s=self._volume,
        )

    def best_ask(self, now_ms: int) -> int | None:
        self._advance(now_ms)
        return min(self._ask_levels) if self._ask_levels else None

    def summary(self, now_ms: int) -> dict[str, Any]:
        """The `market` channel's summary (engine.notify.market_summary)."""
        self._advance(now_ms)
        return market_summary(
            self.region,
            self._active,
            self._listed_ram,
            self._listed_vram,
            min(self._ask_levels) if self._ask_levels else None,
        )


_FIELDS = {
    "status": _STATUS,
    "o_ram": _O_RAM,
    "o_vram": _O_VRAM,
    "r_ram": _R_RAM,
    "r_vram": _R_VRAM,
    "price": _PRICE,
    "held": _HELD,
}
