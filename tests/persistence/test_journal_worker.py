"""The journal worker over real streams: claims, crashes, Postgres outages, lost entries, lag."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from engine.connection import read_streams
from engine.keys import Keys
from engine.settings import ConfigError, Settings
from engine.types import (
    BidCancelled,
    Contract,
    ContractCreated,
    HeartbeatEntry,
    HeartbeatsApplied,
    NodeRegistered,
)
from persistence.journal.batch import write_batch
from persistence.journal.clusters import refresh_clusters
from persistence.journal.lag import journal_lag
from persistence.journal.replay import replay_region
from persistence.journal.status import print_status, rejected_counts
from persistence.journal.stored import decode_entry
from persistence.journal.streams import GROUP
from persistence.journal.worker import run_journal, shard_regions
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
    taken = await read_streams(
        redis, {keys.events(r): ">" for r in h.regions}, count=150, group=GROUP, consumer="dead"
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


def _poisoned(h: History, region: str, stranger: str) -> tuple[list, list, dict[int, str]]:
    """`h`'s events with one poison event of each kind put into `region`'s sequence (the region's
    later events renumbered after them), and the same sequence with a harmless stand-in (the
    cancellation of a bid that never existed: it changes nothing) at each poison's place.
    Returns (poisoned, stand-ins, {seq: what the poison should be refused for})."""
    node = next(e.node for e in h.events if isinstance(e, NodeRegistered) and e.region == region)
    user, client = h.renters[0]
    later = max(e.ts_ms for e in h.events)

    def contract(**changes: object) -> Contract:
        made = Contract(
            contract_id=uuid.uuid4().hex,
            region=region,
            client_id=client,
            user_id=user,
            node_id=node.node_id,
            owner_id=node.owner_id,
            ram_gb=1,
            vram_gb=0,
            duration_s=60,
            start_ms=later,
            end_ms=later + 60_000,
            price_pusd=1,
        )
        return msgspec.structs.replace(made, **changes)

    def envelope(seq: int, kind: str, **body: object) -> bytes:
        return msgspec.json.encode(
            {"type": kind, "event_id": f"{region}:{seq}", "region": region, "ts_ms": later, **body}
        )

    poisons: list[tuple[str, Callable[[int], bytes]]] = [
        # A type this journal does not know (a newer engine's).
        ("not an event", lambda seq: envelope(seq, "contract_disputed", contract_id="c1")),
        # A known type whose body is malformed.
        ("not an event", lambda seq: envelope(seq, "node_registered", node={"node_id": 5})),
        # A cost no bigint holds.
        (
            "OverflowError",
            lambda seq: msgspec.json.encode(
                ContractCreated(
                    event_id=f"{region}:{seq}",
                    region=region,
                    ts_ms=later,
                    contract=contract(cost_pusd=10**21),
                )
            ),
        ),
        # A foreign key to a client that does not exist.
        (
            "ForeignKeyViolation",
            lambda seq: msgspec.json.encode(
                ContractCreated(
                    event_id=f"{region}:{seq}",
                    region=region,
                    ts_ms=later,
                    contract=contract(client_id=stranger),
                )
            ),
        ),
        # A value the tables' types refuse (a node id that is no uuid).
        (
            "DataError",
            lambda seq: msgspec.json.encode(
                HeartbeatsApplied(
                    event_id=f"{region}:{seq}",
                    region=region,
                    ts_ms=later,
                    entries=[
                        HeartbeatEntry(
                            node_id="not-a-uuid",
                            offered_ram_gb=1,
                            offered_vram_gb=0,
                            available_ram_gb=1,
                            available_vram_gb=0,
                        )
                    ],
                )
            ),
        ),
    ]
    mine = [e for e in h.events if e.region == region]
    at = sorted(random.Random(_SEED).sample(range(1, len(mine)), len(poisons)))
    poisoned: list[tuple[str, bytes]] = []
    stand_ins: list[tuple[str, bytes]] = []
    reasons: dict[int, str] = {}
    seq = 0
    for i, e in enumerate(mine):
        while at and at[0] == i:
            at.pop(0)
            seq += 1
            reason, make = poisons[len(reasons)]
            reasons[seq] = reason
            poisoned.append((region, make(seq)))
            stand_in = BidCancelled(
                event_id=f"{region}:{seq}", region=region, ts_ms=later, bid_id=uuid.uuid4().hex
            )
            stand_ins.append((region, msgspec.json.encode(stand_in)))
        seq += 1
        moved = msgspec.json.encode(msgspec.structs.replace(e, event_id=f"{region}:{seq}"))
        poisoned.append((region, moved))
        stand_ins.append((region, moved))
    others = [(e.region, msgspec.json.encode(e)) for e in h.events if e.region != region]
    return poisoned + others, stand_ins + others, reasons


async def test_poison_events_are_set_aside_and_nothing_else_is_lost_or_stalled(
    redis: aioredis.Redis,
    keys: Keys,
    redis_url: str,
    db_url: str,
    conn: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One poison event of each kind (unknown type, malformed body, overflow, foreign key, bad
    value) in the middle of a live stream, plus two stream entries that are not events: the
    worker sets each aside with its reason, applies every other event of both regions (the
    tables equal a clean pass with harmless stand-ins in the poisons' places), acknowledges
    everything, and `journal-status` names them. Mending one cause and replaying the region
    applies that event."""
    h = History.generate(_SEED + 11, 600, regions=("p-a", "p-b"))
    await seed_accounts(conn, h)
    stranger = uuid.uuid4().hex
    poisoned, stand_ins, reasons = _poisoned(h, "p-a", stranger)
    await reset_journal(conn)
    await write_batch(conn, [decode_entry(p) for _, p in stand_ins])
    await refresh_clusters(conn, h.regions)
    expected = await digest(conn)
    await reset_journal(conn)

    settings = _settings(redis_url, db_url, keys)
    want = {"p-a": len([x for x in poisoned if x[0] == "p-a"])}
    want["p-b"] = len(poisoned) - want["p-a"]
    async with _worker_task(settings, consumer="w", batch_size=100):
        for i in range(0, len(poisoned), 50):  # arriving while the worker runs
            await xadd_all(redis, keys, poisoned[i : i + 50])
            if i == 300:
                await redis.xadd(keys.events("p-b"), {"e": b'{"type": "node_reg'})
                await redis.xadd(keys.events("p-b"), {"x": b"no e field"})
            await asyncio.sleep(0.02)

        async def applied() -> bool:
            rows = await conn.fetch("SELECT region, applied_seq FROM journal_positions")
            return {r["region"]: r["applied_seq"] for r in rows} == want

        await _eventually(applied, 60, "every event of both regions applied")
        await _eventually(lambda: _no_lag(redis, keys), 30, "every entry acknowledged")
    await refresh_clusters(conn, h.regions)
    got = await digest(conn)
    assert {t: got[t] for t in got if t != "events"} == {
        t: expected[t] for t in expected if t != "events"
    }
    rows = await conn.fetch(
        "SELECT region, seq, stage, problem, stream, entry_id FROM journal_rejects "
        "ORDER BY region, seq"
    )
    events = [r for r in rows if r["region"] is not None]
    assert [(r["region"], r["seq"], r["stage"]) for r in events] == [
        ("p-a", seq, "apply") for seq in sorted(reasons)
    ]
    for r in events:
        assert reasons[r["seq"]] in r["problem"], (reasons[r["seq"]], r["problem"])
    entries = [r for r in rows if r["region"] is None]
    assert len(entries) == 2 and all(r["stream"] == keys.events("p-b") for r in entries)
    assert await rejected_counts(conn) == {"p-a": len(reasons), "": 2}

    assert await print_status(settings) == 1
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("p-a")]
    assert line.split()[-1] == str(len(reasons))
    for seq in reasons:
        assert f"p-a:{seq} " in out

    # The missing client appears (the cause mended); a replay applies that contract, and only it.
    fk = next(seq for seq, why in reasons.items() if why == "ForeignKeyViolation")
    await conn.execute(
        "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'late')",
        stranger,
        h.renters[0][0],
    )
    result = await replay_region(conn, "p-a")
    assert result.recovered == [fk]
    assert sorted(r.stored.seq for r in result.refused) == sorted(set(reasons) - {fk})
    assert await conn.fetchval("SELECT count(*) FROM contracts WHERE client_id = $1", stranger) == 1
    assert await rejected_counts(conn) == {"p-a": len(reasons) - 1, "": 2}


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
        "INSERT INTO journal_rejects (region, seq, event_type, problem, stage) "
        "VALUES ('st-a', 7, 'contract_created', 'ValueError: refused', 'apply')"
    )
    assert await print_status(settings) == 1
    assert "st-a:7 contract_created at apply: ValueError: refused" in capsys.readouterr().out


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
