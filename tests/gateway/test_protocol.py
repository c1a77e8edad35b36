"""The wire protocol (`gateway.protocol`): every message round-trips, the heartbeat body has one
definition that every side uses, the vocabularies equal the engine's, and the module stays
light (no server needed)."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from gateway import protocol as p

_MS = 1_700_000_000_000


def _contract(**kw: Any) -> p.ContractOut:
    fields: dict[str, Any] = {
        "contract_id": "c1",
        "client_id": "cl1",
        "node_id": "n1",
        "region": "us-east-2",
        "ram_gb": 8,
        "vram_gb": 4,
        "duration_sec": 600,
        "start_ms": _MS,
        "end_ms": _MS + 600_000,
        "price_per_gb_sec": 7e-7,
        "egress_price_per_gb": 0.01,
        "max_price_per_gb_sec": 1e-6,
        "status": "active",
        "bid_id": "b1",
        "predecessor_id": None,
        "successor_id": None,
        "extensions": 0,
        "used_sec": 0,
        "egress_gb": 0.0,
        "total_cost_usd": 0.0,
        "settlement_hash": None,
        "completed_ms": 0,
        "live": p.ContractLive(
            elapsed_sec=10,
            remaining_sec=590,
            accrued_cost_usd=8.4e-5,
            node_status="active",
            node_last_heartbeat_ms=_MS,
            accrued_cost_pusd=84_000_000,
        ),
        "price_pusd": 700_000,
        "egress_price_pusd": 10_000_000_000,
        "max_price_pusd": 1_000_000,
        "total_cost_pusd": 0,
    }
    return p.ContractOut(**(fields | kw))


def _bid() -> p.BidOut:
    return p.BidOut(
        bid_id="b1",
        client_id="cl1",
        region="us-east-2",
        ram_gb=8,
        vram_gb=4,
        duration_sec=600,
        max_price_per_gb_sec=1e-6,
        client_lat=40.7,
        client_lng=-74.0,
        max_distance_km=None,
        min_uptime_score=0.0,
        prefer_local=True,
        node_type="mist_node",
        allow_split=False,
        min_fill_gb=0,
        filled_ram_gb=8,
        filled_vram_gb=4,
        remaining_ram_gb=0,
        remaining_vram_gb=0,
        status="filled",
        created_ms=_MS,
        expires_ms=0,
        contract_ids=["c1"],
        max_price_pusd=1_000_000,
    )


def _beat() -> p.Beat:
    return p.Beat(
        node_id="n1",
        available_ram_gb=48,
        available_vram_gb=12,
        cpu_usage_pct=12.5,
        gpu_usage_pct=3.0,
        temperature_c=61,
        bandwidth_mbps=940,
        latitude=40.7,
        longitude=-74.0,
    )


_BOOK = p.BookOut(
    region="us-east-2",
    ts_ms=_MS,
    best_ask_per_gb_sec=7e-7,
    best_bid_per_gb_sec=None,
    last_fill_per_gb_sec=6.5e-7,
    ask_depth=[p.DepthLevel(price_per_gb_sec=7e-7, gb=24, price_pusd=700_000)],
    bid_depth=[],
    volume_24h_gb_sec=7200,
    best_ask_pusd=700_000,
    best_bid_pusd=None,
    last_fill_pusd=650_000,
)
_TRADE = p.Trade(
    contract_id="c1",
    node_id="n1",
    region="us-east-2",
    ram_gb=8,
    vram_gb=4,
    duration_sec=600,
    price_per_gb_sec=7e-7,
    price_pusd=700_000,
    ts_ms=_MS,
)
_SUMMARY = p.MarketSummary(
    region="us-east-2",
    nodes=3,
    available_ram_gb=64,
    available_vram_gb=16,
    best_ask_per_gb_sec=7e-7,
    best_ask_pusd=700_000,
)
_BID_NOTICE = p.BidNotice(notice="bid_filled", ts_ms=_MS, bid=_bid(), contract=_contract())
_CONTRACT_NOTICE = p.ContractNotice(
    notice="contract_ended",
    ts_ms=_MS,
    contract=_contract(status="completed", total_cost_usd=0.00504, total_cost_pusd=5_040_000_000),
)
_LEASE_NOTICE = p.LeaseNotice(
    notice="lease_ready",
    ts_ms=_MS,
    lease=p.LeaseEndpoint(
        contract_id="c1",
        node_id="n1",
        kind="ram",
        state="ready",
        host="10.0.0.7",
        port=7001,
        tls=False,
        expires_ms=_MS + 600_000,
        ram_gb=8,
    ),
)

_EVENTS: dict[str, p.PublicEvent] = {
    "quotes:us-east-2": _BOOK,
    "trades:us-east-2": _TRADE,
    "market": _SUMMARY,
    "fills": _contract(),
    "bids": _BID_NOTICE,
    "contracts": _CONTRACT_NOTICE,
    "node:n1": _CONTRACT_NOTICE,
    "leases": _LEASE_NOTICE,
    "leases:n1": p.LeaseNotice(notice="lease_open", ts_ms=_MS, lease=_LEASE_NOTICE.lease),
    "node:n1 standing": p.TrustNotice(
        notice="warned",
        ts_ms=_MS,
        node_id="n1",
        uptime_score=58.5,
        uptime_history_windows=720,
        suspension_due_ms=_MS + 86_400_000,
    ),
}

CLIENT_MESSAGES: list[p.ClientMessage] = [
    p.SubscribeOp(channels=["quotes:us-east-2", "fills"]),
    p.UnsubscribeOp(channels=["fills"]),
    p.HeartbeatOp(beats=[_beat(), p.Beat(node_id="n2", available_ram_gb=1, available_vram_gb=0)]),
    p.HeartbeatOp(beats=[_beat()], ref="batch-7"),
    p.HeartbeatOp(
        beats=[
            p.Beat(
                node_id="n3",
                available_ram_gb=2,
                available_vram_gb=0,
                leases=[p.LeaseMeter(contract_id="c1", egress_bytes=10, peak_memory_bytes=99)],
            )
        ]
    ),
    p.PingOp(),
    p.PingOp(ref=3),
]


def _event(channel: str, data: p.PublicEvent) -> p.Event:
    """The frame of `channel` (a key of `_EVENTS`: the channel, then a label if more than one
    event of the channel is listed) carrying `data`."""
    return p.Event(channel=channel.split(" ")[0], data=msgspec.Raw(p.encode(data)))


SERVER_MESSAGES: list[p.ServerMessage] = [
    p.Subscribed(channels=["quotes:us-east-2", "fills"]),
    p.Unsubscribed(channels=["fills"]),
    p.HeartbeatAck(
        ref=1,
        results=[
            p.BeatResult("n1", "ok"),
            p.BeatResult("n2", "too_soon", 25_000),
            p.BeatResult("n3", "not_found"),
            p.BeatResult("n4", "forbidden"),
            p.BeatResult("n5", "deactivated"),
        ],
    ),
    p.Pong(ref=None),
    p.Pong(ref="x"),
    p.ErrorReply(
        error=p.ErrorDetail(
            code="too_many_channels", message="at most 256 channels per socket", field="channels"
        )
    ),
    p.ErrorReply(error=p.ErrorDetail(code="forbidden", message="no"), channel="node:n9"),
    p.ErrorReply(error=p.ErrorDetail(code="unavailable", message="retry"), ref=4),
    *(_event(channel, data) for channel, data in _EVENTS.items()),
    p.Batch(messages=[_event("market", _SUMMARY), p.Pong(ref=1)]),
]


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message: p.ClientMessage) -> None:
    """Every client -> server message decodes to itself (as the gateway reads it)."""
    assert p.decode_client_message(p.encode(message)) == message


@pytest.mark.parametrize("message", SERVER_MESSAGES, ids=lambda m: type(m).__name__)
def test_server_messages_round_trip(message: p.ServerMessage) -> None:
    """Every server -> client message decodes to itself (as a client reads it)."""
    assert p.decode_server_message(p.encode(message)) == message


@pytest.mark.parametrize("channel", list(_EVENTS))
def test_each_channels_event_round_trips(channel: str) -> None:
    """The event of every kind of channel decodes, from an `Event`'s data, to itself."""
    frame = p.decode_server_message(p.encode(_event(channel, _EVENTS[channel])))
    assert isinstance(frame, p.Event)
    assert p.decode_event(frame.channel, frame.data) == _EVENTS[channel]
    kind = p.CHANNEL_EVENTS[channel.partition(":")[0]]
    assert type(_EVENTS[channel]) in (typing.get_args(kind) or (kind,))


def test_every_wire_type_is_covered_above() -> None:
    """A message or shape added to the protocol is added to the round trips too."""
    covered: set[type] = set()

    def walk(value: Any) -> None:
        if isinstance(value, msgspec.Struct):
            covered.add(type(value))
            for name in value.__struct_fields__:
                walk(getattr(value, name))
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for message in [*CLIENT_MESSAGES, *SERVER_MESSAGES, *_EVENTS.values()]:
        walk(message)
    covered.add(p.Heartbeat)  # the REST body: `test_the_heartbeat_body_is_one_definition`
    covered.add(p.ErrorBody)  # REST's error body: `test_rest_shapes_round_trip`
    covered.update(_LEASE_BODIES)  # delivery's REST bodies: `test_rest_shapes_round_trip`
    defined = {
        t
        for t in vars(p).values()
        if isinstance(t, type)
        and issubclass(t, msgspec.Struct)
        and t.__module__ == p.__name__
        and not t.__name__.startswith("_")
    }
    assert defined - covered == set()


def test_rest_shapes_round_trip() -> None:
    """The REST bodies defined here decode to themselves too."""
    error = p.ErrorBody(p.ErrorDetail(code="not_found", message="no such contract"))
    assert msgspec.json.decode(p.encode(error), type=p.ErrorBody) == error
    body = _beat().body()
    assert msgspec.json.decode(p.encode(body), type=p.Heartbeat) == body
    for shape in _LEASE_BODIES.values():
        assert msgspec.json.decode(p.encode(shape), type=type(shape)) == shape


def test_lease_reports_refuse_what_a_node_cannot_mean() -> None:
    """A node's delivery reports are checked at the edge: a port out of range, a host with a
    scheme or spaces, a digest that is not SHA-256 hex, a negative meter."""
    bad = [
        (p.LeaseReady, b'{"host":"10.0.0.7","port":0}'),
        (p.LeaseReady, b'{"host":"redis://x","port":7001}'),
        (p.LeaseReady, b'{"host":"a b","port":7001}'),
        (p.LeaseClosed, b'{"egress_bytes":1,"peak_memory_bytes":1,"digest":"ABC"}'),
        (p.LeaseClosed, b'{"egress_bytes":-1,"peak_memory_bytes":1}'),
        (p.LeaseMeter, b'{"contract_id":"c 1","egress_bytes":1,"peak_memory_bytes":1}'),
    ]
    for shape, raw in bad:
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(raw, type=shape)


_LEASE_BODIES: dict[type, msgspec.Struct] = {
    p.LeaseReady: p.LeaseReady(host="node-7.example.net", port=7001, tls=True),
    p.LeaseClosed: p.LeaseClosed(egress_bytes=5, peak_memory_bytes=6, digest="ab" * 32),
    p.LeaseCredentials: p.LeaseCredentials(contract_id="c1", username="lease-c1", password="s"),
    p.LeaseAccess: p.LeaseAccess(
        contract_id="c1",
        node_id="n1",
        kind="ram",
        state="ready",
        delivered=True,
        url="redis://lease-c1:s@10.0.0.7:7001",
        host="10.0.0.7",
        port=7001,
        username="lease-c1",
        password="s",
        tls=False,
        expires_ms=_MS,
    ),
}


def test_decode_event_refuses_what_is_not_the_channels_event() -> None:
    """An unknown kind of channel, or another channel's event, is an error, not a guess."""
    with pytest.raises(ValueError, match="unknown channel"):
        p.decode_event("news", b"{}")
    with pytest.raises(msgspec.ValidationError):
        p.decode_event("fills", p.encode(_TRADE))


def test_clients_accept_new_fields_and_the_server_refuses_unknown_ones() -> None:
    """The compatibility rule: a field a newer gateway adds does not break an older client; a
    field the gateway does not know is an error, not silently dropped."""
    ack = (
        b'{"type":"heartbeat_ack","ref":1,"results":[{"node_id":"n","outcome":"ok","new":1}],"x":2}'
    )
    assert p.decode_server_message(ack) == p.HeartbeatAck(ref=1, results=[p.BeatResult("n", "ok")])
    data = msgspec.json.decode(p.encode(_contract()))
    assert p.decode_event("fills", msgspec.json.encode(data | {"added_later": 1})) == _contract()
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        p.decode_client_message(b'{"op":"ping","reff":1}')
    beat = b'{"op":"heartbeat","beats":[{"node_id":"n","available_ram_gb":1,"available_vram_gb":0,"ram":1}]}'
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        p.decode_client_message(beat)


def test_the_heartbeat_body_is_one_definition() -> None:
    """REST's body, the WebSocket's beats, the agent and its simulated fleet all use the one
    `Heartbeat` of the protocol, so their fields cannot drift apart; every field reaches the
    market."""
    import agent.client
    import agent.runner
    import agent.shards
    import agent.simulation
    from engine.types import Heartbeat as MarketHeartbeat
    from gateway import ws
    from gateway.heartbeats import market_heartbeat
    from gateway.routes import OPERATIONS

    [rest] = [op for op in OPERATIONS if op.path == "/api/nodes/{node_id}/heartbeat"]
    assert rest.body is p.Heartbeat
    assert ws.HeartbeatOp is p.HeartbeatOp and agent.client.HeartbeatOp is p.HeartbeatOp
    for module in (agent.runner, agent.shards, agent.simulation):
        assert module.Beat is p.Beat
    assert issubclass(p.Beat, p.Heartbeat)
    assert p.Beat.__struct_fields__ == (*p.Heartbeat.__struct_fields__, "node_id")
    assert msgspec.inspect.type_info(p.HeartbeatOp).fields[0].type.item_type.cls is p.Beat

    beat = _beat()
    beat.leases = [p.LeaseMeter(contract_id="c1", egress_bytes=3, peak_memory_bytes=4)]
    assert beat.body() == p.Heartbeat(
        **{f: getattr(beat, f) for f in p.Heartbeat.__struct_fields__}
    )
    assert "node_id" not in msgspec.json.decode(p.encode(beat.body()))
    market = market_heartbeat("n1", beat)
    renamed = {"latitude": "lat", "longitude": "lng"}
    for field in p.Heartbeat.__struct_fields__:
        mine, theirs = getattr(market, renamed.get(field, field)), getattr(beat, field)
        assert msgspec.to_builtins(mine) == msgspec.to_builtins(theirs), field
    assert set(MarketHeartbeat.__struct_fields__) == {
        "node_id",
        *(renamed.get(f, f) for f in p.Heartbeat.__struct_fields__),
    }
    assert p.Heartbeat(available_ram_gb=1, available_vram_gb=0, latitude=1.0).location_error()


def test_vocabularies_equal_the_engines() -> None:
    """The protocol keeps its own copies (it must not import the engine, nor the engine the
    gateway); each equals the engine's, so neither can change alone."""
    from engine import core, notify, types
    from engine.market import HeartbeatResult

    pairs = [
        (p.HeartbeatOutcome, HeartbeatResult),
        (p.NodeType, types.NodeType),
        (p.NodeStatus, types.NodeStatus),
        (p.ContractStatus, types.ContractStatus),
        (p.BidStatus, types.BidStatus),
        (p.ContractNoticeKind, notify.ContractNoticeKind),
        (p.BidNoticeKind, notify.BidNoticeKind),
    ]
    for ours, engines in pairs:
        assert get_args(ours) == get_args(engines)
    assert (p.MAX_GB, p.PUSD_PER_USD) == (core.MAX_GB, types.PUSD_PER_USD)


def test_the_module_imports_only_msgspec_and_the_standard_library() -> None:
    """What the agent installs is enough for it: no Starlette, no engine, no Redis client."""
    source = Path(p.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "typing", "msgspec"}
    code = (
        "import sys, gateway.protocol\n"
        "print(sorted(m for m in ('starlette', 'engine', 'redis', 'numba', 'numpy', 'uvicorn')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
