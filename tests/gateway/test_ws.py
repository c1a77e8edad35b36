"""`/ws` end to end: the real app under uvicorn on a loopback port, real Redis and Postgres,
the `websockets` client library."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import msgspec
import pytest
import redis.asyncio as aioredis
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.errors import MarketError
from engine.keys import Keys
from engine.notify import ContractNote, encode_message
from engine.settings import Settings
from engine.types import Contract, Quote
from gateway import protocol
from gateway.app import create_app
from gateway.hub import Hub
from tests.conftest import publish_all
from tests.gateway.conftest import (
    JWT_SECRET,
    Actor,
    Gateway,
    bearer,
    market_event,
    market_message,
    numbered,
    register_node,
    signup,
    trade_message,
)

WAIT_S = 10.0


@dataclass
class Live:
    """A gateway served by uvicorn on 127.0.0.1, with an HTTP client and its lifespan state."""

    gw: Gateway
    ws_url: str
    state: dict[str, Any]
    keys: Keys

    async def socket(self, actor: Actor | None = None, **kw: Any) -> ClientConnection:
        headers = {"X-API-Key": actor.key} if actor is not None else None
        return await connect(self.ws_url, additional_headers=headers, open_timeout=WAIT_S, **kw)


@asynccontextmanager
async def serving(settings: Settings, keys: Keys, **config: Any) -> AsyncIterator[Live]:
    """The app under uvicorn on a free loopback port (websockets-sansio, no per-message deflate
    unless `config` says otherwise), until the block ends."""
    app = create_app(settings)
    options: dict[str, Any] = {"ws": "websockets-sansio", "ws_per_message_deflate": False}
    options.update(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, loop="none", lifespan="on", log_level="warning",
            **options,
        )
    )  # fmt: skip
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as client:
            yield Live(
                gw=Gateway(app=app, client=client, state=server.lifespan.state, settings=settings),
                ws_url=f"ws://127.0.0.1:{port}/ws",
                state=server.lifespan.state,
                keys=keys,
            )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def live(settings: Settings, keys: Keys) -> AsyncIterator[Live]:
    async with serving(settings, keys) as server:
        yield server


async def recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        return json.loads(await ws.recv())


async def request(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(message))
    return await recv(ws)


async def subscribe(ws: ClientConnection, *channels: str) -> dict[str, Any]:
    return await request(ws, {"op": "subscribe", "channels": list(channels)})


async def closed_with(ws: ClientConnection) -> int | None:
    """Read until the server closes the socket; its close code."""
    async with asyncio.timeout(WAIT_S):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


def _token(user_id: str, role: str, exp_s: int, settings: Settings) -> str:
    now = int(time.time())
    claims = {
        "sub": user_id,
        "role": role,
        "iat": now,
        "exp": exp_s,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


# ---------------------------------------------------------------------------------------------
# authentication


async def test_connect_without_valid_credentials_is_refused(live: Live) -> None:
    """No credentials, a wrong key, a forged or expired token: refused before accept (403)."""
    settings = live.gw.settings
    bad = [
        live.ws_url,
        f"{live.ws_url}?api_key=mnm_{'x' * 43}",
        f"{live.ws_url}?token=not-a-jwt",
        f"{live.ws_url}?token={_token('u', 'user', int(time.time()) - 10, settings)}",
    ]
    for url in bad:
        with pytest.raises(InvalidStatus) as info:
            await connect(url, open_timeout=WAIT_S)
        assert info.value.response.status_code == 403, url


async def test_api_key_header_query_and_bearer_all_work(live: Live) -> None:
    """X-API-Key, ?api_key=, ?token= and Authorization: Bearer each open a socket."""
    user = await signup(live.gw, "user")
    token = (await bearer(live.gw, user))["Authorization"].split()[1]
    sockets = [
        await live.socket(user),
        await connect(f"{live.ws_url}?api_key={user.key}", open_timeout=WAIT_S),
        await connect(f"{live.ws_url}?token={token}", open_timeout=WAIT_S),
        await connect(
            live.ws_url,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=WAIT_S,
        ),
    ]
    for ws in sockets:
        assert await request(ws, {"op": "ping", "ref": 7}) == {"type": "pong", "ref": 7}
        await ws.close()


async def test_socket_closes_with_4401_when_its_jwt_expires(live: Live) -> None:
    """A socket authenticated by JWT is closed (4401) when the token expires, not before."""
    user = await signup(live.gw, "user")
    exp_s = int(time.time()) + 2
    ws = await connect(
        f"{live.ws_url}?token={_token(user.user_id, 'user', exp_s, live.gw.settings)}",
        open_timeout=WAIT_S,
    )
    assert (await subscribe(ws, "market"))["type"] == "subscribed"
    assert await closed_with(ws) == 4401
    assert time.time() >= exp_s - 0.05
    # an API-key socket opened alongside is unaffected
    other = await live.socket(user)
    assert (await request(other, {"op": "ping"}))["type"] == "pong"
    await other.close()


async def test_socket_closes_with_4401_when_its_api_key_is_revoked(live: Live) -> None:
    """Revoking the key a socket was opened with closes it (4401) at the next re-check."""
    services = live.state["ws"]
    services.options = msgspec.structs.replace(services.options, reauth_interval_s=0.05)
    user = await signup(live.gw, "user")
    ws = await live.socket(user)
    assert (await request(ws, {"op": "ping"}))["type"] == "pong"
    r = await live.gw.client.delete(f"/api/auth/api-keys/{user.key_id}", headers=user.headers)
    assert r.status_code == 200, r.text
    assert await closed_with(ws) == 4401


async def test_handshake_gets_503_when_credentials_cannot_be_checked(live: Live) -> None:
    """With the accounts database gone, a key cannot be checked: 503 (retry), not 403."""
    user = await signup(live.gw, "user")
    await live.state["pool"].close()
    with pytest.raises(InvalidStatus) as info:
        await live.socket(user)
    assert info.value.response.status_code == 503
    assert json.loads(info.value.response.body)["error"]["code"] == "unavailable"


# ---------------------------------------------------------------------------------------------
# channels


def _quote(region: str) -> Quote:
    return Quote(
        region=region,
        ts_ms=1_700_000_000_000,
        best_ask_pusd=700_000,
        best_bid_pusd=None,
        ask_depth=[(700_000, 24), (900_001, 8)],
        bid_depth=[],
        last_fill_pusd=650_000,
        volume_24h_gb_s=7200,
    )


def _contract(user_id: str, **kw: Any) -> Contract:
    fields: dict[str, Any] = {
        "contract_id": "c1",
        "region": "us-east-2",
        "client_id": "cl1",
        "user_id": user_id,
        "node_id": "n1",
        "owner_id": "o1",
        "ram_gb": 8,
        "vram_gb": 4,
        "duration_s": 600,
        "start_ms": 1_700_000_000_000,
        "end_ms": 1_700_000_600_000,
        "price_pusd": 700_000,
        "max_price_pusd": 1_000_000,
        "version": 3,
    }
    return Contract(**(fields | kw))


async def test_events_reach_the_subscribers_of_their_channel_only(
    live: Live, redis: aioredis.Redis
) -> None:
    """A message published on Redis reaches every socket subscribed to its channel, no other,
    as its channel's public event: REST's names and units, USD with exact pico-USD twins."""
    alice, bob = await signup(live.gw, "user"), await signup(live.gw, "user")
    a1, a2, b = await live.socket(alice), await live.socket(alice), await live.socket(bob)
    assert await subscribe(a1, "quotes:us-east-2", "fills") == {
        "type": "subscribed",
        "channels": ["quotes:us-east-2", "fills"],
    }
    assert (await subscribe(a2, "quotes:us-east-2"))["type"] == "subscribed"
    assert (await subscribe(b, "quotes:eu-west-1", "fills"))["type"] == "subscribed"

    keys = live.keys
    await redis.publish(
        keys.quotes_channel("us-east-2"), encode_message("quotes:us-east-2", _quote("us-east-2"))
    )
    await redis.publish(
        keys.quotes_channel("eu-west-1"), encode_message("quotes:eu-west-1", _quote("eu-west-1"))
    )
    alices = _contract(alice.user_id)
    await redis.publish(keys.user_channel(alice.user_id), encode_message("fills", alices))
    note = ContractNote(notice="contract_extended", ts_ms=1, contract=alices)
    await redis.publish(keys.user_channel(alice.user_id), encode_message("contracts", note))
    bobs = _contract(bob.user_id, contract_id="c2")
    await redis.publish(keys.user_channel(bob.user_id), encode_message("fills", bobs))

    book = {
        "region": "us-east-2",
        "ts_ms": 1_700_000_000_000,
        "best_ask_per_gb_sec": 7e-7,
        "best_bid_per_gb_sec": None,
        "last_fill_per_gb_sec": 6.5e-7,
        "ask_depth": [
            {"price_per_gb_sec": 7e-7, "gb": 24, "price_pusd": 700_000},
            {"price_per_gb_sec": 9.00001e-7, "gb": 8, "price_pusd": 900_001},
        ],
        "bid_depth": [],
        "volume_24h_gb_sec": 7200,
        "best_ask_pusd": 700_000,
        "best_bid_pusd": None,
        "last_fill_pusd": 650_000,
    }
    quote = {"type": "event", "channel": "quotes:us-east-2", "data": book}
    assert await recv(a1) == quote
    fill = await recv(a1)
    assert fill["channel"] == "fills"
    assert fill["data"]["contract_id"] == "c1" and fill["data"]["duration_sec"] == 600
    assert (fill["data"]["price_per_gb_sec"], fill["data"]["price_pusd"]) == (7e-7, 700_000)
    assert not {"duration_s", "version", "user_id", "owner_id", "cost_pusd"} & set(fill["data"])
    assert await recv(a2) == quote
    other = await recv(b)
    assert other["channel"] == "quotes:eu-west-1" and other["data"]["region"] == "eu-west-1"
    assert (await recv(b))["data"]["contract_id"] == "c2"
    # nothing else was on its way: the next thing each socket reads is the answer to a ping
    for ws in (a1, a2, b):
        assert (await request(ws, {"op": "ping"}))["type"] == "pong"
        await ws.close()


async def test_batch_socket_gets_queued_messages_in_one_frame_in_order(
    live: Live, redis: aioredis.Redis
) -> None:
    """With ?batch=1, messages already queued together arrive as one `batch` frame; flattened,
    the stream is exactly what a plain socket gets."""
    user = await signup(live.gw, "user")
    plain = await live.socket(user)
    batched = await connect(f"{live.ws_url}?api_key={user.key}&batch=1", open_timeout=WAIT_S)
    for ws in (plain, batched):
        assert (await subscribe(ws, "market"))["type"] == "subscribed"
    n = 200
    await publish_all(redis, live.keys.market_channel, (market_message(i) for i in range(n)))
    frames = []
    flat: list[dict[str, Any]] = []
    while len(flat) < n:
        msg = await recv(batched)
        frames.append(msg)
        flat.extend(msg["messages"] if msg["type"] == "batch" else [msg])
    expected = [market_event(i) for i in range(n)]
    assert flat == expected
    assert [await recv(plain) for _ in range(n)] == expected
    assert any(f["type"] == "batch" for f in frames)  # a burst of 200 coalesces somewhere
    for ws in (plain, batched):
        await ws.close()


async def test_unsubscribe_stops_delivery(live: Live, redis: aioredis.Redis) -> None:
    """After `unsubscribed`, nothing more arrives from that channel."""
    user = await signup(live.gw, "user")
    ws = await live.socket(user)
    await subscribe(ws, "market", "trades:us-east-2")
    reply = await request(ws, {"op": "unsubscribe", "channels": ["market"]})
    assert reply == {"type": "unsubscribed", "channels": ["market"]}
    await redis.publish(live.keys.market_channel, market_message(1))
    await redis.publish(live.keys.trades_channel("us-east-2"), trade_message("us-east-2"))
    assert await recv(ws) == {
        "type": "event",
        "channel": "trades:us-east-2",
        "data": {
            "contract_id": "c1",
            "node_id": "n1",
            "region": "us-east-2",
            "ram_gb": 8,
            "vram_gb": 4,
            "duration_sec": 600,
            "price_per_gb_sec": 7e-7,
            "price_pusd": 700_000,
            "ts_ms": 1_700_000_000_000,
        },
    }
    await ws.close()


async def test_channel_authorization(live: Live, redis: aioredis.Redis) -> None:
    """node:<id> is for its owner only; unknown or malformed channels are refused; the socket
    stays open and keeps its other subscriptions."""
    owner, other = await signup(live.gw, "provider"), await signup(live.gw, "provider")
    node_id = await register_node(live.gw, owner)
    ws = await live.socket(other)
    await ws.send(
        json.dumps(
            {
                "op": "subscribe",
                "channels": [
                    f"node:{node_id}",
                    "node:nope",
                    "bogus",
                    "quotes:Bad_Region",
                    "market",
                ],
            }
        )
    )
    replies = [await recv(ws) for _ in range(5)]
    errors = {r["channel"]: r["error"]["code"] for r in replies if r["type"] == "error"}
    assert errors == {
        f"node:{node_id}": "forbidden",
        "node:nope": "not_found",
        "bogus": "unknown_channel",
        "quotes:Bad_Region": "unknown_channel",
    }
    assert replies[-1] == {"type": "subscribed", "channels": ["market"]}

    mine = await live.socket(owner)
    assert await subscribe(mine, f"node:{node_id}") == {
        "type": "subscribed",
        "channels": [f"node:{node_id}"],
    }
    contract = _contract("u1", node_id=node_id)
    notice = ContractNote(notice="contract_started", ts_ms=5, contract=contract)
    await redis.publish(live.keys.node_channel(node_id), encode_message(f"node:{node_id}", notice))
    got = await recv(mine)
    assert (got["channel"], got["data"]["notice"], got["data"]["ts_ms"]) == (
        f"node:{node_id}",
        "contract_started",
        5,
    )
    assert got["data"]["contract"]["contract_id"] == "c1"
    assert got["data"]["contract"]["end_ms"] == contract.end_ms
    await redis.publish(live.keys.market_channel, market_message(1))
    assert await recv(ws) == market_event(1)
    for s in (ws, mine):
        await s.close()


async def test_malformed_and_oversize_messages_get_errors_not_a_crash(live: Live) -> None:
    """Garbage, wrong shapes, unknown ops and oversize messages each get an error reply."""
    user = await signup(live.gw, "user")
    ws = await live.socket(user, max_size=None)
    cases: list[tuple[str | bytes, str]] = [
        ("not json", "malformed_request"),
        (b"\xff\xfe", "malformed_request"),
        ("[]", "validation_error"),
        ('{"op": "dance"}', "validation_error"),
        ('{"op": "subscribe"}', "validation_error"),
        ('{"op": "subscribe", "channels": []}', "validation_error"),
        ('{"op": "subscribe", "channels": ["market"], "extra": 1}', "validation_error"),
        (
            '{"op": "heartbeat", "beats": [{"node_id": "n", "available_ram_gb": -1, '
            '"available_vram_gb": 0}]}',
            "validation_error",
        ),
        (
            '{"op": "heartbeat", "beats": [{"node_id": "n", "available_ram_gb": 1, '
            '"available_vram_gb": 0, "latitude": 10}], "ref": 3}',
            "validation_error",
        ),
        ('{"op": "ping", "ref": {"deep": [1]}}', "validation_error"),
        ("x" * (1 << 20 + 1), "payload_too_large"),
    ]
    for raw, code in cases:
        await ws.send(raw)
        reply = await recv(ws)
        assert reply["type"] == "error", (raw[:80], reply)
        assert reply["error"]["code"] == code, (raw[:80], reply)
    assert (await request(ws, {"op": "ping", "ref": "still here"})) == {
        "type": "pong",
        "ref": "still here",
    }
    await ws.close()


# ---------------------------------------------------------------------------------------------
# heartbeats


async def test_heartbeat_batch_reaches_the_market_and_is_acked_per_entry(live: Live) -> None:
    """A batch over the socket is applied by the market; each beat gets its own outcome."""
    owner, other = await signup(live.gw, "provider"), await signup(live.gw, "provider")
    mine = [await register_node(live.gw, owner, total_ram_gb=64) for _ in range(2)]
    theirs = await register_node(live.gw, other)
    ws = await live.socket(owner)
    beats = [
        {"node_id": mine[0], "available_ram_gb": 40, "available_vram_gb": 10, "cpu_usage_pct": 5.5},
        {"node_id": theirs, "available_ram_gb": 1, "available_vram_gb": 1},
        {"node_id": "f" * 32, "available_ram_gb": 1, "available_vram_gb": 1},
        {"node_id": mine[1], "available_ram_gb": 8, "available_vram_gb": 0,
         "latitude": 40.0, "longitude": -74.0},
    ]  # fmt: skip
    ack = await request(ws, {"op": "heartbeat", "beats": beats, "ref": "b1"})
    assert ack["type"] == "heartbeat_ack" and ack["ref"] == "b1"
    assert [(r["node_id"], r["outcome"]) for r in ack["results"]] == [
        (mine[0], "ok"),
        (theirs, "forbidden"),
        ("f" * 32, "not_found"),
        (mine[1], "ok"),
    ]
    market = live.state["market"]
    node = await market.get_node(mine[0])
    assert (node.offered_ram_gb, node.offered_vram_gb) == (40, 10)
    assert node.last_heartbeat_ms > 0
    # the per-node minimum interval applies on this path too
    again = await request(ws, {"op": "heartbeat", "beats": beats[:1], "ref": 2})
    [result] = again["results"]
    assert result["outcome"] == "too_soon" and result["retry_after_ms"] > 0
    await ws.close()


async def test_heartbeats_from_many_sockets_are_coalesced_and_each_acked(live: Live) -> None:
    """Batches sent at once from several sockets of one owner are all applied and acked."""
    owner = await signup(live.gw, "provider")
    nodes = [await register_node(live.gw, owner) for _ in range(6)]
    sockets = [await live.socket(owner) for _ in range(3)]
    batcher = live.state["ws"].batcher
    calls_before = batcher.calls
    for i, ws in enumerate(sockets):
        beats = [
            {"node_id": n, "available_ram_gb": 10 + i, "available_vram_gb": 1}
            for n in nodes[2 * i : 2 * i + 2]
        ]
        await ws.send(json.dumps({"op": "heartbeat", "beats": beats, "ref": i}))
    for i, ws in enumerate(sockets):
        ack = await recv(ws)
        assert ack["ref"] == i
        assert [r["node_id"] for r in ack["results"]] == nodes[2 * i : 2 * i + 2]
        assert {r["outcome"] for r in ack["results"]} == {"ok"}
        await ws.close()
    assert batcher.calls - calls_before <= 3  # never more calls than batches


# ---------------------------------------------------------------------------------------------
# fan-out under a slow client


async def flood_market_until_a_drop(live: Live, redis: aioredis.Redis, hub: Hub) -> int:
    """Publish numbered 16 KiB messages (`market_message`) on the `market` channel, 50 at a
    time, until the hub drops a subscriber; returns how many were published."""
    pad = 16_384  # large frames fill the kernel buffers quickly
    sent = 0
    dropped_before = hub.dropped
    async with asyncio.timeout(60):
        while hub.dropped == dropped_before:
            await publish_all(
                redis,
                live.keys.market_channel,
                (market_message(sent + i, pad) for i in range(50)),
            )
            sent += 50
            await asyncio.sleep(0.005)
    return sent


async def test_slow_socket_is_closed_1013_and_fast_ones_get_everything(
    live: Live, redis: aioredis.Redis
) -> None:
    """A socket that stops reading is dropped (1013); the others miss nothing meanwhile."""
    hub = live.state["ws"].hub
    hub.queue_size = 4 * hub.burst  # sockets opened from now on get small queues
    user = await signup(live.gw, "user")
    fast = [await live.socket(user, max_queue=None) for _ in range(2)]
    # The slow client's library stops reading the TCP socket after 2 queued messages.
    slow = await live.socket(user, max_queue=2)
    for ws in [*fast, slow]:
        await subscribe(ws, "market")
    got: list[list[int]] = [[] for _ in fast]

    async def drain(i: int, ws: ClientConnection) -> None:
        while True:
            got[i].append(numbered(json.loads(await ws.recv())))

    readers = [asyncio.create_task(drain(i, ws)) for i, ws in enumerate(fast)]
    sent = await flood_market_until_a_drop(live, redis, hub)
    async with asyncio.timeout(WAIT_S):
        while min(len(g) for g in got) < sent:  # noqa: ASYNC110 - readers append; no event
            await asyncio.sleep(0.01)
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for g in got:
        assert g == list(range(sent))
    assert await closed_with(slow) == 1013
    for ws in fast:
        assert (await request(ws, {"op": "ping"}))["type"] == "pong"
        await ws.close()


# ---------------------------------------------------------------------------------------------
# the whole loop: engine process -> Redis pub/sub -> hub -> socket


async def test_resting_bid_fills_and_the_bot_sees_it_on_its_socket(live: Live) -> None:
    """A bid rests; a provider brings capacity; the engine crosses them and the bot's socket gets
    the `bids` update, the `fills` event and the trade, the provider's socket the node notice:
    each in REST's shape and units, its USD and exact pico-USD amounts in agreement."""
    from engine.process import run_engine
    from tests.gateway.conftest import create_client

    bot, provider = await signup(live.gw, "user"), await signup(live.gw, "provider")
    client_id = await create_client(live.gw, bot)
    region = f"ws-{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    engine = asyncio.create_task(run_engine(live.gw.settings, regions=[region], stop=stop))
    try:
        bot_ws = await live.socket(bot)
        channels = ("fills", "bids", f"trades:{region}")
        assert (await subscribe(bot_ws, *channels))["type"] == "subscribed"
        r = await live.gw.client.post(
            "/api/bids",
            headers=bot.headers,
            json={
                "client_id": client_id,
                "region": region,
                "ram_gb": 8,
                "vram_gb": 0,
                "duration_sec": 600,
                "max_price_per_gb_sec": 0.000001,
            },
        )
        assert r.status_code == 201, r.text
        bid_id = r.json()["bid_id"]

        # The ask starts above the bid's cap, so the provider can subscribe to its node first;
        # lowering the price makes it cross.
        node_id = await register_node(live.gw, provider, region=region, price_per_gb_sec=0.00001)
        provider_ws = await live.socket(provider)
        assert (await subscribe(provider_ws, f"node:{node_id}"))["type"] == "subscribed"
        r = await live.gw.client.put(
            f"/api/nodes/{node_id}", headers=provider.headers, json={"price_per_gb_sec": 0.0000008}
        )
        assert r.status_code == 200, r.text

        # (`bid_placed` comes too if the engine was already tailing the stream when the bid
        # was placed; an engine that starts later picks the bid up from its snapshot.)
        events: dict[str, Any] = {}
        async with asyncio.timeout(WAIT_S):
            while len(events) < 3 or events["bids"].notice != "bid_filled":
                # Read as a bot would, with the protocol's own types.
                frame = protocol.decode_server_message(await bot_ws.recv())
                assert isinstance(frame, protocol.Event)
                events[frame.channel.partition(":")[0]] = protocol.decode_event(
                    frame.channel, frame.data
                )
        fill = events["fills"]
        assert isinstance(fill, protocol.ContractOut)
        assert (fill.node_id, fill.bid_id, fill.duration_sec) == (node_id, bid_id, 600)
        assert fill.price_pusd == 800_000 == round(fill.price_per_gb_sec * 1e12)
        assert fill.max_price_pusd == 1_000_000 == round(fill.max_price_per_gb_sec * 1e12)
        # the fill is the contract REST answers (less the live view, which only REST computes)
        r = await live.gw.client.get(f"/api/contracts/{fill.contract_id}", headers=bot.headers)
        assert r.status_code == 200, r.text
        rest = r.json()
        assert rest.pop("live") is not None
        assert rest == {k: v for k, v in msgspec.to_builtins(fill).items() if k != "live"}

        bid = events["bids"]
        assert isinstance(bid, protocol.BidNotice)
        assert (bid.bid.bid_id, bid.bid.status, bid.bid.filled_ram_gb) == (bid_id, "filled", 8)
        assert bid.bid.contract_ids == [fill.contract_id] and bid.contract == fill
        assert bid.bid.max_price_pusd == 1_000_000 == round(bid.bid.max_price_per_gb_sec * 1e12)
        trade = events["trades"]
        assert isinstance(trade, protocol.Trade)
        assert (trade.contract_id, trade.price_pusd, trade.price_per_gb_sec) == (
            fill.contract_id,
            800_000,
            8e-7,
        )
        notice = await recv(provider_ws)
        assert notice["channel"] == f"node:{node_id}"
        assert notice["data"]["notice"] == "contract_started"
        assert notice["data"]["contract"] == msgspec.to_builtins(fill)
        for ws in (bot_ws, provider_ws):
            await ws.close()
    finally:
        stop.set()
        await asyncio.wait_for(engine, WAIT_S)


async def test_batcher_isolates_a_batch_the_market_refuses(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """One owner's batches share a market call; if the market refuses the call for one bad beat,
    only the batch that carried it fails and the others are applied."""
    from engine.market import Market
    from engine.types import Heartbeat, Node
    from gateway.heartbeats import HeartbeatBatcher

    market = Market(redis, keys)
    await market.load_scripts()
    now_ms = int(time.time() * 1000)
    node = Node(node_id=uuid.uuid4().hex, owner_id="owner", region="r1", node_type="mist_node",
                name="n", lat=1.0, lng=1.0, total_ram_gb=8, total_vram_gb=0, offered_ram_gb=8,
                price_pusd=1000)  # fmt: skip
    await market.register_node(node, now_ms)
    batcher = HeartbeatBatcher(market, min_interval_ms=0, window_ms=50)
    good = batcher.submit("owner", [Heartbeat(node_id=node.node_id, available_ram_gb=4,
                                              available_vram_gb=0)])  # fmt: skip
    bad = batcher.submit("owner", [Heartbeat(node_id=node.node_id, available_ram_gb=4,
                                             available_vram_gb=0, lat=10.0)])  # fmt: skip
    [outcome] = await good
    assert outcome.outcome == "ok"
    with pytest.raises(MarketError):
        await bad
    assert batcher.calls >= 1
    await batcher.aclose()
