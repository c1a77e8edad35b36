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
Global:
    P regions                 set    regions that have ever had a node or a bid
    P dir                     hash   node/bid/contract id -> region (routing by id)
    P rl:<bucket>             string rate-limit counters
    P quotes:<r> / P trades:<r> / P market / P user:<id> / P node-ch:<id>   pub/sub channels

The Lua scripts name the region's keys through `lua_prelude()`, generated from the methods below,
so a key's shape is written here only. Each script declares in KEYS every key it touches
(`engine.market` passes them, built here too); the global `dir` and `regions` keys are the only
ones outside the region's slot.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from functools import cache

__all__ = ["REGION_KEYS", "Keys", "key_shape", "lua_prelude"]


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
        """Contract notices for a node's owner and agent."""
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
