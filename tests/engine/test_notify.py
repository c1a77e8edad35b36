"""The event -> notification translator (pure: no server needed). Its notes are internal (the
gateway maps them to the public events: tests/gateway/test_events.py)."""

from __future__ import annotations

import json

import msgspec

from engine.keys import Keys
from engine.notify import ENDING_NOTICE_LEAD_MS, Notifier, SummaryNote, market_summary
from engine.types import (
    Bid,
    BidCancelled,
    BidExpired,
    BidPlaced,
    Contract,
    ContractCreated,
    ContractExtended,
    ContractSettled,
    NodeOffline,
)

KEYS = Keys("n:")
R = "us-east-2"


def _contract(**kw: object) -> Contract:
    base: dict[str, object] = dict(
        contract_id="c1",
        region=R,
        client_id="cl1",
        user_id="u1",
        node_id="n1",
        owner_id="o1",
        ram_gb=8,
        vram_gb=4,
        duration_s=600,
        start_ms=1_000_000,
        end_ms=1_600_000,
        price_pusd=700,
        max_price_pusd=1000,
    )
    base.update(kw)
    return Contract(**base)  # type: ignore[arg-type]


def _bid(**kw: object) -> Bid:
    base: dict[str, object] = dict(
        bid_id="b1",
        region=R,
        client_id="cl1",
        user_id="u1",
        ram_gb=8,
        vram_gb=4,
        duration_s=600,
        max_price_pusd=1000,
    )
    base.update(kw)
    return Bid(**base)  # type: ignore[arg-type]


def _decode(messages: list[tuple[str, bytes]]) -> list[tuple[str, dict]]:
    return [(ch, json.loads(payload)) for ch, payload in messages]


def _settled(contract_id: str = "c1", status: str = "completed", **kw: object) -> ContractSettled:
    base: dict[str, object] = dict(
        event_id=f"{R}:9",
        region=R,
        ts_ms=1_600_000,
        contract_id=contract_id,
        node_id="n1",
        client_id="cl1",
        ram_gb=8,
        vram_gb=4,
        status=status,
        used_s=600,
        egress_mgb=0,
        cost_pusd=5_040_000,
        settlement_hash="ab" * 32,
        completed_ms=1_600_000,
    )
    base.update(kw)
    return ContractSettled(**base)  # type: ignore[arg-type]


def test_bid_fill_reaches_trades_fills_bids_and_node() -> None:
    """A bid's fill is a trade, a fill and a bid update for the renter, and a start for the node."""
    n = Notifier(KEYS, R)
    placed = n.on_event(BidPlaced(event_id=f"{R}:1", region=R, ts_ms=1, bid=_bid()))
    bid_data = msgspec.to_builtins(_bid())
    assert _decode(placed) == [
        (
            KEYS.user_channel("u1"),
            {
                "channel": "bids",
                "data": {"notice": "bid_placed", "ts_ms": 1, "bid": bid_data, "contract": None},
            },
        )
    ]
    ev = ContractCreated(
        event_id=f"{R}:2",
        region=R,
        ts_ms=1_000_000,
        contract=_contract(bid_id="b1"),
        bid_id="b1",
        bid_filled_ram_gb=8,
        bid_filled_vram_gb=4,
        bid_status="filled",
    )
    got = _decode(n.on_event(ev))
    by_ws = {(ch, m["channel"]): m["data"] for ch, m in got}
    assert by_ws[(KEYS.trades_channel(R), f"trades:{R}")] == {
        "contract_id": "c1",
        "node_id": "n1",
        "region": R,
        "price_pusd": 700,
        "ram_gb": 8,
        "vram_gb": 4,
        "duration_s": 600,
        "ts_ms": 1_000_000,
    }
    assert by_ws[(KEYS.user_channel("u1"), "fills")] == msgspec.to_builtins(ev.contract)
    bid = by_ws[(KEYS.user_channel("u1"), "bids")]
    assert (bid["notice"], bid["ts_ms"], bid["contract"]["contract_id"]) == (
        "bid_filled",
        1_000_000,
        "c1",
    )
    assert bid["bid"] == bid_data | {
        "filled_ram_gb": 8,
        "filled_vram_gb": 4,
        "status": "filled",
        "contract_ids": ["c1"],
    }
    node = by_ws[(KEYS.node_channel("n1"), "node:n1")]
    assert node["notice"] == "contract_started" and node["contract"]["contract_id"] == "c1"
    # the filled bid is forgotten: a late cancel for it addresses nobody
    assert n.on_event(BidCancelled(event_id=f"{R}:3", region=R, ts_ms=2, bid_id="b1")) == []


def test_cancel_and_expiry_reach_the_bidder() -> None:
    """Cancelled and expired bids are announced on the bidder's channel, once."""
    n = Notifier(KEYS, R)
    n.remember(_bid(bid_id="b1", user_id="u7"))
    n.remember(_bid(bid_id="b2", user_id="u8"))
    got = _decode(n.on_event(BidExpired(event_id=f"{R}:4", region=R, ts_ms=5, bid_id="b1")))
    expired = msgspec.to_builtins(_bid(bid_id="b1", user_id="u7", status="expired"))
    assert got == [
        (
            KEYS.user_channel("u7"),
            {
                "channel": "bids",
                "data": {"notice": "bid_expired", "ts_ms": 5, "bid": expired, "contract": None},
            },
        )
    ]
    got = _decode(n.on_event(BidCancelled(event_id=f"{R}:5", region=R, ts_ms=6, bid_id="b2")))
    assert [(ch, m["data"]["notice"], m["data"]["bid"]["status"]) for ch, m in got] == [
        (KEYS.user_channel("u8"), "bid_cancelled", "cancelled")
    ]
    assert not n.knows_bid("b1") and not n.knows_bid("b2")


def test_extend_then_settle_notify_renter_and_node_with_whole_contract() -> None:
    """Extension and settlement reach the renter (events) and the node (updated contract)."""
    n = Notifier(KEYS, R)
    n.remember(_contract())
    ext = ContractExtended(
        event_id=f"{R}:6",
        region=R,
        ts_ms=1_100_000,
        contract_id="c1",
        duration_s=900,
        end_ms=1_900_000,
        version=2,
    )
    got = _decode(n.on_event(ext))
    extended = msgspec.to_builtins(
        _contract(duration_s=900, end_ms=1_900_000, version=2, extensions=1)
    )
    note = {"notice": "contract_extended", "ts_ms": 1_100_000, "contract": extended}
    assert got == [
        (KEYS.user_channel("u1"), {"channel": "contracts", "data": note}),
        (KEYS.node_channel("n1"), {"channel": "node:n1", "data": note}),
    ]
    got = _decode(n.on_event(_settled()))
    assert got[0][1]["channel"] == "contracts" and got[0][1]["data"] == got[1][1]["data"]
    ended = got[1][1]["data"]
    assert ended["notice"] == "contract_ended"
    assert ended["contract"]["status"] == "completed"
    assert ended["contract"]["cost_pusd"] == 5_040_000
    assert ended["contract"]["end_ms"] == 1_900_000
    assert not n.knows_contract("c1")


def test_failover_notifies_both_nodes_and_the_renter() -> None:
    """A failover tells the old node it lost the contract, the new node it starts, the renter both."""
    n = Notifier(KEYS, R)
    n.remember(_contract())
    old = _decode(n.on_event(_settled(status="failed_over", successor_id="c2", used_s=100)))
    assert old[0][0] == KEYS.user_channel("u1")
    assert old[0][1]["data"]["notice"] == "contract_failed_over"
    assert old[0][1]["data"]["contract"]["status"] == "failed_over"
    assert old[1][0] == KEYS.node_channel("n1")
    assert old[1][1]["data"]["notice"] == "contract_failed_over"
    assert old[1][1]["data"]["contract"]["successor_id"] == "c2"
    succ = _contract(contract_id="c2", node_id="n2", predecessor_id="c1", start_ms=1_100_000)
    new = _decode(
        n.on_event(ContractCreated(event_id=f"{R}:8", region=R, ts_ms=1_100_000, contract=succ))
    )
    assert [ch for ch, _ in new] == [KEYS.user_channel("u1"), KEYS.node_channel("n2")]
    notice = new[0][1]
    assert notice["channel"] == "contracts"
    assert notice["data"]["notice"] == "contract_started"
    assert notice["data"]["contract"]["contract_id"] == "c2"
    assert notice["data"]["contract"]["predecessor_id"] == "c1"
    assert new[1][1]["data"]["notice"] == "contract_started"


def test_contract_ending_notice_goes_out_once_at_least_60s_before_end() -> None:
    """The ending notice is due ENDING_NOTICE_LEAD_MS before the end, once, and re-arms on extend."""
    assert ENDING_NOTICE_LEAD_MS >= 60_000
    n = Notifier(KEYS, R)
    n.remember(_contract())
    due_at = 1_600_000 - ENDING_NOTICE_LEAD_MS
    assert n.next_notice_ms() == due_at
    assert n.due_notices(due_at - 1) == []
    got = _decode(n.due_notices(due_at))
    assert [(ch, m["data"]["notice"]) for ch, m in got] == [
        (KEYS.node_channel("n1"), "contract_ending")
    ]
    assert n.due_notices(due_at + 1) == []
    assert n.next_notice_ms() is None
    n.on_event(
        ContractExtended(
            event_id=f"{R}:6",
            region=R,
            ts_ms=due_at,
            contract_id="c1",
            duration_s=1200,
            end_ms=2_200_000,
            version=2,
        )
    )
    assert n.next_notice_ms() == 2_200_000 - ENDING_NOTICE_LEAD_MS
    # a settled contract is never announced as ending
    n.on_event(_settled())
    assert n.due_notices(3_000_000) == [] and n.next_notice_ms() is None


def test_short_contract_ending_is_due_at_once_and_unrelated_events_say_nothing() -> None:
    """A contract shorter than the lead is announced as ending right away; other events are silent."""
    n = Notifier(KEYS, R)
    short = _contract(start_ms=1_000_000, end_ms=1_030_000, duration_s=30)
    n.on_event(ContractCreated(event_id=f"{R}:2", region=R, ts_ms=1_000_000, contract=short))
    assert n.next_notice_ms() is not None and n.next_notice_ms() <= 1_000_000
    assert len(n.due_notices(1_000_000)) == 1
    assert (
        n.on_event(
            NodeOffline(event_id=f"{R}:3", region=R, ts_ms=1, node_id="n1", last_heartbeat_ms=0)
        )
        == []
    )


def test_market_summary_shape() -> None:
    """The market channel's summary has exactly the fields of its note."""
    assert list(market_summary(R, 3, 10, 4, 500)) == list(SummaryNote.__struct_fields__)
    assert market_summary(R, 3, 10, 4, 500) == {
        "region": R,
        "nodes": 3,
        "available_ram_gb": 10,
        "available_vram_gb": 4,
        "best_ask_pusd": 500,
    }


def test_lookups_of_closed_objects_still_address_their_messages() -> None:
    """A settlement or cancellation of something the Notifier never saw goes out once the
    engine looked the object up (already closed by then)."""
    n = Notifier(KEYS, R)
    assert n.on_event(_settled()) == []
    n.remember(_contract(status="completed"))
    assert n.next_notice_ms() is None  # a closed contract is never announced as ending
    got = _decode(n.on_event(_settled()))
    assert [(ch, m["channel"]) for ch, m in got] == [
        (KEYS.user_channel("u1"), "contracts"),
        (KEYS.node_channel("n1"), "node:n1"),
    ]
    n.remember(_bid(bid_id="b9", user_id="u9", status="cancelled"))
    got = _decode(n.on_event(BidCancelled(event_id=f"{R}:9", region=R, ts_ms=1, bid_id="b9")))
    assert [ch for ch, _ in got] == [KEYS.user_channel("u9")]
