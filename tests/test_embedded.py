"""Embedded Valkey and PostgreSQL: real servers that keep their data and leave nothing running."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis

from scripts.embedded import EmbeddedError, EmbeddedServers

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the embedded servers' process handling is Linux's"
)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A data folder of this test's own, outside pytest's folder.

    Postgres runs as an unprivileged user when the tests run as root, so it must be able to pass
    through every parent folder; pytest makes its base temp folder private again whenever another
    session starts, which would lock a running test's Postgres out of its own data.
    """
    path = Path(tempfile.mkdtemp(prefix="mnemo-emb-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _leftovers(folder: Path) -> list[psutil.Process]:
    """Live processes working in, or started with, anything under `folder`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(info["cmdline"] or [])
        cwd = info["cwd"] or ""
        if str(folder) in cmdline or cwd.startswith(str(folder)):
            found.append(proc)
    return found


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(folder: Path, timeout_s: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := _leftovers(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


async def _write(servers: EmbeddedServers, value: str) -> None:
    client = redis.Redis.from_url(servers.redis_url)
    try:
        client.rpush("mnemo:test:values", value)
    finally:
        client.close()
    conn = await asyncpg.connect(servers.database_url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (value text)")
        await conn.execute("INSERT INTO kept VALUES ($1)", value)
    finally:
        await conn.close()


async def _read(servers: EmbeddedServers) -> tuple[list[str], list[str]]:
    client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
    try:
        in_redis = client.lrange("mnemo:test:values", 0, -1)
    finally:
        client.close()
    conn = await asyncpg.connect(servers.database_url)
    try:
        rows = await conn.fetch("SELECT value FROM kept")
    finally:
        await conn.close()
    return [str(v) for v in in_redis], sorted(r["value"] for r in rows)


async def test_data_survives_stop_and_start(folder: Path) -> None:
    """A key and a row written before a stop are read back after the next start, on the same URLs."""
    with EmbeddedServers(folder) as servers:
        await _write(servers, "before")
        urls = (servers.redis_url, servers.database_url)
        pids = servers.pids
    assert len(pids) == 2
    assert not [p for p in pids if _running(p)]
    assert _leftovers(folder) == []

    with EmbeddedServers(folder) as servers:
        assert (servers.redis_url, servers.database_url) == urls
        assert await _read(servers) == (["before"], ["before"])
        await _write(servers, "after")
    assert _leftovers(folder) == []


async def test_valkey_persists_with_aof_everysec(folder: Path) -> None:
    """Valkey runs with the append-only file on and fsync every second."""
    with EmbeddedServers(folder, want_postgres=False) as servers:
        client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
        try:
            config = client.config_get("append*")
            assert config["appendonly"] == "yes"
            assert config["appendfsync"] == "everysec"
            assert client.config_get("bind")["bind"] == "127.0.0.1"
        finally:
            client.close()
        with pytest.raises(RuntimeError):
            servers.database_url  # noqa: B018 - not started, so not available


def test_database_mnemo_exists(folder: Path) -> None:
    """The URL names a `mnemo` database on 127.0.0.1 as the postgres superuser."""
    with EmbeddedServers(folder, want_redis=False) as servers:
        assert servers.database_url.startswith("postgresql://postgres@127.0.0.1:")
        assert servers.database_url.endswith("/mnemo")
        with pytest.raises(RuntimeError):
            servers.redis_url  # noqa: B018 - not started, so not available


def test_one_process_per_data_folder(folder: Path) -> None:
    """A second user of the same data folder is refused with one line naming the first."""
    with EmbeddedServers(folder, want_postgres=False):
        with pytest.raises(EmbeddedError) as caught:
            with EmbeddedServers(folder, want_postgres=False):
                pass
        assert "in use" in str(caught.value)
        assert str(os.getpid()) in str(caught.value)


def test_start_failure_is_one_line_and_stops_the_other(folder: Path) -> None:
    """A server that cannot start gives one line with its reason and log tail; nothing is left."""
    with EmbeddedServers(folder):
        pass
    conf = folder / "postgres" / "postgresql.auto.conf"
    conf.write_text(conf.read_text() + "no_such_setting_at_all = 1\n")
    with pytest.raises(EmbeddedError) as caught:
        with EmbeddedServers(folder):
            pass
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("embedded PostgreSQL: ")
    assert "postgresql.auto.conf" in text
    assert caught.value.log_tail
    assert _leftovers(folder) == []  # Valkey, started first, was stopped again


_HOLDER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    import asyncpg, redis
    from scripts.embedded import EmbeddedServers

    async def write(url, value):
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (value text)")
        await conn.execute("INSERT INTO kept VALUES ($1)", value)
        await conn.close()

    with EmbeddedServers(Path(sys.argv[1])) as s:
        r = redis.Redis.from_url(s.redis_url)
        r.rpush("mnemo:test:values", "from-killed-run")
        r.close()
        asyncio.run(write(s.database_url, "from-killed-run"))
        print(json.dumps(s.pids), flush=True)
        sys.stdin.read()
    """
)


def _holder(folder: Path) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the holder process did not start its servers"
    return proc, json.loads(line)


def _reap(proc: subprocess.Popen[str]) -> None:
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


async def test_kill_9_of_the_owner_stops_the_servers(folder: Path) -> None:
    """If the owning process is killed outright, both servers shut down by themselves."""
    proc, pids = _holder(folder)
    proc.kill()
    _reap(proc)
    assert _wait_gone(folder) == []
    assert not [p for p in pids if _running(p)]
    assert (folder / "postgres" / "postmaster.pid").exists() is False
    with EmbeddedServers(folder) as servers:
        assert await _read(servers) == (["from-killed-run"], ["from-killed-run"])


async def test_stale_pid_files_from_a_killed_run(folder: Path) -> None:
    """Owner and servers all killed with -9: the stale pid files do not stop the next start."""
    proc, pids = _holder(folder)
    for pid in [*pids, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    _reap(proc)
    assert _wait_gone(folder) == []
    assert (folder / "postgres" / "postmaster.pid").exists()
    assert (folder / "valkey" / "valkey.pid").exists()
    with EmbeddedServers(folder) as servers:
        # Committed before the kill, so recovered from the WAL; the AOF was written (everysec)
        # but a key written within the last second of a SIGKILLed Valkey may be lost by design.
        in_redis, in_postgres = await _read(servers)
        assert in_postgres == ["from-killed-run"]
        assert in_redis in ([], ["from-killed-run"])
    assert _leftovers(folder) == []


def test_a_killed_server_restarts_on_its_url_with_its_data(folder: Path) -> None:
    """kill -9 of either server is reported by `exited()`; `restart` brings it back on the same
    URL with everything acknowledged before the kill (Valkey's AOF, Postgres's WAL)."""
    with EmbeddedServers(folder) as servers:
        asyncio.run(_write(servers, "before"))
        urls = (servers.redis_url, servers.database_url)
        assert servers.exited() == []
        old = servers.pids
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(servers.exited()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(servers.exited()) == [("PostgreSQL", -9), ("Valkey", -9)]
        for name in ("Valkey", "PostgreSQL"):
            servers.restart(name)
        assert servers.exited() == []
        assert (servers.redis_url, servers.database_url) == urls
        assert not set(servers.pids) & set(old)
        assert asyncio.run(_read(servers)) == (["before"], ["before"])
    assert _leftovers(folder) == []
