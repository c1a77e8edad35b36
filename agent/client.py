"""The agent's side of the gateway contract: REST calls (httpx) and the `/ws` socket (websockets).

REST: `Gateway` wraps one keep-alive `httpx.AsyncClient`. Errors come back as `ApiError` (the
gateway's `{"error": {code, message, field}}` with the HTTP status, and `retry_after_s` for a
429). A lost connection or a 502/503/504 is `GatewayUnavailable`: callers retry those, and only
those, with `Backoff` (exponential, full jitter, capped) — see `retrying()`.

WebSocket: `GatewaySocket` is one connection to `/ws` authenticated by the `X-API-Key` header,
speaking `gateway.protocol` (the gateway's own definition of every message, which imports nothing
but msgspec). It subscribes to channels, sends batched heartbeats (`HeartbeatOp` of `Beat`s) and
resolves each batch with the server's `HeartbeatAck`; each event goes to the `on_event` callback
as its channel's typed public event (`ContractNotice` or `TrustNotice` on `node:<id>`, ...). One
socket carries any number of nodes of one owner, which is how the simulator drives a large fleet
over few connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect

from gateway.protocol import (
    MAX_BEATS_PER_MESSAGE,
    MAX_CHANNELS_PER_MESSAGE,
    Batch,
    Beat,
    BeatResult,
    ContractOut,
    ErrorReply,
    Event,
    Heartbeat,
    HeartbeatAck,
    HeartbeatOp,
    LeaseClosed,
    LeaseCredentials,
    LeaseEndpoint,
    LeaseReady,
    PublicEvent,
    Ref,
    ServerMessage,
    Subscribed,
    SubscribeOp,
    decode_event,
    decode_server_message,
    encode,
)

__all__ = [
    "AckHandler",
    "ApiError",
    "Backoff",
    "EventHandler",
    "Gateway",
    "GatewaySocket",
    "GatewayUnavailable",
    "retrying",
    "ws_url",
]

log = logging.getLogger("mnemo.agent.client")

T = TypeVar("T")


class ApiError(Exception):
    """The gateway refused a request: HTTP `status`, stable `code`, `message`, optional `field`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"{self.status} {self.code}: {self.message}{where}"


class GatewayUnavailable(Exception):
    """The gateway could not be reached or answered 502/503/504; worth retrying later."""


class Backoff:
    """Exponential backoff with full jitter: delay n is uniform in [0, min(cap, base * 2**n)].

    Full jitter spreads a fleet's reconnects after a gateway restart instead of stampeding.
    `floor_s` keeps a small minimum so a tight loop never spins.
    """

    def __init__(
        self,
        base_s: float = 1.0,
        cap_s: float = 60.0,
        *,
        floor_s: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.floor_s = floor_s
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempts, 32)))
        self.attempts += 1
        return max(self.floor_s, self._rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempts = 0


async def retrying(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff | None = None,
    stop: asyncio.Event | None = None,
    attempts: int | None = None,
) -> T:
    """Await `call()` until it succeeds, retrying only `GatewayUnavailable` and 429s.

    Logs a countdown for each retry. Gives up (re-raising the last error) after `attempts` tries,
    or raises `asyncio.CancelledError` when `stop` is set while waiting.
    """
    backoff = backoff or Backoff()
    for attempt in itertools.count(1):
        try:
            return await call()
        except GatewayUnavailable as exc:
            delay = backoff.next_delay()
            reason = str(exc)
        except ApiError as exc:
            if exc.status != 429:
                raise
            delay = max(exc.retry_after_s or 1.0, backoff.floor_s)
            reason = "rate limited"
        if attempts is not None and attempt >= attempts:
            raise GatewayUnavailable(f"{what}: gave up after {attempt} attempts ({reason})")
        log.warning("%s: %s; retrying in %.1f s (attempt %d)", what, reason, delay, attempt)
        if stop is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                raise asyncio.CancelledError(f"{what}: stopped while retrying")
    raise AssertionError("unreachable")


def _api_error(response: httpx.Response) -> ApiError:
    code, message, field = "http_error", response.reason_phrase or "error", None
    try:
        body = response.json()
        error = body.get("error", {}) if isinstance(body, dict) else {}
        code = str(error.get("code", code))
        message = str(error.get("message", message))
        field = error.get("field")
    except ValueError:
        pass
    retry_after: float | None = None
    if raw := response.headers.get("retry-after"):
        with contextlib.suppress(ValueError):
            retry_after = float(raw)
    return ApiError(response.status_code, code, message, field, retry_after)


class Gateway:
    """REST client of one gateway, authenticated with an API key (set later for a signup)."""

    def __init__(
        self,
        api_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 10.0,
        max_connections: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        headers = {"User-Agent": "mnemo-agent/0.1"}
        if api_key:
            headers["X-API-Key"] = api_key
        self.api_key = api_key
        self._http = httpx.AsyncClient(
            base_url=self.api_url,
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=30.0,
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def use_key(self, api_key: str) -> None:
        self.api_key = api_key
        self._http.headers["X-API-Key"] = api_key

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """One call; decoded JSON on 2xx, `ApiError` on 4xx, `GatewayUnavailable` otherwise.

        With `idempotency_key` a retried creating POST is answered with the first one's result
        instead of creating twice (the gateway's `Idempotency-Key`)."""
        content = None if body is None else msgspec.json.encode(body)
        headers: dict[str, str] = {}
        if content is not None:
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            response = await self._http.request(
                method, path, content=content, params=params, headers=headers
            )
        except httpx.TransportError as exc:
            raise GatewayUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            if response.status_code in (502, 503, 504):
                raise GatewayUnavailable(f"{method} {path}: HTTP {response.status_code}")
            raise _api_error(response)
        if response.status_code >= 400:
            raise _api_error(response)
        if not response.content:
            return None
        return msgspec.json.decode(response.content)

    # -- accounts -------------------------------------------------------------------------

    async def signup(
        self,
        email: str,
        password: str,
        *,
        role: str = "provider",
        full_name: str | None = None,
        organization: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Create an account; returns (user, api_key) and authenticates this client with the key."""
        body: dict[str, Any] = {"email": email, "password": password, "role": role}
        if full_name:
            body["full_name"] = full_name
        if organization:
            body["organization"] = organization
        data = await self.request("POST", "/api/auth/signup", body=body)
        key = data["api_key"]["key"]
        self.use_key(key)
        return data["user"], key

    # -- nodes ----------------------------------------------------------------------------

    async def register_node(
        self, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """POST /api/nodes/register; returns (node_id, node). Pass the same `idempotency_key`
        on every retry of one registration so a lost reply never registers the machine twice."""
        data = await self.request(
            "POST", "/api/nodes/register", body=body, idempotency_key=idempotency_key
        )
        return data["node_id"], data["node"]

    async def register_nodes(
        self, bodies: list[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> list[str]:
        """POST /api/nodes/register/batch (all the nodes or none); their ids, in order. A
        gateway without batch registration answers 404 (`ApiError`)."""
        data = await self.request(
            "POST",
            "/api/nodes/register/batch",
            body={"nodes": bodies},
            idempotency_key=idempotency_key,
        )
        return [str(i) for i in data["node_ids"]]

    async def get_node(self, node_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/api/nodes/{node_id}")

    async def update_node(self, node_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", f"/api/nodes/{node_id}", body=changes)

    async def heartbeat(self, node_id: str, body: Heartbeat) -> dict[str, Any]:
        """POST /api/nodes/{id}/heartbeat (the HTTP fallback of the socket's batched beats)."""
        return await self.request("POST", f"/api/nodes/{node_id}/heartbeat", body=body)

    async def node_contracts(self, node_id: str, *, status: str = "active") -> list[ContractOut]:
        """Every contract on the node with this status (all pages)."""
        out: list[ContractOut] = []
        offset = 0
        while True:
            page = await self.request(
                "GET",
                "/api/contracts",
                params={"node_id": node_id, "status": status, "offset": offset, "limit": 500},
            )
            contracts = msgspec.convert(page["contracts"], list[ContractOut])
            out.extend(contracts)
            offset += len(contracts)
            if not contracts or offset >= page["total_count"]:
                return out

    # -- delivery (node-authenticated, as heartbeats) --------------------------------------

    async def node_leases(self, node_id: str) -> list[LeaseEndpoint]:
        """GET /api/nodes/{id}/leases: the leases of the node's active contracts."""
        data = await self.request("GET", f"/api/nodes/{node_id}/leases")
        return msgspec.convert(data, list[LeaseEndpoint])

    async def lease_credentials(self, node_id: str, contract_id: str) -> LeaseCredentials:
        """GET /api/nodes/{id}/leases/{contract_id}/credentials: the lease's ACL user."""
        data = await self.request("GET", f"/api/nodes/{node_id}/leases/{contract_id}/credentials")
        return msgspec.convert(data, LeaseCredentials)

    async def lease_ready(self, node_id: str, contract_id: str, body: LeaseReady) -> LeaseEndpoint:
        """POST /api/nodes/{id}/leases/{contract_id}/ready (409: the lease is no longer pending
        or ready)."""
        data = await self.request(
            "POST", f"/api/nodes/{node_id}/leases/{contract_id}/ready", body=body
        )
        return msgspec.convert(data, LeaseEndpoint)

    async def lease_closed(
        self, node_id: str, contract_id: str, body: LeaseClosed
    ) -> LeaseEndpoint | None:
        """POST /api/nodes/{id}/leases/{contract_id}/closed (idempotent: a repeat, or a report
        after the exchange settled without it, answers 200 or 409 and changes nothing)."""
        data = await self.request(
            "POST", f"/api/nodes/{node_id}/leases/{contract_id}/closed", body=body
        )
        return None if data is None else msgspec.convert(data, LeaseEndpoint)


# ---------------------------------------------------------------------------------------------
# WebSocket


EventHandler = Callable[[str, PublicEvent], None]
"""Called with (channel, the channel's public event) for each event of a subscribed channel."""
AckHandler = Callable[[Ref, list[BeatResult] | None], None]
"""Called with (ref, results) for each ack of `send_heartbeats`; results None: batch refused."""


def ws_url(api_url: str) -> str:
    """`http(s)://host[:port][/prefix]` -> `ws(s)://host[:port][/prefix]/ws`."""
    parts = urlsplit(api_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path + "/ws", "", ""))


class GatewaySocket:
    """One `/ws` connection: subscriptions, batched heartbeats with acks, events by callback.

    Use `await GatewaySocket.open(...)`, then `subscribe`, `heartbeat`/`send_heartbeats`, and
    `closed` (a future set when the connection ends, with the reason). The reader task runs until
    the connection closes; it never raises into the caller.
    """

    CHANNELS_PER_MESSAGE = MAX_CHANNELS_PER_MESSAGE
    """The gateway takes at most this many channels per subscribe message."""
    MAX_BEATS_PER_MESSAGE = MAX_BEATS_PER_MESSAGE
    """The gateway takes at most this many beats per heartbeat message."""

    def __init__(
        self,
        connection: ClientConnection,
        on_event: EventHandler | None,
        on_ack: AckHandler | None,
    ) -> None:
        self._ws = connection
        self._on_event = on_event
        self._on_ack = on_ack
        self._refs = itertools.count(1)
        self._pending: dict[int, asyncio.Future[list[BeatResult]]] = {}
        self._await_channels: dict[str, None] = {}
        self._refused: list[ApiError] = []
        self._subscription: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(), name="mnemo-agent-ws-reader")

    @classmethod
    async def open(
        cls,
        api_url: str,
        api_key: str,
        *,
        on_event: EventHandler | None = None,
        on_ack: AckHandler | None = None,
        open_timeout_s: float = 10.0,
        max_size: int = 16 * 1024 * 1024,
    ) -> GatewaySocket:
        """Connect to `/ws`; raises `GatewayUnavailable` if the gateway cannot be reached,
        `ApiError` if it refuses the key."""
        try:
            connection = await connect(
                ws_url(api_url),
                additional_headers={"X-API-Key": api_key},
                open_timeout=open_timeout_s,
                max_size=max_size,
                ping_interval=20,
                ping_timeout=20,
                compression=None,  # beats are small and many: deflate costs more CPU than it saves
            )
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in (502, 503, 504):
                raise GatewayUnavailable(f"websocket: HTTP {status}") from exc
            raise ApiError(status, "websocket_refused", f"websocket refused with {status}") from exc
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise GatewayUnavailable(f"websocket: {type(exc).__name__}: {exc}") from exc
        return cls(connection, on_event, on_ack)

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    async def _read(self) -> None:
        reason = "closed"
        try:
            async for raw in self._ws:
                try:
                    msg = decode_server_message(raw)
                except msgspec.DecodeError as exc:
                    # A message type of a newer gateway, say: skip it, keep the connection.
                    log.warning("websocket: undecodable message (%s)", exc)
                    continue
                self._dispatch(msg)
        except websockets.ConnectionClosed as exc:
            reason = f"connection closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        except OSError as exc:
            reason = f"connection lost ({exc})"
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(GatewayUnavailable(f"websocket: {reason}"))
            self._pending.clear()
            if self._subscription is not None and not self._subscription.done():
                self._subscription.set_exception(GatewayUnavailable(f"websocket: {reason}"))
            if not self.closed.done():
                self.closed.set_result(reason)

    def _dispatch(self, msg: ServerMessage) -> None:
        match msg:
            case HeartbeatAck(ref=ref, results=results):
                future = self._pending.pop(ref, None) if isinstance(ref, int) else None
                if future is not None and not future.done():
                    future.set_result(results)
                elif self._on_ack is not None:
                    self._on_ack(ref, results)
            case Event(channel=channel):
                if self._on_event is not None:
                    self._on_channel_event(channel, msg)
            case Subscribed(channels=channels):
                for channel in channels:
                    self._await_channels.pop(channel, None)
                self._check_subscription()
            case ErrorReply():
                self._on_error(msg)
            case Batch(messages=messages):
                for inner in messages:
                    self._dispatch(inner)
            case _:
                log.debug("websocket: ignoring %s", type(msg).__name__)

    def _on_channel_event(self, channel: str, msg: Event) -> None:
        assert self._on_event is not None
        try:
            event = decode_event(channel, msg.data)
        except ValueError as exc:
            log.warning("websocket: undecodable event on %s (%s)", channel, exc)
            return
        try:
            self._on_event(channel, event)
        except Exception:
            # A handler bug must not kill the connection (and with it every node on it).
            log.exception("event handler failed on %s", channel)

    def _on_error(self, msg: ErrorReply) -> None:
        code, message = msg.error.code, msg.error.message
        if msg.channel is not None and msg.channel in self._await_channels:
            del self._await_channels[msg.channel]
            self._refused.append(ApiError(0, code, f"{msg.channel}: {message}"))
            self._check_subscription()
        elif isinstance(msg.ref, int) and msg.ref in self._pending:
            future = self._pending.pop(msg.ref)
            if not future.done():
                future.set_exception(ApiError(0, code, message))
        elif msg.ref is not None and self._on_ack is not None:
            log.warning("websocket: heartbeat batch %r refused: %s %s", msg.ref, code, message)
            self._on_ack(msg.ref, None)
        else:
            log.warning("websocket: server error %s: %s", code, message)

    def _check_subscription(self) -> None:
        waiter = self._subscription
        if waiter is not None and not self._await_channels and not waiter.done():
            waiter.set_result(None)

    async def subscribe(self, channels: Iterable[str], *, timeout_s: float = 10.0) -> None:
        """Subscribe to `channels` (chunked) and wait until the server confirmed or refused
        each one; raises `ApiError` (status 0, the server's code) naming a refused channel."""
        channels = list(dict.fromkeys(channels))
        loop = asyncio.get_running_loop()
        for start in range(0, len(channels), self.CHANNELS_PER_MESSAGE):
            chunk = channels[start : start + self.CHANNELS_PER_MESSAGE]
            self._await_channels = dict.fromkeys(chunk)
            self._refused = []
            waiter: asyncio.Future[None] = loop.create_future()
            self._subscription = waiter
            await self._send(encode(SubscribeOp(channels=chunk)))
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
            except TimeoutError:
                raise GatewayUnavailable("websocket: subscription not confirmed") from None
            finally:
                self._subscription = None
            if self._refused:
                raise self._refused[0]

    async def _send(self, frame: bytes) -> None:
        try:
            # A text frame from UTF-8 bytes without decoding them: the gateway reads JSON text.
            await self._ws.send(frame, text=True)
        except websockets.ConnectionClosed as exc:
            raise GatewayUnavailable(f"websocket: {exc}") from exc

    async def send_heartbeats(self, beats: list[Beat], ref: int | None = None) -> int:
        """Send one batch without waiting; its ack goes to `on_ack(ref, results)`. Returns ref."""
        if ref is None:
            ref = next(self._refs)
        await self._send(encode(HeartbeatOp(beats=beats, ref=ref)))
        return ref

    async def heartbeat(self, beats: list[Beat], *, timeout_s: float = 10.0) -> list[BeatResult]:
        """Send one batch and wait for its ack."""
        ref = next(self._refs)
        future: asyncio.Future[list[BeatResult]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        try:
            await self.send_heartbeats(beats, ref)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise GatewayUnavailable("websocket: heartbeat not acknowledged in time") from None
        finally:
            self._pending.pop(ref, None)

    async def close(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed, OSError):
            await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
