"""The worker: one consumer of the `journal` group reading every region's stream (or its shard
of them), writing each batch in one transaction, then acknowledging and trimming; it also
keeps the partitions, the clusters and the positions' gaps (`run_journal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg
import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine import log as event_log
from engine.connection import is_cluster, open_redis, read_streams
from engine.keys import FUNDING, Keys
from engine.settings import ConfigError, Settings
from persistence.journal.batch import _CHUNK, Batch, BatchResult, _pg_transient, write
from persistence.journal.clusters import refresh_clusters
from persistence.journal.partitions import metrics_partitions
from persistence.journal.stored import StoredEvent, _new_tuple, decode_entry
from persistence.journal.streams import _GROUP_B, GROUP, _text

__all__ = ["BATCH_SIZE", "run_journal", "shard_regions"]

log = logging.getLogger("mnemo.journal")
_FIELD_B = event_log.FIELD.encode()

BATCH_SIZE = 20_000
"""Stream entries a batch (a transaction) takes at most. A batch holds what arrived since the
last one, up to this: larger ones come only when the journal is behind, and they catch up
faster, each node's heartbeats and each contract's changes being folded into one row write per
batch (the default mix: 14 us of Postgres CPU an event at 20k, 17.6 at 5k). A 20k-event batch
is about 50 MB of decoded events in the worker."""
_CLUSTER_REFRESH_S = 1.0
_REGIONS_REFRESH_S = 1.0
_GAP_CHECK_S = 5.0
_PARTITIONS_EVERY_S = 3600.0
_PARTITION_DAYS_AHEAD = 2
_BACKOFF_MAX_S = 10.0
_TRIM_EVERY_S = 10.0
_GC_EVERY_S = 5.0


def _default_consumer(shard: tuple[int, int] | None) -> str:
    # Stable across restarts on one host: a restarted worker first re-reads its own pending
    # entries instead of waiting `claim_idle_s` for them to be claimed.
    host = f"journal-{socket.gethostname()}"
    return host if shard is None else f"{host}-{shard[0]}of{shard[1]}"


class _Raw(NamedTuple):
    stream: bytes
    entry_id: bytes
    data: bytes | None  # the `e` field; None when the entry has none or was deleted


_Prepared = tuple[list[_Raw], list[tuple[_Raw, str]], Batch]


class _Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        consumer: str,
        stop: asyncio.Event,
        batch_size: int,
        flush_interval_s: float,
        claim_idle_s: float,
        idle_block_s: float,
        stream_keep_s: float,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if not settings.redis_url or not settings.database_url:
            raise ConfigError(
                "MNEMO_REDIS_URL" if not settings.redis_url else "MNEMO_DATABASE_URL",
                "the journal needs both Redis and Postgres URLs (the CLI fills them in)",
            )
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.shard = shard
        self.consumer = consumer
        self.stop = stop
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.claim_every_s = max(0.05, min(5.0, claim_idle_s / 2))
        self.idle_block_ms = max(1, int(idle_block_s * 1000))
        self.stream_keep_ms = int(stream_keep_s * 1000)
        self.redis: aioredis.Redis = open_redis(settings.redis_url)
        # The worker reads XREADGROUP replies as the server sends them (lists), skipping
        # redis-py's per-entry dict building: a few microseconds an event at full speed.
        self.redis.set_response_callback("XREADGROUP", event_log.as_sent)
        self.conn: asyncpg.Connection | None = None
        self.streams: dict[bytes, str] = {}  # stream key -> region
        self.pel_cursor: dict[bytes, bytes] = {}  # own pending entries not yet re-read
        self.claim_cursor: dict[bytes, bytes] = {}
        self.partitions: set[date] = set()
        self.dirty_clusters: set[str] = set()
        self.catch_up: set[str] = set()
        self.warned_seq: set[str] = set()
        self.next: dict[str, float] = {}

    # -- plumbing -----------------------------------------------------------------------------

    def _due(self, what: str, every_s: float) -> bool:
        now = time.monotonic()
        if now < self.next.get(what, 0.0):
            return False
        self.next[what] = now + every_s
        return True

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _pg(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            assert self.settings.database_url is not None
            self.conn = await asyncpg.connect(
                self.settings.database_url,
                timeout=10,
                server_settings={"application_name": f"mnemo-journal:{self.consumer}"[:63]},
            )
            await self._load_partitions(self.conn)
        return self.conn

    async def _drop_pg(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None

    async def _with_pg(self, what: str, fn: Any) -> Any:
        """Run `fn(conn)` until it succeeds or `stop` is set, reconnecting with backoff."""
        delay = 0.5
        while True:
            try:
                return await fn(await self._pg())
            except Exception as e:
                if not _pg_transient(e):
                    raise
                await self._drop_pg()
                if self.stop.is_set():
                    return None
                log.warning(
                    "journal: postgres unavailable (%s: %s); retrying %s in %.1f s",
                    type(e).__name__,
                    e,
                    what,
                    delay,
                )
                await self._sleep(delay)
                if self.stop.is_set():
                    return None
                delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _with_redis(self, what: str, fn: Any) -> Any:
        delay = 0.5
        while True:
            try:
                return await fn()
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                if self.stop.is_set():
                    return None
                log.warning(
                    "journal: redis unavailable (%s); retrying %s in %.1f s", e, what, delay
                )
                await self._sleep(delay)
                if self.stop.is_set():
                    return None
                delay = min(delay * 2, _BACKOFF_MAX_S)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # The stream or the group vanished (Redis restarted empty, key deleted).
                log.warning("journal: consumer group missing (%s); recreating", e)
                await self._create_groups(list(self.streams))

    # -- Redis side -----------------------------------------------------------------------------

    async def _refresh_regions(self) -> None:
        members = await self.redis.smembers(self.keys.regions)
        regions = [_text(m) or "" for m in members] + list(self.settings.regions)
        dealt = shard_regions(regions, self.shard)
        if self.shard is None or self.shard[0] == 0:
            dealt.append(FUNDING)  # the funding slot's stream (issue 14), to the first shard
        mine = {self.keys.events(r).encode(): r for r in dealt}
        for key in [k for k in self.streams if k not in mine]:
            # Dealt to another shard (the regions changed): its entries this worker holds are
            # written and acknowledged as usual; any left pending are claimed by the new owner.
            del self.streams[key]
            self.pel_cursor.pop(key, None)
            self.claim_cursor.pop(key, None)
        new = [key for key in mine if key not in self.streams]
        self.streams.update(mine)
        if new:
            await self._create_groups(new)

    async def _create_groups(self, streams: list[bytes]) -> None:
        for key in streams:
            try:
                await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            self.pel_cursor[key] = b"0"
            self.claim_cursor[key] = b"0-0"

    @staticmethod
    def _raws(reply: Any) -> list[_Raw]:
        out = []
        for stream, entries in event_log.stream_entries(reply):
            # The engine writes one field (the usual case, without a function call).
            out += [
                _new_tuple(
                    _Raw,
                    (
                        stream,
                        entry_id,
                        fields[1]
                        if type(fields) is list and len(fields) == 2 and fields[0] == _FIELD_B
                        else event_log.entry_payload(fields),
                    ),
                )
                for entry_id, fields in entries
            ]
        return out

    async def _read_own_pending(self) -> list[_Raw]:
        if not self.pel_cursor:
            return []
        replied = await read_streams(
            self.redis, self.pel_cursor, count=self.batch_size, group=GROUP, consumer=self.consumer
        )
        out = []
        for stream, entries in replied:
            if not entries:
                self.pel_cursor.pop(stream, None)
                continue
            self.pel_cursor[stream] = entries[-1][0]
            for entry_id, fields in entries:
                out.append(_Raw(stream, entry_id, event_log.entry_payload(fields)))
        # Streams absent from the reply have no pending entries of ours left.
        for stream in list(self.pel_cursor):
            if all(s != stream for s, _ in replied):
                self.pel_cursor.pop(stream, None)
        return out

    async def _claim(self) -> list[_Raw]:
        out: list[_Raw] = []
        for stream in list(self.streams):
            start = self.claim_cursor.get(stream, b"0-0")
            reply = await self.redis.xautoclaim(
                stream, GROUP, self.consumer, self.claim_idle_ms, start, count=self.batch_size
            )
            self.claim_cursor[stream] = reply[0]
            for entry_id, fields in reply[1]:
                out.append(_Raw(stream, entry_id, event_log.entry_payload(fields)))
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                # Entries trimmed away while pending: nothing left to journal, only to forget.
                log.warning(
                    "journal: %d pending entries of %s were deleted before being journaled",
                    len(deleted),
                    stream.decode(),
                )
                await self.redis.xack(stream, GROUP, *deleted)
        if out:
            log.info(
                "journal: claimed %d entries idle for over %d ms", len(out), self.claim_idle_ms
            )
        return out

    async def _read_batch(self) -> list[_Raw]:
        if not self.streams:
            await self._sleep(self.idle_block_ms / 1000)  # no region yet: nothing to read
            return []
        out = await self._read_own_pending()
        if self._due("claim", self.claim_every_s):
            out += await self._claim()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.flush_interval_s if out else None
        while len(out) < self.batch_size and self.streams and not self.stop.is_set():
            if deadline is None:
                block = self.idle_block_ms
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                block = max(1, int(remaining * 1000))
            replied = await read_streams(
                self.redis,
                dict.fromkeys(self.streams, b">"),
                count=self.batch_size - len(out),
                block_ms=block,
                group=GROUP,
                consumer=self.consumer,
            )
            got = self._raws(replied)
            if not got:
                break
            out += got
            if deadline is None:
                deadline = loop.time() + self.flush_interval_s
        return out

    async def _ack(self, raws: Sequence[_Raw]) -> None:
        by_stream: dict[bytes, list[bytes]] = {}
        for raw in raws:
            by_stream.setdefault(raw.stream, []).append(raw.entry_id)
        # Packed by hiredis (C) and sent as one write: redis-py's own packing of a command
        # with thousands of ids costs about half a microsecond an id.
        packed = b"".join(
            hiredis.pack_command((b"XACK", stream, _GROUP_B, *ids))  # type: ignore[arg-type]
            for stream, ids in by_stream.items()
        )
        try:
            if is_cluster(self.redis):
                # one XACK per stream, sent to the streams' nodes (a cluster client has no
                # pool of its own to pack them on)
                pipe = self.redis.pipeline(transaction=False)
                for stream, ids in by_stream.items():
                    pipe.xack(stream, GROUP, *ids)
                await pipe.execute()
                return
            pool = self.redis.connection_pool
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(packed)
                for _ in by_stream:
                    await conn.read_response()
            except BaseException:
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            # Committed already; the entries will be delivered again and change nothing.
            log.warning("journal: could not acknowledge %d entries (%s)", len(raws), e)

    # -- Postgres side ------------------------------------------------------------------------

    async def _load_partitions(self, conn: asyncpg.Connection) -> None:
        self.partitions = await metrics_partitions(conn)

    async def _maintain_partitions(self, conn: asyncpg.Connection) -> None:
        today = datetime.now(UTC).date()
        await conn.fetchval(
            "SELECT mnemo_ensure_metrics_partitions($1, $2)",
            today,
            today + timedelta(days=_PARTITION_DAYS_AHEAD),
        )
        keep_from = today - timedelta(days=max(1, self.settings.metrics_retention_days))
        dropped = await conn.fetchval("SELECT mnemo_drop_metrics_partitions($1)", keep_from)
        if dropped:
            log.info("journal: dropped %d node_metrics partitions before %s", dropped, keep_from)
        await self._load_partitions(conn)

    def _decode(self, raws: Sequence[_Raw]) -> tuple[list[StoredEvent], list[tuple[_Raw, str]]]:
        events, rejects = [], []
        for raw in raws:
            if raw.data is None:
                rejects.append((raw, "entry has no `e` field (or was deleted)"))
                continue
            try:
                events.append(decode_entry(raw.data, lenient=True))
            except (ValueError, UnicodeDecodeError) as e:
                rejects.append((raw, str(e)))
        return events, rejects

    async def _read_prepared(
        self, done: _Prepared | None = None, after: asyncio.Event | None = None
    ) -> _Prepared | None:
        """Read the next batch and fold it (see `run`), once `after` is set; first drop `done`,
        a batch written already."""
        if after is not None:
            await after.wait()
        if done is not None:
            await done[2].discard_stepwise()
            del done
        raws = await self._with_redis("reading the streams", self._read_batch)
        if not raws:
            return None
        events: list[StoredEvent] = []
        rejects: list[tuple[_Raw, str]] = []
        for i in range(0, len(raws), _CHUNK):
            decoded, refused = self._decode(raws[i : i + _CHUNK])
            events += decoded
            rejects += refused
            await asyncio.sleep(0)
        batch = Batch(events, fold=False)
        await batch.fold_stepwise()
        return raws, rejects, batch

    async def _commit(
        self,
        raws: Sequence[_Raw],
        rejects: list[tuple[_Raw, str]],
        batch: Batch,
        on_tail: Callable[[], None] | None = None,
    ) -> bool:

        async def attempt(conn: asyncpg.Connection) -> BatchResult:
            if rejects:
                await self._store_rejects(conn, rejects)
            return await write(conn, batch, partitions=self.partitions, on_tail=on_tail)

        result = await self._with_pg(f"a batch of {len(raws)}", attempt)
        if result is None:
            return False
        self._note(result)
        return True

    def _note(self, result: BatchResult) -> None:
        self.dirty_clusters.update(result.node_regions)
        # Regions with events left to apply: more than one transaction's worth, or a gap
        # (the catch-up then applies nothing and waits for the next batch or the gap check).
        self.catch_up.update(result.waiting)
        if result.rejected:
            self.next["gaps"] = 0.0  # an event `events` refused leaves a gap its reject fills

    async def _store_rejects(
        self, conn: asyncpg.Connection, rejects: list[tuple[_Raw, str]]
    ) -> None:
        for raw, problem in rejects:
            log.error("journal: rejected entry %s %s: %s", raw.stream, raw.entry_id, problem)
        await conn.executemany(
            "INSERT INTO journal_rejects (stream, entry_id, raw, problem) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT DO NOTHING",
            [(r.stream.decode(), r.entry_id.decode(), r.data, p) for r, p in rejects],
        )

    async def _maintain(self) -> None:
        if self._due("regions", _REGIONS_REFRESH_S):
            await self._with_redis("region discovery", self._refresh_regions)
        if self._due("partitions", _PARTITIONS_EVERY_S):
            await self._with_pg("partition maintenance", self._maintain_partitions)
        if self._due("gaps", _GAP_CHECK_S):
            await self._with_pg("gap check", self._check_gaps)
        while self.catch_up and not self.stop.is_set():
            regions = sorted(self.catch_up)
            self.catch_up.clear()
            result = await self._with_pg(
                "catch-up", lambda c, regions=regions: write(c, [], regions=regions)
            )
            if result is None:
                return
            self._note(result)
            if result.applied == 0:
                self.catch_up.difference_update(result.waiting)
        if self.dirty_clusters and self._due("clusters", _CLUSTER_REFRESH_S):
            regions = sorted(self.dirty_clusters)
            self.dirty_clusters.clear()
            await self._with_pg("clusters", lambda c: refresh_clusters(c, regions))
        if self._due("gc", _GC_EVERY_S):
            gc.collect()
        if self._due("trim", _TRIM_EVERY_S):
            await self._with_redis("trimming the streams", self._trim_streams)

    async def _check_gaps(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "SELECT p.region, p.applied_seq, "
            "(SELECT min(seq) FROM events e WHERE e.region = p.region AND e.seq > p.applied_seq) "
            "AS next_seq, (SELECT max(seq) FROM events e WHERE e.region = p.region) AS max_seq "
            "FROM journal_positions p"
        )
        for region, applied, next_seq, max_seq in rows:
            await self._check_sequence(region, max_seq)
            if next_seq is None or next_seq == applied + 1:
                continue
            if await self._pass_rejects(conn, region):
                continue
            if not await self._nothing_in_flight(region):
                continue
            async with conn.transaction():
                now_applied = await conn.fetchval(
                    "SELECT applied_seq FROM journal_positions WHERE region = $1 FOR UPDATE", region
                )
                first = await conn.fetchval(
                    "SELECT min(seq) FROM events WHERE region = $1 AND seq > $2",
                    region,
                    now_applied,
                )
                if first is None or first <= now_applied + 1:
                    continue
                log.warning(
                    "journal: events %s:%d..%d are gone (nothing pending, everything delivered); "
                    "skipping them",
                    region,
                    now_applied + 1,
                    first - 1,
                )
                await conn.execute(
                    "UPDATE journal_positions SET applied_seq = $2, "
                    "skipped = skipped + ($2 - applied_seq), updated_at = now() WHERE region = $1",
                    region,
                    first - 1,
                )
            self.catch_up.add(region)

    async def _pass_rejects(self, conn: asyncpg.Connection, region: str) -> bool:
        """Move `region` past a gap made wholly of events set aside at storing (they are in
        `journal_rejects`, not `events`): nothing can fill it, nothing was lost."""
        async with conn.transaction():
            applied = await conn.fetchval(
                "SELECT applied_seq FROM journal_positions WHERE region = $1 FOR UPDATE", region
            )
            first = await conn.fetchval(
                "SELECT min(seq) FROM events WHERE region = $1 AND seq > $2", region, applied
            )
            if first is None or first <= applied + 1:
                return True
            covered = await conn.fetchval(
                "SELECT count(*) FROM journal_rejects WHERE region = $1 AND seq > $2 AND seq < $3",
                region,
                applied,
                first,
            )
            if covered != first - applied - 1:
                return False
            await conn.execute(
                "UPDATE journal_positions SET applied_seq = $2, updated_at = now() "
                "WHERE region = $1",
                region,
                first - 1,
            )
        self.catch_up.add(region)
        return True

    async def _nothing_in_flight(self, region: str) -> bool:
        """True when no entry of `region` can still reach the journal: the group has nothing
        pending and has been delivered everything the stream holds."""
        key = self.keys.events(region)
        try:
            groups = await self.redis.xinfo_groups(key)
            info = await self.redis.xinfo_stream(key)
        except ResponseError:
            return False
        group = next((g for g in groups if _text(g.get("name")) == GROUP), None)
        if group is None or int(group.get("pending", 0)) != 0:
            return False
        return _text(group.get("last-delivered-id")) == _text(info.get("last-generated-id"))

    async def _trim_streams(self) -> None:
        """Drop stream entries the journal no longer needs: acknowledged (so stored in
        Postgres) and older than `stream_keep_s`, which other readers tailing the stream (the
        market views, the engine's notifier) get as slack. Never past the group's oldest
        pending entry, whoever holds it."""
        keep_from = (int(time.time() * 1000) - self.stream_keep_ms, 0)
        for key in list(self.streams):
            try:
                groups = await self.redis.xinfo_groups(key)
            except ResponseError:
                continue
            group = next((g for g in groups if _text(g.get("name")) == GROUP), None)
            if group is None:
                continue
            if int(group.get("pending", 0)):
                summary = await self.redis.xpending(key, GROUP)
                bound = event_log.stream_id(summary.get("min"))
            else:
                bound = event_log.stream_id(group.get("last-delivered-id"))
            minid = min(bound, keep_from)
            if minid > (0, 0):
                await self.redis.xtrim(key, minid=f"{minid[0]}-{minid[1]}", approximate=True)

    async def _check_sequence(self, region: str, max_seq: int | None) -> None:
        if max_seq is None or region in self.warned_seq:
            return
        raw = await self.redis.get(self.keys.seq(region))
        if raw is not None and int(raw) < max_seq:
            self.warned_seq.add(region)
            log.error(
                "journal: Redis's event sequence for %s (%d) is behind the journal (%d): Redis lost "
                "acknowledged changes; new events would reuse journaled ids. Run `mnemo "
                "rebuild-live` to restore the live market and its sequence.",
                region,
                int(raw),
                max_seq,
            )

    # -- main loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("journal: consumer %s of group %s starting", self.consumer, GROUP)
        ahead: asyncio.Task[Any] | None = None
        # A batch is some ten container objects an event (decoded events, their keys, folded
        # rows), none in a cycle, alive until it is written: the cyclic collector, run every 700
        # allocations, walks them over and over (~10% of the worker's CPU). It runs on a clock
        # instead (`_GC_EVERY_S`, in `_maintain`), which still frees any cycle within seconds.
        gc_enabled = gc.isenabled()
        gc.disable()
        # The CPU work around a batch's transaction happens while Postgres works on its own:
        # the next batch is read, decoded and folded (and the one before dropped) in a task of
        # its own, in slices, during this one's set-based upserts (most of its database time,
        # and none of this process's); the acknowledgement goes out in the background. At most
        # one batch is read ahead.
        done: _Prepared | None = None
        acks: set[asyncio.Task[None]] = set()
        try:
            while not self.stop.is_set():
                await self._maintain()
                if ahead is None:
                    ahead = asyncio.create_task(self._read_prepared(done))
                    done = None
                got = await ahead
                ahead = None
                if got is None:
                    continue
                # The next batch is read once this one's longest statement is in Postgres.
                tail = asyncio.Event()
                ahead = asyncio.create_task(self._read_prepared(done, tail))
                done = None
                raws, rejects, batch = got
                try:
                    committed = await self._commit(raws, rejects, batch, tail.set)
                finally:
                    tail.set()
                if committed:
                    ack = asyncio.create_task(self._ack(raws))
                    acks.add(ack)
                    ack.add_done_callback(acks.discard)
                done = got
                del got, raws, rejects, batch
        finally:
            if gc_enabled:
                gc.enable()
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
            if acks:
                await asyncio.gather(*acks, return_exceptions=True)
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            if self.conn is not None:
                await self.conn.close(timeout=2)
        with contextlib.suppress(Exception):
            await self.redis.aclose()


def shard_regions(regions: Iterable[str], shard: tuple[int, int] | None) -> list[str]:
    """The regions journal worker k of n (`shard`; None: a worker that takes every region)
    reads: every region's name, sorted, dealt out in turn, so n workers each get a share and
    together all of them. A region is applied by one worker at a time anyway (its position row
    is locked), so workers that share regions add throughput only across them; sharded, each
    worker process decodes and folds its own regions' events on a core of its own. Every shard
    computes the same deal from the same set of regions; while the set changes, a region may
    briefly be read by two workers, which changes nothing but speed."""
    ordered = sorted(set(regions))
    if shard is None:
        return ordered
    k, n = shard
    return ordered[k::n]


async def run_journal(
    settings: Settings,
    *,
    consumer: str | None = None,
    stop: asyncio.Event | None = None,
    batch_size: int = BATCH_SIZE,
    flush_interval_s: float = 0.05,
    claim_idle_s: float = 30.0,
    idle_block_s: float = 0.25,
    stream_keep_s: float = 600.0,
    shard: tuple[int, int] | None = None,
) -> None:
    """Journal every region's event stream into Postgres until `stop` is set.

    `consumer` names this worker in the `journal` group (default: `journal-<hostname>`, stable
    across restarts so a restarted worker re-reads its own pending entries first). Entries another
    worker left pending for `claim_idle_s` are claimed. A batch is flushed at `batch_size` entries
    or `flush_interval_s` after its first entry, whichever comes first. Journaled entries older
    than `stream_keep_s` are trimmed from the streams (never one still pending). With `shard`
    (k, n), only the regions `shard_regions` deals to worker k of n are journaled.
    """
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ConfigError("shard", f"shard {shard[0]}/{shard[1]}: want k/n with 0 <= k < n")
    worker = _Worker(
        settings,
        consumer=consumer or _default_consumer(shard),
        stop=stop or asyncio.Event(),
        batch_size=batch_size,
        flush_interval_s=flush_interval_s,
        claim_idle_s=claim_idle_s,
        idle_block_s=idle_block_s,
        stream_keep_s=stream_keep_s,
        shard=shard,
    )
    await worker.run()
