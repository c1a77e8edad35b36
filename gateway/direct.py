"""Direct writes of already-framed WebSocket messages to the server's transport, past ASGI `send`.

Why: a server-to-client frame is unmasked, so a notification for many sockets can be framed ONCE
(header + payload bytes) and the same bytes written to each socket's transport. Through ASGI every
socket would instead cost a `send` message dict, uvicorn's and websockets' framing of the same
payload again, and (from a writer task) a task wake-up. `gateway.hub` uses this for fan-out.

Rules:
- Only server implementations recognised here are used: uvicorn's `WebSocketsSansIOProtocol`
  (`--ws websockets-sansio`, and what `--ws auto` picks when websockets is installed). The ASGI
  `send` the app is given must be that protocol's own bound `send`, possibly wrapped by the
  pass-through wrappers listed in `_PASS_THROUGH` (Starlette's exception middleware wraps every
  WebSocket `send` in one that only looks at HTTP messages). Anything else (wsproto, the legacy
  websockets implementation, an unknown middleware wrapping `send`): `direct_writer()` returns
  None and the caller keeps the ASGI path.
- Refused when per-message deflate was negotiated (each socket has its own compression context,
  so one framing cannot serve all) and when the socket is not open.
- `write()` hands whole frames to `transport.write` in one call, as uvicorn itself does for every
  frame it sends (messages, pings, pongs, close), so frames never interleave on the wire. It
  writes nothing once the socket is closing (our close sent, the peer's close received, the
  transport closing), saying so in its result.
- Ordering against the ASGI path is the CALLER's rule: uvicorn's `send` writes synchronously
  while the transport is writable, but when the transport has paused writing it suspends BEFORE
  writing; a direct write meanwhile would overtake that pending message. So a socket gets
  direct writes only while nothing of its own is queued for or inside its ASGI `send`
  (`gateway.hub.Subscriber.busy`).
- There is no backpressure: uvicorn's transport buffers what the kernel does not take. `write()`
  reports when the buffer has passed `high_water_bytes`; the caller closes such a slow
  consumer (1013) instead of letting the buffer grow without bound.

`denied(send)` is the one other reach into the same protocol: after a denial response (an HTTP
answer to the handshake, such as a 429 past the account's socket limit) it marks the handshake
done, as uvicorn's wsproto implementation does itself; websockets-sansio otherwise logs "ASGI
callable returned without completing handshake." at ERROR for every refused connection
(Kludex/uvicorn#3138), a line a client could have written at will by retrying.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

__all__ = [
    "FULL",
    "NOT_OPEN",
    "OK",
    "DirectWriter",
    "denied",
    "direct_writer",
    "frame_payload",
    "frame_text",
]

OK: Final = 0
"""Written."""
NOT_OPEN: Final = 1
"""Nothing written: the socket is closing or closed."""
FULL: Final = 2
"""Written, and the transport now buffers more than `high_water_bytes`."""

# (module, qualname) of functions that wrap an ASGI `send` and pass WebSocket messages through
# unchanged, and the name of the closure variable holding the `send` they wrap.
_PASS_THROUGH: dict[tuple[str, str], str] = {
    (
        "starlette._exception_handler",
        "wrap_app_handling_exceptions.<locals>.wrapped_app.<locals>.sender",
    ): "send",
}


def frame_text(payload: bytes) -> bytes:
    """One final, unmasked text frame (RFC 6455 5.2) carrying `payload` (valid UTF-8)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def frame_payload(frame: bytes) -> bytes:
    """The payload of a frame made by `frame_text` (a copy: for notification-sized frames a
    slice costs less than a memoryview)."""
    n = frame[1]
    return frame[2 if n < 126 else 4 if n == 126 else 10 :]


class DirectWriter:
    """Writes whole frames straight to one accepted socket's transport (see the module rules)."""

    __slots__ = ("_protocol", "_transport", "high_water_bytes")

    def __init__(self, protocol: Any, high_water_bytes: int) -> None:
        self._protocol = protocol
        self._transport: asyncio.Transport = protocol.transport
        self.high_water_bytes = high_water_bytes

    def write(self, data: bytes) -> int:
        """Write `data` (whole frames): `OK`, `FULL` (written, but over the high-water mark) or
        `NOT_OPEN` (nothing written)."""
        t = self._transport
        # Every way out of the OPEN state sets `close_sent` or closes the transport in the
        # same callback (our close, the peer's close, a protocol error, a ping timeout).
        if self._protocol.close_sent or t.is_closing():
            return NOT_OPEN
        t.write(data)
        return OK if t.get_write_buffer_size() <= self.high_water_bytes else FULL

    @property
    def buffered_bytes(self) -> int:
        """Bytes the transport holds that the kernel has not taken yet."""
        return self._transport.get_write_buffer_size()


def direct_writer(send: Callable[..., Any], *, high_water_bytes: int) -> DirectWriter | None:
    """A `DirectWriter` for the socket behind the ASGI `send` of an accepted WebSocket, or None
    when the server, the wrappers around `send` or the socket's state are not ones this module
    supports (the caller then keeps using `send`)."""
    protocol = _server_protocol(send)
    if protocol is None:
        return None
    from websockets.protocol import OPEN

    conn = getattr(protocol, "conn", None)
    if (
        conn is None
        or conn.extensions  # per-message deflate (or any extension) was negotiated
        or conn.state is not OPEN
        or not protocol.handshake_complete
        or protocol.initial_response is not None
        or protocol.close_sent
        or protocol.transport is None
        or protocol.transport.is_closing()
    ):
        return None
    return DirectWriter(protocol, high_water_bytes)


def denied(send: Callable[..., Any]) -> None:
    """After a denial response went out through `send`: the handshake is over (see above)."""
    protocol = _server_protocol(send)
    if (
        protocol is not None
        and getattr(protocol, "initial_response", None) is not None
        and getattr(protocol, "close_sent", False)
    ):
        protocol.handshake_complete = True


def _server_protocol(send: Callable[..., Any]) -> Any:
    """The uvicorn protocol object whose own `send` is `send` or is wrapped by it, if supported."""
    for _ in range(8):
        owner = getattr(send, "__self__", None)
        if owner is not None:
            func = getattr(send, "__func__", None)
            cls = _sansio_class()
            if cls is not None and type(owner) is cls and func is cls.send:
                return owner
            return None
        code = getattr(send, "__code__", None)
        closure = getattr(send, "__closure__", None)
        key = (getattr(send, "__module__", ""), getattr(send, "__qualname__", ""))
        var = _PASS_THROUGH.get(key)
        if code is None or closure is None or var is None or var not in code.co_freevars:
            return None
        send = closure[code.co_freevars.index(var)].cell_contents
    return None


def _sansio_class() -> Any:
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:  # uvicorn without websockets, or a version without this module
        return None
    return WebSocketsSansIOProtocol
