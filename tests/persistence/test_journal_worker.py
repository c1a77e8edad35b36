"""The journal worker over real streams: claims, crashes, Postgres outages, lost entries, lag."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from engine.keys import Keys
from engine.settings import ConfigError, Settings
from engine.types import BidCancelled
from persistence.journal import (
    GROUP,
    decode_entry,
    journal_lag,
    print_status,
    refresh_clusters,
    run_journal,
    shard_regions,
    write_batch,
)
from tests.conftest import _SEED
from tests.persistence.conftest import digest, reset_journal
from tests.persistence.history import History, seed_accounts, xadd_all

ROOT = Path(__file__).resolve().parents[2]


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _all_applied(conn: asyncpg.Connection, h: History) -> bool:
    want = {}
    for e in h.events:
        want[e.region] = max(want.get(e.region, 0), int(e.event_id.rsplit(":", 1)[1]))
    rows = await conn.fetch("SELECT region, applied_seq FROM journal_positions")
    return {r["region"]: r["applied_seq"] for r in rows} == want


async def _reference(conn: asyncpg.Connection, h: History) -> dict[str, tuple[int, str]]:
    """The digest of one clean in-order pass (then the journal tables are emptied again)."""
    await reset_journal(conn)
    await write_batch(conn, [decode_entry(p) for _, p in h.encoded()])
    await refresh_clusters(conn, h.regions)
    out = await digest(conn)
    await reset_journal(conn)
    return out


async def _settled_digest(conn: asyncpg.Connection, h: History) -> dict[str, tuple[int, str]]:
    await refresh_clusters(conn, h.regions)
    return await digest(conn)


@contextlib.asynccontextmanager
async def _worker_task(settings: Settings, **kwargs: object) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_journal(settings, stop=stop, **kwargs))  # type: ignore[arg-type]
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _settings(redis_url: str, db_url: str, keys: Keys) -> Settings:
    return Settings(redis_url=redis_url, database_url=db_url, key_prefix=keys.prefix)


async def test_entries_of_a_dead_consumer_are_claimed(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """Entries read by a consumer that died are claimed after the idle threshold and applied in
    order with the rest: the tables equal one clean pass."""
    h = History.generate(_SEED, 800)
    await seed_accounts(conn, h)
    expected = await _reference(conn, h)
    await xadd_all(redis, keys, h.encoded())
    for region in h.regions:
        await redis.xgroup_create(keys.events(region), GROUP, id="0", mkstream=True)
    # The dead worker took the first 150 entries of each stream and never came back.
    taken = await redis.xreadgroup(
        GROUP, "dead", {keys.events(r): ">" for r in h.regions}, count=150
    )
    assert sum(len(entries) for _, entries in taken) == 300
    async with _worker_task(
        _settings(redis_url, db_url, keys), consumer="live", batch_size=100, claim_idle_s=0.3
    ):
        await _eventually(lambda: _all_applied(conn, h), 60, "every event applied")
        lag = await journal_lag(redis, keys)
        await _eventually(lambda: _no_lag(redis, keys), 10, "every entry acknowledged")
    assert lag.undelivered == 0
    assert await _settled_digest(conn, h) == expected


async def _no_lag(redis: aioredis.Redis, keys: Keys) -> bool:
    lag = await journal_lag(redis, keys)
    return lag.pending == 0 and lag.undelivered == 0


async def _spawn(redis_url: str, db_url: str, keys: Keys, batch: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.persistence.journal_worker",
        redis_url,
        db_url,
        keys.prefix,
        "crashy",
        str(batch),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def _kill9(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def test_kill_9_mid_batch_then_restart(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """A worker killed with SIGKILL inside a batch's transaction (and at random moments after)
    loses nothing and duplicates nothing once restarted."""
    h = History.generate(_SEED + 1, 3000)
    await seed_accounts(conn, h)
    expected = await _reference(conn, h)
    await xadd_all(redis, keys, h.encoded())

    # 1. Hold the worker inside its first batch's transaction (events stored, the region's
    #    position locked, the tables half written): a lock on `nodes` it must wait for. Kill it.
    async with conn.transaction():
        await conn.execute("LOCK TABLE nodes IN ACCESS EXCLUSIVE MODE")
        proc = await _spawn(redis_url, db_url, keys, 300)
        try:
            dbname = urlsplit(db_url).path.lstrip("/")

            async def waiting() -> bool:
                # Activity is snapshotted once per transaction unless the snapshot is cleared.
                await conn.execute("SELECT pg_stat_clear_snapshot()")
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                        dbname,
                    )
                )

            await _eventually(waiting, 60, "the worker to block inside its transaction")
        finally:
            await _kill9(proc)
    assert await conn.fetchval("SELECT count(*) FROM events") == 0
    assert (await journal_lag(redis, keys)).pending > 0

    # 2. Restart and kill it again at random moments, then let it finish.
    rng = random.Random(_SEED)
    for _ in range(3):
        proc = await _spawn(redis_url, db_url, keys, 300)
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        await _kill9(proc)
    proc = await _spawn(redis_url, db_url, keys, 300)
    try:
        await _eventually(lambda: _all_applied(conn, h), 120, "every event applied")
        await _eventually(lambda: _no_lag(redis, keys), 30, "every entry acknowledged")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert await _settled_digest(conn, h) == expected


class _Proxy:
    """A TCP proxy to Postgres that can be taken down (listener and live connections)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


async def test_postgres_going_away_loses_nothing(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """Postgres unreachable for a while (and the worker's backend terminated) under a steady
    stream of events: nothing acknowledged early, nothing lost once it is back."""
    h = History.generate(_SEED + 2, 2400)
    await seed_accounts(conn, h)
    expected = await _reference(conn, h)
    parts = urlsplit(db_url)
    proxy = _Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    encoded = h.encoded()
    chunks = [encoded[i : i + 200] for i in range(0, len(encoded), 200)]

    async def produce(chunks: list) -> None:
        for chunk in chunks:
            await xadd_all(redis, keys, chunk)
            await asyncio.sleep(0.05)

    settings = _settings(redis_url, proxied, keys)
    async with _worker_task(settings, consumer="w", batch_size=150):
        await produce(chunks[:4])
        await _eventually(
            lambda: conn.fetchval(
                "SELECT coalesce(sum(applied_seq), 0) > 0 FROM journal_positions"
            ),
            30,
            "some events applied",
        )
        # Terminate the worker's backend: the batch in flight is retried on a new connection.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            parts.path.lstrip("/"),
        )
        await produce(chunks[4:7])
        # Take Postgres away entirely while events keep coming.
        await proxy.stop()
        await produce(chunks[7:10])
        applied_while_down = await conn.fetchval("SELECT sum(applied_seq) FROM journal_positions")
        await asyncio.sleep(1.5)
        assert await conn.fetchval("SELECT sum(applied_seq) FROM journal_positions") == (
            applied_while_down
        )
        lag = await journal_lag(redis, keys)
        assert lag.pending + lag.undelivered > 0
        await proxy.start()
        await produce(chunks[10:])
        await _eventually(lambda: _all_applied(conn, h), 120, "every event applied")
        await _eventually(lambda: _no_lag(redis, keys), 30, "every entry acknowledged")
    await proxy.stop()
    assert await _settled_digest(conn, h) == expected


async def test_entries_lost_from_the_stream_are_skipped_and_counted(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """When the head of a stream is gone (trimmed before the journal read it), the journal
    applies the rest once nothing can fill the gap, and counts what it skipped."""
    h = History.generate(_SEED + 3, 300, regions=("solo",))
    await seed_accounts(conn, h)
    # Twenty harmless events (cancels of bids nobody knows) come first and will be lost, so
    # that the rest of the history stays consistent without them.
    lost = [
        BidCancelled(event_id=f"solo:{i}", region="solo", ts_ms=h.events[0].ts_ms, bid_id="0" * 32)
        for i in range(1, 21)
    ]
    kept = [
        msgspec.structs.replace(e, event_id=f"solo:{i}") for i, e in enumerate(h.events, start=21)
    ]
    encoded = [(e.region, msgspec.json.encode(e)) for e in [*lost, *kept]]
    await xadd_all(redis, keys, encoded)
    await redis.xtrim(keys.events("solo"), maxlen=len(kept), approximate=False)
    async with _worker_task(_settings(redis_url, db_url, keys), consumer="w", batch_size=100):

        async def skipped() -> bool:
            row = await conn.fetchrow("SELECT * FROM journal_positions WHERE region = 'solo'")
            return row is not None and row["applied_seq"] == 20 + len(kept)

        await _eventually(skipped, 30, "the gap to be skipped")
        await _eventually(lambda: _no_lag(redis, keys), 30, "every entry acknowledged")
    row = await conn.fetchrow("SELECT * FROM journal_positions WHERE region = 'solo'")
    assert row["applied_seq"] == 20 + len(kept)
    assert await conn.fetchval("SELECT count(*) FROM events") == len(kept)
    assert await conn.fetchval("SELECT count(*) FROM nodes") > 0


async def test_an_entry_the_events_table_refuses_is_kept_aside(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """An entry `events` refuses (its id does not spell its region and seq) lands in
    journal_rejects with the reason and is acknowledged; every other event of its batch is
    stored and applied."""
    h = History.generate(_SEED + 4, 120, regions=("solo",))
    await seed_accounts(conn, h)
    last = h.events[-1]
    seq = int(last.event_id.rsplit(":", 1)[1])
    padded = msgspec.structs.replace(last, event_id=f"solo:0{seq}")
    encoded = [*h.encoded()[:-1], ("solo", msgspec.json.encode(padded))]
    await xadd_all(redis, keys, encoded)
    async with _worker_task(_settings(redis_url, db_url, keys), consumer="w", batch_size=500):

        async def applied() -> bool:
            row = await conn.fetchrow("SELECT * FROM journal_positions WHERE region = 'solo'")
            return row is not None and row["applied_seq"] == seq - 1

        await _eventually(applied, 30, "every other event applied")
        await _eventually(lambda: _no_lag(redis, keys), 30, "every entry acknowledged")
    assert await conn.fetchval("SELECT count(*) FROM events") == seq - 1
    rejects = await conn.fetch("SELECT raw, problem FROM journal_rejects")
    assert [r["raw"] for r in rejects] == [encoded[-1][1]]
    assert "CheckViolationError" in rejects[0]["problem"]


async def test_lag_counts_pending_and_undelivered(redis: aioredis.Redis, keys: Keys) -> None:
    """journal_lag reports entries read but not acknowledged, entries not yet read, and the age
    of the oldest unacknowledged event."""
    h = History.generate(_SEED + 4, 50, regions=("lag",))
    await xadd_all(redis, keys, h.encoded())
    n = len(h.events)
    await redis.xgroup_create(keys.events("lag"), GROUP, id="0")
    got = await redis.xreadgroup(GROUP, "c", {keys.events("lag"): ">"}, count=10)
    first_ts = h.events[0].ts_ms
    lag = await journal_lag(redis, keys, now_ms=first_ts + 5000)
    (region,) = lag.regions
    assert (region.pending, region.undelivered, region.stream_length) == (10, n - 10, n)
    assert region.oldest_unacked_age_s == pytest.approx(5.0)
    await redis.xack(keys.events("lag"), GROUP, *[i for i, _ in got[0][1]])
    lag = await journal_lag(redis, keys, now_ms=h.events[10].ts_ms + 1000)
    assert (lag.pending, lag.undelivered, lag.oldest_unacked_age_s) == (0, n - 10, 1.0)
    assert lag.regions[0].last_event_id == h.events[-1].event_id


async def test_journaled_entries_are_trimmed_but_never_pending_ones(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """The journal trims the streams of what it has stored, but keeps every entry still
    pending (here: held by a consumer that died, before it is claimed)."""
    h = History.generate(_SEED + 5, 1200, regions=("trim",))
    await seed_accounts(conn, h)
    await xadd_all(redis, keys, h.encoded())
    stream = keys.events("trim")
    await redis.xgroup_create(stream, GROUP, id="0")
    # A dead consumer holds entries in the middle of the stream.
    await redis.xreadgroup(GROUP, "dead", {stream: ">"}, count=400)
    held = await redis.xreadgroup(GROUP, "dead", {stream: ">"}, count=10)
    first_held = held[0][1][0][0]
    total = await redis.xlen(stream)
    settings = _settings(redis_url, db_url, keys)
    async with _worker_task(
        settings, consumer="w", batch_size=100, claim_idle_s=3600, stream_keep_s=0
    ):
        # The worker claims nothing for an hour: it journals what nobody holds.
        async def rest_stored() -> bool:
            return await conn.fetchval("SELECT count(*) FROM events") == total - 410

        await _eventually(rest_stored, 60, "the entries nobody holds to be stored")
        # The first 400 entries' holder comes back and acknowledges them (they were journaled
        # by nobody: this only frees them for trimming); the 10 after stay pending.
        await redis.xack(stream, GROUP, *[i for i, _ in await redis.xrange(stream, count=400)])

        async def trimmed() -> bool:
            return await redis.xlen(stream) < total - 300

        await _eventually(trimmed, 30, "the stream to be trimmed")
    assert await redis.xrange(stream, min=first_held, max=first_held)


async def test_journal_status_prints_lag_and_positions(
    redis: aioredis.Redis,
    keys: Keys,
    redis_url: str,
    db_url: str,
    conn: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`mnemo journal-status` shows each region's stream, lag and applied position, and exits
    non-zero while a region is held at a refused event."""
    h = History.generate(_SEED + 6, 100, regions=("st-a", "st-b"))
    await seed_accounts(conn, h)
    await xadd_all(redis, keys, h.encoded())
    settings = _settings(redis_url, db_url, keys)
    async with _worker_task(settings, consumer="w"):
        await _eventually(lambda: _all_applied(conn, h), 30, "every event applied")
        await _eventually(lambda: _no_lag(redis, keys), 30, "every entry acknowledged")
    assert await print_status(settings) == 0
    out = capsys.readouterr().out
    assert "0 pending, 0 undelivered" in out
    for region in h.regions:
        last = max(int(e.event_id.rsplit(":", 1)[1]) for e in h.events if e.region == region)
        (line,) = [x for x in out.splitlines() if x.startswith(region)]
        assert str(last) in line.split()
    await conn.execute(
        "UPDATE journal_positions SET error = 'st-a:7: refused', error_seq = 7 "
        "WHERE region = 'st-a'"
    )
    assert await print_status(settings) == 1
    assert "st-a:7: refused" in capsys.readouterr().out


async def test_several_workers_share_the_streams(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """Three workers in one consumer group, reading the same streams in small batches while
    events arrive: each event applied once, in order: the tables equal one clean pass."""
    h = History.generate(_SEED + 7, 1500, regions=("w-a", "w-b", "w-c"))
    await seed_accounts(conn, h)
    expected = await _reference(conn, h)
    encoded = h.encoded()
    settings = _settings(redis_url, db_url, keys)
    async with contextlib.AsyncExitStack() as stack:
        for name in ("one", "two", "three"):
            await stack.enter_async_context(
                _worker_task(settings, consumer=name, batch_size=40, claim_idle_s=0.5)
            )
        for i in range(0, len(encoded), 100):
            await xadd_all(redis, keys, encoded[i : i + 100])
            await asyncio.sleep(0.02)
        await _eventually(lambda: _all_applied(conn, h), 120, "every event applied")
        await _eventually(lambda: _no_lag(redis, keys), 30, "every entry acknowledged")
    assert await _settled_digest(conn, h) == expected


def test_shards_deal_every_region_to_exactly_one_worker() -> None:
    regions = ["us-east-2", "eu-west-1", "ap-south-1", "us-west-2", "eu-west-1"]
    for n in (1, 2, 3, 5, 7):
        dealt = [shard_regions(regions, (k, n)) for k in range(n)]
        flat = [r for share in dealt for r in share]
        assert sorted(flat) == sorted(set(regions))  # each region once, none missing
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1  # shares differ by one at most
    assert shard_regions(regions, None) == sorted(set(regions))
    # Every worker computes the same deal whatever order the regions come in.
    assert shard_regions(reversed(regions), (1, 3)) == shard_regions(regions, (1, 3))


async def test_sharded_workers_each_read_only_their_regions(
    redis: aioredis.Redis, keys: Keys, redis_url: str, db_url: str, conn: asyncpg.Connection
) -> None:
    """Two workers, shards 0/2 and 1/2 (`mnemo journal --shard`): each reads only the streams
    of the regions dealt to it, and together they journal everything, as one clean pass."""
    regions = ("s-a", "s-b", "s-c")
    h = History.generate(_SEED + 11, 1200, regions=regions)
    await seed_accounts(conn, h)
    expected = await _reference(conn, h)
    settings = _settings(redis_url, db_url, keys)
    async with contextlib.AsyncExitStack() as stack:
        for k in range(2):
            await stack.enter_async_context(
                _worker_task(settings, consumer=f"shard{k}", batch_size=50, shard=(k, 2))
            )
        await xadd_all(redis, keys, h.encoded())
        await _eventually(lambda: _all_applied(conn, h), 120, "every event applied")
        await _eventually(lambda: _no_lag(redis, keys), 30, "every entry acknowledged")
    assert await _settled_digest(conn, h) == expected
    for k in range(2):
        for region in regions:
            consumers = {
                c["name"].decode(): c
                for c in await redis.xinfo_consumers(keys.events(region), GROUP)
            }
            reads = f"shard{k}" in consumers
            assert reads == (region in shard_regions(regions, (k, 2))), (k, region, consumers)


async def test_a_shard_outside_its_count_is_refused(
    redis_url: str, db_url: str, keys: Keys
) -> None:
    with pytest.raises(ConfigError, match="shard 2/2"):
        await run_journal(_settings(redis_url, db_url, keys), shard=(2, 2))
