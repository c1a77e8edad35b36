"""The digest of a lease's data: what the node reports at close, and what a renter reproduces.

A lease server holds one database (`databases 1`). Its digest is the SHA-256, in lower-case hex,
of this byte string:

    b"mnemo-lease-digest/1\\n"
    then, for each key, in ascending order of the key's raw bytes:
        field(name) + field(TYPE name) + field(DUMP name)
    then (number of keys).to_bytes(8, "big")

where `field(b) = len(b).to_bytes(8, "big") + b`, and a missing DUMP payload (the key vanished
between SCAN and DUMP) is the 8 bytes 0xFF... with no payload. The keys are those a full `SCAN`
returns (duplicates, which SCAN may give, counted once). `TYPE` is the reply's text (`string`,
`hash`, ...), `DUMP` the server's serialized value (type, encoding, data, RDB version and
checksum; no TTL). Only commands the lease's own user may run are used (SCAN, TYPE, DUMP), so
the renter, from its own connection, gets the same digest as the node's agent, as long as
nothing writes in between: the agent computes it at close after it has shut the renter out.

DUMP's bytes depend on the server's version and on the value's internal encoding, so the digest
identifies the data *as this lease server held it*: compare digests from the same server, not
across servers.

The algorithm is written once, without I/O (`digest_steps`: a generator that yields batches of
commands and receives their replies), and driven by `lease_digest` (a synchronous redis-py or
valkey-py client, or any callable that executes one command) and `lease_digest_async` (the
agent's `agent.resp.RespConnection`, an asyncio redis/valkey client, or an async callable).
Clients must return bytes (redis-py's default, `decode_responses=False`): DUMP is binary.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import Awaitable, Callable, Generator
from typing import Any

__all__ = ["DIGEST_PREFIX", "digest_steps", "lease_digest", "lease_digest_async"]

DIGEST_PREFIX = b"mnemo-lease-digest/1\n"
SCAN_COUNT = 1000
"""Keys asked of each SCAN call."""
BATCH_KEYS = 128
"""Most keys whose TYPE and DUMP go in one pipelined batch."""
BATCH_BYTES = 16 << 20
"""Batches shrink so that one holds about this many bytes of DUMP payloads (big values)."""
_MISSING = b"\xff" * 8

Command = tuple[Any, ...]
Steps = Generator[list[Command], list[Any], str]


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    raise TypeError(f"unexpected reply {value!r} (use a client that returns bytes)")


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def digest_steps() -> Steps:
    """The digest as a conversation: yields lists of commands, receives the list of their
    replies (in order), returns the hex digest. Drivers: `lease_digest`, `lease_digest_async`."""
    keys: set[bytes] = set()
    cursor: Any = 0
    while True:
        (reply,) = yield [("SCAN", cursor, "COUNT", SCAN_COUNT)]
        cursor, found = reply
        keys.update(_as_bytes(k) for k in found)
        if int(cursor) == 0:
            break
    ordered = sorted(keys)
    h = hashlib.sha256(DIGEST_PREFIX)
    lo, size = 0, BATCH_KEYS
    while lo < len(ordered):
        chunk = ordered[lo : lo + size]
        lo += len(chunk)
        commands: list[Command] = []
        for key in chunk:
            commands.append(("TYPE", key))
            commands.append(("DUMP", key))
        replies = yield commands
        if len(replies) != len(commands):
            raise ValueError("a reply for every command is needed")
        held = 0
        for k, key in enumerate(chunk):
            kind, payload = replies[2 * k], replies[2 * k + 1]
            if isinstance(kind, Exception):
                raise kind
            if isinstance(payload, Exception):
                raise payload
            h.update(_field(key))
            h.update(_field(_as_bytes(kind)))
            h.update(_MISSING if payload is None else _field(_as_bytes(payload)))
            held += 0 if payload is None else len(payload)
        # The batch size changes nothing in the digest, only how much a batch holds at once.
        size = max(1, min(BATCH_KEYS, len(chunk) * BATCH_BYTES // max(1, held)))
    h.update(len(ordered).to_bytes(8, "big"))
    return h.hexdigest()


def _drive(steps: Steps, run: Callable[[list[Command]], list[Any]]) -> str:
    try:
        commands = next(steps)
        while True:
            commands = steps.send(run(commands))
    except StopIteration as done:
        return str(done.value)


def lease_digest(client: Any) -> str:
    """The lease's digest through a synchronous client: a redis-py / valkey-py `Redis` (pipelined,
    `decode_responses=False`), or a callable `execute(*args)` returning one command's reply."""
    if hasattr(client, "pipeline"):

        def run(commands: list[Command]) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute())

    elif callable(client):

        def run(commands: list[Command]) -> list[Any]:
            return [client(*command) for command in commands]

    else:
        raise TypeError("lease_digest takes a redis/valkey client or a callable")
    return _drive(digest_steps(), run)


async def lease_digest_async(client: Any) -> str:
    """The lease's digest through an asyncio client: `agent.resp.RespConnection`, a
    `redis.asyncio` / `valkey.asyncio` client, or an async callable `execute(*args)`."""
    run: Callable[[list[Command]], Awaitable[list[Any]]]
    pipeline = getattr(client, "pipeline", None)
    if pipeline is not None and inspect.iscoroutinefunction(pipeline):
        run = pipeline  # RespConnection.pipeline(commands)
    elif pipeline is not None:

        async def run(commands: list[Command]) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute())

    elif callable(client):

        async def run(commands: list[Command]) -> list[Any]:
            return [await client(*command) for command in commands]

    else:
        raise TypeError("lease_digest_async takes an asyncio redis/valkey client or a callable")
    steps = digest_steps()

    def step(replies: list[Any]) -> list[Command] | str:
        try:
            return steps.send(replies)
        except StopIteration as done:  # cannot cross a thread's future: returned instead
            return str(done.value)

    commands: list[Command] | str = next(steps)
    while not isinstance(commands, str):
        replies = list(await run(commands))
        if sum(len(r) for r in replies if isinstance(r, bytes)) > 1 << 20:
            # Hashing megabytes would hold up the event loop (the agent's heartbeats).
            commands = await asyncio.to_thread(step, replies)
        else:
            commands = step(replies)
    return commands
