"""Load test of the WebSocket endpoint against a real gateway (uvicorn) on loopback.

    python -m bench.load_ws heartbeats [--seconds 10] [--owners 8] [--nodes 2000] [--batch 500]
    python -m bench.load_ws fanout     [--seconds 10] [--connections 1000] [--per-conn 10]
                                       [--channels 100] [--rate 1000]
    python -m bench.load_ws all        (both, default sizes)

What it does:
- Creates a database of its own (migrated) and a Redis key prefix of its own on the servers named
  by MNEMO_REDIS_URL / MNEMO_DATABASE_URL (default: the local dev servers), starts one gateway
  process (`uvicorn gateway.app:app_from_env`, uvloop, httptools, no per-message deflate) on a free
  loopback port, signs users up over HTTP, and removes everything afterwards.
- heartbeats: `--owners` providers, each with `--nodes` nodes registered directly in the market
  (as the engine would), each on a socket of its own, send `{"op":"heartbeat"}` batches of
  `--batch` beats with up to `--inflight` batches awaiting their ack. The gateway runs with a 1 ms
  per-node minimum interval so nodes can beat again at once. Counted: beats acked `ok` per second
  of the measured window (after `--warmup`); also the ack latency of a batch.
- fanout: `--connections` sockets each subscribe to `--per-conn` of `--channels` channels
  (`quotes:bench-<i>`), so connections x per-conn subscriptions, each channel with the same number
  of subscribers. A publisher process publishes `--rate` messages a second round-robin over the
  channels on Redis, each a quote as the engine publishes it (`engine.types.Quote`, three price
  levels a side), which the gateway maps to the public `BookOut` (`gateway.events`) once per
  message; every delivered message is one WebSocket frame to one subscription. A quote has no
  clock finer than its `ts_ms`, so the publish time (ns) rides in its `volume_24h_gb_s`, which
  the client reads back as `volume_24h_gb_sec`. Counted: frames received per second and
  the publish-to-receive latency (p50/p99/max) of every frame in the measured window, plus frames
  expected vs received and sockets closed by the server.
  Clients run in `--client-procs` processes (default 1) so the load generator's own work is
  visible in the figures rather than hidden: on a 2-core machine gateway, Redis, publisher and
  clients share the same two cores.

Bounded: every phase has a time limit; only 127.0.0.1 is used. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from bench.servers import UNTHROTTLED_ENV, drop_scratch, free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------------------------------------
# The gateway under test


@dataclass
class Gateway:
    url: str
    ws_url: str
    redis_url: str
    prefix: str
    pid: int


@contextlib.contextmanager
def gateway(
    redis_url: str, database_url: str, *, env: dict[str, str] | None = None, workers: int = 1
) -> Iterator[Gateway]:
    """A migrated database and key prefix of our own, one uvicorn gateway; all removed after."""
    from persistence.migrations import migrate

    db = f"mnemo_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    db_url = _with_database(database_url, db)

    async def create() -> None:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'CREATE DATABASE "{db}"')
        finally:
            await admin.close()
        await migrate(db_url)

    asyncio.run(create())
    port = free_port()
    child_env = {
        **os.environ,
        "MNEMO_REDIS_URL": redis_url,
        "MNEMO_DATABASE_URL": db_url,
        "MNEMO_KEY_PREFIX": prefix,
        "MNEMO_JWT_SECRET": uuid.uuid4().hex + uuid.uuid4().hex,
        "MNEMO_LOG_LEVEL": "WARNING",
        "MNEMO_DATA_DIR": f"/tmp/{db}",
        **UNTHROTTLED_ENV,  # fanout opens every socket with one account
        **(env or {}),
    }
    argv = [
        sys.executable, "-m", "uvicorn", "gateway.app:app_from_env", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--ws", "websockets-sansio", "--ws-per-message-deflate", "false",
        "--log-level", "warning", "--no-access-log", "--workers", str(workers),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, env=child_env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway not ready after 60 s")
            time.sleep(0.2)
        yield Gateway(base, f"ws://127.0.0.1:{port}/ws", redis_url, prefix, proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        asyncio.run(drop_scratch(database_url, db, redis_url, prefix))


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _signup(http: httpx.AsyncClient, role: str) -> tuple[str, str]:
    """(user id, API key) of a fresh account."""
    body = {
        "email": f"{uuid.uuid4().hex[:12]}@bench.example",
        "password": "bench-password-1",
        "role": role,
    }
    r = await http.post("/api/auth/signup", json=body)
    r.raise_for_status()
    out = r.json()
    return out["user"]["id"], out["api_key"]["key"]


async def _redis_cpu_s(redis_url: str) -> float:
    """CPU seconds the Redis server has used (INFO cpu, user + system, main thread included)."""
    r = aioredis.from_url(redis_url)
    try:
        info = await r.info("cpu")
    finally:
        await r.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by a process and its children alive now (the
    gateway's workers), from Linux /proc."""
    return sum(_cpu_split(pid))


def _sockets_per_worker(pid: int) -> list[int]:
    """Open sockets of each gateway worker (the children of `pid`, or `pid` itself if none)."""
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                procs.append(entry)
    counts = []
    for proc in procs or [Path(f"/proc/{pid}")]:
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        n = 0
        for fd in fds:
            with contextlib.suppress(OSError):
                n += os.readlink(fd).startswith("socket:")
        counts.append(n)
    return sorted(counts, reverse=True)


def _cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its children alive now, from Linux /proc."""
    user = system = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            user += int(fields[11])
            system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


# ---------------------------------------------------------------------------------------------
# (a) heartbeats over the WebSocket batch path


async def _register_nodes(gw: Gateway, owner_id: str, n: int, region: str) -> list[str]:
    from engine.keys import Keys
    from engine.market import Market
    from engine.types import Node, pusd

    r = aioredis.from_url(gw.redis_url)
    try:
        market = Market(r, Keys(gw.prefix))
        await market.load_scripts()
        ids = [uuid.uuid4().hex for _ in range(n)]
        now_ms = time.time_ns() // 1_000_000
        sem = asyncio.Semaphore(64)

        async def one(node_id: str, i: int) -> None:
            node = Node(
                node_id=node_id, owner_id=owner_id, region=region, node_type="mist_node",
                name=f"bench-{i}", lat=40.0 + i % 90 / 100, lng=-73.0, total_ram_gb=64,
                total_vram_gb=16, offered_ram_gb=64, offered_vram_gb=16, price_pusd=pusd("0.000001"),
                heartbeat_interval_s=1.0,
            )  # fmt: skip
            async with sem:
                await market.register_node(node, now_ms)

        await asyncio.gather(*(one(node_id, i) for i, node_id in enumerate(ids)))
        return ids
    finally:
        await r.aclose()


@dataclass
class _BeatStats:
    ok: int = 0
    other: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def _beat_socket(
    gw: Gateway, key: str, nodes: list[str], batch: int, inflight: int, t_start: float,
    t_measure: float, t_end: float, stats: _BeatStats,
) -> None:  # fmt: skip
    encode = msgspec.json.Encoder().encode
    sent_at: dict[int, float] = {}
    slots = asyncio.Semaphore(inflight)
    async with connect(
        f"{gw.ws_url}?api_key={key}", compression=None, max_size=None, open_timeout=30
    ) as ws:

        async def receive() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                now = time.perf_counter()
                if msg["type"] == "heartbeat_ack":
                    t0 = sent_at.pop(msg["ref"])
                    slots.release()
                    if t0 >= t_measure and now <= t_end:
                        stats.latencies_ms.append((now - t0) * 1000)
                        for res in msg["results"]:
                            if res["outcome"] == "ok":
                                stats.ok += 1
                            else:
                                stats.other[res["outcome"]] = stats.other.get(res["outcome"], 0) + 1
                    if not sent_at and time.perf_counter() >= t_end:
                        return
                elif msg["type"] == "error":
                    stats.errors += 1
                    if "ref" in msg:
                        sent_at.pop(msg["ref"], None)
                        slots.release()

        reader = asyncio.create_task(receive())
        ref = 0
        pos = 0
        while time.perf_counter() < t_end:
            await slots.acquire()
            beats = []
            for _ in range(batch):
                beats.append({"node_id": nodes[pos], "available_ram_gb": 48, "available_vram_gb": 12,
                              "cpu_usage_pct": 12.5})  # fmt: skip
                pos = (pos + 1) % len(nodes)
            ref += 1
            sent_at[ref] = time.perf_counter()
            await ws.send(encode({"op": "heartbeat", "beats": beats, "ref": ref}).decode())
        async with asyncio.timeout(30):
            await reader


def run_heartbeats(args: argparse.Namespace) -> dict[str, Any]:
    redis_url = os.environ.get("MNEMO_REDIS_URL", DEFAULT_REDIS)
    database_url = os.environ.get("MNEMO_DATABASE_URL", DEFAULT_DATABASE)
    env = {"MNEMO_HEARTBEAT_MIN_INTERVAL_S": "0.001"}
    with gateway(redis_url, database_url, env=env, workers=args.workers) as gw:

        async def main() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                owners = [await _signup(http, "provider") for _ in range(args.owners)]
            node_sets = await asyncio.gather(
                *(_register_nodes(gw, uid, args.nodes, "bench-hb") for uid, _ in owners)
            )
            stats = _BeatStats()
            t_start = time.perf_counter()
            t_measure = t_start + args.warmup
            t_end = t_measure + args.seconds
            cpu0, rcpu0, own0 = (
                _cpu_s(gw.pid),
                await _redis_cpu_s(gw.redis_url),
                time.process_time(),
            )
            await asyncio.gather(
                *(
                    _beat_socket(
                        gw, key, nodes, args.batch, args.inflight, t_start, t_measure, t_end, stats
                    )
                    for (_, key), nodes in zip(owners, node_sets, strict=True)
                )
            )
            cpu = _cpu_s(gw.pid) - cpu0
            rcpu = await _redis_cpu_s(gw.redis_url) - rcpu0
            own = time.process_time() - own0
            elapsed = time.perf_counter() - t_start
            return {
                "bench": "ws_heartbeats",
                "workers": args.workers,
                "owners": args.owners,
                "nodes_per_owner": args.nodes,
                "batch": args.batch,
                "inflight": args.inflight,
                "seconds": args.seconds,
                "beats_ok_per_s": round(stats.ok / args.seconds),
                "other_outcomes": stats.other,
                "errors": stats.errors,
                "ack_ms_p50": round(_pct(stats.latencies_ms, 0.5), 2),
                "ack_ms_p99": round(_pct(stats.latencies_ms, 0.99), 2),
                "gateway_cpu_share": round(cpu / elapsed, 2),
                "redis_cpu_share": round(rcpu / elapsed, 2),
                "client_cpu_share": round(own / elapsed, 2),
            }

        return asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# (b) fan-out


class _Probe(msgspec.Struct):
    """The publish time of a quote (see the module docstring): `volume_24h_gb_sec` in the public
    book; `volume_24h_gb_s` if a gateway passes the engine's quote through unmapped."""

    volume_24h_gb_sec: int = 0
    volume_24h_gb_s: int = 0

    @property
    def t(self) -> int:
        return self.volume_24h_gb_sec or self.volume_24h_gb_s


class _Frame(msgspec.Struct):
    data: _Probe


class _Batch(msgspec.Struct):
    messages: list[_Frame]


_decode_frame = msgspec.json.Decoder(_Frame).decode
_decode_batch = msgspec.json.Decoder(_Batch).decode


class _Tally:
    """What one client process saw."""

    def __init__(self) -> None:
        self.t_measure_ns = 1 << 62
        self.t_end_ns = 1 << 62
        self.received = 0
        self.outside = 0
        self.latencies: list[int] = []
        self.published: list[int] = []  # publish time of each latency's message
        self.closes: dict[str, int] = {}


class _FanoutSocket(asyncio.Protocol):
    """A minimal RFC 6455 client for the fan-out load: one subscribe, then count frames.

    The `websockets` client costs a task switch and a queue per message; at 100k frames/s on a
    2-core machine that would measure the load generator, not the gateway. This protocol parses
    frames straight out of `data_received` (server frames are unmasked and, with per-message
    deflate off, uncompressed), decodes each event once with msgspec and records its latency.
    It answers pings and records the server's close code.
    """

    def __init__(self, host: str, port: int, target: str, channels: list[str], tally: _Tally):
        self._request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"
            "\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        # the gateway takes at most 64 channels per subscribe message
        self._subscribes = [
            json.dumps({"op": "subscribe", "channels": channels[i : i + 64]}).encode()
            for i in range(0, len(channels), 64)
        ]
        self._acks_due = len(self._subscribes)
        self._tally = tally
        self._buf = bytearray()
        self._open = False
        self._counting = False  # every subscribe confirmed: text frames are events now
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"connection lost: {exc}"))

    def _send(self, opcode: int, payload: bytes) -> None:
        # Client frames must be masked (RFC 6455 5.3).
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 65536:
            head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
        assert self.transport is not None
        self.transport.write(head + mask + masked)

    def data_received(self, data: bytes) -> None:
        if self._buf or not self._open:
            buf = self._buf
            buf += data
            if not self._open:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                status = bytes(buf[: buf.find(b"\r\n")])
                if b" 101 " not in status:
                    self.subscribed.set_exception(ConnectionError(status.decode(errors="replace")))
                    assert self.transport is not None
                    self.transport.close()
                    return
                del buf[: end + 4]
                self._open = True
                for message in self._subscribes:
                    self._send(0x1, message)
            data = bytes(buf)
            buf.clear()
        # The common case is one whole frame per read: parse `data` in place, keep any tail.
        view = memoryview(data)
        pos, n = 0, len(data)
        now = 0
        while n - pos >= 2:
            b0, ln = data[pos], data[pos + 1] & 0x7F
            hdr = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln, hdr = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, hdr = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            start = pos + hdr
            pos = start + ln
            if pos > n:
                pos = start - hdr
                break
            opcode = b0 & 0x0F
            if opcode == 0x1:
                if self._counting:
                    tally = self._tally
                    if not now:
                        now = time.time_ns()
                    # {"type":"event",... or {"type":"batch",...: byte 9 tells them apart
                    if ln > 9 and data[start + 9] == 0x62:
                        probes = [m.data for m in _decode_batch(view[start:pos]).messages]
                    else:
                        probes = [_decode_frame(view[start:pos]).data]
                    for probe in probes:
                        if tally.t_measure_ns <= probe.t < tally.t_end_ns:
                            tally.received += 1
                            tally.latencies.append(now - probe.t)
                            tally.published.append(probe.t)
                        else:
                            tally.outside += 1
                else:
                    self._reply(bytes(view[start:pos]))
            elif opcode == 0x9:
                self._send(0xA, bytes(view[start:pos]))
            elif opcode == 0x8:
                payload = bytes(view[start:pos])
                code = str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "none"
                self._tally.closes[code] = self._tally.closes.get(code, 0) + 1
                self._send(0x8, payload[:2])
                assert self.transport is not None
                self.transport.close()
        if pos < n:
            self._buf += view[pos:]

    def _reply(self, payload: bytes) -> None:
        """A text frame before every subscribe is confirmed."""
        if b'"type":"error"' in payload:
            self.subscribed.set_exception(RuntimeError(payload.decode()))
        else:
            self._acks_due -= payload.count(b'"type":"subscribed"')
            if self._acks_due <= 0:
                self._counting = True
                self.subscribed.set_result(None)


async def _clients(
    ws_url: str, key: str, conns: list[list[str]], timing: Any, ready: Any, go: Any
) -> dict[str, Any]:
    from urllib.parse import urlsplit

    url = urlsplit(ws_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = f"{url.path}?{url.query + '&' if url.query else ''}api_key={key}"
    tally = _Tally()
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(200)

    async def open_one(channels: list[str]) -> _FanoutSocket:
        async with sem:
            _, proto = await loop.create_connection(
                lambda: _FanoutSocket(host, port, target, channels, tally), host, port
            )
            async with asyncio.timeout(120):
                await proto.subscribed
            return proto

    sockets = await asyncio.gather(*(open_one(chs) for chs in conns))
    ready.put(len(sockets))
    await loop.run_in_executor(None, go.wait)
    tally.t_measure_ns, tally.t_end_ns = int(timing[0]), int(timing[1])  # written before `go`
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    # let the last messages of the window arrive, then stop
    await asyncio.sleep(max(0.0, (tally.t_end_ns - time.time_ns()) / 1e9) + 2.0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for proto in sockets:
        if proto.transport is not None:
            proto.transport.close()
    return {
        "cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
        "sys_s": ru1.ru_stime - ru0.ru_stime,
        "received": tally.received,
        "outside": tally.outside,
        "latencies": tally.latencies,
        "seconds": [(t - tally.t_measure_ns) // 1_000_000_000 for t in tally.published],
        "closes": tally.closes,
    }


def _publisher_proc(
    redis_url: str, prefix: str, channels: int, rate: int, timing: Any, go: Any, out: Any
) -> None:
    """Publishes `rate` messages a second, round-robin over the channels, between the window's
    start and end (read after `go`), each stamped with its publish time."""

    async def main() -> int:
        from engine.keys import Keys
        from engine.notify import encode_message
        from engine.types import Quote

        keys = Keys(prefix)
        r = aioredis.from_url(redis_url)
        names = [(keys.quotes_channel(f"bench-{i}"), f"quotes:bench-{i}") for i in range(channels)]
        asks = [(700_000, 24), (750_000, 64), (800_000, 8)]
        bids = [(650_000, 16), (600_000, 32), (550_000, 8)]

        def quote(region: str) -> Quote:
            now_ns = time.time_ns()
            return Quote(
                region=region,
                ts_ms=now_ns // 1_000_000,
                best_ask_pusd=asks[0][0],
                best_bid_pusd=bids[0][0],
                ask_depth=asks,
                bid_depth=bids,
                last_fill_pusd=680_000,
                volume_24h_gb_s=now_ns,  # the publish time (see the module docstring)
            )

        sent = 0
        per_tick = max(1, round(rate * 0.002))  # a pipeline every ~2 ms
        tick_s = per_tick / rate
        i = 0
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        t_start_ns, t_end_ns = int(timing[2]), int(timing[1])
        await asyncio.sleep(max(0.0, (t_start_ns - time.time_ns()) / 1e9))
        next_tick = time.perf_counter()
        try:
            while time.time_ns() < t_end_ns:
                async with r.pipeline(transaction=False) as pipe:
                    for _ in range(per_tick):
                        ch, ws = names[i % channels]
                        pipe.publish(ch, encode_message(ws, quote(ws[7:])))
                        i += 1
                    await pipe.execute()
                sent += per_tick
                next_tick += tick_s
                delay = next_tick - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        finally:
            await r.aclose()
        return sent

    out.put(asyncio.run(main()))


def run_fanout(args: argparse.Namespace) -> dict[str, Any]:
    redis_url = os.environ.get("MNEMO_REDIS_URL", DEFAULT_REDIS)
    database_url = os.environ.get("MNEMO_DATABASE_URL", DEFAULT_DATABASE)
    nofile = _raise_nofile()
    need = args.connections + 1000
    if nofile < need:
        raise SystemExit(f"open-file limit {nofile} < {need}: raise `ulimit -n`")
    if args.per_conn > args.channels:
        raise SystemExit("--per-conn cannot exceed --channels")
    with gateway(redis_url, database_url, workers=args.workers) as gw:

        async def account() -> str:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                return (await _signup(http, "user"))[1]

        key = asyncio.run(account())
        # connection c subscribes to channels c*per_conn .. (mod channels): equal subscribers each
        conns = [
            [
                f"quotes:bench-{(c * args.per_conn + k) % args.channels}"
                for k in range(args.per_conn)
            ]
            for c in range(args.connections)
        ]
        subs_per_channel = args.connections * args.per_conn / args.channels
        ctx = mp.get_context("spawn")
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        shares = [conns[i :: args.client_procs] for i in range(args.client_procs)]
        ws_url = gw.ws_url + ("?batch=1" if args.coalesce else "")
        # The measurement window is fixed once every socket is up, and read after `go`.
        timing = ctx.Array("q", 3)  # measure start, end, publish start
        procs = [
            ctx.Process(target=_client_entry, args=(ws_url, key, share, timing, ready, go, out))
            for share in shares
        ]
        pub_out = ctx.Queue()
        pub = ctx.Process(
            target=_publisher_proc,
            args=(redis_url, gw.prefix, args.channels, args.rate, timing, go, pub_out),
        )
        for p in [*procs, pub]:
            p.start()
        opened = sum(ready.get(timeout=300) for _ in procs)
        t_start_ns = time.time_ns() + 300_000_000
        t_measure_ns = t_start_ns + int(args.warmup * 1e9)
        t_end_ns = t_measure_ns + int(args.seconds * 1e9)
        timing[0], timing[1], timing[2] = t_measure_ns, t_end_ns, t_start_ns
        spread = _sockets_per_worker(gw.pid)
        user0, sys0 = _cpu_split(gw.pid)
        rcpu0 = asyncio.run(_redis_cpu_s(redis_url))
        go.set()
        published = pub_out.get(timeout=args.warmup + args.seconds + 60)
        user1, sys1 = _cpu_split(gw.pid)
        rcpu = asyncio.run(_redis_cpu_s(redis_url)) - rcpu0
        cpu, cpu_sys = user1 + sys1 - user0 - sys0, sys1 - sys0
        results = [out.get(timeout=120) for _ in procs]
        for p in [*procs, pub]:
            p.join(30)
    received = sum(r["received"] for r in results)
    lat_ms = [ns / 1e6 for r in results for ns in r["latencies"]]
    by_second: dict[int, list[float]] = {}
    for r in results:
        for sec, ns in zip(r["seconds"], r["latencies"], strict=True):
            by_second.setdefault(sec, []).append(ns / 1e6)
    closes: dict[str, int] = {}
    for r in results:
        for k, v in r["closes"].items():
            closes[k] = closes.get(k, 0) + v
    expected = args.rate * args.seconds * subs_per_channel
    frames = max(1, received + sum(r["outside"] for r in results))
    clients_cpu = sum(r["cpu_s"] for r in results)
    return {
        "bench": "ws_fanout",
        "workers": args.workers,
        "connections": opened,
        "sockets_per_worker": spread,
        "subscriptions": args.connections * args.per_conn,
        "channels": args.channels,
        "subscribers_per_channel": subs_per_channel,
        "publish_rate": args.rate,
        "published_total": published,
        "seconds": args.seconds,
        "delivered_per_s": round(received / args.seconds),
        "expected_per_s": round(expected / args.seconds),
        "received_vs_expected": round(received / expected, 4) if expected else None,
        "latency_ms_p50": round(_pct(lat_ms, 0.5), 2),
        "latency_ms_p99": round(_pct(lat_ms, 0.99), 2),
        "latency_ms_max": round(max(lat_ms), 2) if lat_ms else None,
        "latency_ms_mean": round(statistics.fmean(lat_ms), 2) if lat_ms else None,
        # p99 of the messages published in each second of the window: a backlog that builds
        # up, one that drains, or a single stall
        "latency_ms_p99_by_second": [round(_pct(by_second[k], 0.99), 1) for k in sorted(by_second)],
        "closed_by_server": closes,
        "received_outside_window": sum(r["outside"] for r in results),
        "gateway_cpu_share": round(cpu / (args.warmup + args.seconds + 0.5), 2),
        "gateway_cpu_us_per_message": round(cpu * 1e6 / frames, 2),
        "gateway_sys_us_per_message": round(cpu_sys * 1e6 / frames, 2),
        "redis_cpu_share": round(rcpu / (args.warmup + args.seconds + 0.5), 2),
        "clients_cpu_share": round(clients_cpu / (args.warmup + args.seconds + 2.5), 2),
        "clients_cpu_us_per_message": round(clients_cpu * 1e6 / frames, 2),
        "clients_sys_us_per_message": round(sum(r["sys_s"] for r in results) * 1e6 / frames, 2),
        "client_procs": args.client_procs,
        "coalesce": args.coalesce,
    }


def _client_entry(
    ws_url: str, key: str, conns: list[list[str]], timing: Any, ready: Any, go: Any, out: Any
) -> None:
    """One client process: opens its sockets, subscribes, receives until the end, reports."""
    _raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    out.put(asyncio.run(_clients(ws_url, key, conns, timing, ready, go)))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_ws", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="what", required=True)
    hb = sub.add_parser("heartbeats")
    fo = sub.add_parser("fanout")
    both = sub.add_parser("all")
    for p in (hb, fo, both):
        p.add_argument("--seconds", type=float, default=10.0)
        p.add_argument("--warmup", type=float, default=2.0)
        p.add_argument("--repeat", type=int, default=1, help="runs; the median is reported too")
        p.add_argument("--workers", type=int, default=1, help="gateway processes (uvicorn)")
    for p in (hb, both):
        p.add_argument("--owners", type=int, default=8)
        p.add_argument("--nodes", type=int, default=2000, help="nodes per owner")
        p.add_argument("--batch", type=int, default=500)
        p.add_argument("--inflight", type=int, default=4)
    for p in (fo, both):
        p.add_argument("--connections", type=int, default=1000)
        p.add_argument("--per-conn", type=int, default=10)
        p.add_argument("--channels", type=int, default=100)
        p.add_argument("--rate", type=int, default=1000, help="messages published per second")
        p.add_argument("--client-procs", type=int, default=1)
        p.add_argument(
            "--coalesce", action="store_true", help="open sockets with ?batch=1 (batch frames)"
        )
    args = parser.parse_args(argv)
    print(json.dumps({"loadavg_before": os.getloadavg(), "argv": sys.argv[1:]}), flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"ws_heartbeats": [], "ws_fanout": []}
    for _ in range(args.repeat):
        if args.what in ("heartbeats", "all"):
            result = run_heartbeats(args)
            runs["ws_heartbeats"].append(result)
            print(json.dumps(result), flush=True)
        if args.what in ("fanout", "all"):
            result = run_fanout(args)
            runs["ws_fanout"].append(result)
            print(json.dumps(result), flush=True)
    if args.repeat > 1:
        medians = {
            "ws_heartbeats": ("beats_ok_per_s", "ack_ms_p50", "ack_ms_p99", "gateway_cpu_share"),
            "ws_fanout": (
                "delivered_per_s",
                "latency_ms_p50",
                "latency_ms_p99",
                "gateway_cpu_us_per_message",
            ),
        }
        for bench, fields in medians.items():
            if runs[bench]:
                summary = {f: statistics.median(r[f] for r in runs[bench]) for f in fields}
                print(json.dumps({"bench": bench, "median_of": len(runs[bench]), **summary}))
    print(json.dumps({"loadavg_after": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
