"""Every Redis key shape Mnemo uses, in one place.

All keys of one region share the hash tag `{<region>}` so that one script call touches one slot
and the same scripts run on Redis Cluster. `prefix` isolates deployments (and tests) sharing one
server: every key starts with it.

Per region `r` (`P` = prefix):
    P{r}:node:<id>            hash   node state (fields of `engine.types.Node`)
    P{r}:node:<id>:contracts  set    ids of the node's active contracts
    P{r}:asks                 zset   node id -> price_pusd; only nodes with free capacity, active
    P{r}:ask-exp              zset   node id -> ask_expires_ms, for the listed nodes whose ask expires
    P{r}:geo                  geo    node id -> (lng, lat); all registered, non-deactivated nodes
    P{r}:hb                   zset   node id -> heartbeat deadline ms (last heartbeat or registration
                                     + missed_heartbeats_offline * interval); active/maintenance nodes
    P{r}:bids                 zset   "<seq:016d>:<bid id>" -> -max_price_pusd (price-time priority)
    P{r}:bid-exp              zset   bid id -> expires_ms, for open bids that expire
    P{r}:bid:<id>             hash   bid state
    P{r}:contract:<id>        string contract state as one JSON object (the fields as decimal strings,
                                     as a hash would hold them, but end_ms, a number)
    P{r}:ends                 zset   active contract id -> end_ms
    P{r}:client:<id>:contracts set   ids of the client's active contracts in the region
    P{r}:seq                  string last event sequence number of the region
    P{r}:arrival              string last arrival sequence (nodes and bids)
    P{r}:engine-lease         string the engine process serving the region (SET NX PX, renewed)
    P{r}:events               stream the region's change log; field `e` holds the event JSON
    P{r}:fills                zset   "<contract id>:<price_pusd>:<gb_s>" -> ts_ms of fills, last 24 h
                                     (quotes: last fill price, volume)
    P{r}:uptime               hash   node id -> its uptime accounting (`engine.trust.pack`: counters,
                                     then one byte per window of the last 30 days)
    P{r}:trust-due            zset   node id -> ms of the next uptime sweep, for offline nodes
    P{r}:stake-ops            hash   stake lock key -> its StakeChanged event's id (a lock applies once)
  Money (issue 14; the funding slot `P{+funding}:` has the same shapes, see `FUNDING`):
    P{r}:wallets              hash   per client c: `c` money available (pico-USD, decimal, may be
                                     negative), `c:h` held, `c:a` budget allowance (a region: left
                                     for the month; the funding slot: granted this month), `c:m`
                                     that month (YYYY-MM)
    P{r}:open                 hash   "<user id>:c" / "<user id>:b" -> the user's open contracts /
                                     resting bids in the region (absent when 0)
    P{r}:outbox               hash   transfer id -> JSON of a transfer sent from this slot and not
                                     yet known to be received
    P{r}:transfers            zset   "out:<id>" / "in:<id>" -> ts_ms: transfers sent / received
                                     here, kept 30 days (a retried step is a no-op)
    P{r}:ops                  hash   credit/debit idempotency key -> event id (the funding slot)
    P{r}:lease-pending        zset   delivered contract id -> start_ms, while its node has not
                                     reported it ready (the engine fails it over after the timeout)
    P{r}:lease-closing        zset   delivered contract id -> closing_ms while it closes (0 once the
                                     final meter is recorded: settle it now)
    P{r}:lease-meters         hash   delivered contract id -> "<node id> <base> <counter> <peak>":
                                     its node's egress counter as last reported, the bytes of
                                     earlier counters that started over, the peak memory
Global (outside every region's slot; no script touches them: see "Ids and routing"):
    P regions                 set    regions that have ever been offered a node or a bid
    P dir                     hash   id -> region, for ids that do not carry their region (legacy
                                     and caller-chosen ids only); written before the script
    P engines                 zset   engine process -> last announcement ms (the regions are
                                     spread over the live ones)
    P rl:<bucket>             string rate-limit counters
    P quotes:<r> / P trades:<r> / P market / P user:<id> / P node-ch:<id>
                              pub/sub channels

The Lua scripts name the region's keys through `lua_prelude()`, generated from the methods below,
so a key's shape is written here only. Each script declares in KEYS every key it touches
(`engine.market` passes them, built here too), all of them in one region's slot: a Redis (or
Valkey) Cluster accepts every call.

Ids and routing. An object id the exchange mints (`mint_id(region)`: nodes, bids, contracts) is
a UUID version 8 (32 hex digits, as Postgres stores it) whose first 48 bits are the region's tag
(`region_tag`), the rest random (74 bits): the id names its region, so finding an object by id
needs no global lookup (`id_tag` reads the tag back; the `regions` set maps tags to names). An id
that carries no tag (minted before, or chosen by a caller of the engine's API) is routed through
the `dir` hash, which `engine.market` fills with an idempotent claim (HSETNX) made before the
creating script: the claim (HSETNX, then HGET) refuses an id another region claimed, and is
idempotent for its own region, so a retry after a failed call claims again; the script itself
refuses an id whose object (of its kind) exists in the region. Both global writes happen
outside the scripts, before them (`SADD regions` once per region and process): a crash between
the write and the script leaves a region listed with nothing in it, or an id claimed that names
nothing (a lookup finds no object: NotFound, as before the claim); neither is ever read as an
object (the object keys are the truth).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from collections.abc import Callable, Iterable
from functools import cache

__all__ = [
    "FUNDING",
    "REGION_KEYS",
    "Keys",
    "id_tag",
    "key_shape",
    "lua_prelude",
    "mint_id",
    "region_tag",
]

_TAG_HEX = 12  # 48 bits of region tag at the head of a minted id
_MINTED = re.compile(r"[0-9a-f]{12}8[0-9a-f]{3}[89ab][0-9a-f]{15}")


@cache
def region_tag(region: str) -> str:
    """The region's tag in the ids minted for it: the first 48 bits of SHA-256 of its name, as
    12 hex digits."""
    return hashlib.sha256(region.encode()).hexdigest()[:_TAG_HEX]


def mint_id(region: str) -> str:
    """A new object id for `region` (a node, bid or contract that lives there): a UUID version 8
    as 32 hex digits, `region_tag(region)`, then the version digit `8`, random bits and the RFC
    9562 variant. 74 random bits: ids of one region never collide in practice."""
    raw = bytearray(os.urandom(10))
    raw[0] = 0x80 | (raw[0] & 0x0F)  # version 8 in the high nibble
    raw[2] = 0x80 | (raw[2] & 0x3F)  # variant 0b10
    return region_tag(region) + raw.hex()


def id_tag(object_id: str) -> str | None:
    """The region tag a minted id carries, or None for an id minted otherwise (a legacy uuid4,
    a caller's own id): those are routed through the `dir` hash."""
    return object_id[:_TAG_HEX] if _MINTED.fullmatch(object_id) else None


FUNDING = "+funding"
"""The funding slot's name, used where a region's name goes (`Keys.tag(FUNDING)`, its stream's
events' `region`): where top-ups and operator credits land before they move to a region's
wallet. `+` is in no region's name (letters, digits, `_`, `.`, `-`), so it never collides."""


class Keys:
    """Key builder bound to one prefix. Cheap; build one per process (or per test)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "mnemo:") -> None:
        self.prefix = prefix

    def tag(self, region: str) -> str:
        """The region's key prefix including its hash tag, e.g. `mnemo:{us-east-2}:`."""
        return f"{self.prefix}{{{region}}}:"

    def node(self, region: str, node_id: str) -> str:
        return f"{self.tag(region)}node:{node_id}"

    def node_contracts(self, region: str, node_id: str) -> str:
        return f"{self.tag(region)}node:{node_id}:contracts"

    def asks(self, region: str) -> str:
        return f"{self.tag(region)}asks"

    def geo(self, region: str) -> str:
        return f"{self.tag(region)}geo"

    def ask_expiry(self, region: str) -> str:
        return f"{self.tag(region)}ask-exp"

    def heartbeats(self, region: str) -> str:
        return f"{self.tag(region)}hb"

    def bids(self, region: str) -> str:
        return f"{self.tag(region)}bids"

    def bid_expiry(self, region: str) -> str:
        return f"{self.tag(region)}bid-exp"

    def bid(self, region: str, bid_id: str) -> str:
        return f"{self.tag(region)}bid:{bid_id}"

    def contract(self, region: str, contract_id: str) -> str:
        return f"{self.tag(region)}contract:{contract_id}"

    def ends(self, region: str) -> str:
        return f"{self.tag(region)}ends"

    def client_contracts(self, region: str, client_id: str) -> str:
        return f"{self.tag(region)}client:{client_id}:contracts"

    def seq(self, region: str) -> str:
        return f"{self.tag(region)}seq"

    def arrival(self, region: str) -> str:
        return f"{self.tag(region)}arrival"

    def engine_lease(self, region: str) -> str:
        """The engine process's lease on the region: only its holder crosses the region's bids."""
        return f"{self.tag(region)}engine-lease"

    def events(self, region: str) -> str:
        return f"{self.tag(region)}events"

    def fills(self, region: str) -> str:
        return f"{self.tag(region)}fills"

    def uptime(self, region: str) -> str:
        """Each node's uptime accounting (engine.trust), one field per node."""
        return f"{self.tag(region)}uptime"

    def stake_ops(self, region: str) -> str:
        """Stake locks applied (engine.trust): lock key -> the StakeChanged event's id."""
        return f"{self.tag(region)}stake-ops"

    def trust_due(self, region: str) -> str:
        """Offline nodes -> when the engine next closes their uptime windows."""
        return f"{self.tag(region)}trust-due"

    # Money (issue 14): wallets live in each region's slot and in the funding slot (`FUNDING`).

    def wallets(self, region: str) -> str:
        return f"{self.tag(region)}wallets"

    def open_counts(self, region: str) -> str:
        return f"{self.tag(region)}open"

    def outbox(self, region: str) -> str:
        return f"{self.tag(region)}outbox"

    def transfers(self, region: str) -> str:
        return f"{self.tag(region)}transfers"

    def ops(self, region: str) -> str:
        return f"{self.tag(region)}ops"

    def lease_pending(self, region: str) -> str:
        return f"{self.tag(region)}lease-pending"

    def lease_closing(self, region: str) -> str:
        return f"{self.tag(region)}lease-closing"

    def lease_meters(self, region: str) -> str:
        return f"{self.tag(region)}lease-meters"

    @staticmethod
    def each(build: Callable[[str, str], str], region: str, ids: Iterable[str]) -> list[bytes]:
        """`build(region, id)` (an object's key: `node`, `bid`...) for each id, UTF-8 encoded.

        A script call declares every key it touches, a heartbeat batch a thousand node keys:
        built from the shape once and sent as bytes, they cost the client under a third of what
        calling `build` per id and letting redis-py encode each str does."""
        head, tail = build(region, _ID).encode().split(_ID.encode())
        return [head + i.encode() + tail for i in ids]

    @property
    def regions(self) -> str:
        return f"{self.prefix}regions"

    @property
    def directory(self) -> str:
        return f"{self.prefix}dir"

    @property
    def engines(self) -> str:
        """The live engine processes (zset: owner -> last announcement ms): how many share the
        regions (`engine.process`)."""
        return f"{self.prefix}engines"

    def rate_limit(self, bucket: str) -> str:
        return f"{self.prefix}rl:{bucket}"

    def idempotency(self, scope: str) -> str:
        return f"{self.prefix}idem:{scope}"

    # pub/sub channels (not keys, but named here so there is one place for every name)
    def quotes_channel(self, region: str) -> str:
        return f"{self.prefix}quotes:{region}"

    def trades_channel(self, region: str) -> str:
        return f"{self.prefix}trades:{region}"

    @property
    def market_channel(self) -> str:
        return f"{self.prefix}market"

    def user_channel(self, user_id: str) -> str:
        """Fills and bid updates for one user (the WebSocket `fills` and `bids` channels)."""
        return f"{self.prefix}user:{user_id}"

    def node_channel(self, node_id: str) -> str:
        """Contract and standing notices for a node's owner and agent (ws `node:<id>`), and the
        orders to its agent about its lease servers (ws `leases:<id>`)."""
        return f"{self.prefix}node-ch:{node_id}"


REGION_KEYS = (
    "node",
    "node_contracts",
    "asks",
    "ask_expiry",
    "geo",
    "heartbeats",
    "bids",
    "bid_expiry",
    "bid",
    "contract",
    "ends",
    "client_contracts",
    "seq",
    "arrival",
    "engine_lease",
    "events",
    "fills",
    "uptime",
    "trust_due",
    "stake_ops",
    "wallets",
    "open_counts",
    "outbox",
    "transfers",
    "ops",
    "lease_pending",
    "lease_closing",
    "lease_meters",
)
"""The `Keys` methods naming a region's keys (those `lua_prelude()` gives the scripts)."""

# Stand-ins that no real prefix, region or id contains: a method's result, split on them, shows
# the literal parts of its shape.
_PREFIX, _REGION, _ID = "\x00", "\x01", "\x02"


def key_shape(name: str) -> tuple[str, ...]:
    """The literal parts of region key `name` (a `Keys` method) after the region's tag, split
    where the object id goes: `("asks",)`, `("node:", ":contracts")`."""
    keys = Keys(_PREFIX)
    tag = keys.tag(_REGION)
    build = getattr(keys, name)
    takes_id = len(inspect.signature(build).parameters) == 2
    key = build(_REGION, _ID) if takes_id else build(_REGION)
    if not key.startswith(tag):
        raise ValueError(f"Keys.{name} does not start with the region's tag")
    parts = tuple(key[len(tag) :].split(_ID))
    if any(c in part for part in parts for c in (_PREFIX, _REGION, "'", "\\", "\n")):
        raise ValueError(f"Keys.{name} has a shape Lua cannot spell as a plain literal: {parts}")
    return parts


@cache
def lua_prelude() -> str:
    """Lua source naming the region's keys as `Keys` does, for the scripts' prelude.

    It defines `TAG` (ARGV[1]: the region's prefix with its hash tag, `Keys.tag`) and a table
    `K` with one entry per name in `REGION_KEYS`: a string for a region-wide key (`K.asks`), a
    function of the object id for an object's key (`K.node(id)`). Scripts name keys only
    through it, so a shape is written in this module alone (tests/engine/test_keys.py checks
    the scripts).
    """
    lines = [
        "-- Generated by engine.keys.lua_prelude() from engine/keys.py: edit the shapes there.",
        "local TAG = ARGV[1]",
        "local K = {}",
    ]
    for name in REGION_KEYS:
        parts = key_shape(name)
        spelled = ["TAG"]
        for i, part in enumerate(parts):
            if i:
                spelled.append("id")
            if part:
                spelled.append(f"'{part}'")
        if len(parts) > 1:
            lines.append(f"function K.{name}(id) return {' .. '.join(spelled)} end")
        else:
            lines.append(f"K.{name} = {' .. '.join(spelled)}")
    return "\n".join(lines) + "\n"
