"""The engine's notes as the public events of /ws (`gateway.events`): REST's shapes and units,
USD and exact pico-USD in agreement, nothing internal left (no server needed)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from engine.notify import BidNote, ContractNote, TradeNote, encode_message, market_summary
from engine.types import Bid, Contract, Quote
from gateway import protocol
from gateway.events import _MAPPERS, public_event
from gateway.schemas import bid_out, book_out, contract_out

# Names that are the engine's and must never reach a client.
_INTERNAL = {"duration_s", "version", "user_id", "owner_id", "cost_pusd", "used_s", "egress_mgb"}


def _contract(**kw: Any) -> Contract:
    fields: dict[str, Any] = {
        "contract_id": "c1",
        "region": "us-east-2",
        "client_id": "cl1",
        "user_id": "u1",
        "node_id": "n1",
        "owner_id": "o1",
        "ram_gb": 8,
        "vram_gb": 4,
        "duration_s": 600,
        "start_ms": 1_000_000,
        "end_ms": 1_600_000,
        # a price with no exact double: the USD field is the nearest, the twin is exact
        "price_pusd": 123_456_789,
        "egress_price_pusd": 10_000_000_000,
        "max_price_pusd": 200_000_001,
        "status": "completed",
        "bid_id": "b1",
        "used_s": 600,
        "egress_mgb": 1500,
        "cost_pusd": 123_456_789 * 12 * 600 + 15_000_000_000,
        "settlement_hash": "ab" * 32,
        "completed_ms": 1_600_000,
        "version": 4,
    }
    return Contract(**(fields | kw))


def _bid() -> Bid:
    return Bid(
        bid_id="b1",
        region="us-east-2",
        client_id="cl1",
        user_id="u1",
        ram_gb=8,
        vram_gb=4,
        duration_s=600,
        max_price_pusd=200_000_001,
        filled_ram_gb=8,
        filled_vram_gb=4,
        status="filled",
        contract_ids=["c1"],
        seq=7,
    )


def _public(ws_channel: str, note: Any) -> dict[str, Any]:
    envelope = msgspec.json.decode(encode_message(ws_channel, note))
    raw = msgspec.Raw(msgspec.json.encode(envelope["data"]))
    data: dict[str, Any] = msgspec.json.decode(public_event(ws_channel, raw))
    # what a client decodes with the protocol's own types
    assert protocol.decode_event(ws_channel, public_event(ws_channel, raw))
    return data


def _walk_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _walk_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _walk_keys(v)}
    return set()


def _exact(usd: float | None, pusd: int | None) -> bool:
    """The USD amount is the pico-USD one, to a double's precision."""
    if usd is None or pusd is None:
        return usd is None and pusd is None
    return pusd == round(usd * 1e12)


def test_every_kind_of_channel_has_its_mapping() -> None:
    """Each channel the protocol names is mapped, to its own event type."""
    assert set(_MAPPERS) == set(protocol.CHANNEL_EVENTS)
    with pytest.raises(ValueError, match="no public event"):
        public_event("news", msgspec.Raw(b"{}"))
    with pytest.raises(msgspec.ValidationError):
        public_event("fills", msgspec.Raw(b'{"contract_id": "c1"}'))


def test_a_fill_is_the_contract_rest_answers() -> None:
    """`fills` carries REST's `ContractOut`: USD and `_sec` names, each amount with its exact
    pico-USD twin; nothing of the engine's own (version, owner, `_s`)."""
    c = _contract()
    data = _public("fills", c)
    assert data == msgspec.to_builtins(contract_out(c))
    assert data["duration_sec"] == 600 and data["egress_gb"] == 1.5
    assert data["price_pusd"] == 123_456_789 and _exact(data["price_per_gb_sec"], 123_456_789)
    assert _exact(data["max_price_per_gb_sec"], data["max_price_pusd"])
    assert _exact(data["egress_price_per_gb"], data["egress_price_pusd"])
    assert data["total_cost_pusd"] == c.cost_pusd
    assert data["total_cost_usd"] == c.cost_pusd / 1e12
    assert not _INTERNAL & _walk_keys(data)


def test_bid_and_contract_notices_carry_rest_shapes() -> None:
    """`bids`, `contracts` and `node:<id>` carry the notice, its time, and the bid or contract as
    REST answers it."""
    c = _contract(status="active", cost_pusd=0)
    bid = _public("bids", BidNote(notice="bid_filled", ts_ms=5, bid=_bid(), contract=c))
    assert bid == {
        "notice": "bid_filled",
        "ts_ms": 5,
        "bid": msgspec.to_builtins(bid_out(_bid())),
        "contract": msgspec.to_builtins(contract_out(c)),
    }
    assert _exact(bid["bid"]["max_price_per_gb_sec"], bid["bid"]["max_price_pusd"])
    for channel in ("contracts", "node:n1"):
        note = ContractNote(notice="contract_extended", ts_ms=6, contract=c)
        data = _public(channel, note)
        assert data == {
            "event": "contract",
            "notice": "contract_extended",
            "ts_ms": 6,
            "contract": msgspec.to_builtins(contract_out(c)),
        }
    assert not _INTERNAL & _walk_keys(bid)


def test_quotes_trades_and_the_market_in_usd_with_pusd_twins() -> None:
    """The public book, tape and summary: `GET /api/book`'s shape, USD and pico-USD agreeing."""
    quote = Quote(
        region="us-east-2",
        ts_ms=9,
        best_ask_pusd=123_456_789,
        best_bid_pusd=100_000_001,
        ask_depth=[(123_456_789, 24)],
        bid_depth=[(100_000_001, 8)],
        last_fill_pusd=None,
        volume_24h_gb_s=7200,
    )
    book = _public("quotes:us-east-2", quote)
    assert book == msgspec.to_builtins(book_out(quote))
    assert _exact(book["best_ask_per_gb_sec"], book["best_ask_pusd"])
    assert _exact(book["best_bid_per_gb_sec"], book["best_bid_pusd"])
    assert book["last_fill_per_gb_sec"] is None and book["last_fill_pusd"] is None
    assert book["ask_depth"] == [
        {"price_per_gb_sec": 123_456_789 / 1e12, "gb": 24, "price_pusd": 123_456_789}
    ]
    assert book["volume_24h_gb_sec"] == 7200

    trade = TradeNote(
        contract_id="c1",
        node_id="n1",
        region="us-east-2",
        price_pusd=123_456_789,
        ram_gb=8,
        vram_gb=4,
        duration_s=600,
        ts_ms=9,
    )
    assert _public("trades:us-east-2", trade) == {
        "contract_id": "c1",
        "node_id": "n1",
        "region": "us-east-2",
        "ram_gb": 8,
        "vram_gb": 4,
        "duration_sec": 600,
        "price_per_gb_sec": 123_456_789 / 1e12,
        "price_pusd": 123_456_789,
        "ts_ms": 9,
    }
    assert _public("market", market_summary("us-east-2", 3, 64, 16, 700_000)) == {
        "region": "us-east-2",
        "nodes": 3,
        "available_ram_gb": 64,
        "available_vram_gb": 16,
        "best_ask_per_gb_sec": 7e-7,
        "best_ask_pusd": 700_000,
    }
    empty = _public("market", market_summary("us-east-2", 0, 0, 0, None))
    assert empty["best_ask_per_gb_sec"] is None and empty["best_ask_pusd"] is None
