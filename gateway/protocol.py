"""Mnemo's wire protocol: every `/ws` message, the heartbeat body, and the public shapes REST
and the WebSocket share.

msgspec and the standard library only, so that everything which speaks to the exchange imports
this one module: the gateway serves it, the node agent (installed without the exchange's
dependencies) speaks it, and a client or SDK can import it too (`gateway/__init__.py` imports
nothing, so `import gateway.protocol` loads neither Starlette nor the engine).

Client -> server (JSON text, tagged by `op`; the server refuses unknown fields):
    SubscribeOp      {"op": "subscribe", "channels": [...]}        -> Subscribed
    UnsubscribeOp    {"op": "unsubscribe", "channels": [...]}      -> Unsubscribed
    HeartbeatOp      {"op": "heartbeat", "beats": [Beat...], "ref"} -> HeartbeatAck
    PingOp           {"op": "ping", "ref"}                          -> Pong
Server -> client (tagged by `type`): Subscribed, Unsubscribed, HeartbeatAck (one `BeatResult`
per beat, in order, its `outcome` a `HeartbeatOutcome`), Pong, ErrorReply, Event (one
notification of a subscribed channel), Batch (several of these in one frame, on sockets opened
with `?batch=1`).

Channels and what their events carry (`Event.data`; `decode_event` turns it into the Struct):
    quotes:<region>   BookOut          the region's book, as `GET /api/book/{region}`
    trades:<region>   Trade            every contract made by a reserve (fills and RFQ takes)
    market            MarketSummary    each region's supply, a few times a second
    fills             ContractOut      each of the caller's new contracts, as `GET /api/contracts/{id}`
    bids              BidNotice        the caller's bids placed, filled, cancelled or expired
    contracts         ContractNotice   the caller's contracts extended, ended, failed over
    node:<id>         ContractNotice   contracts on the node: started, extended, ending, ended, failed over
    leases            LeaseNotice      the caller's RAM leases: pending, ready, moved (after a failover),
                                       failed, closed (the endpoint, never the secret)
    leases:<node_id>  LeaseNotice      orders to the node's agent: open a lease server, close it
    trust:<node_id>   TrustNotice      the node's standing: warned (uptime below 60), cleared,
                                       suspended from new leases, reinstated (its owner only)

The heartbeat body is `Heartbeat`: the body of `POST /api/nodes/{id}/heartbeat`, and (with the
node's id, as `Beat`) each entry of a `heartbeat` op. It is defined here once; the REST route,
the WebSocket, the agent and its simulated fleet all use this class.

Units, across REST and WebSocket alike:
- Money is in USD, under the spec's names (`price_per_gb_sec` USD per GB-second,
  `egress_price_per_gb` USD per GB, `total_cost_usd`, ...), as JSON numbers: the double nearest
  the exact amount. Exact amounts are in the integer pico-USD twins (1e-12 USD) named `..._pusd`
  (`price_pusd` per GB-second, `egress_price_pusd` per GB, `total_cost_pusd`, ...), the
  market's own unit: a bot computes with those. `round(usd * 1e12) == pusd` for every price and
  every amount under 1,000 USD; beyond, only the integer is exact. A cost may pass 2**53
  pico-USD (about 9,007 USD), so parse JSON integers as 64-bit integers (Python, Go, Rust and
  Java do; JavaScript needs a BigInt-aware parser). Means (an average price, a VWAP) are not
  whole pico-USD and come in USD only.
- Sizes are whole GB (`_gb`), durations whole seconds (`_sec`), instants Unix milliseconds
  (`_ms`). The engine's internal names and units (`_s`, `version`, `owner_id`, pico-USD without
  a USD twin) never appear here.

Compatibility: this is a public API, so changes keep old clients and old servers working. A
field is added with a default (a client built against a newer version still decodes an older
server's messages; an older client ignores the new field) and is never removed, renamed or
given another type, the values of a `Literal` included (a new outcome or status is a new type).
A message type or a channel may be added (a client skips a `type` it does not know). Anything
else needs a new version of the protocol on a new path. Decoders of server messages must not
forbid unknown fields; the server forbids them in what it receives, so a misspelt field is an
error rather than silently ignored. The engine's events (`engine.types`) and the pub/sub notes
between engine and gateway (`engine.notify`) are internal: the gateway maps them to these types
at its edge (`gateway.events`), and their evolution binds no client.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
from msgspec import Meta, Raw, Struct

__all__ = [
    "CHANNEL_EVENTS",
    "MAX_BEATS_PER_MESSAGE",
    "MAX_CHANNELS_PER_MESSAGE",
    "MAX_GB",
    "MAX_LEASES_PER_BEAT",
    "PUSD_PER_USD",
    "Batch",
    "Beat",
    "BeatResult",
    "BidNotice",
    "BidNoticeKind",
    "BidOut",
    "BidStatus",
    "BookOut",
    "ClientMessage",
    "ContractLive",
    "ContractNotice",
    "ContractNoticeKind",
    "ContractOut",
    "ContractStatus",
    "DepthLevel",
    "ErrorBody",
    "ErrorDetail",
    "ErrorReply",
    "Event",
    "Gigabytes",
    "Heartbeat",
    "HeartbeatAck",
    "HeartbeatOp",
    "HeartbeatOutcome",
    "Id",
    "Latitude",
    "LeaseAccess",
    "LeaseClosed",
    "LeaseCredentials",
    "LeaseEndpoint",
    "LeaseKind",
    "LeaseMeter",
    "LeaseNotice",
    "LeaseNoticeKind",
    "LeaseReady",
    "LeaseState",
    "Longitude",
    "MarketSummary",
    "NodeEvent",
    "NodeStatus",
    "NodeType",
    "PingOp",
    "Pong",
    "PublicEvent",
    "Ref",
    "ServerMessage",
    "SubscribeOp",
    "Subscribed",
    "Trade",
    "TrustNotice",
    "TrustNoticeKind",
    "UnsubscribeOp",
    "Unsubscribed",
    "decode_client_message",
    "decode_event",
    "decode_server_message",
    "encode",
]

# ---------------------------------------------------------------------------------------------
# Vocabularies and bounded scalars. The engine keeps its own copies of the vocabularies (it
# must not import the gateway, and this module must not import the engine, which the agent
# does not install); tests/gateway/test_protocol.py asserts each pair is equal.

PUSD_PER_USD: Final = 10**12
"""Pico-USD in one USD: `usd = pusd / PUSD_PER_USD` (the exact unit of every `_pusd` field)."""
MAX_GB: Final = 65_536
"""Largest memory size accepted anywhere (64 TiB), in GB (`engine.core.MAX_GB`)."""
MAX_BEATS_PER_MESSAGE: Final = 1000
"""Beats in one `heartbeat` op."""
MAX_CHANNELS_PER_MESSAGE: Final = 64
"""Channels in one `subscribe` or `unsubscribe` op."""
MAX_LEASES_PER_BEAT: Final = 4096
"""Lease meters in one heartbeat."""

HeartbeatOutcome = Literal["ok", "not_found", "forbidden", "too_soon", "deactivated"]
"""What became of one beat (`engine.market.HeartbeatResult`): applied; no such node; not the
caller's node; sooner than the node's minimum interval (see `retry_after_ms`); node deactivated."""
NodeType = Literal["datacenter", "edge_cluster", "mist_node"]
NodeStatus = Literal["active", "maintenance", "offline", "deactivated"]
ContractStatus = Literal["active", "completed", "failed", "failed_over"]
BidStatus = Literal["open", "filled", "cancelled", "expired"]
ContractNoticeKind = Literal[
    "contract_started",
    "contract_extended",
    "contract_ending",
    "contract_ended",
    "contract_failed_over",
]
"""`contract_started`: a contract began (on `node:<id>`; on `contracts` only a failover's
successor, whose `predecessor_id` names the contract it replaces: a new fill goes to `fills`);
`contract_extended`: its end moved later; `contract_ending`: it ends in about a minute or less
(`node:<id>` only, once per end time); `contract_ended`: it was settled `completed` or `failed`;
`contract_failed_over`: its node went offline and the rest of its time moved to `successor_id`."""
BidNoticeKind = Literal["bid_placed", "bid_filled", "bid_cancelled", "bid_expired"]
LeaseState = Literal["pending", "ready", "failed", "closed"]
"""Where a lease's delivery stands: `pending` (the node has not reported its endpoint yet),
`ready` (the endpoint serves the renter), `failed` (the node did not deliver, or died and no
successor took the lease), `closed` (the lease ended; its server is stopped and wiped)."""
LeaseKind = Literal["ram", "vram"]
LeaseNoticeKind = Literal[
    "lease_open",
    "lease_ready",
    "lease_moved",
    "lease_failed",
    "lease_close",
    "lease_closed",
]
"""To the renter (`leases`): `lease_ready` (the endpoint serves), `lease_moved` (after a
failover the lease is served by another node: a new endpoint, new credentials from
`GET /api/contracts/{id}/access`), `lease_failed`, `lease_closed`. To the node's agent
(`leases:<node_id>`): `lease_open` (start the contract's lease server and report ready) and
`lease_close` (stop it, wipe it, and report the final meter and digest)."""


def whole(pattern: str) -> str:
    """A regex that must match the whole string. msgspec checks patterns with Python's
    `re.search`, whose `$` also matches before a final newline: `^[a-z]+$` takes "abc\n". The
    lookahead refuses that newline; in JSON Schema (ECMA regexes) it changes nothing."""
    return f"^{pattern}(?!\n)$"


Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=whole("[A-Za-z0-9_-]+"))]
Gigabytes = Annotated[int, Meta(ge=0, le=MAX_GB)]
Latitude = Annotated[float, Meta(ge=-90.0, le=90.0, description="Degrees north.")]
Longitude = Annotated[float, Meta(ge=-180.0, le=180.0, description="Degrees east.")]
Ref = Annotated[str, Meta(max_length=256)] | int | float | bool | None
"""A client's tag for a request, echoed in its answer."""
ChannelName = Annotated[str, Meta(min_length=1, max_length=128)]
Channels = Annotated[list[ChannelName], Meta(min_length=1, max_length=MAX_CHANNELS_PER_MESSAGE)]


# ---------------------------------------------------------------------------------------------
# Delivery: what a node's agent reports about the lease servers it runs

Host = Annotated[str, Meta(min_length=1, max_length=253, pattern=whole("[A-Za-z0-9.:_-]+"))]
"""A host name or an IP address (v4, or v6 without brackets)."""
Port = Annotated[int, Meta(ge=1, le=65535)]
Bytes = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Digest = Annotated[str, Meta(pattern=whole("[0-9a-f]{64}"))]
"""A SHA-256 digest in lower-case hex."""


class LeaseMeter(Struct, forbid_unknown_fields=True, kw_only=True):
    """One lease server's meter, as its node measured it, cumulative since the lease began:
    bytes sent to clients (egress) and the peak of memory used by the lease's data."""

    contract_id: Id
    egress_bytes: Bytes
    peak_memory_bytes: Bytes


class LeaseReady(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /api/nodes/{node_id}/leases/{contract_id}/ready`: the node's agent serves the lease
    at `host:port` (TLS when `tls`)."""

    host: Host
    port: Port
    tls: bool = False
    maxmemory_bytes: Bytes | None = None
    """The most the renter's data may take on this server, in bytes: the lease's `ram_gb` GiB on
    a real node; less on the simulated fleet, whose leases are scaled down (README)."""


class LeaseClosed(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /api/nodes/{node_id}/leases/{contract_id}/closed`: the lease server is stopped and
    its memory freed; the final meter, and the digest of the data it held when it closed (None:
    the node could not read it)."""

    egress_bytes: Bytes
    peak_memory_bytes: Bytes
    digest: Digest | None = None


class LeaseCredentials(Struct, kw_only=True):
    """`GET /api/nodes/{node_id}/leases/{contract_id}/credentials`, for the node's own agent:
    the one ACL user its lease server must accept."""

    contract_id: str
    username: str
    password: str


# ---------------------------------------------------------------------------------------------
# The heartbeat body


class Heartbeat(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """What a node reports every interval (the spec's heartbeat body): the body of
    `POST /api/nodes/{id}/heartbeat`.

    `available_*_gb`: memory the node could lend right now, NOT counting what Mnemo already
    leases from it (the market adds its own leases back). `latitude` and `longitude` come
    together. Fields left out (None) are not sent.
    """

    json_schema_rules: ClassVar[dict[str, Any]] = {
        "anyOf": [
            {
                "properties": {"latitude": {"type": "number"}, "longitude": {"type": "number"}},
                "required": ["latitude", "longitude"],
            },
            {"properties": {"latitude": {"type": "null"}, "longitude": {"type": "null"}}},
        ]
    }
    """The rule across fields, as JSON Schema (the OpenAPI document adds it to the body's)."""

    available_ram_gb: Gigabytes
    available_vram_gb: Gigabytes
    cpu_usage_pct: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    gpu_usage_pct: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    temperature_c: Annotated[int, Meta(ge=-100, le=200)] | None = None
    bandwidth_mbps: Annotated[int, Meta(ge=0, le=10_000_000)] | None = None
    latitude: Latitude | None = None
    longitude: Longitude | None = None
    leases: Annotated[list[LeaseMeter], Meta(max_length=MAX_LEASES_PER_BEAT)] | None = None
    """What the node measured on each lease server it runs (delivery), one entry per lease."""

    def location_error(self) -> str | None:
        """Why the location is refused (one of the two coordinates without the other), or None."""
        if (self.latitude is None) != (self.longitude is None):
            return "latitude and longitude come together"
        return None


class Beat(Heartbeat, kw_only=True):
    """One entry of a `heartbeat` op: the heartbeat body plus the node it is for."""

    node_id: Id

    def body(self) -> Heartbeat:
        """The REST body of this beat (the node goes in the path there)."""
        fields = {name: getattr(self, name) for name in Heartbeat.__struct_fields__}
        return Heartbeat(**fields)


class BeatResult(Struct):
    """The server's verdict on one beat (`retry_after_ms` > 0 only with `too_soon`)."""

    node_id: str
    outcome: HeartbeatOutcome
    retry_after_ms: int = 0


# ---------------------------------------------------------------------------------------------
# Client -> server


class _Op(Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    pass


class SubscribeOp(_Op, tag="subscribe"):
    channels: Channels


class UnsubscribeOp(_Op, tag="unsubscribe"):
    channels: Channels


class HeartbeatOp(_Op, tag="heartbeat"):
    """Heartbeats of the caller's nodes, applied together; answered by one `HeartbeatAck`."""

    beats: Annotated[list[Beat], Meta(min_length=1, max_length=MAX_BEATS_PER_MESSAGE)]
    ref: Ref = None


class PingOp(_Op, tag="ping"):
    """For clients that cannot see protocol pings (browsers)."""

    ref: Ref = None


ClientMessage = SubscribeOp | UnsubscribeOp | HeartbeatOp | PingOp


# ---------------------------------------------------------------------------------------------
# Errors (the same shape as every REST error's `error`)


class ErrorDetail(Struct, omit_defaults=True):
    """What went wrong: a stable machine-readable `code`, a `message` for people, and the
    offending input's `field` (a dotted path) when there is one."""

    code: str
    message: str
    field: str | None = None
    shortfall_usd: float | None = None
    """A 402 (`insufficient_funds`, `budget_exceeded`): what must come in (or what the budget
    lacks) for the request to pass, in USD, with its exact `shortfall_pusd` twin."""
    shortfall_pusd: int | None = None


class ErrorBody(Struct):
    """`{"error": {...}}`: the body of every REST error response."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# Public shapes shared by REST and the WebSocket


class _Public(Struct, kw_only=True):
    pass


class DepthLevel(_Public, kw_only=True):
    price_per_gb_sec: float
    gb: int
    price_pusd: int = 0


class BookOut(_Public, kw_only=True):
    """A region's top of book and recent trading (`GET /api/book/{region}`, `quotes:<region>`)."""

    region: str
    ts_ms: int
    best_ask_per_gb_sec: float | None
    best_bid_per_gb_sec: float | None
    last_fill_per_gb_sec: float | None
    ask_depth: list[DepthLevel]
    """GB offered at each price, cheapest first (at most 20 levels)."""
    bid_depth: list[DepthLevel]
    """GB wanted at each price, highest first (at most 20 levels)."""
    volume_24h_gb_sec: int
    """Sum over the last 24 h's fills of (ram_gb + vram_gb) x duration_sec."""
    best_ask_pusd: int | None = None
    best_bid_pusd: int | None = None
    last_fill_pusd: int | None = None


class ContractLive(_Public, kw_only=True):
    """Real-time view of an active contract (absent once it ended)."""

    elapsed_sec: int
    remaining_sec: int
    accrued_cost_usd: float
    node_status: Literal["active", "maintenance", "offline", "deactivated", "unknown"]
    node_last_heartbeat_ms: int
    accrued_cost_pusd: int = 0


class ContractOut(_Public, kw_only=True):
    """A contract (`GET /api/contracts/{id}`, `fills`, and inside the contract notices)."""

    contract_id: str
    client_id: str
    node_id: str
    region: str
    ram_gb: int
    vram_gb: int
    duration_sec: int
    start_ms: int
    end_ms: int
    price_per_gb_sec: float
    egress_price_per_gb: float
    max_price_per_gb_sec: float
    status: ContractStatus
    bid_id: str | None
    predecessor_id: str | None
    successor_id: str | None
    extensions: int
    used_sec: int
    egress_gb: float
    total_cost_usd: float
    """What was charged at settlement (0 before)."""
    settlement_hash: str | None
    completed_ms: int
    live: ContractLive | None = None
    price_pusd: int = 0
    egress_price_pusd: int = 0
    max_price_pusd: int = 0
    total_cost_pusd: int = 0
    delivered: bool = False
    """The node's agent delivers this lease (RAM over the Redis protocol: see
    `GET /api/contracts/{id}/access`); false: reserved, not delivered (VRAM, or a node whose
    agent does not deliver)."""
    lease_state: LeaseState | None = None
    """A delivered lease's state (None when not delivered)."""
    ready_ms: int = 0
    """When the node first reported the lease ready: a delivered lease is billed from here."""
    egress_bytes: int = 0
    """What the node measured its lease server sent (the egress billed at settlement)."""
    peak_memory_bytes: int = 0
    claimed_egress_gb: float | None = None
    """The renter's own `actual_egress_gb` at settle, recorded beside the measurement."""
    lease_digest: str | None = None
    """SHA-256 of the lease's data when its server closed (the node's report; in the
    settlement hash)."""


class BidOut(_Public, kw_only=True):
    """A limit bid (`GET /api/bids/{id}`, and inside `BidNotice`)."""

    bid_id: str
    client_id: str
    region: str
    ram_gb: int
    vram_gb: int
    duration_sec: int
    max_price_per_gb_sec: float
    client_lat: float | None
    client_lng: float | None
    max_distance_km: float | None
    min_uptime_score: float
    prefer_local: bool
    node_type: NodeType | None
    allow_split: bool
    min_fill_gb: int
    filled_ram_gb: int
    filled_vram_gb: int
    remaining_ram_gb: int
    remaining_vram_gb: int
    status: BidStatus
    created_ms: int
    expires_ms: int
    contract_ids: list[str]
    max_price_pusd: int = 0


class Trade(_Public, kw_only=True):
    """A contract made by a reserve, as the public tape shows it (`trades:<region>`); a
    failover's successor is not a trade."""

    contract_id: str
    node_id: str
    region: str
    ram_gb: int
    vram_gb: int
    duration_sec: int
    price_per_gb_sec: float
    price_pusd: int
    ts_ms: int


class MarketSummary(_Public, kw_only=True):
    """One region's supply (`market`): active nodes, the free capacity of its listed asks, the
    cheapest of them (None: nothing listed)."""

    region: str
    nodes: int
    available_ram_gb: int
    available_vram_gb: int
    best_ask_per_gb_sec: float | None
    best_ask_pusd: int | None


class BidNotice(_Public, kw_only=True):
    """A change to one of the caller's bids (`bids`): `bid` as it is after the change; with
    `bid_filled`, `contract` is the fill (it also goes to `fills`)."""

    notice: BidNoticeKind
    ts_ms: int
    bid: BidOut
    contract: ContractOut | None = None


class ContractNotice(_Public, kw_only=True, tag_field="event", tag="contract"):
    """A change to a contract (`contracts`, `node:<id>`): `contract` as it is after the change
    (see `ContractNoticeKind`). `event` is `contract` (it tells it from a `TrustNotice` on
    `node:<id>`)."""

    notice: ContractNoticeKind
    ts_ms: int
    contract: ContractOut


class LeaseEndpoint(_Public, kw_only=True):
    """Where a lease is served, without its secret (`leases`, `leases:<node_id>`)."""

    contract_id: str
    node_id: str
    kind: LeaseKind
    state: LeaseState
    host: str | None
    port: int | None
    tls: bool
    expires_ms: int
    ram_gb: int = 0


class LeaseAccess(_Public, kw_only=True):
    """`GET /api/contracts/{id}/access`, for the renter only: how to reach the rented memory.
    `url` (`redis://` or `rediss://`, credentials included) is set once `state` is `ready`.
    A VRAM lease is reserved, not delivered (`delivered` false, no endpoint)."""

    contract_id: str
    node_id: str
    kind: LeaseKind
    state: LeaseState
    delivered: bool
    url: str | None
    host: str | None
    port: int | None
    username: str | None
    password: str | None
    tls: bool
    expires_ms: int


class LeaseNotice(_Public, kw_only=True):
    """A change to a lease (see `LeaseNoticeKind`): `lease` as it is after the change."""

    notice: LeaseNoticeKind
    ts_ms: int
    lease: LeaseEndpoint


TrustNoticeKind = Literal["warned", "cleared", "suspended", "reinstated"]
"""`warned`: the node's uptime score fell below 60: it will be suspended from new leases at
`suspension_due_ms` unless the score is back at 60 by then; `cleared`: it was, the warning is
lifted; `suspended`: no new leases (running ones go on) until the score reaches 62;
`reinstated`: it did."""


class TrustNotice(_Public, kw_only=True, tag_field="event", tag="standing"):
    """A change of a node's standing (`node:<id>`, beside its `ContractNotice`s; `event` is
    `standing`), with its uptime after it."""

    notice: TrustNoticeKind
    ts_ms: int
    node_id: str
    uptime_score: float
    uptime_history_windows: int
    suspension_due_ms: int = 0
    suspended_since_ms: int = 0


PublicEvent = (
    BookOut
    | Trade
    | MarketSummary
    | ContractOut
    | BidNotice
    | ContractNotice
    | LeaseNotice
    | TrustNotice
)

NodeEvent = ContractNotice | TrustNotice
"""The events of `node:<id>`, told apart by their `event` field (`contract`, `standing`)."""

CHANNEL_EVENTS: Final[dict[str, Any]] = {
    "quotes": BookOut,
    "trades": Trade,
    "market": MarketSummary,
    "fills": ContractOut,
    "bids": BidNotice,
    "contracts": ContractNotice,
    "node": NodeEvent,
    "leases": LeaseNotice,
}
"""The event type of each kind of channel (the channel's name up to its `:`): one type, or
for `node` the union `NodeEvent`."""


# ---------------------------------------------------------------------------------------------
# Server -> client


class _Reply(Struct, tag_field="type", kw_only=True):
    pass


class Subscribed(_Reply, tag="subscribed"):
    """The channels now subscribed (in the order asked); their events follow this message."""

    channels: list[str]


class Unsubscribed(_Reply, tag="unsubscribed"):
    channels: list[str]


class HeartbeatAck(_Reply, tag="heartbeat_ack"):
    ref: Ref
    results: list[BeatResult]
    """One per beat, in the op's order."""


class Pong(_Reply, tag="pong"):
    ref: Ref


class ErrorReply(_Reply, tag="error", omit_defaults=True):
    """A message refused (the socket stays open): a malformed op, a channel refused (`channel`
    names it; codes `unknown_channel`, `forbidden`, `not_found`, `unavailable`), a subscribe past
    the socket's channel limit (`too_many_channels`, nothing of it subscribed), a heartbeat op
    that could not be applied (`ref` names it)."""

    error: ErrorDetail
    channel: str | None = None
    ref: Ref = None


class Event(_Reply, tag="event"):
    """One notification of a subscribed channel: `data` is the JSON of the channel's event
    type (`CHANNEL_EVENTS`; `decode_event(event.channel, event.data)`)."""

    channel: str
    data: Raw


class Batch(_Reply, tag="batch"):
    """Messages that were due together, in order, in one frame (sockets opened with
    `?batch=1` only)."""

    messages: list[Subscribed | Unsubscribed | HeartbeatAck | Pong | ErrorReply | Event]


ServerMessage = Subscribed | Unsubscribed | HeartbeatAck | Pong | ErrorReply | Event | Batch


# ---------------------------------------------------------------------------------------------
# Encoding and decoding (built once, reused)

encode = msgspec.json.Encoder().encode
"""JSON bytes of any message or shape here."""

_decode_client = msgspec.json.Decoder(ClientMessage).decode
_decode_server = msgspec.json.Decoder(ServerMessage).decode
_decode_events = {kind: msgspec.json.Decoder(t).decode for kind, t in CHANNEL_EVENTS.items()}


def decode_client_message(data: bytes | str) -> ClientMessage:
    """A client's message (raises `msgspec.DecodeError`, or its `ValidationError`)."""
    return _decode_client(data)


def decode_server_message(data: bytes | str) -> ServerMessage:
    """A server's message (raises `msgspec.DecodeError` for one it does not know)."""
    return _decode_server(data)


def decode_event(channel: str, data: bytes | Raw) -> PublicEvent:
    """The typed event of `channel` (raises `ValueError` for a kind of channel not in
    `CHANNEL_EVENTS`, `msgspec.DecodeError` for data that is not its event)."""
    decode = _decode_events.get(channel.partition(":")[0])
    if decode is None:
        raise ValueError(f"unknown channel {channel!r}")
    return decode(data)
