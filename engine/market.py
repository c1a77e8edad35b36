"""The live market in Redis: one atomic Lua script per kind of state change.

`Market` is a thin adapter. The rules and the exact arithmetic live in `engine.core`; the scripts
in `engine/lua/` (each prefixed with the key names of `engine.keys` and `_lib.lua`) check every
precondition before their first write, mutate, bump the region's sequence number and append one
event per change to the region's stream (its shape is `engine.log`'s: one field holding the
event's JSON, event id `"<region>:<seq>"`). A refusal raises an `engine.errors`
subclass; nothing was written.

Most calls make one change and append one event. Batches are one call too: a heartbeat batch
appends one `HeartbeatsApplied` for all its accepted beats; a reserve batch (`reserve_many`),
`place_bid` calls made together (they share a script call), `expire_bids` and `expire_asks`
append one event per item they change (each item is checked and applied on its own, in order);
`failover` appends the old contract's `ContractSettled` and the successor's `ContractCreated`.
The batch scripts group their writes (one command per touched key or index) at the end.

- Time is always an argument (`now_ms`); no clock is read here or in the scripts.
- Scripts are loaded once (`load_scripts()`) and called by SHA; a server that lost them
  (restart, `SCRIPT FLUSH`) gets them again on the `NOSCRIPT` reply, transparently.
- Every key of a region shares its hash tag (`engine.keys`). The scripts name keys only through
  `engine.keys.lua_prelude()` and each call declares in KEYS every key its script may touch
  (built here with `Keys`); where a script would find a key from data (the node of a contract,
  the entries due in an expiry index, the top of a book for a quote), this adapter reads that
  first and passes the keys (a contract's node and client never change; an expiry still due
  and the top of a book are re-checked by the script). `CHECK_DECLARED_KEYS`
  (the tests) makes every script verify it. Scripts carry a `#!lua` shebang without
  `allow-cross-slot-keys`, so a Cluster refuses any access outside the call's slot.
- Every call's keys are in one region's slot, so a Redis (or Valkey) Cluster accepts every
  call. Routing by id needs no global lookup for the ids the exchange mints
  (`engine.keys.mint_id`: the id carries its region's tag; contracts are minted here). The
  global `regions` set and, for ids without a tag, the `dir` hash are written before the
  creating script, outside it (`engine.keys`, "Ids and routing", says what a crash in between
  leaves).
- On a cluster (`engine.connection`) each call goes to the primary of its first key's slot;
  MOVED (the slot moved: the client's slot map is updated) and ASK (the slot is migrating:
  `ASKING` first) are followed, NOSCRIPT loads the script on that node, TRYAGAIN and
  CLUSTERDOWN wait and resend: none of these replies means the script ran. A connection that
  cannot be opened (a primary gone, its replica not yet promoted) is retried on a refreshed
  slot map until `CLUSTER_RETRY_S`; nothing was sent on it. A call whose reply is lost after it
  was sent is never resent (it may have run), but for the read-only quote.
- `ack_replicas` (`MNEMO_REDIS_ACK_REPLICAS`): after the calls sent to a server, `WAIT` for
  that many replicas to hold them; a shortfall raises `ReplicaAckTimeout` (the change is made
  on the primary, not known to have reached a replica: the outcome the caller must treat as
  unknown). With one replica per primary and 1 here, a primary that fails over to its replica
  loses no change this adapter reported as made.
- Money that can exceed 2**53 (a settlement's cost) is computed in Python (`engine.core`) from
  the contract as read, and the script applies it only if the contract's `version` is still the
  one read (optimistic concurrency; the adapter re-reads and retries on a mismatch).
- Objects that close (bids cancelled, expired or filled; contracts settled, failed or failed
  over) stay readable for `retention_ms` (a day by default) and then vanish from Redis; their
  history is in the event stream and Postgres. Directory entries stay.
- The event stream is never trimmed here: the journal trims what it has persisted. `replay()`
  rebuilds a region from a complete stream (see `engine.replay`).
- Money (issue 14, section "money" below): renters' wallets live in each region's slot and in
  the funding slot (`engine.keys.FUNDING`); the scripts that reserve, fill, place, extend,
  settle, fail over, cancel and expire hold, capture and release in the same call (their
  Lua is in `_lib.lua`'s section "Money"); `credit`/`debit` and the three steps of a
  `transfer` are scripts of their own, one slot each.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import hiredis
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine import core, trust
from engine import log as event_log
from engine.connection import is_cluster
from engine.errors import (
    BudgetExceeded,
    CapacityTaken,
    Conflict,
    InsufficientFunds,
    InsufficientStake,
    InvalidRequest,
    MarketError,
    NotFound,
    OutsideTerms,
    PaymentRequired,
    TooManyOpen,
    Unavailable,
)
from engine.keys import FUNDING, Keys, id_tag, lua_prelude, mint_id, region_tag
from engine.types import (
    Bid,
    Contract,
    Event,
    Heartbeat,
    LeaseMeter,
    Node,
    NodeChanges,
    NodeRegistered,
    NodeUpdated,
    Quote,
    StakeChanged,
    TrustUpdated,
    WalletState,
)

__all__ = [
    "HEARTBEAT_BATCH",
    "MAX_MOVEMENT_PUSD",
    "PLACE_BATCH",
    "RAILS",
    "REGISTER_BATCH",
    "RESERVE_BATCH",
    "TERMINAL_RETENTION_MS",
    "CreditResult",
    "HeartbeatOutcome",
    "Market",
    "PendingTransfer",
    "ReplicaAckTimeout",
    "ReserveRequest",
]

log = logging.getLogger("mnemo.market")

TERMINAL_RETENTION_MS = 86_400_000
"""How long a closed bid or contract stays readable in Redis."""
HEARTBEAT_BATCH = 1000
"""Heartbeats per script call: a bigger batch is split into several calls, pipelined."""
REGISTER_BATCH = 1000
"""Nodes per script call in `register_many` (a bigger batch is several calls, pipelined)."""
RESERVE_BATCH = 200
"""Reserves per script call in `reserve_many` (a call holds the server for its whole batch)."""
PLACE_BATCH = 200
"""Concurrent `place_bid` calls sent in one script call, at most."""
QUOTE_LEVELS = 20
QUOTE_SCAN_LIMIT = 5000
"""A quote reads at most this many asks and this many bids (the top of each book)."""
_QUOTE_READ = 200  # entries of each book whose keys a region's first quote declares

_VERSION_RETRIES = 16
CLUSTER_RETRY_S = 30.0
"""How long a call keeps following redirections, waiting out TRYAGAIN / CLUSTERDOWN and
reconnecting to a slot's new primary (a fail-over takes the cluster's node timeout and an
election) before it raises."""
_CLUSTER_PAUSE_S = 0.05
_READ_ONLY = frozenset({"quote"})  # scripts that may be resent when their reply was lost
_WAIT_TIMEOUT_MS = 1000
_CALLS_IN_FLIGHT = 4  # concurrent heartbeat calls of one batch: enough to overlap client and server
_REGION_CACHE_MAX = 200_000
_MGET_CHUNK = 5_000
_LUA = Path(__file__).with_name("lua")
_SCRIPTS = (
    "register",
    "register_many",
    "update",
    "deactivate",
    "heartbeat",
    "mark_offline",
    "expire_asks",
    "place_bid",
    "cancel_bid",
    "expire_bids",
    "reserve",
    "extend",
    "settle",
    "failover",
    "quote",
    "trust_sweep",
    "maintenance",
    "stake",
    "credit",
    "transfer_out",
    "transfer_in",
    "transfer_done",
    "lease_ready",
    "lease_close",
    "lease_report",
)
_ERRORS: dict[str, type[MarketError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        Conflict,
        CapacityTaken,
        Unavailable,
        InvalidRequest,
        OutsideTerms,
        TooManyOpen,
        InsufficientStake,
    )
}
_PAYMENT_ERRORS: dict[str, type[PaymentRequired]] = {
    cls.code: cls for cls in (InsufficientFunds, BudgetExceeded)
}
HeartbeatResult = Literal["ok", "not_found", "forbidden", "too_soon", "deactivated"]
_OUTCOMES: tuple[HeartbeatResult, ...] = ("ok", "not_found", "forbidden", "too_soon", "deactivated")


class HeartbeatOutcome(msgspec.Struct, frozen=True):
    """What became of one beat of a batch (`retry_after_ms` > 0 only with `too_soon`)."""

    node_id: str
    outcome: HeartbeatResult
    retry_after_ms: int = 0


class ReserveRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One reserve of a `reserve_many` batch (the arguments of `Market.reserve`)."""

    node_id: str
    client_id: str
    user_id: str
    ram_gb: int
    vram_gb: int
    duration_s: int
    max_price_pusd: int
    bid_id: str | None = None
    budgeted: bool = False
    """The renter has a monthly budget: the hold must fit the month's allowance too."""


CHECK_DECLARED_KEYS = False
"""Test mode: when true, every script loaded afterwards raises if a command of it touches a key
not declared in its KEYS (no single server checks that; Redis Cluster needs it), and every call
checks that its KEYS share one slot. Slower (one more
command per command); the tests turn it on."""


@cache
def _script(name: str, checked: bool) -> tuple[str, str]:
    """The source of script `name` as loaded, and its SHA-1: the shebang (the script's own first
    line when it starts with one, `#!lua flags=no-writes` for the read-only ones; else `#!lua`:
    no flags, so a Cluster refuses any access outside the slot of the declared keys), the key
    names (`engine.keys.lua_prelude`), the key check in test mode, the helpers, the script."""
    body = (_LUA / f"{name}.lua").read_text()
    shebang = "#!lua\n"
    if body.startswith("#!"):
        shebang, body = body.split("\n", 1)
        shebang += "\n"
    parts = [shebang, lua_prelude()]
    if checked:
        parts.append((_LUA / "_declared.lua").read_text())
    parts += [(_LUA / "_lib.lua").read_text(), body]
    source = "\n".join(parts)
    return source, hashlib.sha1(source.encode()).hexdigest()


def _source(name: str) -> str:
    return _script(name, CHECK_DECLARED_KEYS)[0]


def _sha(name: str) -> str:
    return _script(name, CHECK_DECLARED_KEYS)[1]


_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class _NotSent:
    """A connection to a node could not be opened: nothing was sent."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReplicaAckTimeout(RedisConnectionError):
    """The calls ran on the primary, but `WAIT` did not see `ack_replicas` replicas confirm
    them in time: their outcome is unknown to a caller (a fail-over now could lose them)."""


def _new_id() -> str:
    """A random 128-bit id as 32 hex digits: a transfer's (it lives in its outbox and routes by
    its slots, never by the id; market objects get `mint_id(region)`)."""
    return os.urandom(16).hex()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _refusal(result: Sequence[Any]) -> MarketError:
    code, message, field = (_text(v) for v in result[1:4])
    if code in _PAYMENT_ERRORS:  # money refusals carry the shortfall (issue 14)
        return _PAYMENT_ERRORS[code](
            message, field=field or None, shortfall_pusd=int(_text(result[4]))
        )
    return _ERRORS[code](message, field=field or None)


def _beat_entry(b: Heartbeat) -> list[Any]:
    """One beat as the heartbeat script reads it: the node, its figures, and its lease meters
    when it carries some."""
    entry: list[Any] = [
        b.node_id,
        b.available_ram_gb,
        b.available_vram_gb,
        _beat_text(b.cpu_usage_pct),
        _beat_text(b.gpu_usage_pct),
        _beat_text(b.temperature_c),
        _beat_text(b.bandwidth_mbps),
        _beat_text(b.lat),
        _beat_text(b.lng),
    ]
    if b.leases is not None:
        entry.append(_meters(b.leases))
    return entry


def _beat_text(value: Any) -> str:
    # validate_heartbeat made float fields floats: repr is their exact, stored text.
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _meters(leases: Sequence[LeaseMeter]) -> list[list[str]]:
    """A beat's lease meters as the heartbeat script takes them (decimal text; meters of ids no
    contract can have, or with counts out of range, are left out)."""
    return [
        [m.contract_id, str(m.egress_bytes), str(m.peak_memory_bytes)]
        for m in leases
        if type(m.contract_id) is str
        and _CONTRACT_ID.fullmatch(m.contract_id)
        and 0 <= m.egress_bytes < 2**63
        and 0 <= m.peak_memory_bytes < 2**63
    ]


_CONTRACT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_json = msgspec.json.Encoder().encode
_O = TypeVar("_O", Node, Bid, Contract)


class _BidBatch:
    """`place_bid` calls sharing one script call: its keys, arguments and the callers'
    futures."""

    __slots__ = ("args", "keys", "waiters")

    def __init__(self) -> None:
        self.args: list[str | bytes] = []
        self.keys: list[str] = []
        self.waiters: list[asyncio.Future[Any]] = []


_decode_contract = msgspec.json.Decoder(Contract, strict=False).decode
"""A stored contract (`contract:<id>` holds its JSON: decimal strings, `end_ms` a number)."""

RAILS = ("stripe", "eth", "sol", "operator")
"""Where money comes from and goes to (the ledger's external accounts `rail:<name>`)."""
MAX_MOVEMENT_PUSD = 10**18
"""The most one credit or debit may move: 1,000,000 USD."""
_PLAIN_ID = core._ID


class CreditResult(msgspec.Struct, frozen=True, kw_only=True):
    """What `Market.credit` / `Market.debit` did: `applied` False when the key was used before
    (nothing changed); `balance_pusd` the funding wallet's balance now; `event_id` the event
    that applied the key (now or the first time)."""

    applied: bool
    balance_pusd: int
    event_id: str


class PendingTransfer(msgspec.Struct, frozen=True, kw_only=True):
    """An outbox entry: a transfer sent from its slot and not yet known to be received."""

    client_id: str
    to_slot: str
    amount_pusd: int
    allow_pusd: int = 0
    month: str = ""
    ts_ms: int = 0


_decode_pending = msgspec.json.Decoder(PendingTransfer, strict=False).decode


def _wallet_state(client_id: str, raw: Sequence[Any], month: str) -> WalletState:
    avail, held, allow, stored_month = (None if v is None else _text(v) for v in raw)
    if stored_month != month:
        allow = None
    return WalletState(
        client_id=client_id,
        avail_pusd=int(avail or 0),
        held_pusd=int(held or 0),
        allow_pusd=int(allow or 0),
        month=month,
    )


class Market:
    """The live market of every region in one Redis (or Valkey) server or cluster.

    `Market(redis, keys)`, then `await load_scripts()` once. The client may decode responses or
    not. Methods that change the market are one script call each (plus, for settle and
    failover, a read of the contract first); `missed_heartbeats_offline` sets the offline
    deadline (`engine.core.hb_deadline_ms`).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        missed_heartbeats_offline: int = 3,
        retention_ms: int = TERMINAL_RETENTION_MS,
        ack_replicas: int = 0,
        platform_fee_bps: int = 1000,
        max_open_contracts: int = 0,
        max_open_bids: int = 0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.missed_heartbeats_offline = missed_heartbeats_offline
        self.retention_ms = retention_ms
        self.ack_replicas = ack_replicas
        self._cluster: RedisCluster | None = redis if is_cluster(redis) else None  # type: ignore[assignment]
        self.platform_fee_bps = platform_fee_bps
        """The platform's fee at settlement, in basis points of the cost (issue 14)."""
        self.max_open_contracts = max_open_contracts
        self.max_open_bids = max_open_bids
        """A user's open contracts / resting bids per region at most (0: no cap)."""
        # id -> region; directory entries never change, so this never goes stale.
        self._region_cache: dict[str, str] = {}
        # region tag (engine.keys.region_tag) -> region, for the regions of the `regions` set
        self._tags: dict[str, str] = {}
        self._listed: set[str] = set()  # regions known to be in the `regions` set
        # place_bid calls waiting for their batch's script call, by (region, now_ms)
        self._bids_to_place: dict[tuple[str, int], _BidBatch] = {}
        self._placing: set[asyncio.Task[None]] = set()
        # region -> book -> how many of the book's top entries a quote declares (see quote)
        self._quote_depth: dict[str, dict[str, int]] = {}

    # -- scripts -----------------------------------------------------------------------------

    async def load_scripts(self) -> None:
        """Load every script into the server, or every primary of a cluster (idempotent; also
        done on demand after NOSCRIPT)."""
        if self._cluster is not None:
            for name in _SCRIPTS:
                await self._cluster.script_load(_source(name))
            return
        pipe = self.redis.pipeline(transaction=False)
        for name in _SCRIPTS:
            pipe.script_load(_source(name))
        await pipe.execute()

    @staticmethod
    def _check_slot(keys: Sequence[str | bytes]) -> None:
        """Test mode: the call's keys are in one slot."""
        slots = {key_slot(k if isinstance(k, bytes) else k.encode()) for k in keys}
        if len(slots) > 1:
            raise RuntimeError(f"a script call declares keys of {len(slots)} slots: {keys}")

    async def _eval(self, name: str, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        (answer,) = await self._eval_many(name, [(keys, args)])
        return answer

    def _acked(self, out: list[Any]) -> list[Any]:
        """The replies of calls followed by `WAIT ack_replicas` (its reply last)."""
        acked = out.pop()
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.ack_replicas:
            raise ReplicaAckTimeout(
                f"{acked} of {self.ack_replicas} replicas confirmed the change in "
                f"{_WAIT_TIMEOUT_MS} ms: its outcome is unknown"
            )
        return out

    def _wait(self) -> bytes:
        if not self.ack_replicas:
            return b""
        return hiredis.pack_command((b"WAIT", self.ack_replicas, _WAIT_TIMEOUT_MS))  # type: ignore[arg-type]

    async def _send(self, packed: bytes, replies: int) -> list[Any]:
        """Send packed commands on one pooled connection and read their `replies` (an error
        reply comes back as its exception, in its place). A call declares every key its script
        touches, a heartbeat batch a thousand: hiredis packs them in C, where redis-py's command
        path encodes each argument in Python (a fifth of a reserve's client CPU). Nothing is
        retried: a script whose reply was lost may have run, and must not run twice."""
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        wait = self._wait()
        try:
            await conn.send_packed_command(packed + wait if wait else packed)
            out: list[Any] = []
            for _ in range(replies + (1 if wait else 0)):
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
            return self._acked(out) if wait else out
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def _eval_many(
        self, name: str, calls: Sequence[tuple[Sequence[str | bytes], Sequence[Any]]]
    ) -> list[Any]:
        """Pipelined calls of one script (each call stays atomic on its own)."""
        if CHECK_DECLARED_KEYS:
            for keys, _ in calls:
                self._check_slot(keys)
        if self._cluster is not None:
            return await self._eval_cluster(self._cluster, name, calls)
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        sha = _sha(name).encode()
        for attempt in range(2):
            answers = await self._send(
                b"".join(
                    hiredis.pack_command((b"EVALSHA", sha, len(keys), *keys, *args))
                    for keys, args in (calls[i] for i in todo)
                ),
                len(todo),
            )
            missing = []
            for i, answer in zip(todo, answers, strict=True):
                if isinstance(answer, NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(answer, Exception):
                    raise answer
                else:
                    results[i] = answer
            if not missing:
                break
            await self.redis.script_load(_source(name))
            todo = missing
        return results

    # -- cluster -----------------------------------------------------------------------------

    async def _eval_cluster(
        self,
        cluster: RedisCluster,
        name: str,
        calls: Sequence[tuple[Sequence[str | bytes], Sequence[Any]]],
    ) -> list[Any]:
        """The calls on a cluster: each to the primary of its first key's slot, the calls of
        one primary packed together on one of its connections, the primaries concurrently
        (see the module's docstring for the replies that resend a call)."""
        if cluster._initialize:
            await cluster.initialize()
        manager = cluster.nodes_manager
        sha = _sha(name).encode()
        results: list[Any] = [None] * len(calls)
        asking: dict[int, ClusterNode] = {}  # call -> the node an ASK sent it to
        todo = list(range(len(calls)))
        deadline = time.monotonic() + CLUSTER_RETRY_S
        while todo:
            groups: dict[ClusterNode, list[int]] = {}
            for i in todo:
                node = asking.get(i)
                if node is None:
                    first = calls[i][0][0]
                    slot = key_slot(first if isinstance(first, bytes) else first.encode())
                    node = manager.get_node_from_slot(slot)
                groups.setdefault(node, []).append(i)
            sent = await asyncio.gather(
                *(self._send_node(node, sha, calls, idx, asking) for node, idx in groups.items()),
                return_exceptions=True,
            )
            todo, pause, refresh = [], False, False
            for (node, idx), answers in zip(groups.items(), sent, strict=True):
                if isinstance(answers, _NotSent):
                    todo += idx  # nothing reached the node: route again on a fresh map
                    refresh = pause = True
                    continue
                if isinstance(answers, BaseException):
                    if name in _READ_ONLY and isinstance(answers, _CONNECTION_ERRORS):
                        todo += idx
                        refresh = pause = True
                        continue
                    raise answers
                for i, answer in zip(idx, answers, strict=True):
                    asking.pop(i, None)
                    if isinstance(answer, MovedError):
                        await manager.move_slot(answer)
                        todo.append(i)
                    elif isinstance(answer, AskError):
                        host, port = manager.remap_host_port(answer.host, answer.port)
                        target = manager.get_node(host=host, port=port)
                        if target is None:
                            target = ClusterNode(host, port, "primary", **manager.connection_kwargs)
                            manager.set_nodes(manager.nodes_cache, {target.name: target})
                        asking[i] = target
                        todo.append(i)
                    elif isinstance(answer, NoScriptError):
                        await cluster.execute_command(
                            "SCRIPT", "LOAD", _source(name), target_nodes=node
                        )
                        todo.append(i)
                    elif isinstance(answer, (TryAgainError, ClusterDownError)):
                        todo.append(i)
                        pause = True
                    elif isinstance(answer, Exception):
                        raise answer
                    else:
                        results[i] = answer
            if todo:
                if time.monotonic() > deadline:
                    raise ClusterDownError(
                        f"the cluster did not take {len(todo)} {name} call(s) within "
                        f"{CLUSTER_RETRY_S:.0f} s"
                    )
                if pause:
                    await asyncio.sleep(_CLUSTER_PAUSE_S)
                if refresh:
                    try:
                        await manager.initialize()
                    except Exception as exc:  # every seed down for now: the next round retries
                        log.debug("cluster slot map refresh failed: %s", exc)
        return results

    async def _send_node(
        self,
        node: ClusterNode,
        sha: bytes,
        calls: Sequence[tuple[Sequence[str | bytes], Sequence[Any]]],
        idx: list[int],
        asking: dict[int, ClusterNode],
    ) -> list[Any] | _NotSent:
        """The replies of calls `idx` sent to `node` (each call's own: ASKING's are left out),
        or `_NotSent` when no connection could be opened (nothing was sent)."""
        parts = []
        for i in idx:
            keys, args = calls[i]
            if i in asking:
                parts.append(b"*1\r\n$6\r\nASKING\r\n")
            parts.append(hiredis.pack_command((b"EVALSHA", sha, len(keys), *keys, *args)))
        wait = self._wait()
        gate = getattr(self._cluster, "gate", None)  # engine.connection.WaitingCluster's
        if gate is not None:
            await self._cluster.waiting()  # type: ignore[union-attr]
        try:
            return await self._send_on(node, parts, idx, asking, wait)
        finally:
            if gate is not None:
                gate.release()

    async def _send_on(
        self,
        node: ClusterNode,
        parts: list[bytes],
        idx: list[int],
        asking: dict[int, ClusterNode],
        wait: bytes,
    ) -> list[Any] | _NotSent:
        conn = node.acquire_connection()
        try:
            if not conn.is_connected:
                await conn.connect()
        except (*_CONNECTION_ERRORS, ClusterDownError) as exc:
            node.release(conn)
            return _NotSent(exc)
        try:
            await conn.send_packed_command(b"".join(parts) + wait, check_health=False)
            out: list[Any] = []
            for i in idx:
                if i in asking:
                    try:
                        await conn.read_response()
                    except ResponseError:
                        pass  # the EVALSHA's own reply says what became of it
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
            if wait:
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
                return self._acked(out)
            return out
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)

    def _head(self, region: str, now_ms: int) -> list[Any]:
        return [self.keys.tag(region), region, int(now_ms)]

    # The KEYS of each call: every key its script touches (engine/lua/_lib.lua's conventions).

    def _creating(self, region: str) -> list[str]:
        """The first KEYS of a script that registers nodes or places bids: the region's seq,
        event stream and arrival counter."""
        k = self.keys
        return [k.seq(region), k.events(region), k.arrival(region)]

    def _node_indexes(self, region: str) -> list[str]:
        """The region's indexes of nodes (asks, their expiry, locations, heartbeat deadlines)
        and their uptime accounting (engine.trust)."""
        k = self.keys
        return [
            k.asks(region),
            k.ask_expiry(region),
            k.geo(region),
            k.heartbeats(region),
            k.uptime(region),
            k.trust_due(region),
        ]

    # -- directory ---------------------------------------------------------------------------

    def _remember(self, object_id: str, region: str) -> None:
        if len(self._region_cache) >= _REGION_CACHE_MAX:
            self._region_cache.clear()
        self._region_cache[object_id] = region

    async def _load_regions(self) -> None:
        """Read the `regions` set into the tag map."""
        regions = sorted(_text(r) for r in await self.redis.smembers(self.keys.regions))
        for region in regions:
            seen = self._tags.setdefault(region_tag(region), region)
            if seen != region:
                log.error("regions %r and %r share the id tag %s", seen, region, region_tag(region))
        self._listed.update(regions)

    async def _tagged_region(self, tag: str) -> str | None:
        region = self._tags.get(tag)
        if region is None:
            await self._load_regions()
            region = self._tags.get(tag)
        return region

    async def region_of(self, object_id: str) -> str | None:
        """The region of a node, bid or contract id (from the id's tag, else the `dir` hash),
        or None."""
        region = self._region_cache.get(object_id)
        if region is None:
            tag = id_tag(object_id)
            if tag is not None:
                region = await self._tagged_region(tag)
            if region is None:
                raw = await self.redis.hget(self.keys.directory, object_id)
                if raw is None:
                    return None
                region = _text(raw)
            self._remember(object_id, region)
        return region

    async def _regions_of(self, ids: Sequence[str]) -> list[str | None]:
        cache = self._region_cache
        out = [cache.get(i) for i in ids]
        unknown = sorted({i for i, region in zip(ids, out, strict=True) if region is None})
        if unknown:
            found = {}
            legacy = []
            for object_id in unknown:
                tag = id_tag(object_id)
                region = None if tag is None else await self._tagged_region(tag)
                if region is None:
                    legacy.append(object_id)
                else:
                    found[object_id] = region
                    self._remember(object_id, region)
            if legacy:
                for object_id, raw in zip(
                    legacy, await self.redis.hmget(self.keys.directory, legacy), strict=True
                ):
                    if raw is not None:
                        found[object_id] = region = _text(raw)
                        self._remember(object_id, region)
            out = [found.get(i) if r is None else r for i, r in zip(ids, out, strict=True)]
        return out

    async def _region_or_404(self, object_id: str, message: str, field: str) -> str:
        region = await self.region_of(object_id) if object_id else None
        if region is None:
            raise NotFound(message, field=field)
        return region

    async def _list_region(self, region: str) -> None:
        """Put `region` in the `regions` set (once per process) before its first object is
        created: SADD is idempotent, and a region listed with nothing in it is harmless. A
        region whose id tag is another listed region's is refused."""
        if region in self._listed:
            return
        tag = region_tag(region)
        if tag not in self._tags:
            await self._load_regions()
        other = self._tags.get(tag, region)
        if other != region:
            raise InvalidRequest(
                f"region name {region!r} shares its id tag with region {other!r}; choose "
                "another name",
                field="region",
            )
        await self.redis.sadd(self.keys.regions, region)
        self._tags[tag] = region
        self._listed.add(region)

    def _check_id(self, object_id: str, region: str, field: str) -> bool:
        """True when `object_id` carries `region`'s tag, False when it carries none (it is
        claimed in the directory); InvalidRequest when it carries another region's."""
        tag = id_tag(object_id)
        if tag is None:
            return False
        if tag != region_tag(region):
            raise InvalidRequest("the id was minted for another region", field=field)
        return True

    async def _claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """Claim ids that carry no region tag in the directory for their region (`(id,
        region)` pairs; HSETNX then HGET, pipelined): for each, whether the id is now the
        region's (False: another region's). Idempotent: a retry after a call that failed
        between the claim and the script claims again; the script refuses an object that
        exists."""
        pipe = self.redis.pipeline(transaction=False)
        for object_id, region in claims:
            pipe.hsetnx(self.keys.directory, object_id, region)
            pipe.hget(self.keys.directory, object_id)
        owners = (await pipe.execute())[1::2]
        return [_text(o) == r for (_, r), o in zip(claims, owners, strict=True)]

    async def regions(self) -> list[str]:
        """Every region that has ever had a node or a bid, sorted."""
        return sorted(_text(r) for r in await self.redis.smembers(self.keys.regions))

    # -- reads -------------------------------------------------------------------------------

    async def _get(self, cls: type[_O], key: str) -> _O | None:
        raw = await self.redis.hgetall(key)
        return core.from_fields(cls, _pairs([x for kv in raw.items() for x in kv])) if raw else None

    async def _contract(self, key: str) -> Contract | None:
        try:
            raw = await self.redis.get(key)
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            return await self._get(Contract, key)  # a hash, stored before contracts were JSON
        return None if raw is None else _decode_contract(raw)

    async def _contracts(self, keys: Sequence[str]) -> list[Contract]:
        """The contracts stored under `keys` (one region's: one slot), skipping missing ones."""
        out = []
        for start in range(0, len(keys), _MGET_CHUNK):
            chunk = keys[start : start + _MGET_CHUNK]
            other = []
            for key, raw in zip(chunk, await self.redis.mget(chunk), strict=True):
                if raw is not None:
                    out.append(_decode_contract(raw))
                else:
                    other.append(key)  # gone, or a hash stored before contracts were JSON
            out += await self._get_many(Contract, other)
        return out

    async def _get_many(self, cls: type[_O], keys: Sequence[str]) -> list[_O]:
        if not keys:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        out = []
        for raw in await pipe.execute():
            if raw:
                out.append(core.from_fields(cls, _pairs([x for kv in raw.items() for x in kv])))
        return out

    async def get_node(self, node_id: str) -> Node | None:
        region = await self.region_of(node_id)
        return None if region is None else await self._get(Node, self.keys.node(region, node_id))

    async def get_bid(self, bid_id: str) -> Bid | None:
        region = await self.region_of(bid_id)
        return None if region is None else await self._get(Bid, self.keys.bid(region, bid_id))

    async def get_contract(self, contract_id: str) -> Contract | None:
        region = await self.region_of(contract_id)
        if region is None:
            return None
        return await self._contract(self.keys.contract(region, contract_id))

    async def nodes(self, region: str | None = None) -> list[Node]:
        """Registered nodes that are not deactivated (of one region, or all), by arrival."""
        out: list[Node] = []
        for r in [region] if region is not None else await self.regions():
            ids = [_text(i) for i in await self.redis.zrange(self.keys.geo(r), 0, -1)]
            nodes = await self._get_many(Node, [self.keys.node(r, i) for i in ids])
            out.extend(sorted(nodes, key=lambda n: n.arrival_seq))
        return out

    async def bids(self, region: str) -> list[Bid]:
        """The region's open bids in priority order (best price, then earliest)."""
        members = [_text(m) for m in await self.redis.zrange(self.keys.bids(region), 0, -1)]
        ids = [core.parse_bid_member(m)[1] for m in members]
        return await self._get_many(Bid, [self.keys.bid(region, i) for i in ids])

    async def contracts(
        self,
        *,
        client_id: str | None = None,
        node_id: str | None = None,
        region: str | None = None,
    ) -> list[Contract]:
        """Active contracts, filtered; ordered by start, then id. Closed ones: see Postgres."""
        if node_id is not None:
            node_region = await self.region_of(node_id)
            if node_region is None or (region is not None and region != node_region):
                return []
            ids = await self.redis.smembers(self.keys.node_contracts(node_region, node_id))
            found = await self._contracts([self.keys.contract(node_region, _text(i)) for i in ids])
        else:
            found = []
            for r in [region] if region is not None else await self.regions():
                members: Iterable[Any]
                if client_id is not None:
                    members = await self.redis.smembers(self.keys.client_contracts(r, client_id))
                else:
                    members = await self.redis.zrange(self.keys.ends(r), 0, -1)
                found += await self._contracts([self.keys.contract(r, _text(i)) for i in members])
        if client_id is not None:
            found = [c for c in found if c.client_id == client_id]
        return sorted(found, key=lambda c: (c.start_ms, c.contract_id))

    async def due_contracts(self, region: str, now_ms: int, limit: int = 500) -> list[str]:
        """Ids of active contracts whose end has come (`end_ms <= now_ms`), earliest first."""
        ids = await self.redis.zrangebyscore(self.keys.ends(region), "-inf", now_ms, 0, limit)
        return [_text(i) for i in ids]

    async def stale_nodes(self, region: str, now_ms: int, limit: int = 500) -> list[str]:
        """Ids of active or maintenance nodes whose heartbeat deadline has come."""
        ids = await self.redis.zrangebyscore(self.keys.heartbeats(region), "-inf", now_ms, 0, limit)
        return [_text(i) for i in ids]

    async def quote(self, region: str, now_ms: int) -> Quote:
        """The region's top of book now (levels of price, GB), last fill, 24 h volume."""
        k = self.keys
        # The script reads the hashes of the entries at the top of each book, so it is given
        # their keys: twice as many as the last quote of the region read, read just before, and
        # more when the levels reach deeper or the book changed in between (the script says
        # which book).
        depth = self._quote_depth.setdefault(region, {"asks": _QUOTE_READ, "bids": _QUOTE_READ})
        for _ in range(_VERSION_RETRIES):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrange(k.asks(region), 0, depth["asks"] - 1)
            pipe.zrange(k.bids(region), 0, depth["bids"] - 1)
            node_ids, members = await pipe.execute()
            result = await self._eval(
                "quote",
                [
                    k.asks(region),
                    k.bids(region),
                    k.fills(region),
                    *k.each(k.node, region, (_text(i) for i in node_ids)),
                    *k.each(k.bid, region, (core.parse_bid_member(_text(m))[1] for m in members)),
                ],
                [*self._head(region, now_ms), QUOTE_LEVELS, QUOTE_SCAN_LIMIT],
            )
            if result[0] == 1:
                break
            book = _text(result[1])
            depth[book] = min(QUOTE_SCAN_LIMIT, depth[book] * 4)
        else:
            raise Conflict("the book keeps changing; try again", field="region")
        _, asks, bids, last, volume, asks_read, bids_read = result
        depth["asks"] = min(QUOTE_SCAN_LIMIT, max(_QUOTE_READ, 2 * int(asks_read)))
        depth["bids"] = min(QUOTE_SCAN_LIMIT, max(_QUOTE_READ, 2 * int(bids_read)))

        def levels(flat: Sequence[Any]) -> list[tuple[int, int]]:
            return [(int(_text(flat[i])), int(_text(flat[i + 1]))) for i in range(0, len(flat), 2)]

        ask_depth, bid_depth = levels(asks), levels(bids)
        return Quote(
            region=region,
            ts_ms=now_ms,
            best_ask_pusd=ask_depth[0][0] if ask_depth else None,
            best_bid_pusd=bid_depth[0][0] if bid_depth else None,
            ask_depth=ask_depth,
            bid_depth=bid_depth,
            last_fill_pusd=int(_text(last).split(":")[1]) if last else None,
            volume_24h_gb_s=int(_text(volume)),
        )

    async def read_events(
        self, region: str, *, start: str = "-", count: int | None = None
    ) -> list[Event]:
        """The region's events from stream entry `start` on (oldest first)."""
        entries = await self.redis.xrange(self.keys.events(region), start, "+", count) or []
        out = []
        for _, fields in entries:
            out.append(event_log.decode(event_log.entry_payload(fields)))
        return out

    # -- nodes -------------------------------------------------------------------------------

    async def register_node(self, node: Node, now_ms: int) -> Node:
        """Register a node (id chosen by the caller): `offered = min(total, given offered)`,
        active, in the asks book if it offers anything. Conflict if the id is taken."""
        stored = core.new_node(node, now_ms)
        region = stored.region
        tagged = self._check_id(stored.node_id, region, "node_id")
        if not tagged and not (await self._claim([(stored.node_id, region)]))[0]:
            raise Conflict(core.ID_IN_USE, field="node_id")
        await self._list_region(region)
        result = await self._eval(
            "register",
            [
                *self._creating(region),
                self.keys.node(region, stored.node_id),
                *self._node_indexes(region),
            ],
            [
                *self._head(region, now_ms),
                self.missed_heartbeats_offline,
                stored.node_id,
                *_flatten(core.to_fields(stored)),
            ],
        )
        if result[0] == 0:
            raise _refusal(result)
        self._remember(stored.node_id, region)
        event = event_log.decode(result[1])
        assert isinstance(event, NodeRegistered)
        return event.node

    async def register_many(self, nodes: Sequence[Node], now_ms: int) -> list[Node]:
        """Register a batch of nodes (ids chosen by the caller), each as `register_node` would;
        the stored nodes, in order. All or nothing: every node is validated and every id checked
        (unused in the directory, not twice in the batch) before the first write, else
        InvalidRequest or Conflict naming the node as `nodes[i].<field>`.

        One script call per region (per `REGISTER_BATCH` nodes), pipelined in one round trip,
        each atomic, writing its nodes and appending one NodeRegistered event per node (the
        same event as `register_node`'s), in order. The directory check before the calls makes
        the batch all or nothing; the scripts check it again atomically, so the only partial
        outcome is a concurrent registration of the same caller-chosen id between the two
        checks: that call is refused (Conflict), the batch's other calls have registered. Ids
        the gateway generates (128 random bits) never collide.
        """
        stored: list[Node] = []
        for i, node in enumerate(nodes):
            try:
                stored.append(core.new_node(node, now_ms))
            except InvalidRequest as exc:
                raise InvalidRequest(exc.message, field=f"nodes[{i}].{exc.field}") from None
        if not stored:
            return []
        index: dict[str, int] = {}
        for i, node in enumerate(stored):
            if index.setdefault(node.node_id, i) != i:
                raise Conflict("id appears twice in the batch", field=f"nodes[{i}].node_id")
        legacy = [
            i
            for i, node in enumerate(stored)
            if not self._check_id(node.node_id, node.region, f"nodes[{i}].node_id")
        ]
        if legacy:
            in_use = await self.redis.hmget(
                self.keys.directory, [stored[i].node_id for i in legacy]
            )
            for i, region in zip(legacy, in_use, strict=True):
                if region is not None:
                    raise Conflict(core.ID_IN_USE, field=f"nodes[{i}].node_id")
        groups: dict[str, list[int]] = {}
        for i, node in enumerate(stored):
            groups.setdefault(node.region, []).append(i)
        if legacy:
            claimed = await self._claim([(stored[i].node_id, stored[i].region) for i in legacy])
            for i, ok in zip(legacy, claimed, strict=True):
                if not ok:
                    raise Conflict(core.ID_IN_USE, field=f"nodes[{i}].node_id")
        for region in groups:
            await self._list_region(region)
        calls = [
            (region, idx[start : start + REGISTER_BATCH])
            for region, idx in groups.items()
            for start in range(0, len(idx), REGISTER_BATCH)
        ]
        results = await self._eval_many(
            "register_many",
            [
                (
                    [
                        *self._creating(region),
                        *self._node_indexes(region),
                        *self.keys.each(self.keys.node, region, (stored[i].node_id for i in idx)),
                    ],
                    [
                        *self._head(region, now_ms),
                        self.missed_heartbeats_offline,
                        _json([core.to_fields(stored[i]) for i in idx]),
                    ],
                )
                for region, idx in calls
            ],
        )
        refusal: MarketError | None = None
        for (region, idx), result in zip(calls, results, strict=True):
            if result[0] == 0:
                at = idx[int(result[4]) - 1]
                refusal = refusal or _ERRORS[_text(result[1])](
                    _text(result[2]), field=f"nodes[{at}].{_text(result[3])}"
                )
                continue
            first = int(result[1])
            for j, i in enumerate(idx):
                stored[i] = msgspec.structs.replace(stored[i], arrival_seq=first + j)
                self._remember(stored[i].node_id, region)
        if refusal is not None:
            raise refusal
        return stored

    async def update_node(self, node_id: str, changes: NodeChanges, now_ms: int) -> Node:
        """Change a node's terms (price, durations, ask expiry, status active/maintenance...).
        Contracts already made keep their terms."""
        fields = core.change_fields(core.validate_changes(changes))
        region = await self._region_or_404(node_id, core.NODE_NOT_FOUND, "node_id")
        k = self.keys
        result = await self._eval(
            "update",
            [
                k.seq(region),
                k.events(region),
                k.node(region, node_id),
                k.asks(region),
                k.ask_expiry(region),
                k.geo(region),
            ],
            [*self._head(region, now_ms), node_id, *_flatten(fields)],
        )
        if result[0] == 0:
            raise _refusal(result)
        event = event_log.decode(result[1])
        assert isinstance(event, NodeUpdated)
        return event.node

    async def deactivate_node(self, node_id: str, now_ms: int) -> Node:
        """No new leases and no heartbeats; the node's active contracts run to their end."""
        region = await self._region_or_404(node_id, core.NODE_NOT_FOUND, "node_id")
        k = self.keys
        result = await self._eval(
            "deactivate",
            [k.seq(region), k.events(region), k.node(region, node_id), *self._node_indexes(region)],
            [*self._head(region, now_ms), node_id],
        )
        if result[0] == 0:
            raise _refusal(result)
        return core.from_fields(Node, _pairs(result[2]))

    async def heartbeat(
        self, owner_id: str, beats: Sequence[Heartbeat], now_ms: int, min_interval_ms: int
    ) -> list[HeartbeatOutcome]:
        """Apply a batch of beats from one owner: one script call per region (per
        `HEARTBEAT_BATCH` beats). One outcome per beat, in order. A malformed beat refuses the
        whole batch (InvalidRequest) before anything is applied.

        The calls of a big batch run concurrently (each prepared while the server runs the
        previous one) when no node appears twice; otherwise they run in order, pipelined, so a
        node's later beat always meets its earlier one.
        """
        beats = [core.validate_heartbeat(b) for b in beats]
        regions = await self._regions_of([b.node_id for b in beats])
        outcomes: list[HeartbeatOutcome | None] = [None] * len(beats)
        groups: dict[str, list[int]] = {}
        for i, (beat, region) in enumerate(zip(beats, regions, strict=True)):
            if region is None:
                outcomes[i] = HeartbeatOutcome(beat.node_id, "not_found")
            else:
                groups.setdefault(region, []).append(i)
        calls: list[tuple[str, list[int]]] = [
            (region, idx[start : start + HEARTBEAT_BATCH])
            for region, idx in groups.items()
            for start in range(0, len(idx), HEARTBEAT_BATCH)
        ]

        def request(region: str, idx: list[int]) -> tuple[list[str | bytes], list[Any]]:
            entries = [_beat_entry(beats[i]) for i in idx]
            args = [
                *self._head(region, now_ms),
                int(min_interval_ms),
                self.missed_heartbeats_offline,
                owner_id,
                _json(entries),
            ]
            k = self.keys
            return [
                k.seq(region),
                k.events(region),
                *self._node_indexes(region),
                k.lease_meters(region),
                *k.each(k.node, region, (beats[i].node_id for i in idx)),
            ], args

        def record(idx: list[int], result: Any) -> None:
            waits = iter(result[2:])
            for i, code in zip(idx, _text(result[1]), strict=True):
                if code == "0":
                    outcomes[i] = HeartbeatOutcome(beats[i].node_id, "ok")
                elif code == "3":
                    outcomes[i] = HeartbeatOutcome(beats[i].node_id, "too_soon", int(next(waits)))
                else:
                    outcomes[i] = HeartbeatOutcome(beats[i].node_id, _OUTCOMES[int(code)])

        gate = asyncio.Semaphore(_CALLS_IN_FLIGHT)

        async def call(region: str, idx: list[int]) -> None:
            async with gate:
                record(idx, await self._eval("heartbeat", *request(region, idx)))

        if len(calls) > 1 and len({b.node_id for b in beats}) == len(beats):
            await asyncio.gather(*(call(region, idx) for region, idx in calls))
        else:
            results = await self._eval_many("heartbeat", [request(r, idx) for r, idx in calls])
            for (_, idx), result in zip(calls, results, strict=True):
                record(idx, result)
        return outcomes  # type: ignore[return-value]

    async def mark_offline(self, node_id: str, now_ms: int) -> list[Contract]:
        """Mark a node offline once its heartbeat deadline has passed (re-checked atomically:
        Conflict if a beat came in meanwhile). Returns its active contracts, by id."""
        region = await self._region_or_404(node_id, core.NODE_NOT_FOUND, "node_id")
        k = self.keys
        result = await self._eval(
            "mark_offline",
            [
                k.seq(region),
                k.events(region),
                k.node(region, node_id),
                k.node_contracts(region, node_id),
                k.asks(region),
                k.ask_expiry(region),
                k.heartbeats(region),
                k.trust_due(region),
            ],
            [*self._head(region, now_ms), node_id],
        )
        if result[0] == 0:
            raise _refusal(result)
        ids = sorted(_text(i) for i in result[2])
        return await self._contracts([self.keys.contract(region, i) for i in ids])

    # -- trust -------------------------------------------------------------------------------

    async def sweep_uptime(self, region: str, now_ms: int, limit: int = 500) -> int:
        """Close the uptime windows of offline nodes whose window ended (engine.trust); one
        TrustUpdated event for those accounted. Returns how many were due (at most `limit`)."""
        k = self.keys
        due = await self.redis.zrangebyscore(k.trust_due(region), "-inf", now_ms, 0, limit)
        if not due:
            return 0
        ids = [_text(i) for i in due]
        await self._eval(
            "trust_sweep",
            [
                k.seq(region),
                k.events(region),
                k.uptime(region),
                k.trust_due(region),
                *k.each(k.node, region, ids),
            ],
            [*self._head(region, now_ms), *ids],
        )
        return len(ids)

    async def announce_maintenance(
        self, node_id: str, owner_id: str, start_ms: int, end_ms: int, now_ms: int
    ) -> TrustUpdated:
        """Announce the node's maintenance window `[start_ms, end_ms)` (engine.trust's rules:
        InvalidRequest or Conflict), or withdraw the announced one (`start_ms` 0: a pending
        window is cancelled, one in progress ends now; NotFound if there is none). The uptime
        is accounted up to now first. Returns the TrustUpdated event."""
        region = await self._region_or_404(node_id, core.NODE_NOT_FOUND, "node_id")
        result = await self._eval(
            "maintenance",
            [
                self.keys.seq(region),
                self.keys.events(region),
                self.keys.node(region, node_id),
                *self._node_indexes(region),
            ],
            [
                *self._head(region, now_ms),
                node_id,
                owner_id,
                int(start_ms),
                int(end_ms),
            ],
        )
        if result[0] == 0:
            raise _refusal(result)
        event = event_log.decode(result[1])
        assert isinstance(event, TrustUpdated)
        return event

    async def lock_stake(
        self, node_id: str, owner_id: str, amount_pusd: int, key: str, now_ms: int
    ) -> StakeChanged | None:
        """Add `amount_pusd` to the node's stake (engine.trust), once per `key`: the id under
        which the caller moved the amount out of the provider's earnings into the ledger's
        `stake_transit` (persistence.ledger.stake_transit). None: that key was applied before
        (nothing changed)."""
        return await self._stake(node_id, owner_id, "lock", amount_pusd, key, now_ms)

    async def release_stake(
        self, node_id: str, owner_id: str, amount_pusd: int, now_ms: int
    ) -> StakeChanged:
        """Release `amount_pusd` of the node's stake to its provider's earnings: Conflict
        beyond what its active leases do not require."""
        event = await self._stake(node_id, owner_id, "release", amount_pusd, "", now_ms)
        assert event is not None
        return event

    async def _stake(
        self, node_id: str, owner_id: str, kind: str, amount: int, key: str, now_ms: int
    ) -> StakeChanged | None:
        region = await self._region_or_404(node_id, core.NODE_NOT_FOUND, "node_id")
        k = self.keys
        result = await self._eval(
            "stake",
            [k.seq(region), k.events(region), k.node(region, node_id), k.stake_ops(region)],
            [*self._head(region, now_ms), node_id, owner_id, kind, str(int(amount)), key],
        )
        if result[0] == 0:
            raise _refusal(result)
        if not result[1]:
            return None
        event = event_log.decode(result[1])
        assert isinstance(event, StakeChanged)
        return event

    async def uptime_of(self, node: Node) -> trust.Uptime | None:
        """The node's uptime accounting (its window history), None while not tracked yet."""
        raw = await self.redis.hget(self.keys.uptime(node.region), node.node_id)
        found = trust.unpack(raw)
        return None if found is None else found[0]

    async def expire_asks(self, region: str, now_ms: int, limit: int = 500) -> list[Node]:
        """Delist the nodes whose ask expired (`ask_expires_ms <= now_ms`) with no change since;
        one NodeUpdated event each. Returns those nodes (at most `limit`, earliest first)."""
        k = self.keys
        # The script touches the nodes found due here (their keys must be declared) and delists
        # those still due when it runs.
        due = await self.redis.zrangebyscore(k.ask_expiry(region), "-inf", now_ms, 0, limit)
        if not due:
            return []
        ids = [_text(i) for i in due]
        result = await self._eval(
            "expire_asks",
            [
                k.seq(region),
                k.events(region),
                k.asks(region),
                k.ask_expiry(region),
                *k.each(k.node, region, ids),
            ],
            [*self._head(region, now_ms), *ids],
        )
        out = []
        for raw in result[1:]:
            event = event_log.decode(raw)
            assert isinstance(event, NodeUpdated)
            out.append(event.node)
        return out

    # -- bids --------------------------------------------------------------------------------

    async def place_bid(self, bid: Bid, now_ms: int, *, budgeted: bool = False) -> Bid:
        """Rest a limit bid in its region's book (price-time priority). Filling is the engine's
        job (`reserve(..., bid_id=...)`); this never crosses.

        Money (issue 14): the bid rests only if the renter's wallet in the region covers its
        hold, size x duration x cap (`core.hold_pusd`): else InsufficientFunds (with
        `budgeted`, BudgetExceeded when the month's allowance does not), or TooManyOpen past
        `max_open_bids`.

        Calls made together (in one turn of the event loop, same region and `now_ms`) share
        one script call, `PLACE_BATCH` bids at most, each bid applied on its own in call order:
        the same outcome as separate calls, at a fraction of the client's and the server's
        cost per bid (a gateway placing many bots' bids at once)."""
        stored = core.new_bid(bid, now_ms)
        self._check_id(stored.bid_id, stored.region, "bid_id")
        stored = msgspec.structs.replace(
            stored,
            hold_pusd=core.hold_pusd(
                stored.ram_gb + stored.vram_gb, stored.duration_s, stored.max_price_pusd
            ),
            hold_month=core.month_of(now_ms),
        )
        fields = core.to_fields(stored)
        del fields["seq"], fields["hold_month"]  # the script's to assign
        key = (stored.region, int(now_ms))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        batch = self._bids_to_place.get(key)
        if batch is None:
            batch = self._bids_to_place[key] = _BidBatch()
            task = loop.create_task(self._place_queued(key, batch))
            self._placing.add(task)
            task.add_done_callback(self._placing.discard)
        batch.args += (stored.bid_id, _json(fields), "1" if budgeted else "0")
        batch.keys.append(self.keys.bid(stored.region, stored.bid_id))
        batch.waiters.append(waiter)
        if len(batch.waiters) >= PLACE_BATCH:
            del self._bids_to_place[key]  # the next call starts another batch
        result = await waiter
        if result[0] == 0:
            raise _refusal(result)
        self._remember(stored.bid_id, stored.region)
        # what the BidPlaced event says: the fields sent (their text is exact), the seq
        return msgspec.structs.replace(stored, seq=int(result[1]))

    async def _place_queued(self, key: tuple[str, int], batch: _BidBatch) -> None:
        """Send one batch of `place_bid` calls (runs in the loop turn after they queued)."""
        if self._bids_to_place.get(key) is batch:
            del self._bids_to_place[key]
        waiters = batch.waiters
        region, now_ms = key
        try:
            ids = [_text(i) for i in batch.args[::3]]
            legacy = [j for j, i in enumerate(ids) if id_tag(i) is None]
            refused: set[int] = set()
            if legacy:
                claimed = await self._claim([(ids[j], region) for j in legacy])
                refused = {j for j, ok in zip(legacy, claimed, strict=True) if not ok}
            sent = [j for j in range(len(ids)) if j not in refused]
            if sent:
                await self._list_region(region)
            k = self.keys
            answers = iter(
                await self._eval(
                    "place_bid",
                    [
                        *self._creating(region),
                        k.bids(region),
                        k.bid_expiry(region),
                        k.wallets(region),
                        k.open_counts(region),
                        *(batch.keys[j] for j in sent),
                    ],
                    [
                        *self._head(region, now_ms),
                        self.max_open_bids,
                        *(a for j in sent for a in batch.args[3 * j : 3 * j + 3]),
                    ],
                )
                if sent
                else []
            )
            in_use = [0, b"conflict", core.ID_IN_USE.encode(), b"bid_id"]
            results = [in_use if j in refused else next(answers) for j in range(len(ids))]
        except BaseException as exc:
            for waiter in waiters:
                if waiter.done():
                    continue
                if isinstance(exc, Exception):
                    waiter.set_exception(exc)
                else:
                    waiter.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for waiter, result in zip(waiters, results, strict=True):
            if not waiter.done():
                waiter.set_result(result)

    async def cancel_bid(self, bid_id: str, now_ms: int) -> Bid:
        """Cancel an open bid (Conflict once it is filled, cancelled or expired)."""
        region = await self._region_or_404(bid_id, core.BID_NOT_FOUND, "bid_id")
        k = self.keys
        result = await self._eval(
            "cancel_bid",
            [
                k.seq(region),
                k.events(region),
                k.bid(region, bid_id),
                k.bids(region),
                k.bid_expiry(region),
                k.wallets(region),
                k.open_counts(region),
            ],
            [*self._head(region, now_ms), bid_id, self.retention_ms],
        )
        if result[0] == 0:
            raise _refusal(result)
        return core.from_fields(Bid, _pairs(result[2]))

    async def expire_bids(self, region: str, now_ms: int, limit: int = 500) -> list[Bid]:
        """Expire open bids whose `expires_ms <= now_ms`, earliest first (at most `limit`); one
        event each."""
        k = self.keys
        # The script touches the bids found due here (their keys must be declared) and expires
        # those still due when it runs.
        due = await self.redis.zrangebyscore(k.bid_expiry(region), "-inf", now_ms, 0, limit)
        if not due:
            return []
        ids = [_text(i) for i in due]
        result = await self._eval(
            "expire_bids",
            [
                k.seq(region),
                k.events(region),
                k.bids(region),
                k.bid_expiry(region),
                k.wallets(region),
                k.open_counts(region),
                *k.each(k.bid, region, ids),
            ],
            [*self._head(region, now_ms), self.retention_ms, *ids],
        )
        return [core.from_fields(Bid, _pairs(result[i])) for i in range(2, len(result), 2)]

    # -- contracts ---------------------------------------------------------------------------

    def _reserve_call(
        self, region: str, now_ms: int, entries: list[list[str]]
    ) -> tuple[list[str | bytes], list[Any]]:
        k = self.keys
        keys: list[str | bytes] = [
            k.seq(region),
            k.events(region),
            k.asks(region),
            k.ask_expiry(region),
            k.bids(region),
            k.bid_expiry(region),
            k.ends(region),
            k.fills(region),
            k.wallets(region),
            k.open_counts(region),
            *self._lease_indexes(region),
        ]
        # the objects of the requests (_reserve_entry), each key once
        nodes = {e[0] for e in entries}
        clients = {e[2] for e in entries}
        bids = {e[8] for e in entries if e[8]}
        keys += k.each(k.node, region, nodes)
        keys += k.each(k.node_contracts, region, nodes)
        keys += k.each(k.client_contracts, region, clients)
        keys += k.each(k.bid, region, bids)
        keys += k.each(k.contract, region, (e[1] for e in entries))
        return keys, [
            *self._head(region, now_ms),
            self.retention_ms,
            _json(entries),
            self.max_open_contracts,
        ]

    @staticmethod
    def _reserve_entry(contract_id: str, r: ReserveRequest) -> list[str]:
        # Strings throughout: the script stores them as they are (exact, even past 2**53).
        return [
            r.node_id,
            contract_id,
            r.client_id,
            r.user_id,
            str(r.ram_gb),
            str(r.vram_gb),
            str(r.duration_s),
            str(r.max_price_pusd),
            r.bid_id or "",
            "1" if r.budgeted else "0",
        ]

    async def _reserve_region(self, r: ReserveRequest) -> str:
        ids = [r.node_id] if r.bid_id is None else [r.node_id, r.bid_id]
        return self._check_reserve(r, dict(zip(ids, await self._regions_of(ids), strict=True)))

    @staticmethod
    def _check_reserve(r: ReserveRequest, regions: dict[str, str | None]) -> str:
        """The request's region (`regions`: id -> region, for its node and bid), or the
        refusal Python can tell without the script."""
        core.validate_reserve(
            node_id=r.node_id,
            client_id=r.client_id,
            user_id=r.user_id,
            ram_gb=r.ram_gb,
            vram_gb=r.vram_gb,
            duration_s=r.duration_s,
            max_price_pusd=r.max_price_pusd,
        )
        region = regions.get(r.node_id) if r.node_id else None
        if region is None:
            raise NotFound(core.NODE_NOT_FOUND, field="node_id")
        if r.bid_id is not None:
            bid_region = regions.get(r.bid_id) if r.bid_id else None
            if bid_region is None:
                raise NotFound(core.BID_NOT_FOUND, field="bid_id")
            if bid_region != region:
                raise InvalidRequest(
                    "the bid and the node are in different regions", field="bid_id"
                )
        return region

    def _created(
        self, result: Any, contract_id: str, r: ReserveRequest, region: str, now_ms: int
    ) -> Contract:
        # The script answers with the node's terms only (owner, price, egress price) and the
        # lease's delivery: the rest of the contract is the request's, and a small answer keeps
        # big batches cheap.
        if result[0] == 0:
            raise _refusal(result)
        lease_state: Any = _text(result[6]) if len(result) > 6 else "none"
        self._remember(contract_id, region)
        return Contract(
            contract_id=contract_id,
            region=region,
            client_id=r.client_id,
            user_id=r.user_id,
            node_id=r.node_id,
            owner_id=_text(result[1]),
            ram_gb=r.ram_gb,
            vram_gb=r.vram_gb,
            duration_s=r.duration_s,
            start_ms=now_ms,
            end_ms=now_ms + r.duration_s * 1000,
            price_pusd=int(result[2]),
            egress_price_pusd=int(result[3]),
            max_price_pusd=r.max_price_pusd,
            bid_id=r.bid_id,
            version=1,
            hold_pusd=int(result[4]),
            hold_month=_text(result[5]),
            lease_state=lease_state,
        )

    async def reserve(
        self,
        *,
        node_id: str,
        client_id: str,
        user_id: str,
        ram_gb: int,
        vram_gb: int,
        duration_s: int,
        max_price_pusd: int,
        now_ms: int,
        bid_id: str | None = None,
        budgeted: bool = False,
    ) -> Contract:
        """Lease `ram_gb + vram_gb` on the node for `duration_s` at the node's ask price.

        Refusals: NotFound (node, bid), Unavailable (node not active, ask expired),
        CapacityTaken ("price above cap", "duration outside the node's terms",
        "capacity taken" — someone else got it first), and with `bid_id` Conflict (bid not
        open, expired, remainder smaller than the fill) or InvalidRequest (fill does not match
        the bid). With `bid_id` the bid's fill state changes in the same atomic step.
        Money (issue 14): without a bid the contract's cost at the node's price is held from
        the renter's wallet in the region (InsufficientFunds, or with `budgeted`
        BudgetExceeded, before anything is reserved; TooManyOpen past `max_open_contracts`);
        a fill converts the bid's hold for it and releases the difference.
        """
        request = ReserveRequest(
            node_id=node_id,
            client_id=client_id,
            user_id=user_id,
            ram_gb=ram_gb,
            vram_gb=vram_gb,
            duration_s=duration_s,
            max_price_pusd=max_price_pusd,
            bid_id=bid_id,
            budgeted=budgeted,
        )
        region = await self._reserve_region(request)
        contract_id = mint_id(region)
        keys, args = self._reserve_call(region, now_ms, [self._reserve_entry(contract_id, request)])
        [result] = await self._eval("reserve", keys, args)
        return self._created(result, contract_id, request, region, now_ms)

    async def reserve_many(
        self, requests: Sequence[ReserveRequest], now_ms: int
    ) -> list[Contract | MarketError]:
        """Many reserves in one round trip: each applies on its own (its checks, then its
        writes and event), in request order within a region, `RESERVE_BATCH` to a script call,
        the calls pipelined. Each slot holds the contract or the refusal (nothing is raised
        for a refusal), so a later request of the batch sees the leases of earlier ones."""
        out: list[Contract | MarketError | None] = [None] * len(requests)
        ids = [r.node_id for r in requests] + [r.bid_id for r in requests if r.bid_id]
        regions = dict(zip(ids, await self._regions_of(ids), strict=True))
        groups: dict[str, list[tuple[int, str, list[str]]]] = {}
        for i, r in enumerate(requests):
            try:
                region = self._check_reserve(r, regions)
            except MarketError as exc:
                out[i] = exc
                continue
            contract_id = mint_id(region)
            groups.setdefault(region, []).append(
                (i, contract_id, self._reserve_entry(contract_id, r))
            )
        batches = [
            (region, items[start : start + RESERVE_BATCH])
            for region, items in groups.items()
            for start in range(0, len(items), RESERVE_BATCH)
        ]
        if batches:
            calls = [
                self._reserve_call(region, now_ms, [entry for _, _, entry in items])
                for region, items in batches
            ]
            for (region, items), results in zip(
                batches, await self._eval_many("reserve", calls), strict=True
            ):
                for (i, contract_id, _), result in zip(items, results, strict=True):
                    try:
                        out[i] = self._created(result, contract_id, requests[i], region, now_ms)
                    except MarketError as exc:
                        out[i] = exc
        return out  # type: ignore[return-value]

    async def extend(
        self, contract_id: str, extra_s: int, now_ms: int, *, budgeted: bool = False
    ) -> Contract:
        """Add `extra_s` seconds to an active contract that has not ended; the node must still
        be active (else Unavailable), the total within its `max_duration_s` (else OutsideTerms,
        naming both) and the lease's value within `core.MAX_LEASE_VALUE_PUSD` (InvalidRequest).
        The extension's cost at the contract's price is held from the renter's region wallet
        (InsufficientFunds / BudgetExceeded, as `reserve`)."""
        if (
            not isinstance(extra_s, int)
            or isinstance(extra_s, bool)
            or not (1 <= extra_s <= core.MAX_DURATION_S)
        ):
            raise InvalidRequest(
                f"must be an integer between 1 and {core.MAX_DURATION_S}", field="extra_s"
            )
        region = await self._region_or_404(contract_id, core.CONTRACT_NOT_FOUND, "contract_id")
        # A contract's size and price cap never change, so this bound on its total duration
        # holds for the script's atomic check whatever extensions race with this one.
        contract = await self._contract(self.keys.contract(region, contract_id))
        if contract is None:
            raise NotFound(core.CONTRACT_NOT_FOUND, field="contract_id")
        longest_s = core.longest_lease_s(
            contract.ram_gb + contract.vram_gb, contract.max_price_pusd or contract.price_pusd
        )
        k = self.keys
        result = await self._eval(
            "extend",
            [
                k.seq(region),
                k.events(region),
                k.contract(region, contract_id),
                # a contract's node never changes: the one read here is the script's
                k.node(region, contract.node_id),
                k.ends(region),
                k.wallets(region),
            ],
            [
                *self._head(region, now_ms),
                contract_id,
                extra_s,
                longest_s,
                "1" if budgeted else "0",
            ],
        )
        if result[0] == 0:
            raise _refusal(result)
        return _decode_contract(result[2])

    async def settle(self, contract_id: str, egress_gb: float, now_ms: int) -> Contract:
        """Complete an active contract: bill the seconds used (capped at its term) plus egress,
        stamp the settlement hash, return the capacity to the node (`engine.core`)."""
        return await self._close(contract_id, now_ms, "completed", core.egress_mgb(egress_gb))

    async def fail_contract(
        self, contract_id: str, now_ms: int, *, stop_ms: int | None = None
    ) -> Contract:
        """Close an active contract as `failed`, billing the time served (pro rata; a delivered
        lease: its delivered time, up to `stop_ms`, its failed node's last heartbeat)."""
        return await self._close(contract_id, now_ms, "failed", 0, stop_ms=stop_ms)

    async def _read_active(self, region: str, contract_id: str) -> Contract:
        contract = await self._contract(self.keys.contract(region, contract_id))
        if contract is None:
            raise NotFound(core.CONTRACT_NOT_FOUND, field="contract_id")
        if contract.status != "active":
            raise Conflict(f"contract is {contract.status}", field="contract_id")
        return contract

    def _closing(self, region: str, contract: Contract) -> list[str]:
        """The keys that closing `contract` touches but the seq: it, its node's and client's
        (they never change, so the contract as read names them), the region's event stream and
        indexes of contracts and asks."""
        k = self.keys
        return [
            k.events(region),
            k.contract(region, contract.contract_id),
            k.node(region, contract.node_id),
            k.node_contracts(region, contract.node_id),
            k.client_contracts(region, contract.client_id),
            k.ends(region),
            k.asks(region),
            k.ask_expiry(region),
            k.wallets(region),
            k.open_counts(region),
            *self._lease_indexes(region),
            k.uptime(region),
        ]

    def _lease_indexes(self, region: str) -> list[str]:
        """The region's delivery indexes (pending and closing leases, meters): what creating
        or closing a contract may touch for its lease."""
        k = self.keys
        return [k.lease_pending(region), k.lease_closing(region), k.lease_meters(region)]

    async def _close(
        self,
        contract_id: str,
        now_ms: int,
        status: str,
        egress: int,
        *,
        stop_ms: int | None = None,
    ) -> Contract:
        region = await self._region_or_404(contract_id, core.CONTRACT_NOT_FOUND, "contract_id")
        for _ in range(_VERSION_RETRIES):
            contract = await self._read_active(region, contract_id)
            closed = core.close_contract(
                contract, now_ms=now_ms, status=status, egress_mgb=egress, stop_ms=stop_ms
            )
            result = await self._eval(
                "settle",
                [self.keys.seq(region), *self._closing(region, contract)],
                [
                    *self._head(region, now_ms),
                    contract_id,
                    contract.version,
                    status,
                    closed.used_s,
                    closed.egress_mgb,
                    str(closed.cost_pusd),
                    closed.settlement_hash,
                    self.retention_ms,
                    str(core.platform_fee_pusd(closed.cost_pusd, self.platform_fee_bps)),
                ],
            )
            if result[0] == 2:
                continue
            if result[0] == 0:
                raise _refusal(result)
            return _decode_contract(result[2])
        raise Conflict("contract keeps changing; try again", field="contract_id")

    async def failover(
        self, contract_id: str, new_node_id: str, now_ms: int, *, stop_ms: int | None = None
    ) -> tuple[Contract, Contract]:
        """Move the rest of an active contract to `new_node_id` (same region) atomically.

        The old contract closes `failed_over` with the time served billed and `successor_id`
        set; the successor runs on the new node for the seconds not yet billed, at the new
        node's price, which must be within the old contract's `max_price_pusd`
        (CapacityTaken "price above cap" otherwise; Unavailable / CapacityTaken when the node
        cannot take it). Conflict if the contract has no time left. Returns (old, new).
        A delivered lease bills its delivered time up to `stop_ms` (its node's last heartbeat);
        the successor's lease starts pending on the new node if that node delivers.
        """
        region = await self._region_or_404(contract_id, core.CONTRACT_NOT_FOUND, "contract_id")
        for _ in range(_VERSION_RETRIES):
            old = await self._read_active(region, contract_id)
            remaining = core.successor_duration_s(old, now_ms, stop_ms)
            if remaining <= 0:
                raise Conflict(core.CONTRACT_ENDED, field="contract_id")
            new_region = await self._region_or_404(new_node_id, core.NODE_NOT_FOUND, "node_id")
            if new_region != region:
                raise InvalidRequest("failover stays in the contract's region", field="node_id")
            if new_node_id == old.node_id:
                raise InvalidRequest(core.SAME_NODE, field="node_id")
            new_id = mint_id(region)
            closed = core.close_contract(
                old, now_ms=now_ms, status="failed_over", successor_id=new_id, stop_ms=stop_ms
            )
            k = self.keys
            result = await self._eval(
                "failover",
                [
                    k.seq(region),
                    *self._closing(region, old),
                    k.contract(region, new_id),
                    k.node(region, new_node_id),
                    k.node_contracts(region, new_node_id),
                ],
                [
                    *self._head(region, now_ms),
                    contract_id,
                    old.version,
                    closed.used_s,
                    str(closed.cost_pusd),
                    closed.settlement_hash,
                    new_id,
                    new_node_id,
                    remaining,
                    self.retention_ms,
                    str(core.platform_fee_pusd(closed.cost_pusd, self.platform_fee_bps)),
                ],
            )
            if result[0] == 2:
                continue
            if result[0] == 0:
                raise _refusal(result)
            self._remember(new_id, region)
            return (
                _decode_contract(result[3]),
                _decode_contract(result[4]),
            )
        raise Conflict("contract keeps changing; try again", field="contract_id")

    # -- money (issue 14) --------------------------------------------------------------------
    #
    # A renter's (a client's) money sits in wallets: one in the funding slot (`FUNDING`), where
    # credits from the rails land, and one per region, from which the region's scripts hold and
    # charge. Each wallet is only ever changed by a script of its own slot, and money moves
    # between two slots by a transfer: three script calls made safe by an outbox (see
    # `transfer`). Every change appends an event that the journal writes into the ledger.

    def _money_check(self, account_id: str, amount_pusd: int, key: str, rail: str) -> None:
        if not isinstance(account_id, str) or not _PLAIN_ID.fullmatch(account_id):
            raise InvalidRequest("must be a client id", field="account_id")
        if (
            not isinstance(amount_pusd, int)
            or isinstance(amount_pusd, bool)
            or not 0 < amount_pusd <= MAX_MOVEMENT_PUSD
        ):
            raise InvalidRequest(
                f"must be an integer between 1 and {MAX_MOVEMENT_PUSD}", field="amount_pusd"
            )
        if not isinstance(key, str) or not 0 < len(key) <= 255:
            raise InvalidRequest("must be 1-255 characters", field="key")
        if rail not in RAILS:
            raise InvalidRequest(f"must be one of {', '.join(RAILS)}", field="rail")

    async def _credit_call(
        self,
        direction: str,
        account_id: str,
        amount_pusd: int,
        *,
        key: str,
        rail: str,
        reference: str,
        reason: str,
        now_ms: int,
        allow_negative: bool = False,
    ) -> CreditResult:
        self._money_check(account_id, amount_pusd, key, rail)
        if len(reference) > 255 or len(reason) > 1000:
            raise InvalidRequest("reference or reason too long", field="reason")
        k, f = self.keys, FUNDING
        result = await self._eval(
            "credit",
            [k.seq(f), k.events(f), k.wallets(f), k.ops(f)],
            [
                *self._head(f, now_ms),
                account_id,
                str(amount_pusd),
                key,
                rail,
                reference,
                reason,
                direction,
                "1" if allow_negative else "0",
            ],
        )
        if result[0] == 0:
            raise _refusal(result)
        applied = int(result[1]) == 1
        event_id = event_log.decode(result[3]).event_id if applied else _text(result[3])
        return CreditResult(applied=applied, balance_pusd=int(_text(result[2])), event_id=event_id)

    async def credit(
        self,
        account_id: str,
        amount_pusd: int,
        *,
        key: str,
        rail: str,
        reference: str = "",
        reason: str = "",
        now_ms: int,
    ) -> CreditResult:
        """Credit `amount_pusd` to renter `account_id`'s (a client id's) funding wallet from
        `rail` (`RAILS`), once per idempotency `key`: one script call on the funding slot that
        checks the key, adds the money and appends `WalletCredited` (the journal writes it into
        the ledger: rail -> the client's funding account). A key used before changes nothing
        and answers `applied=False` with the current balance. `reference` (the rail's id of the
        payment) and `reason` are kept with the movement."""
        return await self._credit_call(
            "credit",
            account_id,
            amount_pusd,
            key=key,
            rail=rail,
            reference=reference,
            reason=reason,
            now_ms=now_ms,
        )

    async def debit(
        self,
        account_id: str,
        amount_pusd: int,
        *,
        key: str,
        rail: str,
        reference: str = "",
        reason: str = "",
        now_ms: int,
        allow_negative: bool = False,
    ) -> CreditResult:
        """Take `amount_pusd` out of renter `account_id`'s funding wallet back to `rail` (a
        refund, a clawback), once per `key` (`WalletDebited`; ledger: funding account -> rail).

        Only the funding wallet is debited: money already moved to a region (held, or
        available there) is not reached; `gather` brings a region's idle money back first. If
        the funding balance is short, the debit is refused with InsufficientFunds, whose
        `shortfall_pusd` is what is missing (so `amount - shortfall` is what could be
        debited), unless `allow_negative`: then the balance goes negative (a refund of money
        already spent becomes a debt that later credits pay off first)."""
        return await self._credit_call(
            "debit",
            account_id,
            amount_pusd,
            key=key,
            rail=rail,
            reference=reference,
            reason=reason,
            now_ms=now_ms,
            allow_negative=allow_negative,
        )

    async def wallet(self, slot: str, client_id: str, now_ms: int) -> WalletState:
        """The client's wallet in `slot` (a region, or `FUNDING`) as of `now_ms` (a new month
        shows no allowance yet)."""
        raw = await self.redis.hmget(
            self.keys.wallets(slot),
            [client_id, f"{client_id}:h", f"{client_id}:a", f"{client_id}:m"],
        )
        return _wallet_state(client_id, raw, core.month_of(now_ms))

    async def wallets(self, client_id: str, now_ms: int) -> dict[str, WalletState]:
        """The client's wallets: the funding slot's (always) and each region's that it has."""
        slots = [FUNDING, *await self.regions()]
        pipe = self.redis.pipeline(transaction=False)
        fields = [client_id, f"{client_id}:h", f"{client_id}:a", f"{client_id}:m"]
        for slot in slots:
            pipe.hmget(self.keys.wallets(slot), fields)
        month = core.month_of(now_ms)
        out: dict[str, WalletState] = {}
        for slot, raw in zip(slots, await pipe.execute(), strict=True):
            if slot == FUNDING or raw[0] is not None:
                out[slot] = _wallet_state(client_id, raw, month)
        return out

    async def open_counts(self, region: str, user_id: str) -> tuple[int, int]:
        """(open contracts, resting bids) of the user in the region (the caps' counters)."""
        raw = await self.redis.hmget(
            self.keys.open_counts(region), [f"{user_id}:c", f"{user_id}:b"]
        )
        return int(_text(raw[0] or b"0")), int(_text(raw[1] or b"0"))

    async def send_transfer(
        self,
        client_id: str,
        *,
        from_slot: str,
        to_slot: str,
        amount_pusd: int,
        allow_pusd: int,
        now_ms: int,
        credit_line_pusd: int = 0,
        budget_pusd: int | None = None,
        transfer_id: str | None = None,
    ) -> str | None:
        """Step 1 of `transfer`: debit `from_slot`'s wallet and put the transfer in its outbox
        (`TransferSent`). Returns the transfer id, or None when that id was sent before.
        Refusals: InsufficientFunds (the funding slot may go down to `-credit_line_pusd`, a
        region not below zero), BudgetExceeded (from the funding slot: the month's grants
        would pass `budget_pusd`)."""
        if from_slot == to_slot:
            raise InvalidRequest("a transfer goes between two slots", field="to_slot")
        if amount_pusd < 0 or allow_pusd < 0:
            raise InvalidRequest("amounts are not negative", field="amount_pusd")
        transfer_id = transfer_id or _new_id()
        k = self.keys
        result = await self._eval(
            "transfer_out",
            [
                k.seq(from_slot),
                k.events(from_slot),
                k.wallets(from_slot),
                k.outbox(from_slot),
                k.transfers(from_slot),
            ],
            [
                *self._head(from_slot, now_ms),
                transfer_id,
                client_id,
                to_slot,
                str(amount_pusd),
                str(allow_pusd),
                "1" if from_slot == FUNDING else "0",
                str(credit_line_pusd),
                "" if budget_pusd is None else str(budget_pusd),
            ],
        )
        if result[0] == 0:
            raise _refusal(result)
        return transfer_id if int(result[1]) == 1 else None

    async def receive_transfer(
        self, from_slot: str, transfer_id: str, sent: PendingTransfer, now_ms: int
    ) -> bool:
        """Step 2 of `transfer`: credit the destination, once per transfer id (`TransferReceived`;
        False when it was credited before)."""
        k, to = self.keys, sent.to_slot
        result = await self._eval(
            "transfer_in",
            [k.seq(to), k.events(to), k.wallets(to), k.transfers(to)],
            [
                *self._head(to, now_ms),
                transfer_id,
                sent.client_id,
                from_slot,
                str(sent.amount_pusd),
                str(sent.allow_pusd),
                sent.month,
                "1" if to == FUNDING else "0",
            ],
        )
        return int(result[1]) == 1

    async def finish_transfer(self, from_slot: str, transfer_id: str, now_ms: int) -> None:
        """Step 3 of `transfer`: clear the outbox entry once the destination has credited it."""
        k = self.keys
        await self._eval(
            "transfer_done",
            [k.seq(from_slot), k.outbox(from_slot)],
            [*self._head(from_slot, now_ms), transfer_id],
        )

    async def pending_transfers(self, slot: str) -> dict[str, PendingTransfer]:
        """The transfers sent from `slot` whose outbox entry is not cleared yet, by id."""
        raw = await self.redis.hgetall(self.keys.outbox(slot))
        return {_text(i): _decode_pending(v) for i, v in raw.items()}

    async def in_transit(self, client_id: str, slots: Sequence[str] | None = None) -> int:
        """The client's money between two wallets: sent from one of `slots` (default: the
        funding slot and every region) and not yet received (the ledger's transit account)."""
        total = 0
        for slot in slots if slots is not None else [FUNDING, *await self.regions()]:
            for transfer_id, sent in (await self.pending_transfers(slot)).items():
                if sent.client_id != client_id:
                    continue
                received = await self.redis.zscore(
                    self.keys.transfers(sent.to_slot), f"in:{transfer_id}"
                )
                if received is None:
                    total += sent.amount_pusd
        return total

    async def transfer(
        self,
        client_id: str,
        *,
        from_slot: str,
        to_slot: str,
        amount_pusd: int,
        allow_pusd: int = 0,
        now_ms: int,
        credit_line_pusd: int = 0,
        budget_pusd: int | None = None,
    ) -> str | None:
        """Move a renter's money (and budget allowance) from one slot to another: `send_transfer`
        (debit + outbox + event), `receive_transfer` (credit, idempotent on the transfer id),
        `finish_transfer` (clear the outbox). Each is one script on one slot, so a Redis Cluster
        accepts them; a crash after step 1 leaves the money in transit, in the outbox, where
        `complete_transfers` (the engine's repair loop) finds and finishes it. Returns the
        transfer id (None: nothing to move)."""
        if amount_pusd == 0 and allow_pusd == 0:
            return None
        transfer_id = await self.send_transfer(
            client_id,
            from_slot=from_slot,
            to_slot=to_slot,
            amount_pusd=amount_pusd,
            allow_pusd=allow_pusd,
            now_ms=now_ms,
            credit_line_pusd=credit_line_pusd,
            budget_pusd=budget_pusd,
        )
        if transfer_id is None:
            return None
        raw = await self.redis.hget(self.keys.outbox(from_slot), transfer_id)
        if raw is not None:
            await self.receive_transfer(from_slot, transfer_id, _decode_pending(raw), now_ms)
            await self.finish_transfer(from_slot, transfer_id, now_ms)
        return transfer_id

    async def complete_transfers(self, now_ms: int, *, older_than_ms: int = 5_000) -> int:
        """Finish every transfer left in an outbox (funding and every region) for at least
        `older_than_ms` (a crash between a transfer's steps): steps 2 and 3 again, which are
        idempotent, so a transfer finished meanwhile by its sender changes nothing. Returns how
        many entries it cleared."""
        done = 0
        for slot in [FUNDING, *await self.regions()]:
            for transfer_id, sent in (await self.pending_transfers(slot)).items():
                if sent.ts_ms > now_ms - older_than_ms:
                    continue
                await self.receive_transfer(slot, transfer_id, sent, now_ms)
                await self.finish_transfer(slot, transfer_id, now_ms)
                done += 1
        return done

    async def fund_region(
        self,
        client_id: str,
        region: str,
        need_pusd: int,
        *,
        now_ms: int,
        credit_line_pusd: int = 0,
        budget_pusd: int | None = None,
    ) -> None:
        """Make sure the client's wallet in `region` can hold `need_pusd` (money and this
        month's allowance), moving the shortfall from its funding wallet. Refusals of the move
        (InsufficientFunds, BudgetExceeded) name what the whole balance lacks: the renter sees
        one balance, funding and regions together."""
        w = await self.wallet(region, client_id, now_ms)
        money = max(0, need_pusd - w.avail_pusd)
        allow = max(0, need_pusd - w.allow_pusd)
        if money or allow:
            await self.transfer(
                client_id,
                from_slot=FUNDING,
                to_slot=region,
                amount_pusd=money,
                allow_pusd=allow,
                now_ms=now_ms,
                credit_line_pusd=credit_line_pusd,
                budget_pusd=budget_pusd,
            )

    async def gather(self, client_id: str, now_ms: int) -> int:
        """Move the client's available money from every region back to its funding wallet (for
        a debit or a payout of the balance). Returns how much moved."""
        moved = 0
        for slot, w in (await self.wallets(client_id, now_ms)).items():
            if slot != FUNDING and w.avail_pusd > 0:
                await self.transfer(
                    client_id,
                    from_slot=slot,
                    to_slot=FUNDING,
                    amount_pusd=w.avail_pusd,
                    allow_pusd=max(0, w.allow_pusd),
                    now_ms=now_ms,
                )
                moved += w.avail_pusd
        return moved

    # -- delivery ----------------------------------------------------------------------------

    async def _lease_call(
        self, name: str, region: str, contract_id: str, now_ms: int, args: Sequence[Any]
    ) -> tuple[Contract, bool]:
        """One call of a lease script on the contract's keys; (the contract after it, whether
        it changed anything)."""
        k = self.keys
        result = await self._eval(
            name,
            [
                k.seq(region),
                k.events(region),
                k.contract(region, contract_id),
                k.ends(region),
                *self._lease_indexes(region),
                *([k.uptime(region)] if name == "lease_ready" else []),
            ],
            [*self._head(region, now_ms), contract_id, *args],
        )
        if result[0] == 0:
            raise _refusal(result)
        if result[0] == 3:
            return _decode_contract(result[1]), False
        return _decode_contract(result[2]), True

    async def lease_ready(
        self, contract_id: str, node_id: str, *, host: str, port: int, tls: bool, now_ms: int
    ) -> Contract:
        """Node `node_id` serves the contract's lease at `host:port`: the lease is ready, billed
        from its first ready report. NotFound when the contract is not on that node; Conflict
        when its lease is not pending or ready (not delivered, closing, closed, failed)."""
        region = await self._region_or_404(contract_id, core.LEASE_NOT_FOUND, "contract_id")
        contract, _ = await self._lease_call(
            "lease_ready",
            region,
            contract_id,
            now_ms,
            [node_id, host, int(port), "true" if tls else "false"],
        )
        return contract

    async def close_lease(
        self, contract_id: str, now_ms: int, *, claimed_egress_gb: float | None = None
    ) -> Contract:
        """Order the close of a delivered lease (the renter settles, or its term ended): billing
        stops now and the node is told to stop, wipe and report; the contract is settled by
        `settle_lease` once the report is in (or at the close timeout). The renter's egress
        figure is recorded (InvalidRequest `egress_gb` if malformed). A lease already closing
        is left as it is. Conflict for a lease that is not delivered or not open."""
        claimed = "" if claimed_egress_gb is None else str(core.egress_mgb(claimed_egress_gb))
        region = await self._region_or_404(contract_id, core.CONTRACT_NOT_FOUND, "contract_id")
        contract, _ = await self._lease_call("lease_close", region, contract_id, now_ms, [claimed])
        return contract

    async def report_lease(
        self,
        contract_id: str,
        node_id: str | None,
        now_ms: int,
        *,
        egress_bytes: int = 0,
        peak_memory_bytes: int = 0,
        digest: str | None = None,
    ) -> tuple[Contract, bool]:
        """Record a delivered lease's final meter: node `node_id`'s closed report (its egress
        counter continues the heartbeats' meter), or (node_id None) the heartbeats' meter
        alone. (the contract, whether this recorded it: False when a final meter was recorded
        before). The lease must be closing or past its end."""
        region = await self._region_or_404(contract_id, core.LEASE_NOT_FOUND, "contract_id")
        return await self._lease_call(
            "lease_report",
            region,
            contract_id,
            now_ms,
            [
                node_id or "",
                "" if node_id is None else str(egress_bytes),
                str(peak_memory_bytes),
                digest or "",
            ],
        )

    async def settle_lease(self, contract_id: str, now_ms: int) -> Contract:
        """Settle a closing delivered lease as completed: its final meter (recorded first from
        the last heartbeat when its node sent no report) bills its egress, its delivered time
        up to the close order its seconds, its digest goes into the settlement hash, and the
        capacity returns. A contract already settled is returned as it is."""
        contract = await self.get_contract(contract_id)
        if contract is None:
            raise NotFound(core.CONTRACT_NOT_FOUND, field="contract_id")
        if contract.status != "active":
            return contract
        if contract.lease_state == "closing" and contract.reported_ms == 0:
            try:
                await self.report_lease(contract_id, None, now_ms)
            except Conflict:
                pass  # settled meanwhile: the settle below says so
        try:
            return await self._close(contract_id, now_ms, "completed", 0)
        except Conflict:
            settled = await self.get_contract(contract_id)
            if settled is not None and settled.status != "active":
                return settled
            raise

    async def pending_leases(self, region: str, made_before_ms: int, limit: int = 500) -> list[str]:
        """Ids of leases still waiting for their ready report that were made before the given
        instant, earliest first."""
        ids = await self.redis.zrangebyscore(
            self.keys.lease_pending(region), "-inf", made_before_ms, 0, limit
        )
        return [_text(i) for i in ids]

    async def closing_leases(
        self, region: str, ordered_before_ms: int, limit: int = 500
    ) -> list[str]:
        """Ids of closing leases due for settlement: their final meter is recorded, or their
        close was ordered before the given instant."""
        ids = await self.redis.zrangebyscore(
            self.keys.lease_closing(region), "-inf", ordered_before_ms, 0, limit
        )
        return [_text(i) for i in ids]

    # -- rebuild -----------------------------------------------------------------------------

    async def replay(self, events: Iterable[Event]) -> None:
        """Rebuild the live state of the events' regions from their complete event log (into
        an empty key space), as `engine.replay.replay` describes."""
        from engine.replay import replay

        await replay(
            self.redis,
            self.keys,
            events,
            missed_heartbeats_offline=self.missed_heartbeats_offline,
            retention_ms=self.retention_ms,
        )
