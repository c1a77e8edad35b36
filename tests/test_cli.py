"""The `mnemo` command: one-line start-up errors, migrate, servers, the Procfile, and `up`."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
import pytest
import redis

from engine.keys import Keys
from scripts.cli import PROCFILE, _demo_processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder of this test's own outside pytest's tmp_path (see tests/test_embedded.py)."""
    path = Path(tempfile.mkdtemp(prefix="mnemo-cli-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env(home: Path, **values: str) -> dict[str, str]:
    """This environment without any MNEMO_* setting, plus `values`, with a private data folder
    and a free port of its own (so the tests pass while `scripts/up` holds the default 8000)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMO_")}
    env["MNEMO_DATA_DIR"] = str(home / "data")
    env["MNEMO_PORT"] = str(_free_port())
    env.update(values)
    return env


def _mnemo(
    home: Path, *args: str, timeout: float = 120, **values: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.cli", *args],
        env=_env(home, **values),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _leftovers(folder: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmdline or (proc.info["cwd"] or "").startswith(str(folder)):
            found.append(proc)
    return found


@pytest.mark.parametrize("command", ["migrate", "up", "journal", "gateway"])
def test_bad_database_url_is_one_line(folder: Path, command: str) -> None:
    """An unreachable MNEMO_DATABASE_URL gives one line naming it and exit status 2."""
    done = _mnemo(
        folder,
        command,
        MNEMO_DATABASE_URL="postgresql://nobody@127.0.0.1:1/x",
        MNEMO_REDIS_URL="redis://127.0.0.1:1/0" if command != "up" else "",
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    if command in ("journal", "gateway"):
        # These check Redis first; the line names whichever setting is unusable.
        assert len(lines) == 1 and lines[0].startswith("mnemo: error: MNEMO_REDIS_URL: ")
        return
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mnemo: error: MNEMO_DATABASE_URL: cannot connect")
    assert "Traceback" not in done.stderr + done.stdout
    assert _leftovers(folder) == []  # `up` started embedded Valkey, and stopped it again


def test_malformed_setting_is_one_line(tmp_path: Path) -> None:
    """A malformed variable is named in one line, before anything starts."""
    done = _mnemo(tmp_path, "up", MNEMO_PORT="eighty")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "mnemo: error: MNEMO_PORT: expected an integer, got 'eighty'"
    ]


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    """`mnemo up` on a taken port says so before starting anything."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _mnemo(tmp_path, "up", MNEMO_PORT=str(port))
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"mnemo: error: MNEMO_PORT: cannot listen on 127.0.0.1:{port}")
    assert not (tmp_path / "data" / "valkey").exists()


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "0/0"])
def test_journal_shard_out_of_range_is_one_line(tmp_path: Path, shard: str) -> None:
    """`mnemo journal --shard K/N` wants 0 <= K < N, said in one line before anything starts."""
    done = _mnemo(tmp_path, "journal", "--shard", shard)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"mnemo journal: error: argument --shard: expected K/N with 0 <= K < N, got '{shard}'"
    )


def test_single_process_needs_urls(tmp_path: Path) -> None:
    """`mnemo engine` alone, without URLs, says which variable is missing."""
    done = _mnemo(tmp_path, "engine")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("mnemo: error: MNEMO_REDIS_URL: not set")


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    name = f"mnemo_cli_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await asyncio.shield(admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            await admin.close()


def test_migrate_command(tmp_path: Path, fresh_database: str) -> None:
    """`mnemo migrate` applies the schema, then reports it up to date."""
    first = _mnemo(tmp_path, "migrate", MNEMO_DATABASE_URL=fresh_database)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("applied: 001_accounts")
    again = _mnemo(tmp_path, "migrate", MNEMO_DATABASE_URL=fresh_database)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "schema is up to date"


async def _count_migrations(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        return count
    finally:
        await conn.close()


def test_servers_command_runs_until_sigterm(folder: Path) -> None:
    """`mnemo servers` prints usable URLs, and SIGTERM stops it and both servers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.cli", "servers", "--migrate"],
        env=_env(folder),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        while len(urls) < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "no output"
            name, _, value = line.strip().partition("=")
            urls[name] = value
        client = redis.Redis.from_url(urls["MNEMO_REDIS_URL"])
        try:
            assert client.ping()
        finally:
            client.close()
        assert asyncio.run(_count_migrations(urls["MNEMO_DATABASE_URL"])) >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert _leftovers(folder) == []


def test_procfile_matches_what_up_runs() -> None:
    """The Procfile lists exactly the processes `mnemo up` knows, with the same commands."""
    lines = [
        line
        for line in (ROOT / "Procfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parsed = []
    for line in lines:
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        assert match, line
        parsed.append((match.group(1), tuple(match.group(2).split())))
    assert parsed == [(p.name, p.argv) for p in PROCFILE]


@pytest.mark.skipif(not importlib.util.find_spec("agent.cli"), reason="needs the agent package")
def test_a_big_demo_fleet_fits_the_accounts_socket_limit() -> None:
    """`mnemo up --fleet N` keeps the fleet's sockets (one account) within the per-account limit
    by putting more nodes on each; a small fleet keeps the agent's own default."""
    (small, *_) = _demo_processes(1000, "http://127.0.0.1:1", 20)
    assert small.argv[1:] == ("--simulate", "1000")
    (big, *_) = _demo_processes(1_000_000, "http://127.0.0.1:1", 20)
    assert big.argv[1:] == ("--simulate", "1000000", "--nodes-per-connection", "50000")


_STACK = ("gateway.app", "engine.process", "persistence.journal.worker")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(
    not all(_have(m) for m in _STACK), reason=f"needs {', '.join(_STACK)} in this checkout"
)
def test_up_reaches_healthy_and_ctrl_c_leaves_nothing(folder: Path) -> None:
    """`mnemo up` on the embedded default serves /healthz; Ctrl-C stops every process it started."""
    port = _free_port()
    output = folder / "up.log"
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.cli", "up", "--no-demo"],
            env=_env(folder, MNEMO_PORT=str(port)),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    descendants: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            descendants |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    status = r.status
                    break
            except OSError:
                time.sleep(0.5)
        assert status == 200, "\n".join(output.read_text().splitlines()[-30:])
        descendants |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    still = []
    for pid in descendants:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                still.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert still == []
    assert _leftovers(folder) == []


async def test_credit_clawback_and_credit_line_commands(
    tmp_path: Path, redis_url: str, db_url: str, keys: Keys
) -> None:
    """`mnemo credit` credits a renter once per key (the same key again changes nothing),
    `mnemo clawback` refuses beyond the balance unless allowed to leave a debt, `mnemo
    credit-line` sets the renter's terms; bad input is one line and exit status 2."""
    conn = await asyncpg.connect(db_url)
    try:
        user, client = uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO users (id, email, password_hash) VALUES ($1, 'op@x.test', 'x')", user
        )
        await conn.execute(
            "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'o')", client, user
        )
        urls = {
            "MNEMO_REDIS_URL": redis_url,
            "MNEMO_DATABASE_URL": db_url,
            "MNEMO_KEY_PREFIX": keys.prefix,
        }

        def mnemo(*args: str) -> subprocess.CompletedProcess[str]:
            return _mnemo(tmp_path, *args, **urls)

        done = await asyncio.to_thread(
            mnemo, "credit", str(client), "12.50", "--reason", "trial", "--key", "t1"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("credited 12.5 USD (key t1)")
        again = await asyncio.to_thread(
            mnemo, "credit", str(client), "12.50", "--reason", "trial", "--key", "t1"
        )
        assert again.stdout.startswith("already applied (key t1)")
        assert "funding balance 12.5 USD" in again.stdout
        refused = await asyncio.to_thread(mnemo, "clawback", str(client), "20", "--reason", "x")
        assert refused.returncode == 1 and "insufficient_funds" not in refused.stdout
        assert "refused" in refused.stderr
        debt = await asyncio.to_thread(
            mnemo, "clawback", str(client), "20", "--reason", "fraud", "--allow-negative"
        )
        assert debt.returncode == 0 and "funding balance -7.5 USD" in debt.stdout, debt.stderr
        line = await asyncio.to_thread(mnemo, "credit-line", str(client), "100")
        assert line.returncode == 0, line.stderr
        assert (
            await conn.fetchval("SELECT credit_line_pusd FROM clients WHERE id = $1", client)
            == 100 * 10**12
        )
        bad = await asyncio.to_thread(mnemo, "credit", str(client), "ten", "--reason", "x")
        assert bad.returncode == 2 and "expected a USD amount" in bad.stderr
        unknown = await asyncio.to_thread(mnemo, "credit", str(uuid.uuid4()), "1", "--reason", "x")
        assert unknown.returncode == 1 and "no client" in unknown.stderr
    finally:
        await conn.close()
