"""The fan-out hub against real Redis pub/sub, with plain queue-consuming subscribers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from engine.connection import is_cluster, open_redis, pubsub_node
from engine.keys import Keys
from engine.notify import encode_message
from gateway.hub import Hub, Subscriber

WAIT_S = 10.0  # generous upper bound for things that happen "soon"; never a timing assertion


@pytest.fixture
async def source(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The client a gateway gives its hub: the server's, or a cluster's."""
    client = open_redis(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis(source: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    """Where these tests publish and look: the server, or on a cluster the node the hub
    subscribes on (a PUBLISH on any node reaches it; its PUBSUB and CLIENT see the hub)."""
    if not is_cluster(source):
        yield source
        return
    client = aioredis.Redis(**pubsub_node(source))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def hub(source: aioredis.Redis) -> AsyncIterator[Hub]:
    h = Hub(source, queue_size=64, client_name=f"test-hub-{uuid.uuid4().hex[:12]}")
    await h.start()
    await h.wait_connected(WAIT_S)
    try:
        yield h
    finally:
        await h.stop()


class Consumer:
    """A subscriber whose writer task drains its queue into a list, like a fast socket."""

    def __init__(self, hub: Hub, name: str, *, drain: bool = True, queue_size: int | None = None):
        self.drops: list[str] = []
        self.sub: Subscriber = hub.attach(
            name, on_drop=lambda s, why: self.drops.append(why), queue_size=queue_size
        )
        self.got: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._drain()) if drain else None

    async def _drain(self) -> None:
        while True:
            self.got.append(json.loads(await self.sub.queue.get()))
            self._arrived.set()

    async def wait_for(self, n: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(WAIT_S):
            while len(self.got) < n:
                self._arrived.clear()
                await self._arrived.wait()
        return self.got

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _numsub(redis: aioredis.Redis, channel: str) -> int:
    [(_, n)] = await redis.pubsub_numsub(channel)
    return int(n)


async def _until(predicate: Any) -> None:
    # Polls state held by the Redis server, which has no event to wait on.
    async with asyncio.timeout(WAIT_S):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_message_reaches_every_subscriber_of_its_channel_and_no_other(
    hub: Hub, redis: aioredis.Redis, keys: Keys
) -> None:
    """A published message reaches each subscriber of that channel once, and nobody else."""
    qa, qb = keys.quotes_channel("region-a"), keys.quotes_channel("region-b")
    a1, a2, b1 = (Consumer(hub, n) for n in ("a1", "a2", "b1"))
    await hub.subscribe(a1.sub, [(qa, "quotes:region-a")])
    await hub.subscribe(a2.sub, [(qa, "quotes:region-a")])
    await hub.subscribe(b1.sub, [(qb, "quotes:region-b")])

    await redis.publish(qa, encode_message("quotes:region-a", {"n": 1}))
    await redis.publish(qb, encode_message("quotes:region-b", {"n": 2}))

    want_a = {"type": "event", "channel": "quotes:region-a", "data": {"n": 1}}
    assert await a1.wait_for(1) == [want_a]
    assert await a2.wait_for(1) == [want_a]
    assert await b1.wait_for(1) == [
        {"type": "event", "channel": "quotes:region-b", "data": {"n": 2}}
    ]
    # a marker after everything else proves nothing more was on its way to a1
    await redis.publish(qa, encode_message("quotes:region-a", {"n": 3}))
    assert [m["data"]["n"] for m in await a1.wait_for(2)] == [1, 3]
    for c in (a1, a2, b1):
        await c.close()


async def test_one_user_channel_is_split_by_ws_channel(
    hub: Hub, redis: aioredis.Redis, keys: Keys
) -> None:
    """`fills`, `bids`, `contracts` share a Redis channel; each socket gets only what it asked."""
    user = keys.user_channel("u1")
    fills, bids = Consumer(hub, "fills"), Consumer(hub, "bids")
    await hub.subscribe(fills.sub, [(user, "fills")])
    await hub.subscribe(bids.sub, [(user, "bids")])
    for ws, n in (("bids", 1), ("contracts", 2), ("fills", 3), ("bids", 4)):
        await redis.publish(user, encode_message(ws, {"n": n}))
    assert [(m["channel"], m["data"]["n"]) for m in await bids.wait_for(2)] == [
        ("bids", 1),
        ("bids", 4),
    ]
    assert [(m["channel"], m["data"]["n"]) for m in await fills.wait_for(1)] == [("fills", 3)]
    await asyncio.sleep(0)
    assert len(fills.got) == 1
    assert await _numsub(redis, user) == 1  # one Redis subscription serves both sockets
    for c in (fills, bids):
        await c.close()


async def test_redis_subscription_follows_the_refcount(
    hub: Hub, redis: aioredis.Redis, keys: Keys
) -> None:
    """The process subscribes once per channel and unsubscribes when the last subscriber goes."""
    ch = keys.market_channel
    subs = [hub.attach(f"s{i}") for i in range(3)]
    for s in subs:
        await hub.subscribe(s, [(ch, "market")])
    assert await _numsub(redis, ch) == 1
    assert hub.subscriber_count(ch) == 3
    hub.unsubscribe(subs[0], ["market"])
    hub.detach(subs[1])
    assert hub.subscriber_count(ch) == 1
    assert await _numsub(redis, ch) == 1
    hub.detach(subs[2])

    async def gone() -> bool:
        return await _numsub(redis, ch) == 0

    await _until(gone)
    assert ch.encode() not in hub.redis_channels
    # and it comes back for a newcomer
    late = Consumer(hub, "late")
    await hub.subscribe(late.sub, [(ch, "market")])
    await redis.publish(ch, encode_message("market", {"n": 1}))
    assert (await late.wait_for(1))[0]["data"] == {"n": 1}
    await late.close()


async def test_unsubscribed_channel_delivers_nothing_more(
    hub: Hub, redis: aioredis.Redis, keys: Keys
) -> None:
    """After unsubscribe, messages of that channel are not queued for the subscriber."""
    qa, ta = keys.quotes_channel("a"), keys.trades_channel("a")
    c = Consumer(hub, "c")
    await hub.subscribe(c.sub, [(qa, "quotes:a"), (ta, "trades:a")])
    assert hub.unsubscribe(c.sub, ["quotes:a", "quotes:nope"]) == ["quotes:a"]
    await redis.publish(qa, encode_message("quotes:a", {"n": 1}))
    await redis.publish(ta, encode_message("trades:a", {"n": 2}))
    assert [m["channel"] for m in await c.wait_for(1)] == ["trades:a"]
    await c.close()


async def test_slow_subscriber_is_dropped_and_fast_ones_get_everything(
    hub: Hub, redis: aioredis.Redis, keys: Keys
) -> None:
    """A subscriber that never drains is dropped when its queue fills; the others miss nothing."""
    ch = keys.quotes_channel("busy")
    fast = [Consumer(hub, f"fast{i}", queue_size=hub.burst * 2) for i in range(3)]
    slow = Consumer(hub, "slow", drain=False, queue_size=8)
    for c in [*fast, slow]:
        await hub.subscribe(c.sub, [(ch, "quotes:busy")])
    n = 200
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.publish(ch, encode_message("quotes:busy", {"i": i}))
        await pipe.execute()
    for c in fast:
        assert [m["data"]["i"] for m in await c.wait_for(n)] == list(range(n))
        assert c.drops == []
    assert slow.drops == ["slow"]
    assert slow.sub.dropped == "slow"
    assert slow.sub.queue.qsize() == 8  # what it had before the drop; nothing after
    assert slow.sub.channels == {}
    assert hub.subscriber_count(ch) == 3
    assert hub.dropped == 1
    for c in fast:
        await c.close()


async def test_deliver_queues_replies_and_drops_when_full(hub: Hub) -> None:
    """Replies share the subscriber's queue and its bound."""
    drops: list[str] = []
    sub = hub.attach("r", on_drop=lambda s, why: drops.append(why), queue_size=2)
    assert hub.deliver(sub, "a") and hub.deliver(sub, "b")
    assert not hub.deliver(sub, "c")
    assert drops == ["slow"]
    assert not hub.deliver(sub, "d")  # dropped stays dropped
    assert drops == ["slow"]


async def test_malformed_payload_is_skipped(hub: Hub, redis: aioredis.Redis, keys: Keys) -> None:
    """A payload that is not the {"channel", "data"} envelope is logged and skipped."""
    ch = keys.market_channel
    c = Consumer(hub, "c")
    await hub.subscribe(c.sub, [(ch, "market")])
    for bad in (b"not json", b'{"data": {}}', b"[1,2]"):
        await redis.publish(ch, bad)
    await redis.publish(ch, encode_message("market", {"ok": True}))
    assert [m["data"] for m in await c.wait_for(1)] == [{"ok": True}]
    await c.close()


async def test_translate_makes_the_public_event_once_and_skips_what_it_refuses(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """With a `translate`, subscribers get the public event (translated once per message, not
    per subscriber); a message it refuses is skipped and the next one still arrives."""
    calls: list[str] = []

    def translate(ws_channel: str, data: msgspec.Raw) -> bytes:
        calls.append(ws_channel)
        n = msgspec.json.decode(data)["n"]
        if n < 0:
            raise ValueError("not a note")
        return msgspec.json.encode({"public": n})

    h = Hub(redis, client_name=f"test-hub-{uuid.uuid4().hex[:12]}", translate=translate)
    await h.start()
    try:
        ch = keys.market_channel
        a, b = Consumer(h, "a"), Consumer(h, "b")
        for c in (a, b):
            await h.subscribe(c.sub, [(ch, "market")])
        await redis.publish(ch, encode_message("market", {"n": -1}))
        await redis.publish(ch, encode_message("market", {"n": 2}))
        for c in (a, b):
            assert await c.wait_for(1) == [
                {"type": "event", "channel": "market", "data": {"public": 2}}
            ]
            await c.close()
        assert calls == ["market", "market"]
    finally:
        await h.stop()


async def test_reconnects_and_resubscribes_after_connection_loss(
    hub: Hub, redis: aioredis.Redis, keys: Keys
) -> None:
    """Killing the pub/sub connection loses only what was published while it was down."""
    ch = keys.quotes_channel("k")
    c = Consumer(hub, "c")
    await hub.subscribe(c.sub, [(ch, "quotes:k")])
    clients = await redis.client_list(_type="pubsub")
    [mine] = [cl for cl in clients if cl.get("name") == hub.client_name]
    await redis.client_kill_filter(_id=mine["id"])

    async def delivered() -> bool:
        await redis.publish(ch, encode_message("quotes:k", {"after": True}))
        await asyncio.sleep(0.02)
        return bool(c.got)

    await _until(delivered)
    assert c.got[0]["data"] == {"after": True}
    assert await _numsub(redis, ch) == 1
    # a subscription made after the reconnect works too
    d = Consumer(hub, "d")
    await hub.subscribe(d.sub, [(keys.market_channel, "market")])
    await redis.publish(keys.market_channel, encode_message("market", {"m": 1}))
    assert (await d.wait_for(1))[0]["data"] == {"m": 1}
    await c.close()
    await d.close()


async def test_stop_drops_every_subscriber(redis: aioredis.Redis, keys: Keys) -> None:
    """Shutdown tells each subscriber why it was let go."""
    h = Hub(redis, client_name=f"test-hub-{uuid.uuid4().hex[:12]}")
    await h.start()
    drops: list[str] = []
    sub = h.attach("s", on_drop=lambda s, why: drops.append(why))
    await h.subscribe(sub, [(keys.market_channel, "market")])
    await h.stop()
    assert drops == ["shutdown"]
    assert h.subscriber_count() == 0


async def test_subscribe_right_after_the_last_unsubscribe_is_live(
    hub: Hub, redis: aioredis.Redis, keys: Keys
) -> None:
    """SUBSCRIBE/UNSUBSCRIBE/SUBSCRIBE of one channel in quick succession: whatever is published
    after the last subscribe() returns is delivered."""
    ch = keys.quotes_channel("churn")
    for i in range(20):
        first = hub.attach(f"first{i}")
        await hub.subscribe(first, [(ch, "quotes:churn")])
        hub.detach(first)
        for _ in range(i % 4):  # let the unsubscriber get to (or not yet to) its UNSUBSCRIBE
            await asyncio.sleep(0)
        c = Consumer(hub, f"second{i}")
        await hub.subscribe(c.sub, [(ch, "quotes:churn")])
        await redis.publish(ch, encode_message("quotes:churn", {"i": i}))
        assert [m["data"]["i"] for m in await c.wait_for(1)] == [i]
        hub.detach(c.sub)
        await c.close()
