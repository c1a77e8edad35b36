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
- The global directory (`dir`: id -> region) and the `regions` set are the only keys outside a
  region's slot. They are written by the scripts that create objects (`register`,
  `register_many`, `place_bid`: both; `reserve`, `failover`: `dir`), declared as KEYS[2] (and
  KEYS[3]). That is atomic on one Redis or Valkey server; on Redis Cluster those calls would be
  refused (CROSSSLOT): a Cluster deployment must move those writes into a separate idempotent
  call made before the script.
- Money that can exceed 2**53 (a settlement's cost) is computed in Python (`engine.core`) from
  the contract as read, and the script applies it only if the contract's `version` is still the
  one read (optimistic concurrency; the adapter re-reads and retries on a mismatch).
- Objects that close (bids cancelled, expired or filled; contracts settled, failed or failed
  over) stay readable for `retention_ms` (a day by default) and then vanish from Redis; their
  history is in the event stream and Postgres. Directory entries stay.
- The event stream is never trimmed here: the journal trims what it has persisted. `replay()`
  rebuilds a region from a complete stream (see `engine.replay`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import hiredis
import msgspec
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import NoScriptError, ResponseError

from engine import core
from engine import log as event_log
from engine.errors import (
    CapacityTaken,
    Conflict,
    InvalidRequest,
    MarketError,
    NotFound,
    OutsideTerms,
    Unavailable,
)
from engine.keys import Keys, lua_prelude
from engine.types import (
    Bid,
    Contract,
    Event,
    Heartbeat,
    Node,
    NodeChanges,
    NodeRegistered,
    NodeUpdated,
    Quote,
)

__all__ = [
    "HEARTBEAT_BATCH",
    "PLACE_BATCH",
    "REGISTER_BATCH",
    "RESERVE_BATCH",
    "TERMINAL_RETENTION_MS",
    "HeartbeatOutcome",
    "Market",
    "ReserveRequest",
]

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
)
_ERRORS: dict[str, type[MarketError]] = {
    cls.code: cls
    for cls in (NotFound, Conflict, CapacityTaken, Unavailable, InvalidRequest, OutsideTerms)
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


CHECK_DECLARED_KEYS = False
"""Test mode: when true, every script loaded afterwards raises if a command of it touches a key
not declared in its KEYS (no single server checks that; Redis Cluster needs it), and every call
checks that its KEYS share one slot but the global `dir` and `regions`. Slower (one more
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


def _new_id() -> str:
    """A random 128-bit id as 32 hex digits (the shape of `uuid4().hex`)."""
    return os.urandom(16).hex()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _refusal(result: Sequence[Any]) -> MarketError:
    code, message, field = (_text(v) for v in result[1:4])
    return _ERRORS[code](message, field=field or None)


def _beat_text(value: Any) -> str:
    # validate_heartbeat made float fields floats: repr is their exact, stored text.
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


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


class Market:
    """The live market of every region in one Redis (or Valkey) server.

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
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.missed_heartbeats_offline = missed_heartbeats_offline
        self.retention_ms = retention_ms
        # id -> region; directory entries never change, so this never goes stale.
        self._region_cache: dict[str, str] = {}
        # place_bid calls waiting for their batch's script call, by (region, now_ms)
        self._bids_to_place: dict[tuple[str, int], _BidBatch] = {}
        self._placing: set[asyncio.Task[None]] = set()
        # region -> book -> how many of the book's top entries a quote declares (see quote)
        self._quote_depth: dict[str, dict[str, int]] = {}

    # -- scripts -----------------------------------------------------------------------------

    async def load_scripts(self) -> None:
        """Load every script into the server (idempotent; also done on demand after NOSCRIPT)."""
        pipe = self.redis.pipeline(transaction=False)
        for name in _SCRIPTS:
            pipe.script_load(_source(name))
        await pipe.execute()

    def _check_slot(self, keys: Sequence[str | bytes]) -> None:
        """Test mode: the call's keys, but the global ones, are in one slot."""
        outside = (self.keys.directory.encode(), self.keys.regions.encode())
        encoded = (k if isinstance(k, bytes) else k.encode() for k in keys)
        slots = {key_slot(k) for k in encoded if k not in outside}
        if len(slots) > 1:
            raise RuntimeError(f"a script call declares keys of {len(slots)} slots: {keys}")

    async def _eval(self, name: str, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        (answer,) = await self._eval_many(name, [(keys, args)])
        return answer

    async def _send(self, packed: bytes, replies: int) -> list[Any]:
        """Send packed commands on one pooled connection and read their `replies` (an error
        reply comes back as its exception, in its place). A call declares every key its script
        touches, a heartbeat batch a thousand: hiredis packs them in C, where redis-py's command
        path encodes each argument in Python (a fifth of a reserve's client CPU). Nothing is
        retried: a script whose reply was lost may have run, and must not run twice."""
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(packed)
            out: list[Any] = []
            for _ in range(replies):
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
            return out
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def _eval_many(
        self, name: str, calls: Sequence[tuple[Sequence[str | bytes], Sequence[Any]]]
    ) -> list[Any]:
        """Pipelined calls of one script (each call stays atomic on its own)."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        sha = _sha(name).encode()
        for attempt in range(2):
            if CHECK_DECLARED_KEYS:
                for i in todo:
                    self._check_slot(calls[i][0])
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

    def _head(self, region: str, now_ms: int) -> list[Any]:
        return [self.keys.tag(region), region, int(now_ms)]

    # The KEYS of each call: every key its script touches (engine/lua/_lib.lua's conventions).

    def _creating(self, region: str) -> list[str]:
        """The first KEYS of a script that registers nodes or places bids: the region's seq,
        the global directory and regions set (outside the region's slot: see the module's
        docstring), then the region's event stream and arrival counter."""
        k = self.keys
        return [k.seq(region), k.directory, k.regions, k.events(region), k.arrival(region)]

    def _node_indexes(self, region: str) -> list[str]:
        """The region's indexes of nodes (asks, their expiry, locations, heartbeat deadlines)."""
        k = self.keys
        return [k.asks(region), k.ask_expiry(region), k.geo(region), k.heartbeats(region)]

    # -- directory ---------------------------------------------------------------------------

    def _remember(self, object_id: str, region: str) -> None:
        if len(self._region_cache) >= _REGION_CACHE_MAX:
            self._region_cache.clear()
        self._region_cache[object_id] = region

    async def region_of(self, object_id: str) -> str | None:
        """The region of a node, bid or contract id (via the `dir` hash), or None."""
        region = self._region_cache.get(object_id)
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
            for object_id, raw in zip(
                unknown, await self.redis.hmget(self.keys.directory, unknown), strict=True
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
        ids = list(index)
        in_use = await self.redis.hmget(self.keys.directory, ids)
        for i, region in enumerate(in_use):
            if region is not None:
                raise Conflict(core.ID_IN_USE, field=f"nodes[{i}].node_id")
        groups: dict[str, list[int]] = {}
        for i, node in enumerate(stored):
            groups.setdefault(node.region, []).append(i)
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
            entries = [
                [
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
                for b in (beats[i] for i in idx)
            ]
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
            ],
            [*self._head(region, now_ms), node_id],
        )
        if result[0] == 0:
            raise _refusal(result)
        ids = sorted(_text(i) for i in result[2])
        return await self._contracts([self.keys.contract(region, i) for i in ids])

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

    async def place_bid(self, bid: Bid, now_ms: int) -> Bid:
        """Rest a limit bid in its region's book (price-time priority). Filling is the engine's
        job (`reserve(..., bid_id=...)`); this never crosses.

        Calls made together (in one turn of the event loop, same region and `now_ms`) share
        one script call, `PLACE_BATCH` bids at most, each bid applied on its own in call order:
        the same outcome as separate calls, at a fraction of the client's and the server's
        cost per bid (a gateway placing many bots' bids at once)."""
        stored = core.new_bid(bid, now_ms)
        fields = core.to_fields(stored)
        del fields["seq"]  # the script's to assign
        key = (stored.region, int(now_ms))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        batch = self._bids_to_place.get(key)
        if batch is None:
            batch = self._bids_to_place[key] = _BidBatch()
            task = loop.create_task(self._place_queued(key, batch))
            self._placing.add(task)
            task.add_done_callback(self._placing.discard)
        batch.args += (stored.bid_id, _json(fields))
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
            k = self.keys
            results = await self._eval(
                "place_bid",
                [*self._creating(region), k.bids(region), k.bid_expiry(region), *batch.keys],
                [*self._head(region, now_ms), *batch.args],
            )
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
            k.directory,
            k.events(region),
            k.asks(region),
            k.ask_expiry(region),
            k.bids(region),
            k.bid_expiry(region),
            k.ends(region),
            k.fills(region),
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
        return keys, [*self._head(region, now_ms), self.retention_ms, _json(entries)]

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
        # The script answers with the node's terms only (owner, price, egress price): the rest
        # of the contract is the request's, and a small answer keeps big batches cheap.
        if result[0] == 0:
            raise _refusal(result)
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
    ) -> Contract:
        """Lease `ram_gb + vram_gb` on the node for `duration_s` at the node's ask price.

        Refusals: NotFound (node, bid), Unavailable (node not active, ask expired),
        CapacityTaken ("price above cap", "duration outside the node's terms",
        "capacity taken" — someone else got it first), and with `bid_id` Conflict (bid not
        open, expired, remainder smaller than the fill) or InvalidRequest (fill does not match
        the bid). With `bid_id` the bid's fill state changes in the same atomic step.
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
        )
        region = await self._reserve_region(request)
        contract_id = _new_id()
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
            contract_id = _new_id()
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

    async def extend(self, contract_id: str, extra_s: int, now_ms: int) -> Contract:
        """Add `extra_s` seconds to an active contract that has not ended; the node must still
        be active (else Unavailable), the total within its `max_duration_s` (else OutsideTerms,
        naming both) and the lease's value within `core.MAX_LEASE_VALUE_PUSD` (InvalidRequest)."""
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
            ],
            [*self._head(region, now_ms), contract_id, extra_s, longest_s],
        )
        if result[0] == 0:
            raise _refusal(result)
        return _decode_contract(result[2])

    async def settle(self, contract_id: str, egress_gb: float, now_ms: int) -> Contract:
        """Complete an active contract: bill the seconds used (capped at its term) plus egress,
        stamp the settlement hash, return the capacity to the node (`engine.core`)."""
        return await self._close(contract_id, now_ms, "completed", core.egress_mgb(egress_gb))

    async def fail_contract(self, contract_id: str, now_ms: int) -> Contract:
        """Close an active contract as `failed`, billing the time served (pro rata)."""
        return await self._close(contract_id, now_ms, "failed", 0)

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
        ]

    async def _close(self, contract_id: str, now_ms: int, status: str, egress: int) -> Contract:
        region = await self._region_or_404(contract_id, core.CONTRACT_NOT_FOUND, "contract_id")
        for _ in range(_VERSION_RETRIES):
            contract = await self._read_active(region, contract_id)
            closed = core.close_contract(contract, now_ms=now_ms, status=status, egress_mgb=egress)
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
                ],
            )
            if result[0] == 2:
                continue
            if result[0] == 0:
                raise _refusal(result)
            return _decode_contract(result[2])
        raise Conflict("contract keeps changing; try again", field="contract_id")

    async def failover(
        self, contract_id: str, new_node_id: str, now_ms: int
    ) -> tuple[Contract, Contract]:
        """Move the rest of an active contract to `new_node_id` (same region) atomically.

        The old contract closes `failed_over` with the time served billed and `successor_id`
        set; the successor runs on the new node for the seconds not yet billed, at the new
        node's price, which must be within the old contract's `max_price_pusd`
        (CapacityTaken "price above cap" otherwise; Unavailable / CapacityTaken when the node
        cannot take it). Conflict if the contract has no time left. Returns (old, new).
        """
        region = await self._region_or_404(contract_id, core.CONTRACT_NOT_FOUND, "contract_id")
        for _ in range(_VERSION_RETRIES):
            old = await self._read_active(region, contract_id)
            remaining = core.successor_duration_s(old, now_ms)
            if remaining <= 0:
                raise Conflict(core.CONTRACT_ENDED, field="contract_id")
            new_region = await self._region_or_404(new_node_id, core.NODE_NOT_FOUND, "node_id")
            if new_region != region:
                raise InvalidRequest("failover stays in the contract's region", field="node_id")
            if new_node_id == old.node_id:
                raise InvalidRequest(core.SAME_NODE, field="node_id")
            new_id = _new_id()
            closed = core.close_contract(
                old, now_ms=now_ms, status="failed_over", successor_id=new_id
            )
            k = self.keys
            result = await self._eval(
                "failover",
                [
                    k.seq(region),
                    k.directory,
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
