"""The engine's notes, as the public events of `/ws`: the one place where the internal becomes
the public on the WebSocket.

The engine publishes notes in its own types and units (`engine.notify`: pico-USD, `_s`, the
internal `Contract` and `Bid` with `version`, `user_id`, `owner_id`); `public_event` decodes one
and returns the JSON of its channel's public event (`gateway.protocol.CHANNEL_EVENTS`), built
with the converters REST uses (`gateway.schemas`), so a contract, a bid or a book reads the same
on both. The hub calls it once per message, before the fan-out.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from engine.notify import BidNote, ContractNote, LeaseNote, SummaryNote, TradeNote, TrustNote
from engine.types import Contract, Quote
from gateway import protocol
from gateway.schemas import bid_out, book_out, contract_out, lease_endpoint, to_usd

__all__ = ["public_event"]


def _quote(data: msgspec.Raw) -> protocol.BookOut:
    return book_out(_decode_quote(data))


def _trade(data: msgspec.Raw) -> protocol.Trade:
    t = _decode_trade(data)
    return protocol.Trade(
        contract_id=t.contract_id,
        node_id=t.node_id,
        region=t.region,
        ram_gb=t.ram_gb,
        vram_gb=t.vram_gb,
        duration_sec=t.duration_s,
        price_per_gb_sec=to_usd(t.price_pusd),
        price_pusd=t.price_pusd,
        ts_ms=t.ts_ms,
    )


def _summary(data: msgspec.Raw) -> protocol.MarketSummary:
    s = _decode_summary(data)
    best = s.best_ask_pusd
    return protocol.MarketSummary(
        region=s.region,
        nodes=s.nodes,
        available_ram_gb=s.available_ram_gb,
        available_vram_gb=s.available_vram_gb,
        best_ask_per_gb_sec=None if best is None else to_usd(best),
        best_ask_pusd=best,
    )


def _fill(data: msgspec.Raw) -> protocol.ContractOut:
    return contract_out(_decode_contract(data))


def _bid(data: msgspec.Raw) -> protocol.BidNotice:
    note = _decode_bid_note(data)
    return protocol.BidNotice(
        notice=note.notice,
        ts_ms=note.ts_ms,
        bid=bid_out(note.bid),
        contract=None if note.contract is None else contract_out(note.contract),
    )


def _contract(data: msgspec.Raw) -> protocol.ContractNotice:
    note = _decode_contract_note(data)
    return protocol.ContractNotice(
        notice=note.notice, ts_ms=note.ts_ms, contract=contract_out(note.contract)
    )


def _trust(data: msgspec.Raw) -> protocol.TrustNotice:
    note = _decode_trust_note(data)
    return protocol.TrustNotice(
        notice=note.notice,
        ts_ms=note.ts_ms,
        node_id=note.node_id,
        uptime_score=note.uptime_score,
        uptime_history_windows=note.uptime_windows,
        suspension_due_ms=note.suspend_at_ms,
        suspended_since_ms=note.suspended_ms,
    )


class _NodeNote(msgspec.Struct):
    """Tells the two notes of `node:<id>` apart: only a `TrustNote` has an uptime score."""

    uptime_score: float | None = None


def _node(data: msgspec.Raw) -> protocol.ContractNotice | protocol.TrustNotice:
    return _contract(data) if _decode_node_note(data).uptime_score is None else _trust(data)


def _lease(data: msgspec.Raw) -> protocol.LeaseNotice:
    note = _decode_lease_note(data)
    return protocol.LeaseNotice(
        notice=note.notice, ts_ms=note.ts_ms, lease=lease_endpoint(note.contract)
    )


_decode_quote = msgspec.json.Decoder(Quote).decode
_decode_trust_note = msgspec.json.Decoder(TrustNote).decode
_decode_trade = msgspec.json.Decoder(TradeNote).decode
_decode_summary = msgspec.json.Decoder(SummaryNote).decode
_decode_contract = msgspec.json.Decoder(Contract).decode
_decode_bid_note = msgspec.json.Decoder(BidNote).decode
_decode_contract_note = msgspec.json.Decoder(ContractNote).decode
_decode_lease_note = msgspec.json.Decoder(LeaseNote).decode
_decode_node_note = msgspec.json.Decoder(_NodeNote).decode

_MAPPERS: dict[str, Callable[[msgspec.Raw], protocol.PublicEvent]] = {
    "quotes": _quote,
    "trades": _trade,
    "market": _summary,
    "fills": _fill,
    "bids": _bid,
    "contracts": _contract,
    "node": _node,
    "leases": _lease,
}


def public_event(ws_channel: str, data: msgspec.Raw) -> bytes:
    """The JSON of `ws_channel`'s public event made from the engine's note `data`; raises
    `ValueError` (msgspec's errors included) for a channel or a note it does not know."""
    mapper = _MAPPERS.get(ws_channel.partition(":")[0])
    if mapper is None:
        raise ValueError(f"no public event for channel {ws_channel!r}")
    return protocol.encode(mapper(data))
