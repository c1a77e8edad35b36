"""The bid book: one region's resting limit bids and the crossing rule. Pure: no Redis, no clock.

`BidBook` holds the region's open bids and decides which reserves to attempt against the region's
asks; it never performs one. An adapter (`engine.process.RegionWorker`) feeds it the region's
events and market time, sends the reserves it hands out through `Market`, and gives back each
outcome. The asks are the adapter's view of the region, kept current from the same stream: the
`AskBook` (engine.scoring) that ranks them, and the `QuoteBook` (engine.quotes) that knows which
of them got better. The book shares both and debits them as it plans.

Protocol (one owner, calls in this order; not thread-safe):
- `add(bid)` for each open bid of a snapshot; then `apply(event)` for each event of the stream,
  after the asks' books applied it.
- A pass: `cross(now_ms, everything=...)` returns a `Crossing`; its `next_batch(now_ms)` hands
  out `Attempt`s a batch at a time (an empty batch before the pass is `done` is a pause: let other
  work run, then call again). For each batch, in order: send it (one pipelined round trip; each
  reserve is still its own atomic script), `resolve(attempt, result)` for each, `refresh(bid_id,
  bid)` with a fresh read of each bid whose outcome was "gone", then `fall_through(now_ms)` until
  it returns None, resolving each attempt (and refreshing it, if gone) before asking for the next.
- `expiry_due(now_ms)`: whether an open bid's expiry came; the adapter then expires bids through
  the script and `remove`s each it expired.

Rules
- Priority: higher `max_price_pusd` first, then earlier `seq` (`engine.core.bid_priority`). A pass
  plans its bids in that order and stops at the first whose cap is below the cheapest listed ask:
  no later bid, its cap lower still, could fill.
- Which bids a pass tries: every open bid on a new book (after a snapshot) and when the adapter
  asks for `everything` (its slow backstop tick); otherwise the bids placed since the last pass,
  the split bids that filled in part in that pass, and the resting bids that an ask which got better
  since (`QuoteBook.take_improved`'s bounds: price, free RAM, free VRAM, free total) could serve.
  A resting bid those bounds do not admit already failed against the rest of the book.
- What a bid tries (`plan`): `engine.core.plan_fills` over the asks as `engine.scoring.rank` orders
  them under the bid's filters: the best-scored node taking the whole remainder; with
  `allow_split`, if none can, pieces of at least `max(min_fill_gb, 1)` GB (or the whole rest) on
  the nodes best scored for a 1-GB piece of each kind of memory still wanted, best first, until
  the bid is covered. A node too small for a piece now may take the whole rest in a later pass.
- The view is debited as reserves are planned (a node's reserved capacity rises before the event
  confirms it), so later bids of the pass see the capacity as taken; a refused reserve credits it
  back. The events then set the same absolute values.
- Outcomes (`resolve`): a contract applies the fill to the bid (`engine.core.apply_fill`); a bid
  still open is tried again in the next pass. A lost race (`CapacityTaken`, `Unavailable`: the
  view was stale) makes the bid fall through to its next candidate with that node excluded, one
  reserve at a time, at most `MAX_FALL_THROUGH` of them, stopping at the first outcome that is not
  a lost race; a bid that found no taker waits for a pass that includes it again. A bid gone
  (`Conflict`, `NotFound`: cancelled, expired, or our fill state behind) is to be re-read. Any
  other refusal (a split bid's "rest" that is no longer the rest because a piece before it
  failed) is dropped for the pass.
- Invariants: the book holds open bids only (one leaves on its last fill, its cancel, its expiry
  by the script, or a re-read finding it closed); a bid's fill state only grows, `filled +
  remaining == original`; a planned fill never exceeds what the fills planned before it left of
  the bid, and is at least the minimum piece unless it is all of that; each attempt debits the
  view once when planned and credits it once if refused. Events carry absolute fill states, so
  one the book already applied (its own fill, the overlap after a snapshot) changes nothing.

Complexity: `add`, `apply`, `resolve`, `refresh` O(1), but for copying a filled bid's contract
ids (`add` O(log b) with an expiry); a pass O(c log c) to sort its c candidates (all b open bids
for `everything` or improved asks, O(b) to filter), and per bid planned one `rank` (O(n log K)
over the n asks of the region, three for a split bid) and `plan_fills` (O(K)).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from typing import Literal, assert_never

import msgspec

from engine.core import Fill, apply_fill, bid_priority, plan_fills
from engine.errors import (
    CapacityTaken,
    Conflict,
    InvalidRequest,
    MarketError,
    NotFound,
    Unavailable,
)
from engine.quotes import QuoteBook
from engine.scoring import AskBook, MatchRequest, browse, merge_matches, rank
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
    "MAX_FALL_THROUGH",
    "RANK_K",
    "RESERVE_BATCH",
    "SPLIT_K",
    "YIELD_EVERY",
    "Attempt",
    "BidBook",
    "Crossing",
    "Outcome",
]

log = logging.getLogger("mnemo.engine")

RANK_K = 4
"""Candidates ranked per bid at first (each costs ~5 us to materialise; the view is debited as
fills are planned, so the best few almost always take it); a bid that loses races ranks again
wider, `RANK_K` more per node excluded."""
SPLIT_K = 64
"""Candidates ranked per kind of memory for the pieces of a split bid."""
RESERVE_BATCH = 256
"""Reserves per batch of a pass (one pipelined round trip)."""
MAX_FALL_THROUGH = 8
"""Reserves one bid tries, one after another, after losing a race in a batch; then it waits for
the next pass."""
YIELD_EVERY = 500
"""Bids planned between two pauses of a long pass (the adapter lets other work run)."""

_LOST_RACE = (CapacityTaken, Unavailable)
_GONE = (Conflict, NotFound)

Outcome = Literal["filled", "lost", "gone", "refused"]
"""What an attempt's result means for the book: a contract was made; the race for the node was
lost (the view was stale); the bid is to be re-read (`refresh`); refused for another reason."""


class Attempt(msgspec.Struct, frozen=True):
    """One reserve to attempt: `fill` of `bid`, at most `bid.max_price_pusd` per GB-second.

    `bid` is the bid as the pass found it; the reserve's arguments are its fixed terms
    (`bid_id`, `client_id`, `user_id`, `duration_s`, `max_price_pusd`) and the fill's node and
    size (`Market.reserve(..., bid_id=...)`)."""

    bid: Bid
    fill: Fill


def _may_use(bid: Bid, improved: tuple[int, int, int, int]) -> bool:
    """Whether some ask within `improved` (QuoteBook.take_improved's bounds) might fill the bid."""
    price, ram, vram, total = improved
    if bid.max_price_pusd < price:
        return False
    if bid.allow_split:
        rest = bid.remaining_ram_gb + bid.remaining_vram_gb
        return total >= min(rest, max(bid.min_fill_gb, 1))
    return bid.remaining_ram_gb <= ram and bid.remaining_vram_gb <= vram


class BidBook:
    """One region's open bids and the crossing rule (see the module docstring).

    `asks` and `quotes` are the region's ask view, which the owner keeps current from the stream
    and the book debits as it plans. `reserve_batch` and `yield_every` size a pass's batches and
    pauses (tests make them small).
    """

    def __init__(
        self,
        region: str,
        asks: AskBook,
        quotes: QuoteBook,
        *,
        reserve_batch: int = RESERVE_BATCH,
        yield_every: int = YIELD_EVERY,
    ) -> None:
        self.region = region
        self.asks = asks
        self.quotes = quotes
        self.reserve_batch = reserve_batch
        self.yield_every = yield_every
        self._bids: dict[str, Bid] = {}
        self._fresh: list[str] = []
        self._retry: set[str] = set()
        self._everything = True
        self._expiry: list[tuple[int, str]] = []
        # bids falling through after a lost race, in the order they lost, with the nodes to skip
        self._falling: dict[str, set[str]] = {}
        self._tries = 0  # reserves the first of them tried so far
        self._trying: Attempt | None = None

    def __len__(self) -> int:
        return len(self._bids)

    def __contains__(self, bid_id: object) -> bool:
        return bid_id in self._bids

    def get(self, bid_id: str) -> Bid | None:
        """The open bid as the book holds it (its fill state as far as the book knows)."""
        return self._bids.get(bid_id)

    def bids(self) -> list[Bid]:
        """The open bids, in priority order."""
        return sorted(self._bids.values(), key=bid_priority)

    @property
    def pending(self) -> bool:
        """Whether bids wait to be tried (placed since the last pass, or filled in part in it):
        the owner should cross again without waiting for more events."""
        return bool(self._fresh or self._retry)

    # -- bids ---------------------------------------------------------------------------------

    def add(self, bid: Bid) -> None:
        """Hold a bid (a snapshot's open bid; `apply` adds placed ones)."""
        self._bids[bid.bid_id] = bid
        if bid.expires_ms:
            heapq.heappush(self._expiry, (bid.expires_ms, bid.bid_id))

    def remove(self, bid_id: str) -> None:
        """Drop a bid that left the market (expired by the script, say); absent is fine."""
        self._bids.pop(bid_id, None)

    def apply(self, event: Event) -> None:
        """Apply one event of the region's stream (bids placed, cancelled, expired, filled)."""
        match event:
            case BidPlaced(bid=bid):
                if bid.status == "open":
                    self.add(bid)
                    self._fresh.append(bid.bid_id)
            case BidCancelled(bid_id=bid_id) | BidExpired(bid_id=bid_id):
                self._bids.pop(bid_id, None)
            case ContractCreated():
                if event.bid_id is not None:
                    self._bid_filled(event)
            case (
                NodeRegistered()
                | NodeUpdated()
                | NodeDeactivated()
                | HeartbeatsApplied()
                | NodeOffline()
                | ContractExtended()
                | LeaseChanged()
                | ContractSettled()
                | TrustUpdated()
                | StakeChanged()
            ):
                pass  # nodes and contracts change no bid (a bid's fill comes as ContractCreated)
            case WalletCredited() | WalletDebited() | TransferSent() | TransferReceived():
                pass  # money changes no bid (a bid's hold rides on its own events)
            case _:
                assert_never(event)

    def _bid_filled(self, event: ContractCreated) -> None:
        assert event.bid_id is not None
        bid = self._bids.get(event.bid_id)
        if bid is None:
            return
        if event.bid_status is not None and event.bid_status != "open":
            del self._bids[event.bid_id]
            return
        ids = bid.contract_ids
        if event.contract.contract_id not in ids:
            ids = [*ids, event.contract.contract_id]
        self._bids[event.bid_id] = msgspec.structs.replace(
            bid,
            filled_ram_gb=event.bid_filled_ram_gb,
            filled_vram_gb=event.bid_filled_vram_gb,
            contract_ids=ids,
        )

    def expiry_due(self, now_ms: int) -> bool:
        """Whether an open bid's expiry came by `now_ms` (each expiry is reported once)."""
        due = False
        heap = self._expiry
        while heap and heap[0][0] <= now_ms:
            _, bid_id = heapq.heappop(heap)
            if bid_id in self._bids:
                due = True
        return due

    # -- the ask view -------------------------------------------------------------------------

    def debit(self, node_id: str, ram_gb: int, vram_gb: int) -> None:
        """Count a reserve on the node in the ask view before its event arrives (the event then
        sets the same absolute value); negative amounts credit it back. The owner calls it for
        reserves made outside the book (a failover)."""
        reserved = self.quotes.reserved(node_id)
        if reserved is None:
            return
        ram, vram = reserved[0] + ram_gb, reserved[1] + vram_gb
        self.asks.set_reserved(node_id, ram, vram)
        self.quotes.set_reserved(node_id, ram, vram)

    # -- crossing -----------------------------------------------------------------------------

    def cross(self, now_ms: int, *, everything: bool = False) -> Crossing:
        """Start a pass over the bids due now (every open bid with `everything`), best first."""
        improved = self.quotes.take_improved(now_ms)
        self._falling.clear()
        self._tries = 0
        self._trying = None
        everything = everything or self._everything
        if everything:
            self._everything = False
            candidates = list(self._bids.values())
        else:
            wanted = set(self._fresh) | self._retry
            candidates = [self._bids[i] for i in wanted if i in self._bids]
            if improved is not None:
                # Only a bid that one of the asks that got better could serve may cross now:
                # the others were tried against the rest of the book already.
                candidates += [
                    b
                    for b in self._bids.values()
                    if b.bid_id not in wanted and _may_use(b, improved)
                ]
        self._fresh.clear()
        self._retry.clear()
        best_ask = None
        if candidates:
            offers, _total = browse(self.asks, now_ms=now_ms, limit=1)
            best_ask = offers[0].price_pusd if offers else None
        if best_ask is None:
            return Crossing(self, [], 0, everything)
        candidates.sort(key=bid_priority)
        return Crossing(self, candidates, best_ask, everything)

    def plan(self, bid: Bid, now_ms: int, excluded: Iterable[str] = ()) -> list[Fill]:
        """The fills to try for `bid` now, best first, skipping the `excluded` nodes: `plan_fills`
        over the eligible asks as `rank` orders them under the bid's constraints (the book's
        copy of the bid, if it holds one, gives the remainder)."""
        bid = self._bids.get(bid.bid_id, bid)
        ram, vram = bid.remaining_ram_gb, bid.remaining_vram_gb
        if bid.status != "open" or ram + vram <= 0:
            return []
        skip = set(excluded)
        try:
            matches = rank(
                self.asks, self._request(bid, ram, vram), now_ms, RANK_K * (1 + len(skip))
            )
            if not bid.allow_split:
                for m in matches:
                    node = None if m.node_id in skip else self.asks.node(m.node_id)
                    if node is not None and (fills := plan_fills(bid, [node], now_ms)):
                        return fills
                return []
            # Nodes too small for the whole remainder can take a piece of it: rank on a one-GB
            # probe for each kind of memory still wanted. Whole-remainder candidates come first
            # (one contract beats several), then the pieces, best score first.
            probes = []
            if ram > 0:
                probes.append(rank(self.asks, self._request(bid, 1, 0), now_ms, SPLIT_K))
            if vram > 0:
                probes.append(rank(self.asks, self._request(bid, 0, 1), now_ms, SPLIT_K))
            ordered = [*matches, *merge_matches(probes, 2 * SPLIT_K)]
        except InvalidRequest as exc:
            log.warning("region %s: bid %s cannot be matched: %s", self.region, bid.bid_id, exc)
            return []
        nodes = []
        for m in ordered:
            if m.node_id in skip:
                continue
            skip.add(m.node_id)
            node = self.asks.node(m.node_id)
            if node is not None:
                nodes.append(node)
        return plan_fills(bid, nodes, now_ms)

    def _request(self, bid: Bid, ram_gb: int, vram_gb: int) -> MatchRequest:
        return MatchRequest(
            ram_gb=ram_gb,
            vram_gb=vram_gb,
            max_price_pusd=bid.max_price_pusd,
            duration_s=bid.duration_s,
            lat=bid.lat,
            lng=bid.lng,
            prefer_local=bid.prefer_local,
            max_distance_km=bid.max_distance_km,
            min_uptime_score=bid.min_uptime_score,
            node_type=bid.node_type,
            region=self.region,
            limit=RANK_K,
        )

    # -- outcomes -----------------------------------------------------------------------------

    def resolve(self, attempt: Attempt, result: Contract | MarketError) -> Outcome:
        """Apply an attempt's result (the contract made, or the refusal) and say what it means.

        "gone": re-read the bid and `refresh` it before asking for the fall-through."""
        bid_id, fill = attempt.bid.bid_id, attempt.fill
        falling = attempt is self._trying
        if falling:
            self._trying = None
        outcome: Outcome
        if isinstance(result, Contract):
            self._filled(bid_id, fill, result.contract_id)
            outcome = "filled"
        else:
            self.debit(fill.node_id, -fill.ram_gb, -fill.vram_gb)
            if isinstance(result, _LOST_RACE):
                self._falling.setdefault(bid_id, set()).add(fill.node_id)
                return "lost"
            outcome = "gone" if isinstance(result, _GONE) else "refused"
        if falling:
            # a fall-through ends at its first outcome that is not a lost race
            del self._falling[bid_id]
            self._tries = 0
        return outcome

    def _filled(self, bid_id: str, fill: Fill, contract_id: str) -> None:
        bid = self._bids.get(bid_id)
        if bid is None or contract_id in bid.contract_ids:
            return  # closed meanwhile, or the stream told us first
        bid = apply_fill(bid, fill.ram_gb, fill.vram_gb, contract_id)
        if bid.status == "open":
            self._bids[bid_id] = bid
            self._retry.add(bid_id)  # a split bid keeps filling
        else:
            del self._bids[bid_id]

    def refresh(self, bid_id: str, bid: Bid | None) -> None:
        """A fresh read of a bid whose reserve came back "gone" (None: it no longer exists)."""
        if bid is None or bid.status != "open":
            self._bids.pop(bid_id, None)
        elif bid_id in self._bids:
            self._bids[bid_id] = bid

    def fall_through(self, now_ms: int) -> Attempt | None:
        """The next reserve for a bid that lost a race in the last batch (its next candidate, the
        nodes it lost on excluded), or None when every such bid is done for this pass."""
        while self._falling:
            bid_id = next(iter(self._falling))
            bid = self._bids.get(bid_id)
            if bid is None or self._tries >= MAX_FALL_THROUGH:
                fills: list[Fill] = []
            else:
                fills = self.plan(bid, now_ms, self._falling[bid_id])
            if bid is None or not fills:
                del self._falling[bid_id]
                self._tries = 0
                continue
            fill = fills[0]
            self.debit(fill.node_id, fill.ram_gb, fill.vram_gb)
            self._tries += 1
            self._trying = Attempt(bid, fill)
            return self._trying
        return None


class Crossing:
    """One pass of a `BidBook`: its candidate bids, best first, planned a batch at a time.

    `everything`: whether the pass tries every open bid. `done`: nothing is left to plan."""

    __slots__ = ("_batch", "_best_ask", "_bids", "_book", "_next", "_paused", "done", "everything")

    def __init__(self, book: BidBook, bids: list[Bid], best_ask: int, everything: bool) -> None:
        self._book = book
        self._bids = bids
        self._best_ask = best_ask
        self._next = 0
        self._batch: list[Attempt] = []
        self._paused = False
        self.everything = everything
        self.done = not bids

    def next_batch(self, now_ms: int) -> list[Attempt]:
        """Plan bids (debiting the view) until a batch of `reserve_batch` reserves is ready or
        the pass ends, and hand it out; [] with `done` still False is a pause after every
        `yield_every` bids of the pass. Resolve a batch's attempts before asking for the next."""
        book = self._book
        bids = self._bids
        batch = self._batch
        every = book.yield_every
        while self._next < len(bids):
            i = self._next
            bid = bids[i]
            if bid.max_price_pusd < self._best_ask:
                break  # every later bid has a lower cap still
            if i % every == every - 1 and not self._paused:
                self._paused = True
                return []
            self._paused = False
            self._next = i + 1
            for fill in book.plan(bid, now_ms):
                book.debit(fill.node_id, fill.ram_gb, fill.vram_gb)
                batch.append(Attempt(bid, fill))
            if len(batch) >= book.reserve_batch:
                self._batch = []
                return batch
        self.done = True
        self._batch = []
        return batch
