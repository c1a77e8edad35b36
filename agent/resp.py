"""A small Redis protocol (RESP2) client over asyncio streams: the agent's line to its lease servers.

The agent manages each lease server (INFO for the meter, the digest, SHUTDOWN) through one
connection of its own. It does not use redis-py or valkey-py: the agent installs with light
dependencies, and it needs one thing those clients do not give, the exact count of bytes the
connection received (`bytes_received`), which the meter subtracts from the server's
`total_net_output_bytes` so that the renter is billed only for what the renter's connections
received (see `agent.lease_server`).

One command at a time per connection (or one pipelined batch): replies come back in order.
An error reply is raised as `RespError` by `execute`; `pipeline` returns it in its place.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any

__all__ = ["Arg", "RespConnection", "RespError", "encode_command"]

Arg = bytes | str | int
"""One argument of a command (str is sent as UTF-8, int in decimal)."""


class RespError(Exception):
    """An error reply from the server (`-ERR ...`, `-NOPERM ...`, `-OOM ...`); `str` is its text."""

    @property
    def code(self) -> str:
        """The first word of the reply (`ERR`, `NOPERM`, `OOM`, `WRONGPASS`...)."""
        return str(self).split(" ", 1)[0]


def _arg(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    raise TypeError(f"a command argument must be bytes, str or int, not {type(value).__name__}")


def encode_command(args: Sequence[Arg]) -> bytes:
    """The RESP array of bulk strings that sends `args` as one command."""
    parts = [b"*%d\r\n" % len(args)]
    for value in args:
        data = _arg(value)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class RespConnection:
    """One connection to a Redis-protocol server. Open with `RespConnection.open(...)`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.bytes_received = 0
        """Every byte read from the server on this connection so far (replies, errors included)."""
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        host: str | None = None,
        port: int | None = None,
        *,
        unix_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout_s: float = 5.0,
        username: str | None = None,
        password: str | None = None,
    ) -> RespConnection:
        """Connect by TCP (`host`, `port`) or Unix socket (`unix_path`); AUTH when a password is
        given (raises `RespError` if refused). `OSError`/`TimeoutError` if it cannot connect."""
        limit = 1 << 20
        async with asyncio.timeout(timeout_s):
            if unix_path is not None:
                reader, writer = await asyncio.open_unix_connection(unix_path, limit=limit)
            else:
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=server_hostname if ssl_context is not None else None,
                    limit=limit,
                )
        connection = cls(reader, writer)
        if password is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    if username is None:
                        await connection.execute("AUTH", password)
                    else:
                        await connection.execute("AUTH", username, password)
            except BaseException:
                await connection.close()
                raise
        return connection

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply (bytes, int, list, None); raises `RespError`
        for an error reply, `ConnectionError` if the connection is lost."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send `commands` in one write and return their replies in order (an error reply is
        returned as a `RespError` in its place)."""
        async with self._lock:
            self._writer.write(b"".join(encode_command(c) for c in commands))
            await self._writer.drain()
            return [await self._read_reply() for _ in commands]

    async def _read_line(self) -> bytes:
        line = await self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by the server")
        self.bytes_received += len(line)
        return line[:-2]

    async def _read_reply(self) -> Any:
        line = await self._read_line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            try:
                data = await self._reader.readexactly(size + 2)
            except asyncio.IncompleteReadError as exc:
                raise ConnectionError("connection closed by the server") from exc
            self.bytes_received += size + 2
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [await self._read_reply() for _ in range(count)]
        raise ConnectionError(f"unexpected reply from the server: {line[:40]!r}")

    async def close(self) -> None:
        """Close the connection (never raises)."""
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, ConnectionError, ssl.SSLError):
            pass
