"""Fan-out of Redis pub/sub notifications to this process's WebSocket subscribers.

One `Hub` per gateway process holds ONE Redis pub/sub connection. Local subscribers come and go;
the hub keeps a refcount per Redis channel and SUBSCRIBEs a channel when its first local
subscriber arrives and UNSUBSCRIBEs it when its last one leaves, so Redis sends each process
only what someone in it wants.

Rules:
- Every payload on a Redis channel is `{"channel": <ws channel>, "data": {...}}` (see
  `engine.notify`). Local subscriptions are (Redis channel, ws channel) pairs: a message reaches
  the subscribers of its Redis channel that asked for its ws channel. That is how one user channel
  carries `fills`, `bids` and `contracts` and each socket gets only the ones it asked for.
- The engine's `data` is internal; with a `translate` (the gateway gives `gateway.events`'s
  `public_event`) it becomes the channel's public event before it leaves, once per message
  that has a subscriber here, never per subscriber. A message `translate` refuses is skipped
  with a warning. Without one (tests of the fan-out itself) `data` goes out as it came.
- Encode once: the envelope is decoded once per message, the outgoing frame
  (`gateway.protocol.Event`, `{"type": "event", "channel", "data"}`) is encoded once (the `data`
  bytes are copied, never re-parsed) and framed once; the same bytes (direct) or `str` (queued)
  go to every subscriber.
- Two delivery paths per subscriber, one at a time, never reordering its frames:
  * direct (a subscriber attached with a `gateway.direct.DirectWriter`): the message is framed
    once as a WebSocket text frame and the same bytes go to every such subscriber's transport,
    synchronously, from the reader. Frames for one subscriber are collected during a run of
    messages and written together when the reader next yields (one `write` for the run: plain
    subscribers get the frames back to back, batch subscribers one `batch` message). A
    subscriber whose transport then buffers more than its high-water mark is dropped ("slow").
  * queued (no direct writer, or `busy`): `put_nowait` of the encoded `str` into the
    subscriber's bounded queue, which its owner's writer task drains through ASGI `send`. A
    subscriber whose queue is full is dropped ("slow").
  A subscriber is `busy` from the moment anything is queued for it (a reply, or an event while
  busy) until its writer has sent everything queued (`Subscriber.sent()`); meanwhile events are
  queued too, so nothing written directly overtakes a frame still queued or suspended in `send`.
  Frames collected for direct writing are written before a reply is queued (`deliver`).
- Fan-out never waits: a dropped subscriber has its subscriptions released, `on_drop` called and
  a warning logged; the others are not delayed by it. Its owner closes the socket (code 1013).
- `subscribe()` returns once Redis has confirmed every channel: whatever is published after it
  returns reaches the subscriber. Commands and confirmations on one connection are ordered, so
  the hub counts SUBSCRIBEs sent and confirmations received per channel to know which
  confirmation answers which command.
- Redis pub/sub is at-most-once: what is published while the connection is down is lost. The
  reader reconnects with capped exponential backoff and re-subscribes every channel still wanted.
- On a Redis Cluster the connection goes to one node: classic pub/sub (`PUBLISH`, what the engine
  sends) is broadcast by the cluster bus to every node, so any node hears every channel. When
  that node cannot be reached the reader tries the next one the cluster client knows of.
  Sharded pub/sub would not fit: a user's channel carries events of every region (README,
  "Scaling out").
  Durable history is the event stream and the REST API, not this path.

Cost: one decode, translation, encode and framing per message; per receiving subscriber a list
append, and one transport `write` per subscriber per run of messages (direct), or one
`put_nowait` and a writer wake-up (queued). Subscribe and unsubscribe are O(channels of the
call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from engine.connection import is_cluster, pubsub_node
from gateway.direct import FULL, OK, DirectWriter, frame_payload, frame_text
from gateway.protocol import Event

__all__ = ["Hub", "HubUnavailable", "Subscriber"]

log = logging.getLogger("mnemo.gateway.hub")

DropCallback = Callable[["Subscriber", str], None]
Translate = Callable[[str, msgspec.Raw], bytes]
"""(ws channel, the engine's data) -> the public event's JSON; raises `ValueError` (msgspec's
errors are ones) for data it cannot map."""


class HubUnavailable(Exception):
    """Redis did not confirm a subscription in time (the pub/sub connection is down)."""


class Subscriber:
    """One local consumer: a bounded queue of encoded frames (`str`), optionally a direct writer
    to its socket, and the channels it holds.

    The owner runs a writer task that drains `queue` and calls `sent()` after each send. The hub
    never awaits it: when `queue` is full, or the direct writer's transport is over its
    high-water mark, the subscriber is dropped and `on_drop(subscriber, reason)` is called
    (synchronously, from the hub; it must not block). Reasons: "slow", "error" (a direct write
    failed unexpectedly), "shutdown" (the hub stopped).
    """

    __slots__ = (
        "batch_bytes",
        "busy",
        "channels",
        "direct",
        "dropped",
        "name",
        "on_drop",
        "pending",
        "queue",
    )

    def __init__(
        self,
        name: str,
        *,
        queue_size: int,
        on_drop: DropCallback | None = None,
        direct: DirectWriter | None = None,
        batch_bytes: int = 0,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.name = name
        self.queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self.channels: dict[str, bytes] = {}
        """ws channel -> Redis channel, for the subscriptions the hub has made live."""
        self.dropped: str | None = None
        """Why the hub dropped this subscriber (None while it is attached)."""
        self.on_drop = on_drop
        self.direct = direct
        """Writes frames straight to the socket's transport, or None (queued path only)."""
        self.batch_bytes = batch_bytes
        """> 0: events written directly together go as `batch` messages of about this size."""
        self.busy = False
        """The queued path holds frames of this subscriber: no direct writes until `sent()`."""
        self.pending: bytes | list[bytes] | None = None
        """Frames collected for the next direct write (one frame, or a list of several)."""

    def sent(self) -> None:
        """The owner's writer has sent a frame; with nothing left queued, direct writes resume."""
        if self.queue.empty():
            self.busy = False

    def __repr__(self) -> str:
        return f"Subscriber({self.name!r}, channels={len(self.channels)})"


class _Envelope(msgspec.Struct):
    channel: str
    data: msgspec.Raw


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_encode = msgspec.json.Encoder().encode


def _pubsub_client(client: aioredis.Redis, client_name: str, attempt: int = 0) -> aioredis.Redis:
    """A client of our own for the pub/sub connection, on the same server as `client` (on a
    cluster: one of its nodes, the next one at each `attempt`; classic pub/sub reaches
    subscribers on any node, see `engine.connection`).

    Retries are off so every connection error reaches the reader, which alone reconnects and
    re-subscribes (the library's own retry would re-subscribe behind the hub's back and break
    its count of confirmations). Internal pool plumbing is not copied.
    """
    if is_cluster(client):
        node = pubsub_node(client, attempt)
        node.update(
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            client_name=client_name,
            socket_keepalive=True,
            single_connection_client=False,
        )
        return aioredis.Redis(**node)
    pool = client.connection_pool
    kwargs = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if not k.startswith(("maint_notifications", "orig_"))
        and k not in ("himport_registry", "event_dispatcher", "retry", "decode_responses")
    }
    kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs["decode_responses"] = False
    kwargs["client_name"] = client_name
    kwargs.setdefault("socket_keepalive", True)
    new_pool = aioredis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=2, **kwargs
    )
    return aioredis.Redis.from_pool(new_pool)  # closing the client closes the pool


class Hub:
    """The process's fan-out hub. `await start()` once, `await stop()` at shutdown.

    `queue_size` is the default for `attach()`; `high_water_bytes` is what an owner should give
    its subscriber's direct writer (bytes a transport may buffer before its subscriber counts as
    slow). `subscribe_timeout_s` bounds how long `subscribe()` waits for Redis to confirm. `idle_ping_s`: with no traffic for that long the
    reader pings Redis, and reconnects when two intervals pass in silence (a dead TCP peer).
    `client_name` names the connection in Redis's CLIENT LIST. `burst`: messages dispatched
    between two yields to the event loop (direct writes go out at each yield); a queued
    subscriber can be up to `burst` frames behind without being slow, so queues should hold
    several times that. `translate` turns the engine's data into the public event (see the
    module's rules).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        queue_size: int = 1024,
        high_water_bytes: int = 512 * 1024,
        subscribe_timeout_s: float = 5.0,
        idle_ping_s: float = 15.0,
        max_backoff_s: float = 5.0,
        client_name: str = "mnemo-gateway-hub",
        burst: int = 16,
        translate: Translate | None = None,
    ) -> None:
        if not 1 <= burst <= queue_size:
            raise ValueError("burst must be between 1 and queue_size")
        self._translate = translate
        self._source = redis
        self.client_name = client_name
        self.burst = burst
        self.queue_size = queue_size
        self.high_water_bytes = high_water_bytes
        self.subscribe_timeout_s = subscribe_timeout_s
        self.idle_ping_s = idle_ping_s
        self.max_backoff_s = max_backoff_s
        self._client: aioredis.Redis | None = None
        self._attempt = 0  # pub/sub connections tried (a cluster's nodes in turn)
        self._pubsub: Any = None  # redis.asyncio.client.PubSub of the live connection, or None
        # Redis channel -> ws channel -> subscribers (dicts as insertion-ordered sets)
        self._index: dict[bytes, dict[str, dict[Subscriber, None]]] = {}
        self._refs: dict[bytes, int] = {}  # live + pending local subscriptions per Redis channel
        self._subscribed: set[bytes] = set()  # last command sent on this connection was SUBSCRIBE
        self._sent: dict[bytes, int] = {}  # SUBSCRIBEs sent on this connection
        self._acked: dict[bytes, int] = {}  # subscribe confirmations received on it
        self._waiters: dict[bytes, list[tuple[int, asyncio.Future[None]]]] = {}
        self._dirty = asyncio.Event()  # channels may have lost their last subscriber
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribers: dict[Subscriber, None] = {}
        self._to_write: list[Subscriber] = []  # subscribers with frames pending a direct write
        self._flush_handle: asyncio.Handle | None = None
        self.messages = 0
        """Messages received from Redis."""
        self.delivered = 0
        """Event frames handed on (queued or to be written directly)."""
        self.written = 0
        """Event frames written directly to transports."""
        self.dropped = 0
        """Subscribers dropped as too slow (queue full, or transport over its high-water mark)."""

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the reader and the unsubscriber. Returns at once; the connection comes up in
        the background (`wait_connected()` waits for it)."""
        if self._tasks:
            raise RuntimeError("hub already started")
        self._client = _pubsub_client(self._source, self.client_name)
        self._tasks = [
            asyncio.create_task(self._run_reader(), name="hub-reader"),
            asyncio.create_task(self._run_unsubscriber(), name="hub-unsubscriber"),
        ]
        for task in self._tasks:
            task.add_done_callback(_log_task_end)

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until the pub/sub connection is up."""
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    async def stop(self) -> None:
        """Stop the background tasks, close the connection, drop every subscriber."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # A cancellation can be lost inside redis-py's pub/sub read (the reader was seen
            # "cancelling" yet blocked in a fresh read, and stop() waited forever): cancel
            # again until the task has ended.
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._to_write.clear()
        await asyncio.shield(self._close_pubsub())
        if self._client is not None:
            await asyncio.shield(self._client.aclose())
            self._client = None
        for sub in list(self._subscribers):
            self._drop(sub, "shutdown", warn=False)
        for waiters in self._waiters.values():
            for _, fut in waiters:
                if not fut.done():
                    fut.set_exception(HubUnavailable("hub stopped"))
        self._waiters.clear()

    # -- subscribers --------------------------------------------------------------------------

    def attach(
        self,
        name: str,
        *,
        on_drop: DropCallback | None = None,
        queue_size: int | None = None,
        direct: DirectWriter | None = None,
        batch_bytes: int = 0,
    ) -> Subscriber:
        """A new subscriber with a bounded queue (`queue_size` or the hub's default) and, when
        given, a direct writer to its socket (`batch_bytes` > 0: events written together go as
        `batch` messages)."""
        sub = Subscriber(
            name,
            queue_size=queue_size or self.queue_size,
            on_drop=on_drop,
            direct=direct,
            batch_bytes=batch_bytes,
        )
        self._subscribers[sub] = None
        return sub

    def detach(self, sub: Subscriber) -> None:
        """Release every subscription of `sub` (idempotent; safe after a drop). Frames not yet
        written directly are discarded."""
        self._subscribers.pop(sub, None)
        sub.pending = None
        for ws_channel, redis_channel in list(sub.channels.items()):
            self._unindex(sub, redis_channel, ws_channel)
        sub.channels.clear()

    def deliver(self, sub: Subscriber, frame: str) -> bool:
        """Queue one frame for `sub` (a reply of its own, not fan-out), after the events already
        due to it. A full queue (or a transport over its high-water mark) drops it."""
        if sub.pending is not None:
            self._write(sub)  # events dispatched before this reply go out before it
        if sub.dropped is not None:
            return False
        try:
            sub.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self._drop(sub, "slow")
            return False
        sub.busy = True
        return True

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        """The attached subscribers."""
        return tuple(self._subscribers)

    def subscriber_count(self, redis_channel: str | bytes | None = None) -> int:
        """Attached subscribers, or live local subscriptions to one Redis channel."""
        if redis_channel is None:
            return len(self._subscribers)
        by_ws = self._index.get(_b(redis_channel), {})
        return sum(len(subs) for subs in by_ws.values())

    @property
    def redis_channels(self) -> frozenset[bytes]:
        """Channels this process is subscribed to in Redis (or about to be)."""
        return frozenset(self._subscribed)

    async def subscribe(self, sub: Subscriber, pairs: Iterable[tuple[str | bytes, str]]) -> None:
        """Make each (Redis channel, ws channel) pair live for `sub`; all or nothing.

        Returns when Redis has confirmed every channel; raises `HubUnavailable` after
        `subscribe_timeout_s` without confirmation. Pairs `sub` already holds are skipped. No
        frame of a new channel is queued before this returns, so the caller can queue its
        "subscribed" reply first (nothing runs between the return and the caller's next line).
        """
        if sub.dropped is not None:
            return
        wanted: dict[str, bytes] = {}
        for redis_channel, ws_channel in pairs:
            if ws_channel not in sub.channels and ws_channel not in wanted:
                wanted[ws_channel] = _b(redis_channel)
        if not wanted:
            return
        reserved = list(wanted.values())
        for ch in reserved:
            self._refs[ch] = self._refs.get(ch, 0) + 1
        completed = False
        futures: list[asyncio.Future[None]] = []
        try:
            futures, to_send, ps = self._request(set(reserved))
            if to_send:
                try:
                    await ps.subscribe(*to_send)
                except (RedisError, OSError) as exc:
                    # The reader sees the same failure, reconnects and re-subscribes every
                    # wanted channel; the futures resolve then (or time out below).
                    log.debug("SUBSCRIBE failed (%s); the reader will reconnect", exc)
            if futures:
                done, _ = await asyncio.wait(futures, timeout=self.subscribe_timeout_s)
                if len(done) < len(futures):
                    raise HubUnavailable("Redis did not confirm the subscription in time")
                for fut in done:
                    fut.result()
            if sub.dropped is not None:
                return
            for ws_channel, ch in wanted.items():
                by_ws = self._index.setdefault(ch, {})
                by_ws.setdefault(ws_channel, {})[sub] = None
                sub.channels[ws_channel] = ch
            completed = True
        finally:
            if not completed:
                for fut in futures:
                    fut.cancel()
                for ch in reserved:
                    self._prune_waiters(ch)
                    self._release(ch)

    def unsubscribe(self, sub: Subscriber, ws_channels: Iterable[str]) -> list[str]:
        """Release some of `sub`'s subscriptions; returns those it held. Nothing for that
        channel is queued for it afterwards (frames already queued stay)."""
        released = []
        for ws_channel in ws_channels:
            ch = sub.channels.pop(ws_channel, None)
            if ch is not None:
                self._unindex(sub, ch, ws_channel)
                released.append(ws_channel)
        return released

    # -- internals: subscription bookkeeping --------------------------------------------------

    def _request(self, channels: set[bytes]) -> tuple[list[asyncio.Future[None]], list[bytes], Any]:
        """Book SUBSCRIBEs for channels not yet subscribed (the caller sends them on the
        returned connection before yielding, so commands go out in booking order) and return
        futures for the channels not yet confirmed."""
        loop = asyncio.get_running_loop()
        ps = self._pubsub
        to_send = [ch for ch in channels if ch not in self._subscribed]
        futures = []
        for ch in channels:
            if ps is not None:
                if ch in to_send:
                    self._subscribed.add(ch)
                    self._sent[ch] = self._sent.get(ch, 0) + 1
                ticket = self._sent.get(ch, 0)
                if self._acked.get(ch, 0) >= ticket:
                    continue
            else:
                ticket = 1  # rebased by the next connect, which subscribes every wanted channel
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(ch, []).append((ticket, fut))
            futures.append(fut)
        return futures, (to_send if ps is not None else []), ps

    def _prune_waiters(self, ch: bytes) -> None:
        waiters = self._waiters.get(ch)
        if waiters is not None:
            waiters[:] = [(t, f) for t, f in waiters if not f.done()]
            if not waiters:
                del self._waiters[ch]

    def _unindex(self, sub: Subscriber, ch: bytes, ws_channel: str) -> None:
        by_ws = self._index.get(ch)
        if by_ws is not None:
            subs = by_ws.get(ws_channel)
            if subs is not None and subs.pop(sub, 0) is None:
                if not subs:
                    del by_ws[ws_channel]
                if not by_ws:
                    del self._index[ch]
                self._release(ch)

    def _release(self, ch: bytes) -> None:
        n = self._refs.get(ch, 0) - 1
        if n > 0:
            self._refs[ch] = n
        else:
            self._refs.pop(ch, None)
            self._dirty.set()

    def _confirmed(self, ch: bytes) -> None:
        acked = self._acked.get(ch, 0) + 1
        self._acked[ch] = acked
        waiters = self._waiters.get(ch)
        if waiters:
            keep = []
            for ticket, fut in waiters:
                if ticket <= acked:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((ticket, fut))
            if keep:
                self._waiters[ch] = keep
            else:
                del self._waiters[ch]

    def _unsubscribe_confirmed(self, ch: bytes) -> None:
        # Forget the counters once no confirmation for this channel can still be in flight.
        if ch not in self._subscribed and self._acked.get(ch, 0) >= self._sent.get(ch, 0):
            self._acked.pop(ch, None)
            self._sent.pop(ch, None)

    def _drop(self, sub: Subscriber, reason: str, *, warn: bool = True) -> None:
        if sub.dropped is not None:
            return
        sub.dropped = reason
        if warn:
            self.dropped += 1
            log.warning(
                "dropping subscriber %s (%s): %d frames queued, %d bytes buffered, %d channels",
                sub.name,
                reason,
                sub.queue.qsize(),
                sub.direct.buffered_bytes if sub.direct is not None else 0,
                len(sub.channels),
            )
        self.detach(sub)
        if sub.on_drop is not None:
            try:
                sub.on_drop(sub, reason)
            except Exception:
                log.exception("on_drop callback of %s failed", sub.name)

    # -- internals: the connection ------------------------------------------------------------

    async def _connect(self) -> Any:
        assert self._client is not None
        ps = self._client.pubsub()
        try:
            await ps.connect()
        except BaseException:
            await asyncio.shield(ps.aclose())
            raise
        # From here to the SUBSCRIBE below nothing yields: every channel wanted so far is in
        # this snapshot, every later subscribe() sends its own SUBSCRIBE on `ps`.
        self._pubsub = ps
        self._sent.clear()
        self._acked.clear()
        wanted = [ch for ch, n in self._refs.items() if n > 0]
        self._subscribed = set(wanted)
        for ch in wanted:
            self._sent[ch] = 1
        for ch, waiters in list(self._waiters.items()):
            if ch in self._subscribed:
                self._waiters[ch] = [(1, fut) for _, fut in waiters]
            else:
                for _, fut in waiters:
                    if not fut.done():
                        fut.set_result(None)
                del self._waiters[ch]
        if wanted:
            await ps.subscribe(*wanted)
        return ps

    async def _close_pubsub(self) -> None:
        ps, self._pubsub = self._pubsub, None
        self._connected.clear()
        self._subscribed.clear()
        if ps is not None:
            try:
                await ps.aclose()
            except (RedisError, OSError) as exc:
                log.debug("closing the pub/sub connection: %s", exc)

    async def _run_reader(self) -> None:
        backoff_s = 0.05
        while True:
            connected = False
            try:
                ps = await self._connect()
                connected = True
                self._connected.set()
                if backoff_s > 0.05:
                    log.info("pub/sub connection restored (%d channels)", len(self._subscribed))
                backoff_s = 0.05
                await self._pump(ps)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("pub/sub connection lost: %s; retrying in %.2fs", exc, backoff_s)
                if is_cluster(self._source) and not connected:
                    # that node may be gone for good (a primary killed): try the next one
                    self._attempt += 1
                    old, self._client = (
                        self._client,
                        _pubsub_client(self._source, self.client_name, self._attempt),
                    )
                    if old is not None:
                        await asyncio.shield(old.aclose())
            except Exception:
                # A bug must not end fan-out for the whole process: log it, start over.
                log.exception("pub/sub reader failed; retrying in %.2fs", backoff_s)
            finally:
                await asyncio.shield(self._close_pubsub())
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self.max_backoff_s)

    async def _pump(self, ps: Any) -> None:
        silent = 0
        run = 0
        while True:
            msg = await ps.get_message(timeout=self.idle_ping_s)
            if msg is None:
                silent += 1
                if silent >= 2:
                    raise TimeoutError(f"no answer from Redis in {2 * self.idle_ping_s:.0f}s")
                await ps.ping()
                continue
            silent = 0
            kind = msg["type"]
            if kind == b"message" or kind == "message":
                self._dispatch(msg["channel"], msg["data"])
                # The parser may hold many buffered messages and reading them does not yield.
                # Yielding every `burst` messages lets writers drain between runs, so only a
                # subscriber that really cannot keep up overflows; and under load each writer
                # wakes once for several frames instead of once per frame.
                run += 1
                if run >= self.burst:
                    run = 0
                    await asyncio.sleep(0)
            elif kind == b"subscribe" or kind == "subscribe":
                self._confirmed(msg["channel"])
            elif kind == b"unsubscribe" or kind == "unsubscribe":
                self._unsubscribe_confirmed(msg["channel"])

    def _dispatch(self, ch: bytes, payload: bytes) -> None:
        self.messages += 1
        by_ws = self._index.get(ch)
        if not by_ws:
            return
        try:
            env = _decode_envelope(payload)
        except msgspec.DecodeError as exc:
            log.warning("skipping malformed message on %r: %s", ch, exc)
            return
        subs = by_ws.get(env.channel)
        if not subs:
            return
        body = env.data
        if self._translate is not None:
            try:
                body = msgspec.Raw(self._translate(env.channel, body))
            except ValueError as exc:
                log.warning("skipping message on %r: no public event (%s)", ch, exc)
                return
        data = _encode(Event(channel=env.channel, data=body))
        try:
            text = data.decode()  # a text frame must be UTF-8; the queued path sends the str
        except UnicodeDecodeError:
            log.warning("skipping message on %r: not UTF-8", ch)
            return
        framed: bytes | None = None
        to_write = self._to_write
        n_before = len(to_write)
        slow: list[Subscriber] | None = None
        for sub in subs:
            if sub.direct is None or sub.busy:
                try:
                    sub.queue.put_nowait(text)
                except asyncio.QueueFull:
                    if slow is None:
                        slow = []
                    slow.append(sub)
                    continue
                sub.busy = True
                continue
            if framed is None:
                framed = frame_text(data)
            pending = sub.pending
            if pending is None:
                sub.pending = framed  # the usual case: no list for a lone frame
                to_write.append(sub)
            elif isinstance(pending, bytes):
                sub.pending = [pending, framed]
            else:
                pending.append(framed)
        self.delivered += len(subs) - (len(slow) if slow else 0)
        if len(to_write) > n_before and self._flush_handle is None:
            # Written when the reader next yields: a run of messages makes one write per socket.
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        if slow:
            for sub in slow:
                self._drop(sub, "slow")

    def _flush(self) -> None:
        self._flush_handle = None
        to_write, self._to_write = self._to_write, []
        for sub in to_write:
            if sub.pending is not None:
                self._write(sub)

    def _write(self, sub: Subscriber) -> None:
        frames = sub.pending
        sub.pending = None
        direct = sub.direct
        if frames is None or direct is None or sub.dropped is not None:
            return
        if isinstance(frames, bytes):
            data, count = frames, 1
        else:
            count = len(frames)
            data = _batched(frames, sub.batch_bytes) if sub.batch_bytes else b"".join(frames)
        try:
            result = direct.write(data)
        except Exception:
            # A bug must not end fan-out for the others: close this socket, carry on.
            log.exception("direct write to %s failed", sub.name)
            self._drop(sub, "error", warn=False)
            return
        if result == OK:
            self.written += count
        elif result == FULL:
            self.written += count
            self._drop(sub, "slow")
        # else NOT_OPEN: the socket is closing; its session ends when uvicorn reports the close.

    async def _run_unsubscriber(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            ps = self._pubsub
            if ps is None:
                continue  # the next connect subscribes only what is still wanted
            gone = [ch for ch in self._subscribed if self._refs.get(ch, 0) == 0]
            if not gone:
                continue
            self._subscribed.difference_update(gone)
            try:
                await ps.unsubscribe(*gone)
            except (RedisError, OSError) as exc:
                log.debug("UNSUBSCRIBE failed (%s); the reader will reconnect", exc)


def _batched(frames: list[bytes], max_bytes: int) -> bytes:
    """Text frames as `batch` messages of about `max_bytes` each (a frame that is alone in its
    batch goes as itself), in order, ready to write."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for frame in frames:
        if group and size + len(frame) > max_bytes:
            out.append(_batch_frame(group))
            group, size = [], 0
        group.append(frame)
        size += len(frame)
    out.append(_batch_frame(group))
    return b"".join(out)


def _batch_frame(frames: list[bytes]) -> bytes:
    if len(frames) == 1:
        return frames[0]
    body = b",".join([frame_payload(f) for f in frames])
    return frame_text(b'{"type":"batch","messages":[' + body + b"]}")


def _b(channel: str | bytes) -> bytes:
    return channel.encode() if isinstance(channel, str) else channel


def _log_task_end(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("hub task %s failed", task.get_name(), exc_info=exc)
