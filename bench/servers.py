"""Servers for the load benchmarks: a private Redis on a free loopback port, and the guard that
keeps every benchmark's traffic on this machine."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

# Each load generator is one account (or a few) driving a whole market; the per-account limits
# meant for hostile clients (README, "Limits") would measure the limiter's refusals instead of
# the exchange. Raised, not switched off: every request still pays the limiter's Redis call.
UNTHROTTLED_ENV: dict[str, str] = {
    "MNEMO_WRITE_RATE_PER_S": "1000000000",
    "MNEMO_WRITE_BURST": "1000000000",
    "MNEMO_WS_CONNECTIONS_PER_ACCOUNT": "1000000",
    "MNEMO_WS_CHANNELS_PER_SOCKET": "1000000",
}
"""The gateway's `MNEMO_*` per-account limits, raised for benchmarks."""


async def delete_prefix(redis: Any, prefix: str) -> None:
    """Remove every key under `prefix` (a benchmark's own key space), in batches of UNLINK."""
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


async def drop_scratch(database_url: str, db: str, redis_url: str, prefix: str) -> None:
    """Remove a load test's scratch database `db` (on the server of `database_url`) and its
    Redis key space."""
    import asyncpg
    import redis.asyncio as aioredis

    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    finally:
        await admin.close()
    r = aioredis.from_url(redis_url)
    try:
        await delete_prefix(r, prefix)
    finally:
        await r.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_loopback(url: str, who: str) -> None:
    """Exit unless `url` points at this machine: benchmarks never load another host."""
    host = urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise SystemExit(f"{who}: {url} is not a loopback address; refusing to load it")


@contextlib.contextmanager
def private_redis(url: str | None, who: str) -> Iterator[tuple[str, int | None]]:
    """(redis url, server pid or None): ours on a free port without persistence, or the given
    (loopback) one."""
    if url is not None:
        require_loopback(url, who)
        yield url, None
        return
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise SystemExit(f"{who}: no redis-server/valkey-server on PATH; pass --redis-url")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mnemo-bench-redis-") as folder:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", folder, "--protected-mode", "yes"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), 0.2),
                ):
                    break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{who}: redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0", proc.pid
        finally:
            proc.terminate()
            proc.wait(10)
