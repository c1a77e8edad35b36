"""Lease servers against real Valkey processes: what a renter can and cannot do, the meter, the
digest, the wipe, TLS. Ports come from 42000-42999."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import redis.asyncio as aioredis

from agent.digest import DIGEST_PREFIX, lease_digest, lease_digest_async
from agent.lease_server import ADMIN_USER, LeaseServer, LeaseServers, LeaseSpec
from agent.resp import RespConnection, RespError

PORTS = range(42000, 43000)
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def make_spec(contract_id: str = "c-1", maxmemory_bytes: int = 64 * MIB) -> LeaseSpec:
    return LeaseSpec(
        contract_id=contract_id,
        username=f"lease-{contract_id}",
        password=secrets.token_urlsafe(32),
        maxmemory_bytes=maxmemory_bytes,
    )


@pytest.fixture
async def make_servers() -> AsyncIterator[Callable[..., LeaseServers]]:
    """LeaseServers on 127.0.0.1 in a private directory, all stopped afterwards."""
    made: list[LeaseServers] = []
    root = tempfile.mkdtemp(prefix="mla-")  # short: the admin socket's path is bounded

    def make(**kwargs: Any) -> LeaseServers:
        kwargs.setdefault("listen", "127.0.0.1")
        kwargs.setdefault("lease_dir", os.path.join(root, str(len(made))))
        servers = LeaseServers(advertise_host="127.0.0.1", ports=PORTS, **kwargs)
        made.append(servers)
        return servers

    yield make
    for servers in made:
        await servers.close_all()
    shutil.rmtree(root, True)


def renter(server: LeaseServer, spec: LeaseSpec, **kwargs: Any) -> aioredis.Redis:
    return aioredis.Redis(
        host=server.host,
        port=server.port,
        username=spec.username,
        password=spec.password,
        **kwargs,
    )


async def refused(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


async def test_renter_writes_and_reads_100_mb(make_servers: Callable[..., LeaseServers]) -> None:
    """A 1 GB lease takes 100 MB from the renter's user and gives back exactly the same bytes."""
    servers = make_servers()
    spec = make_spec(maxmemory_bytes=1 << 30)
    server = await servers.start(spec)
    client = renter(server, spec)
    values = {f"kv:{i}".encode(): os.urandom(4 * MIB) for i in range(25)}
    try:
        async with client.pipeline(transaction=False) as pipe:
            for key, value in values.items():
                pipe.set(key, value)
            assert all(await pipe.execute())
        for key, value in values.items():
            assert await client.get(key) == value
        assert await client.dbsize() == 25
    finally:
        await client.aclose()
    meter = await server.read_meter()
    assert meter.peak_memory_bytes >= 100 * MIB


async def test_writes_past_maxmemory_are_refused_not_evicted(
    make_servers: Callable[..., LeaseServers],
) -> None:
    """Past the lease's size a write is refused with OOM and every key written before stays."""
    servers = make_servers()
    spec = make_spec(maxmemory_bytes=8 * MIB)
    server = await servers.start(spec)
    client = renter(server, spec)
    written = 0
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):
            for i in range(100):
                await client.set(f"k{i}", os.urandom(MIB))
                written += 1
        assert 6 <= written <= 8  # 8 MiB for data (the empty server's own memory on top)
        assert await client.dbsize() == written
        for i in range(written):
            assert len(await client.get(f"k{i}") or b"") == MIB
        # Reads and deletes still work at the limit; the space comes back.
        await client.delete("k0")
        await client.set("again", os.urandom(MIB))
    finally:
        await client.aclose()


async def test_wrong_foreign_or_no_credentials_are_refused(
    make_servers: Callable[..., LeaseServers],
) -> None:
    """A wrong password, another lease's user, the default user and no AUTH all get nothing."""
    servers = make_servers()
    spec_a, spec_b = make_spec("c-a"), make_spec("c-b")
    server_a = await servers.start(spec_a)
    server_b = await servers.start(spec_b)
    assert server_a.port != server_b.port
    host, port = server_a.host, server_a.port
    for username, password in (
        (spec_a.username, spec_a.password + "x"),
        (spec_b.username, spec_b.password),
        ("default", ""),
        ("default", spec_a.password),
        (ADMIN_USER, spec_a.password),
    ):
        with pytest.raises(RespError, match="WRONGPASS"):
            await RespConnection.open(host, port, username=username, password=password)
    with pytest.raises(RespError, match="WRONGPASS"):
        await RespConnection.open(host, port, password=spec_a.password)  # AUTH <password>
    anonymous = await RespConnection.open(host, port)
    try:
        with pytest.raises(RespError, match="NOAUTH"):
            await anonymous.execute("GET", "x")
        with pytest.raises(RespError, match="NOAUTH"):
            await anonymous.execute("KEYS", "*")
    finally:
        await anonymous.close()
    # And the right one works on its own server only.
    ok = await RespConnection.open(host, port, username=spec_a.username, password=spec_a.password)
    assert await ok.execute("PING") == b"PONG"
    await ok.close()


DENIED = [
    ("CONFIG", "GET", "maxmemory"),
    ("CONFIG", "SET", "maxmemory", "0"),
    ("DEBUG", "SLEEP", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "x", "on"),
    ("MODULE", "LIST"),
    ("REPLICAOF", "127.0.0.1", "6379"),
    ("SLAVEOF", "NO", "ONE"),
    ("SAVE",),
    ("BGSAVE",),
    ("BGREWRITEAOF",),
    ("MONITOR",),
    ("CLIENT", "KILL", "USER", ADMIN_USER),
    ("CLIENT", "LIST"),
    ("CLIENT", "PAUSE", "1000"),
    ("MIGRATE", "127.0.0.1", "6379", "k", "0", "1000"),
    ("SYNC",),
    ("PSYNC", "?", "-1"),
    ("FAILOVER",),
    ("SWAPDB", "0", "1"),
    ("RESTORE", "k", "0", "x"),
]


async def test_lease_user_cannot_run_admin_commands(
    make_servers: Callable[..., LeaseServers],
) -> None:
    """CONFIG, DEBUG, SHUTDOWN, ACL, MODULE, REPLICAOF and the rest are refused (NOPERM); the
    renter's own-data commands and the digest's (SCAN, TYPE, DUMP) work."""
    servers = make_servers()
    spec = make_spec()
    server = await servers.start(spec)
    conn = await RespConnection.open(
        server.host, server.port, username=spec.username, password=spec.password
    )
    try:
        await conn.execute("SET", "k", "v")
        for command in DENIED:
            with pytest.raises(RespError) as refused_with:
                await conn.execute(*command)
            # DEBUG and MODULE are also switched off server-wide, which Valkey checks first.
            reason = str(refused_with.value)
            assert refused_with.value.code == "NOPERM" or "not allowed" in reason, command
        assert await conn.execute("SCAN", 0) == [b"0", [b"k"]]
        assert await conn.execute("TYPE", "k") == b"string"
        assert (await conn.execute("DUMP", "k"))[:3] == b"\x00\x01v"
        assert await conn.execute("KEYS", "*") == [b"k"]
        assert b"total_net_output_bytes" in await conn.execute("INFO", "stats")
        with pytest.raises(RespError, match="DB index is out of range"):
            await conn.execute("SELECT", 1)  # one database: the digest covers it all
        assert await conn.execute("FLUSHALL") == b"OK"
    finally:
        await conn.close()
    assert server.alive  # SHUTDOWN was refused


async def test_config_is_private_and_holds_no_password(
    make_servers: Callable[..., LeaseServers],
) -> None:
    """The server's directory is 0700, its config 0600, with password hashes only."""
    servers = make_servers()
    spec = make_spec()
    server = await servers.start(spec)
    conf = server.directory / "valkey.conf"
    assert stat.S_IMODE(server.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    text = conf.read_text()
    assert spec.password not in text
    assert hashlib.sha256(spec.password.encode()).hexdigest() in text
    assert "maxmemory-policy noeviction" in text and 'save ""' in text
    assert f"maxmemory {spec.maxmemory_bytes}" in text  # raised by the empty server's own at start
    assert list(server.directory.iterdir())  # nothing persisted but config, pid, log, socket
    assert not [p for p in server.directory.iterdir() if p.suffix in (".rdb", ".aof")]


async def test_close_wipes_and_port_refuses(make_servers: Callable[..., LeaseServers]) -> None:
    """After close the process is gone, the port refuses at once, the directory is gone, and
    the reported digest is the one the renter computed from its own connection."""
    servers = make_servers()
    spec = make_spec()
    server = await servers.start(spec)
    client = renter(server, spec)
    try:
        await client.set("s", b"\x00binary\xff")
        await client.hset("h", mapping={"a": "1", "b": "2"})
        await client.rpush("l", "x", "y", "z")
        await client.sadd("set", "m", "n")
        await client.zadd("z", {"p": 1.5, "q": 2})
        await client.xadd("st", {"f": "v"})
        await client.set("ttl", "v", ex=3600)
        renter_digest = await lease_digest_async(client)
    finally:
        await client.aclose()
    pid, port, directory = server.pid, server.port, server.directory
    started = time.monotonic()
    result = await servers.close(spec.contract_id)
    assert result is not None and result.digest == renter_digest
    assert await refused("127.0.0.1", port)
    assert time.monotonic() - started < 1.0
    assert not _running(pid)
    assert not directory.exists()
    assert spec.contract_id not in servers
    assert await server.close() is result  # idempotent


async def test_egress_meter_counts_only_what_the_renter_received(
    make_servers: Callable[..., LeaseServers],
) -> None:
    """The meter equals the bytes the renter's connections received (exactly, well within 1 %),
    however much the agent itself reads (meters, the digest)."""
    servers = make_servers()
    spec = make_spec(maxmemory_bytes=1 << 30)
    server = await servers.start(spec)
    conn = await RespConnection.open(
        server.host, server.port, username=spec.username, password=spec.password
    )
    other = await RespConnection.open(
        server.host, server.port, username=spec.username, password=spec.password
    )
    try:
        await conn.pipeline([("SET", f"v{i}", os.urandom(4 * MIB)) for i in range(25)])
        await server.read_meter()  # the agent's own reads are not the renter's
        for i in range(25):
            assert len(await conn.execute("GET", f"v{i}")) == 4 * MIB
        await other.execute("GET", "v0")
        with pytest.raises(RespError):
            await other.execute("CONFIG", "GET", "*")  # an error reply is egress too
        await lease_digest_async(conn)
        meter = await server.read_meter()
        received = conn.bytes_received + other.bytes_received
        assert received > 2 * 100 * MIB  # 100 MiB of GETs, plus the digest's DUMPs
        assert abs(meter.egress_bytes - received) <= 0.01 * received
        assert meter.egress_bytes == received
    finally:
        await conn.close()
        await other.close()
    closed = await servers.close(spec.contract_id)
    assert closed is not None and closed.egress_bytes == received  # the close's digest: not billed


async def test_egress_with_redis_py(make_servers: Callable[..., LeaseServers]) -> None:
    """With a stock client the meter is the values' bytes plus protocol framing, within 1 %."""
    servers = make_servers()
    spec = make_spec(maxmemory_bytes=256 * MIB)
    server = await servers.start(spec)
    client = renter(server, spec)
    try:
        for i in range(20):
            await client.set(f"v{i}", os.urandom(MIB))
        before = (await server.read_meter()).egress_bytes
        got = sum([len(await client.get(f"v{i}") or b"") for i in range(20)])
        meter = await server.read_meter()
    finally:
        await client.aclose()
    assert abs((meter.egress_bytes - before) - got) <= 0.01 * got


async def test_digest_is_the_same_from_every_client(
    make_servers: Callable[..., LeaseServers],
) -> None:
    """redis-py (sync and asyncio), the agent's RESP client and a plain callable all compute the
    same digest; changing one byte of one value changes it; an empty lease has a fixed one."""
    servers = make_servers()
    spec = make_spec()
    server = await servers.start(spec)
    client = renter(server, spec)
    empty = hashlib.sha256(DIGEST_PREFIX + (0).to_bytes(8, "big")).hexdigest()
    try:
        assert await lease_digest_async(client) == empty
        for i in range(600):  # more than one SCAN page and several batches
            await client.set(f"key:{i}", f"value {i}")
        await client.hset("h", mapping={str(i): i for i in range(300)})
        a = await lease_digest_async(client)
        sync_client = redis.Redis(
            host=server.host, port=server.port, username=spec.username, password=spec.password
        )
        try:
            b = await asyncio.to_thread(lease_digest, sync_client)
            c = await asyncio.to_thread(lease_digest, sync_client.execute_command)
        finally:
            sync_client.close()
        conn = await RespConnection.open(
            server.host, server.port, username=spec.username, password=spec.password
        )
        try:
            d = await lease_digest_async(conn)
            e = await lease_digest_async(conn.execute)
        finally:
            await conn.close()
        assert a == b == c == d == e != empty
        await client.set("key:7", "value 8")
        assert await lease_digest_async(client) != a
        # Big values: smaller batches, hashed off the event loop; the same digest either way.
        for i in range(4):
            await client.set(f"~big:{i}", os.urandom(6 * MIB))  # sorted last: the last batch
        f = await lease_digest_async(client)
        sync_client = redis.Redis(
            host=server.host, port=server.port, username=spec.username, password=spec.password
        )
        try:
            assert await asyncio.to_thread(lease_digest, sync_client) == f
        finally:
            sync_client.close()
    finally:
        await client.aclose()


def _readme_digest_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- digest-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no digest snippet"
    return match.group(1)


async def test_readme_snippet_reproduces_the_digest(
    make_servers: Callable[..., LeaseServers],
) -> None:
    """The renter's digest recipe in the README, run as printed, gives the agent's digest."""
    servers = make_servers()
    spec = make_spec()
    server = await servers.start(spec)
    client = renter(server, spec)
    try:
        await client.set("a", "1")
        await client.rpush("b", "x", "y")
        await client.sadd("c", *[str(i) for i in range(50)])
    finally:
        await client.aclose()
    url = f"redis://{spec.username}:{spec.password}@{server.host}:{server.port}"
    code = _readme_digest_snippet()
    namespace: dict[str, Any] = {"URL": url}
    await asyncio.to_thread(exec, code, namespace)
    result = await servers.close(spec.contract_id)
    assert result is not None and namespace["digest"] == result.digest


def _openssl_cert(directory: Path) -> tuple[str, str]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_lease(make_servers: Callable[..., LeaseServers], tmp_path: Path) -> None:
    """With a certificate the lease is served over TLS only: a verifying client reads and
    writes, the meter counts it, a plain client gets nothing, and close shuts the port."""
    cert, key = _openssl_cert(tmp_path)
    servers = make_servers(tls_cert=cert, tls_key=key)
    spec = make_spec()
    server = await servers.start(spec)
    assert server.tls
    client = renter(server, spec, ssl=True, ssl_ca_certs=cert, ssl_cert_reqs="required")
    try:
        await client.set("k", os.urandom(MIB))
        assert len(await client.get("k") or b"") == MIB
        digest = await lease_digest_async(client)
    finally:
        await client.aclose()
    meter = await server.read_meter()
    assert meter.egress_bytes > 2 * MIB  # the GET and the digest's DUMP
    plain = aioredis.Redis(
        host=server.host,
        port=server.port,
        username=spec.username,
        password=spec.password,
        socket_timeout=2,
    )
    with pytest.raises(redis.exceptions.ConnectionError):
        await plain.ping()
    await plain.aclose()
    result = await servers.close(spec.contract_id)
    assert result is not None and result.digest == digest
    assert await refused("127.0.0.1", server.port)


def _routable_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_reachable_from_another_address(make_servers: Callable[..., LeaseServers]) -> None:
    """Bound to a non-loopback address, the lease serves clients that are not local (protected
    mode does not get in the way: the default user is off, not password-less)."""
    address = _routable_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    servers = make_servers(listen=address)
    spec = make_spec()
    server = await servers.start(spec)
    conn = await RespConnection.open(
        address, server.port, username=spec.username, password=spec.password
    )
    try:
        assert await conn.execute("SET", "k", "v") == b"OK"
    finally:
        await conn.close()


def _present(path: Path) -> bool:
    return path.exists()


async def test_a_deep_lease_dir_still_serves(tmp_path: Path) -> None:
    """A lease_dir too deep for a Unix socket's path gets the admin socket in a private short
    directory, removed with the lease."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    servers = LeaseServers(listen="127.0.0.1", ports=PORTS, lease_dir=str(deep))
    try:
        spec = make_spec()
        server = await servers.start(spec)
        conf = (server.directory / "valkey.conf").read_text()
        socket_path = Path(conf.split("unixsocket ", 1)[1].split("\n", 1)[0].strip('"'))
        assert not socket_path.is_relative_to(deep) and _present(socket_path)
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
        conn = await RespConnection.open(
            server.host, server.port, username=spec.username, password=spec.password
        )
        assert await conn.execute("SET", "k", "v") == b"OK"
        await conn.close()
        await servers.close(spec.contract_id)
        assert not _present(socket_path.parent)
    finally:
        await servers.close_all()


async def test_cap_and_ports(make_servers: Callable[..., LeaseServers]) -> None:
    """The cap refuses a server past it; a port in use is skipped; a freed port is reused."""
    squatter = socket.socket()
    taken = next(p for p in range(42800, 42900) if squatter.connect_ex(("127.0.0.1", p)) != 0)
    squatter.close()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", taken))
    squatter.listen()
    try:
        servers = LeaseServers(
            listen="127.0.0.1",
            ports=range(taken, taken + 3),
            max_servers=2,
            lease_dir=tempfile.mkdtemp(prefix="mla-"),
        )
        try:
            a = await servers.start(make_spec("c-a"))
            b = await servers.start(make_spec("c-b"))
            assert taken not in (a.port, b.port)
            assert servers.full
            with pytest.raises(Exception, match="cap of 2"):
                await servers.start(make_spec("c-c"))
            await servers.close("c-a")
            c = await servers.start(make_spec("c-c"))
            assert c.port == a.port  # the only one left
        finally:
            await servers.close_all()
    finally:
        squatter.close()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a dead orphan waiting for init to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ends_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _leftovers(lease_dir: str) -> int:
    return len(list(Path(lease_dir).glob("lease-*")))


_CHILD = """
import asyncio, sys
from agent.lease_server import LeaseServers, LeaseSpec
async def main():
    servers = LeaseServers(listen="127.0.0.1", ports=range(42900, 43000), lease_dir=sys.argv[1])
    server = await servers.start(LeaseSpec("c-k", "lease-c-k", "pw", 1 << 24))
    print(server.pid, server.port, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_servers_die_with_the_agent(tmp_path: Path) -> None:
    """kill -9 of the agent ends its lease servers at once (nothing could manage them), and the
    next agent on the same lease_dir removes what was left."""
    lease_dir = tempfile.mkdtemp(prefix="mla-")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        lease_dir,
        stdout=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        pid, port = map(int, line.split())
        assert psutil.pid_exists(pid)
        child.send_signal(signal.SIGKILL)
        await child.wait()
        # The kernel signals at once; the bound leaves room for a loaded machine's scheduler.
        assert await asyncio.to_thread(_ends_within, pid, 3.0)
        assert await refused("127.0.0.1", port)
        assert _leftovers(lease_dir) == 1  # left behind by the killed agent
        servers = LeaseServers(listen="127.0.0.1", ports=PORTS, lease_dir=lease_dir)
        await servers.start(make_spec())
        assert _leftovers(lease_dir) == 1  # only the new one
        await servers.close_all()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        shutil.rmtree(lease_dir, True)
