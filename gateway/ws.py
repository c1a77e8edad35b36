"""The WebSocket endpoint `/ws`: market streams, own notifications, and batched heartbeats.

Connect with credentials (`Authorization: Bearer <jwt|api key>`, `X-API-Key`, or `?token=` /
`?api_key=`); without valid ones the handshake is refused before accept (close code 4401, which the
server sends as HTTP 403). A socket opened with a JWT is closed with 4401 when the token expires;
one opened with an API key is closed with 4401 within `reauth_interval_s` of the key's revocation.

An account holds at most `MNEMO_WS_CONNECTIONS_PER_ACCOUNT` sockets at once over every gateway
(slots in Redis, `gateway.ratelimit`); the handshake of one more is refused with HTTP 429, a
`Retry-After` and the usual error body (`rate_limited`). The slot is given back when the socket
ends, however it ends.

Messages are those of `gateway.protocol` (the one definition the agent and clients import too):
    {"op": "subscribe",   "channels": [...]}     -> {"type": "subscribed",   "channels": [...]}
    {"op": "unsubscribe", "channels": [...]}     -> {"type": "unsubscribed", "channels": [...]}
    {"op": "heartbeat", "beats": [Beat...], "ref"?: scalar}
        -> {"type": "heartbeat_ack", "ref", "results": [{"node_id", "outcome", "retry_after_ms"}]}
           (a `HeartbeatOutcome` per beat, in order)
    {"op": "ping", "ref"?: scalar}              -> {"type": "pong", "ref"}
and, from the server, {"type": "event", "channel", "data"} for each notification of a subscribed
channel, its data the channel's public event (`protocol.CHANNEL_EVENTS`: REST's shapes and
units, mapped from the engine's notes by `gateway.events`), and {"type": "error", "error":
{"code", "message", "field"?}, "channel"?, "ref"?} for a bad message (JSON text or binary
frames, at most `max_message_bytes`), an unknown or forbidden channel, or a failed heartbeat
batch; the socket stays open. A subscribe that would take the socket past `max_channels`
(`MNEMO_WS_CHANNELS_PER_SOCKET`) channels adds none of its new ones and gets one
`too_many_channels` error naming the limit. {"type": "batch", "messages": [...]} only on
sockets opened with `?batch=1`: when several messages are already queued for the socket they
go in one frame, in order (nothing is held back to fill a batch; a lone message is sent as
itself). For high-rate consumers: one frame and one write instead of one per message.

Channels and who may subscribe:
    quotes:<region>, trades:<region>, market   any authenticated caller
    fills, bids, contracts, leases             the caller's own (one Redis user channel, split by
                                               the message's ws channel name)
    node:<node_id>, leases:<node_id>,          the node's owner (or an admin)
    trust:<node_id>

Delivery: the process's `Hub` (`gateway.hub`) frames each notification once and writes the
same bytes straight to the transport of every subscribed socket (`gateway.direct`; uvicorn's
websockets-sansio protocol without per-message deflate). Every socket also has one bounded
queue and one writer task for what goes through ASGI `send`: replies, and events while a reply
is still queued or being sent, so events never overtake a reply and vice versa (on other
servers, or with deflate, everything takes that path). A socket that cannot keep up (more than
`send_buffer_bytes` waiting in its transport, or a full queue) is closed with 1013 ("try again
later") and the others never wait for it. "subscribed" comes before the first event of the
channel, and everything published after "subscribed" is delivered. Pub/sub is at-most-once
(see `gateway.hub`): after a reconnect, fetch current state over REST.

Keepalive: the server (uvicorn) pings every socket and closes it when pongs stop; `op: ping` is
there for clients that cannot see protocol pings (browsers).

`/ws/public` is the same endpoint without credentials, for the public market page: it serves
only `quotes:<region>`, `trades:<region>` and `market` (anything else is refused as on `/ws`
for a channel of someone else's, `forbidden`), takes no heartbeats, and counts its sockets per
client address (`MNEMO_WS_CONNECTIONS_PER_ACCOUNT` of them, as for an account).

Close codes: 4401 auth missing/invalid/expired, 1013 too slow, 1012 server shutting down,
1011 internal error. If credentials or the account's socket count cannot be checked at all
(accounts database or Redis down), the handshake gets HTTP 503 with the usual error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import redis.asyncio as aioredis
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from engine.errors import MarketError
from engine.keys import Keys
from engine.settings import Settings
from gateway import protocol
from gateway.auth import Principal, authenticate
from gateway.direct import denied, direct_writer
from gateway.errors import RateLimited, Unauthorized, error_response, from_msgspec
from gateway.events import public_event
from gateway.heartbeats import HeartbeatBatcher, HeartbeatSink, Outcome, market_heartbeat
from gateway.hub import Hub, HubUnavailable, Subscriber
from gateway.protocol import (
    BeatResult,
    ErrorDetail,
    ErrorReply,
    HeartbeatAck,
    HeartbeatOp,
    PingOp,
    Pong,
    Ref,
    Subscribed,
    SubscribeOp,
    Unsubscribed,
    UnsubscribeOp,
)
from gateway.ratelimit import RateLimiter

__all__ = [
    "STATE_KEY",
    "WsEndpoint",
    "WsOptions",
    "WsServices",
    "ws_routes",
    "ws_services",
]

log = logging.getLogger("mnemo.gateway.ws")

STATE_KEY = "ws"
"""Key of the `WsServices` in the app's lifespan state."""

CLOSE_AUTH = 4401
CLOSE_SLOW = 1013
CLOSE_SHUTDOWN = 1012
CLOSE_INTERNAL = 1011

_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")  # as gateway.schemas.Region
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # as gateway.schemas.Id
_OWN_CHANNELS = frozenset({"fills", "bids", "contracts", "leases"})


class WsOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of the WebSocket endpoint (defaults suit production; benchmarks may raise them)."""

    queue_size: int = 1024
    """Frames queued per socket before it counts as too slow and is closed (1013)."""
    send_buffer_bytes: int = 512 * 1024
    """Bytes a socket's transport may hold beyond what the kernel took before the socket counts
    as too slow and is closed (1013); the bound of the direct path, as `queue_size` is of the
    queued one."""
    max_channels: int = 256
    """Subscriptions per socket (`ws_services` takes it from `Settings.ws_channels_per_socket`)."""
    max_message_bytes: int = 1 << 20
    """Largest client message accepted (a heartbeat batch of 1000 beats is about 200 KB)."""
    max_inflight_heartbeats: int = 8
    """Heartbeat batches per socket waiting for their ack; the socket is read no further
    until one is answered (TCP backpressure)."""
    heartbeat_window_ms: float = 5.0
    """How long heartbeats from all sockets coalesce before one market call per owner."""
    subscribe_timeout_s: float = 5.0
    close_timeout_s: float = 5.0
    """How long a close waits for a socket whose send buffer is full."""
    max_batch_bytes: int = 256 * 1024
    """Largest batch message a `?batch=1` socket is sent (a single larger frame goes alone)."""
    reauth_interval_s: float = 60.0
    """How often a socket opened with an API key checks that the key is still valid (a revoked
    key closes its sockets with 4401 within this time). JWT sockets close at the token's expiry."""


class WsServices:
    """What `/ws` needs, built once per process in the app's lifespan (`ws_services`)."""

    def __init__(
        self,
        *,
        hub: Hub,
        batcher: HeartbeatBatcher,
        market: Any,
        keys: Keys,
        options: WsOptions,
    ) -> None:
        self.hub = hub
        self.batcher = batcher
        self.market = market
        """`engine.market.Market` (heartbeat, get_node)."""
        self.keys = keys
        self.options = options
        self.sockets = 0
        """Sockets open now."""


@asynccontextmanager
async def ws_services(
    redis: aioredis.Redis,
    market: HeartbeatSink,
    keys: Keys,
    settings: Settings,
    *,
    options: WsOptions | None = None,
) -> AsyncIterator[WsServices]:
    """Start the hub and the heartbeat batcher; stop them (in that order of release) on exit.

    Use inside the app's lifespan and put the result in its state under `STATE_KEY`.
    """
    options = options or WsOptions(max_channels=settings.ws_channels_per_socket)
    hub = Hub(
        redis,
        queue_size=options.queue_size,
        high_water_bytes=options.send_buffer_bytes,
        subscribe_timeout_s=options.subscribe_timeout_s,
        translate=public_event,
    )
    batcher = HeartbeatBatcher(
        market,
        min_interval_ms=int(settings.heartbeat_min_interval_s * 1000),
        window_ms=options.heartbeat_window_ms,
    )
    await hub.start()
    try:
        yield WsServices(hub=hub, batcher=batcher, market=market, keys=keys, options=options)
    finally:
        await asyncio.shield(batcher.aclose())
        await asyncio.shield(hub.stop())


_encode = protocol.encode


class _ChannelRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# The endpoint


class WsEndpoint:
    """The ASGI app behind `/ws`: authenticate before accept, then run the session to its end.

    A plain ASGI callable rather than a Starlette function endpoint: no per-frame wrappers of
    its own around `send`, and `gateway.direct` recognises the server's `send` through the
    only wrapper left (Starlette's exception middleware).
    """

    def __init__(self, *, public: bool = False) -> None:
        self.public = public
        """Anonymous sockets, public channels only (`/ws/public`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        services: WsServices = getattr(websocket.state, STATE_KEY)
        principal: Principal | None = None
        if self.public:
            client = websocket.client
            subject = f"addr:{client.host if client is not None else 'unknown'}"
        else:
            try:
                principal = await authenticate(websocket)
            except Unauthorized as exc:
                await websocket.close(code=CLOSE_AUTH, reason=exc.code)
                return
            except Exception:
                # The accounts database is down, say: a retryable 503, not a refusal.
                log.exception("authenticating a WebSocket failed")
                await _deny(
                    websocket, send, 503, "unavailable", "authentication unavailable; retry"
                )
                return
            if principal.expires_ms is not None and principal.expires_ms <= _now_ms():
                await websocket.close(code=CLOSE_AUTH, reason="token_expired")
                return
            subject = principal.user_id
        limiter: RateLimiter = websocket.state.limiter
        try:
            slot = await limiter.open_connection(subject)
        except RateLimited as exc:
            await _deny(websocket, send, 429, exc.code, exc.message, exc.headers)
            return
        except Exception:
            log.exception("counting the sockets of %s failed", subject)
            await _deny(websocket, send, 503, "unavailable", "connection limit unavailable; retry")
            return
        try:
            await websocket.accept()
            session = _Session(websocket, send, principal, services)
            services.sockets += 1
            try:
                await session.run()
            finally:
                services.sockets -= 1
        finally:
            await asyncio.shield(limiter.close_connection(subject, slot))


async def _deny(
    websocket: WebSocket,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Refuse a handshake with an HTTP status and the error body, where the server can send one
    (uvicorn can); elsewhere a close before accept, which reaches the client as a 403."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(status, code, message, headers=headers))
        denied(send)
    else:
        await websocket.close(code=CLOSE_SLOW if status == 429 else CLOSE_INTERNAL, reason=code)


ws_routes: list[BaseRoute] = [
    WebSocketRoute("/ws", WsEndpoint(), name="ws"),
    WebSocketRoute("/ws/public", WsEndpoint(public=True), name="ws_public"),
]
"""Routes to mount in the app (`routes=[..., *ws_routes]`)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _batch(first: str, queue: asyncio.Queue[str], max_bytes: int) -> str:
    """`first` and the frames queued behind it (up to about `max_bytes`) as one batch message.

    Each element is a server message exactly as it would have been sent alone (already encoded,
    so this is a join, not a re-encode). Nothing waits for a batch to fill.
    """
    frames = [first]
    size = len(first)
    while size < max_bytes and not queue.empty():
        frame = queue.get_nowait()
        frames.append(frame)
        size += len(frame) + 1
    if len(frames) == 1:
        return first
    return '{"type":"batch","messages":[' + ",".join(frames) + "]}"


class _Session:
    """One open socket: a reader (client messages), a writer (the hub queue), a deadline."""

    def __init__(
        self, websocket: WebSocket, send: Send, principal: Principal | None, services: WsServices
    ) -> None:
        self.ws = websocket
        self._send = send
        self.principal = principal
        self.services = services
        self.hub = services.hub
        client = websocket.client
        where = f"{client.host}:{client.port}" if client else "?"
        self.batch = websocket.query_params.get("batch", "").lower() in ("1", "true")
        self.sub: Subscriber = self.hub.attach(
            f"{principal.user_id if principal is not None else 'public'}@{where}",
            on_drop=self._on_drop,
            direct=direct_writer(send, high_water_bytes=self.hub.high_water_bytes),
            batch_bytes=services.options.max_batch_bytes if self.batch else 0,
        )
        self._done = asyncio.Event()
        self._close_code: int | None = None
        self._close_reason = ""
        self._inflight = asyncio.Semaphore(services.options.max_inflight_heartbeats)
        self._limiter: RateLimiter = websocket.state.limiter

    def finish(self, code: int | None, reason: str = "") -> None:
        """End the session; `code` None means the client is gone (nothing to close)."""
        if not self._done.is_set():
            self._close_code, self._close_reason = code, reason
            self._done.set()

    def _on_drop(self, sub: Subscriber, reason: str) -> None:
        if reason == "slow":
            self.finish(CLOSE_SLOW, "too slow: send buffer full")
        elif reason == "error":
            self.finish(CLOSE_INTERNAL, "internal error")
        else:
            self.finish(CLOSE_SHUTDOWN, "server shutting down")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._read_loop(), name=f"ws-read {self.sub.name}")
        writer = asyncio.create_task(self._write_loop(), name=f"ws-write {self.sub.name}")
        tasks = [reader, writer]
        deadline = None
        principal = self.principal
        if principal is not None and principal.expires_ms is not None:
            delay_s = max(0.0, (principal.expires_ms - _now_ms()) / 1000)
            deadline = loop.call_later(delay_s, self.finish, CLOSE_AUTH, "token expired")
        if principal is not None and principal.via in ("api_key", "session"):
            tasks.append(asyncio.create_task(self._recheck_key(), name=f"ws-auth {self.sub.name}"))
        try:
            await self._done.wait()
        finally:
            if deadline is not None:
                deadline.cancel()
            self.hub.detach(self.sub)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        if self._close_code is None or self.ws.application_state != WebSocketState.CONNECTED:
            return
        try:
            # A client that stopped reading keeps the send buffer full; don't wait on it forever.
            async with asyncio.timeout(self.services.options.close_timeout_s):
                await self.ws.close(code=self._close_code, reason=self._close_reason)
        except (TimeoutError, WebSocketDisconnect, OSError, RuntimeError) as exc:
            log.debug("closing %s: %r", self.sub.name, exc)

    async def _recheck_key(self) -> None:
        interval_s = self.services.options.reauth_interval_s
        while True:
            await asyncio.sleep(interval_s)
            try:
                await authenticate(self.ws)
            except Unauthorized:
                self.finish(CLOSE_AUTH, "credentials revoked")
                return
            except Exception as exc:
                # An outage of the accounts database is not the client's fault: keep serving.
                log.warning("re-checking the key of %s failed: %r", self.sub.name, exc)

    async def _write_loop(self) -> None:
        sub = self.sub
        queue = sub.queue
        send = self._send  # the ASGI path: the socket is accepted and only this task sends
        batch_bytes = self.services.options.max_batch_bytes if self.batch else 0
        try:
            while True:
                frame = await queue.get()
                if batch_bytes and not queue.empty():
                    frame = _batch(frame, queue, batch_bytes)
                await send({"type": "websocket.send", "text": frame})
                sub.sent()  # nothing left queued: the hub may write directly again
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            log.debug("writer of %s stopped: %r", self.sub.name, exc)
            self.finish(None)
        except Exception:
            log.exception("writer of %s failed", self.sub.name)
            self.finish(CLOSE_INTERNAL, "internal error")

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.finish(None)
                    return
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                await self._handle(data)
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            log.debug("reader of %s stopped: %r", self.sub.name, exc)
            self.finish(None)
        except Exception:
            log.exception("reader of %s failed", self.sub.name)
            self.finish(CLOSE_INTERNAL, "internal error")

    # -- replies --------------------------------------------------------------------------------

    def _reply(self, message: Subscribed | Unsubscribed | HeartbeatAck | Pong | ErrorReply) -> None:
        if not self._done.is_set():
            self.hub.deliver(self.sub, _encode(message).decode())

    def _error(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        channel: str | None = None,
        ref: Ref = None,
    ) -> None:
        detail = ErrorDetail(code=code, message=message, field=field)
        self._reply(ErrorReply(error=detail, channel=channel, ref=ref))

    # -- client messages ------------------------------------------------------------------------

    async def _handle(self, data: str | bytes) -> None:
        if len(data) > self.services.options.max_message_bytes:
            self._error(
                "payload_too_large",
                f"message of {len(data)} bytes exceeds {self.services.options.max_message_bytes}",
            )
            return
        try:
            op = protocol.decode_client_message(data)
        except msgspec.DecodeError as exc:
            api = from_msgspec(exc, where="message")
            self._error(api.code, api.message, field=api.field)
            return
        match op:
            case SubscribeOp():
                await self._subscribe(op.channels)
            case UnsubscribeOp():
                names = list(dict.fromkeys(op.channels))
                self.hub.unsubscribe(self.sub, names)
                self._reply(Unsubscribed(channels=names))
            case HeartbeatOp():
                await self._heartbeat(op)
            case PingOp():
                self._reply(Pong(ref=op.ref))

    async def _subscribe(self, names: list[str]) -> None:
        wanted = list(dict.fromkeys(names))
        held = len(self.sub.channels)
        limit = self.services.options.max_channels
        new = sum(1 for name in wanted if name not in self.sub.channels)
        # Counted as asked, before any channel is looked up: a client probing past its limit
        # costs no Redis reads.
        if held + new > limit:
            self._limiter.refused("subscriptions")
            self._error(
                "too_many_channels",
                f"at most {limit} channels per socket: this socket holds {held} and the "
                f"request adds {new}; nothing was subscribed",
                field="channels",
            )
            return
        pairs: list[tuple[str, str]] = []
        for name in wanted:
            try:
                redis_channel = await self._authorize(name)
            except _ChannelRefused as exc:
                self._error(exc.code, exc.message, channel=name)
                continue
            pairs.append((redis_channel, name))
        if not pairs:
            return
        try:
            await self.hub.subscribe(self.sub, pairs)
        except HubUnavailable as exc:
            for _, name in pairs:
                self._error("unavailable", str(exc), channel=name)
            return
        # Nothing ran since subscribe() returned, so this reply precedes the channels' events.
        self._reply(Subscribed(channels=[name for _, name in pairs]))

    async def _authorize(self, name: str) -> str:
        """The Redis channel behind a ws channel name, if this principal may subscribe."""
        keys = self.services.keys
        principal = self.principal
        if principal is None and (name in _OWN_CHANNELS or name.startswith("node:")):
            raise _ChannelRefused("forbidden", "sign in for this channel (on /ws)")
        if name in _OWN_CHANNELS:
            assert principal is not None
            return keys.user_channel(principal.user_id)
        if name == "market":
            return keys.market_channel
        kind, _, arg = name.partition(":")
        if kind in ("quotes", "trades"):
            if not _REGION.match(arg):
                raise _ChannelRefused("unknown_channel", f"bad region in {name!r}")
            return keys.quotes_channel(arg) if kind == "quotes" else keys.trades_channel(arg)
        if kind in ("node", "leases"):
            if not _ID.match(arg):
                raise _ChannelRefused("unknown_channel", f"bad node id in {name!r}")
            node = await self.services.market.get_node(arg)
            if node is None:
                raise _ChannelRefused("not_found", f"no node {arg}")
            assert principal is not None
            if node.owner_id != principal.user_id and not principal.is_admin:
                raise _ChannelRefused("forbidden", "only the node's owner may subscribe")
            return keys.node_channel(arg)
        raise _ChannelRefused(
            "unknown_channel",
            f"unknown channel {name!r}: expected quotes:<region>, trades:<region>, fills, bids, "
            "contracts, leases, node:<id>, leases:<id> or market",
        )

    async def _heartbeat(self, op: HeartbeatOp) -> None:
        principal = self.principal
        if principal is None:
            self._error("forbidden", "heartbeats need credentials (on /ws)", ref=op.ref)
            return
        # The bounds are the REST heartbeat's (msgspec checked them); this is the one rule
        # across fields, checked here so a bad beat never reaches a batch shared with others.
        for i, b in enumerate(op.beats):
            if (problem := b.location_error()) is not None:
                self._error("validation_error", problem, field=f"beats[{i}].latitude", ref=op.ref)
                return
        beats = [market_heartbeat(b.node_id, b) for b in op.beats]
        # Read no further while too many batches of this socket await their ack.
        await self._inflight.acquire()
        fut = self.services.batcher.submit(principal.user_id, beats)
        ref = op.ref
        fut.add_done_callback(lambda f: self._acked(f, ref))

    def _acked(self, fut: asyncio.Future[list[Outcome]], ref: Ref) -> None:
        self._inflight.release()
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            results = [BeatResult(o.node_id, o.outcome, o.retry_after_ms) for o in fut.result()]
            self._reply(HeartbeatAck(ref=ref, results=results))
        elif isinstance(exc, MarketError):
            self._error(exc.code, exc.message, field=exc.field, ref=ref)
        else:
            self._error("unavailable", "heartbeats could not be applied; retry", ref=ref)
