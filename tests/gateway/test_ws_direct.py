"""Fan-out written straight to uvicorn's transports (`gateway.direct`), and its fallbacks: the real
app under uvicorn on loopback, real Redis, the `websockets` client library."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.keys import Keys
from engine.settings import Settings
from gateway.direct import direct_writer, frame_payload, frame_text
from gateway.hub import Hub, Subscriber
from tests.conftest import publish_all
from tests.gateway.conftest import market_event, market_message, numbered, signup
from tests.gateway.test_ws import (
    WAIT_S,
    Live,
    _token,
    closed_with,
    flood_market_until_a_drop,
    recv,
    request,
    serving,
    subscribe,
)


@pytest.fixture
async def live(settings: Settings, keys: Keys) -> AsyncIterator[Live]:
    async with serving(settings, keys) as server:
        yield server


def _hub(live: Live) -> Hub:
    hub: Hub = live.state["ws"].hub
    return hub


async def _server_side(hub: Hub, before: set[Subscriber]) -> Subscriber:
    """The subscriber of the one socket opened since `before` was taken."""
    async with asyncio.timeout(WAIT_S):
        while True:
            new = [s for s in hub.subscribers if s not in before]
            if new:
                [sub] = new
                return sub
            await asyncio.sleep(0.01)


async def _until(predicate: Any) -> None:
    # Polls the server's state, which has no event to wait on.
    async with asyncio.timeout(WAIT_S):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------------------------
# the adapter on its own


def test_frame_text_header_lengths_follow_rfc6455() -> None:
    """Payload lengths up to 125 go in the first byte, then 16-bit, then 64-bit extended."""
    for n, head in [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f" + (65536).to_bytes(8, "big")),
    ]:
        payload = b"x" * n
        frame = frame_text(payload)
        assert frame == head + payload
        assert bytes(frame_payload(frame)) == payload


async def test_direct_writer_refuses_a_send_it_does_not_recognise() -> None:
    """Any `send` but uvicorn's sansio protocol's (possibly wrapped by Starlette's pass-through)
    keeps the ASGI path."""

    async def plain_send(message: Any) -> None:
        return None

    def wrapper(send: Any) -> Any:
        async def sender(message: Any) -> None:
            await send(message)

        return sender

    assert direct_writer(plain_send, high_water_bytes=1) is None
    assert direct_writer(wrapper(plain_send), high_water_bytes=1) is None
    assert direct_writer(print, high_water_bytes=1) is None


# ---------------------------------------------------------------------------------------------
# end to end


async def test_events_are_written_directly_on_the_real_app(
    live: Live, redis: aioredis.Redis
) -> None:
    """Under uvicorn's websockets-sansio protocol the app's `send` is recognised (through the
    middleware) and events skip the queue; payloads of every header size arrive intact."""
    hub = _hub(live)
    user = await signup(live.gw, "user")
    before = set(hub.subscribers)
    ws = await live.socket(user, max_size=None)
    sub = await _server_side(hub, before)
    assert sub.direct is not None
    assert (await subscribe(ws, "market"))["type"] == "subscribed"
    written = hub.written
    sizes = [1, 100, 126, 65_000, 65_536, 200_000]
    for i, n in enumerate(sizes):
        await redis.publish(live.keys.market_channel, market_message(i, n))
    for i, n in enumerate(sizes):
        assert await recv(ws) == market_event(i, n)
    assert hub.written - written == len(sizes)
    assert (await request(ws, {"op": "ping", "ref": 1})) == {"type": "pong", "ref": 1}
    await ws.close()


async def test_reply_waiting_in_send_is_not_overtaken_by_direct_events(
    live: Live, redis: aioredis.Redis
) -> None:
    """A reply suspended in uvicorn's `send` (its transport paused: the client stopped reading)
    comes out before every event published after it, and after every event published before;
    the stream is exactly the publication order with the reply in its place."""
    hub = _hub(live)
    hub.high_water_bytes = 256 << 20  # not slow: this socket may buffer what the test needs
    user = await signup(live.gw, "user")
    before = set(hub.subscribers)
    # The client library stops reading the TCP socket once 2 frames wait in its queue.
    ws = await live.socket(user, max_queue=2, max_size=None)
    sub = await _server_side(hub, before)
    assert sub.direct is not None
    assert (await subscribe(ws, "market"))["type"] == "subscribed"

    pad = 32_768
    sent = 0

    async def publish(n: int) -> None:
        nonlocal sent
        await publish_all(
            redis, live.keys.market_channel, (market_message(sent + i, pad) for i in range(n))
        )
        sent += n
        await _until(lambda: hub.delivered >= delivered0 + sent)

    delivered0 = hub.delivered
    written0 = hub.written
    async with asyncio.timeout(60):
        while sub.direct.buffered_bytes < 1 << 20:  # far past the transport's pause mark
            await publish(20)
    assert hub.written - written0 == sent  # all of these went directly
    before_reply = sent

    await ws.send(json.dumps({"op": "ping", "ref": "r"}))
    # The pong is taken off the queue by the writer and waits in uvicorn's send (paused).
    await _until(lambda: sub.busy and sub.queue.empty())
    await publish(30)
    assert hub.written - written0 == before_reply  # these waited behind the reply

    seen: list[Any] = []
    async with asyncio.timeout(WAIT_S):
        while len(seen) < sent + 1:
            msg = json.loads(await ws.recv())
            seen.append(msg["ref"] if msg["type"] == "pong" else numbered(msg))
    assert seen == [*range(before_reply), "r", *range(before_reply, sent)]
    # once the queue has drained, events go directly again
    await _until(lambda: not sub.busy)
    written = hub.written
    await redis.publish(live.keys.market_channel, market_message(-1))
    assert await recv(ws) == market_event(-1)
    assert hub.written == written + 1
    await ws.close()


async def test_socket_over_its_send_buffer_is_closed_1013_others_get_everything(
    live: Live, redis: aioredis.Redis
) -> None:
    """A socket whose transport buffers past the high-water mark is closed with 1013; a fast
    socket on the same channel misses nothing."""
    hub = _hub(live)
    hub.high_water_bytes = 256 * 1024
    user = await signup(live.gw, "user")
    fast = await live.socket(user, max_size=None)
    slow = await live.socket(user, max_queue=2, max_size=None)
    for ws in (fast, slow):
        assert (await subscribe(ws, "market"))["type"] == "subscribed"
    got: list[int] = []

    async def drain() -> None:
        while True:
            got.append(numbered(json.loads(await fast.recv())))

    reader = asyncio.create_task(drain())
    sent = await flood_market_until_a_drop(live, redis, hub)
    await _until(lambda: len(got) >= sent)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert got == list(range(sent))
    assert await closed_with(slow) == 1013
    assert (await request(fast, {"op": "ping"}))["type"] == "pong"
    await fast.close()


async def test_batch_socket_written_directly_splits_batches_at_max_batch_bytes(
    live: Live, redis: aioredis.Redis
) -> None:
    """A `?batch=1` socket gets the events of one run as `batch` messages no larger than about
    `max_batch_bytes` (a lone message goes as itself); flattened, the stream is in order."""
    services = live.state["ws"]
    services.options = msgspec.structs.replace(services.options, max_batch_bytes=2_000)
    user = await signup(live.gw, "user")
    ws = await connect(f"{live.ws_url}?api_key={user.key}&batch=1", open_timeout=WAIT_S)
    assert (await subscribe(ws, "market"))["type"] == "subscribed"
    n = 300
    await publish_all(redis, live.keys.market_channel, (market_message(i) for i in range(n)))
    flat: list[Any] = []
    batches = 0
    while len(flat) < n:
        async with asyncio.timeout(WAIT_S):
            raw = await ws.recv()
        msg = json.loads(raw)
        if msg["type"] == "batch":
            batches += 1
            assert len(raw) <= 2_000 + 200  # the limit, give or take the envelope
            flat.extend(numbered(m) for m in msg["messages"])
        else:
            flat.append(numbered(msg))
    assert flat == list(range(n))
    assert batches > 1  # 300 messages of ~160 bytes cannot fit one 2 KB batch
    await ws.close()


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"ws_per_message_deflate": True}, id="per-message-deflate"),
        pytest.param(
            {"ws": "websockets"},
            id="legacy-websockets-protocol",
            marks=pytest.mark.filterwarnings("ignore::uvicorn.config.UvicornDeprecationWarning"),
        ),
    ],
)
async def test_unsupported_sockets_keep_the_queued_path(
    settings: Settings, keys: Keys, redis: aioredis.Redis, config: dict[str, Any]
) -> None:
    """With per-message deflate negotiated, or another uvicorn protocol, nothing is written
    directly and every event still arrives, in order, after its "subscribed"."""
    async with serving(settings, keys, **config) as live:
        hub = _hub(live)
        user = await signup(live.gw, "user")
        before = set(hub.subscribers)
        ws = await live.socket(user, compression="deflate")
        sub = await _server_side(hub, before)
        assert sub.direct is None
        assert (await subscribe(ws, "market"))["type"] == "subscribed"
        written = hub.written
        for i in range(20):
            await redis.publish(live.keys.market_channel, market_message(i))
        assert [await recv(ws) for _ in range(20)] == [market_event(i) for i in range(20)]
        assert hub.written == written
        await ws.close()


async def test_jwt_expiry_closes_a_socket_receiving_direct_events(
    live: Live, redis: aioredis.Redis
) -> None:
    """Events written directly do not keep a socket open past its token: 4401 at expiry."""
    hub = _hub(live)
    user = await signup(live.gw, "user")
    exp_s = int(time.time()) + 2
    token = _token(user.user_id, "user", exp_s, live.gw.settings)
    ws = await connect(f"{live.ws_url}?token={token}", open_timeout=WAIT_S)
    assert (await subscribe(ws, "market"))["type"] == "subscribed"
    written = hub.written

    async def publish() -> None:
        i = 0
        while True:
            await redis.publish(live.keys.market_channel, market_message(i))
            i += 1
            await asyncio.sleep(0.02)

    publisher = asyncio.create_task(publish())
    try:
        received = 0
        async with asyncio.timeout(WAIT_S):
            try:
                while True:
                    assert json.loads(await ws.recv())["type"] == "event"
                    received += 1
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 4401
        assert time.time() >= exp_s - 0.05
        assert received > 10 and hub.written - written >= received
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
