"""Wire schemas of the REST API: one msgspec Struct per request and response body.

Rules every Struct here follows:
- Requests forbid unknown fields and bound every quantity (sizes, prices, durations, coordinates,
  string lengths, list lengths), so absurd or hostile input is refused with a 422 naming the field
  before it reaches the market. Bounds are part of the generated OpenAPI schema, so clients and
  schemathesis see the same rules the server enforces. The market's bounds (`engine.core`) are
  the source: with them every derived amount, a contract's cost at the worst case of all of them
  included, fits a signed 64-bit integer with room to spare; the one rule a schema cannot say
  (a lease's value, size x duration x price cap, is at most 1,000,000 USD) is in the
  descriptions.
- Money is decimal USD on the wire, named as in the spec (`price_per_gb_sec`, `estimated_cost`,
  `total_cost_usd`), and every exact amount has its integer pico-USD twin (`price_pusd`,
  `estimated_cost_pusd`, `total_cost_pusd`): the unit convention of `gateway.protocol`, which
  REST and the WebSocket share. Inside, money is integer pico-USD (`engine.types.pusd`/`usd`);
  the converters at the bottom are the only place that crosses between the two.
- Units live in names: `_gb`, `_sec`, `_ms` (Unix milliseconds), `_km`, `_usd`, `_pusd`.
- Ids are opaque strings (uuid hex or uuid text).
- The shapes the WebSocket sends too (`ContractOut`, `BidOut`, `BookOut`, ...) and the heartbeat
  body (`Heartbeat`) live in `gateway.protocol`, which imports nothing of the exchange; the
  converters here build them from the market's types.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct

from engine import core, trust
from engine.types import PUSD_PER_USD, Bid, Contract, Node, NodeType, Quote, pusd, usd
from gateway.protocol import (
    BidOut,
    BookOut,
    ContractLive,
    ContractOut,
    DepthLevel,
    Gigabytes,
    Id,
    Latitude,
    LeaseEndpoint,
    LeaseState,
    Longitude,
    whole,
)

# ---------------------------------------------------------------------------------------------
# Bounded scalar types

MAX_GB = core.MAX_GB
"""Largest memory size accepted anywhere (64 TiB), in GB."""
MAX_DURATION_S = core.MAX_DURATION_S
"""Longest lease or bid lifetime accepted (30 days)."""
MAX_PRICE_USD_PER_GB_S = core.MAX_PRICE_PUSD / 1e12
"""No sane ask costs more than a dollar per GB-second; anything above is a unit mistake."""
MAX_EGRESS_PRICE_USD_PER_GB = core.MAX_EGRESS_PRICE_PUSD / 1e12
MAX_EGRESS_GB = core.MAX_EGRESS_MGB / 1000
MAX_LEASE_VALUE_USD = core.MAX_LEASE_VALUE_PUSD // 10**12
MAX_PAGE = 500
MAX_OFFSET = 1_000_000
EARTH_HALF_CIRCUMFERENCE_KM = 20_038.0

Region = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=50,
        pattern=whole("[a-z0-9][a-z0-9-]*"),
        description="Region slug, e.g. `us-east-2` (lowercase letters, digits, dashes).",
        examples=["us-east-2"],
    ),
]
DurationSec = Annotated[int, Meta(ge=1, le=MAX_DURATION_S)]
PriceUsd = Annotated[
    float,
    Meta(
        ge=1e-12,
        le=MAX_PRICE_USD_PER_GB_S,
        description="USD per GB-second (at least 1e-12, the smallest unit the market prices in).",
    ),
]
EgressPrice = Annotated[
    float, Meta(ge=0.0, le=MAX_EGRESS_PRICE_USD_PER_GB, description="USD per GB of egress.")
]
UptimeScore = Annotated[float, Meta(ge=0.0, le=100.0)]
DistanceKm = Annotated[float, Meta(gt=0.0, le=EARTH_HALF_CIRCUMFERENCE_KM)]
_PRINTABLE = whole(r"[^\x00-\x1f\x7f]+")
"""No control characters (NUL in particular, which Postgres text and jsonb refuse)."""
Name = Annotated[str, Meta(min_length=1, max_length=255, pattern=_PRINTABLE)]
Email = Annotated[
    str,
    Meta(
        min_length=3,
        max_length=254,
        pattern=whole(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+"),
        examples=["ada@example.com"],
    ),
]
Password = Annotated[str, Meta(min_length=8, max_length=256)]
Offset = Annotated[int, Meta(ge=0, le=MAX_OFFSET)]
Limit = Annotated[int, Meta(ge=1, le=MAX_PAGE)]
MetaKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=_PRINTABLE)]
MetaValue = (
    Annotated[str, Meta(max_length=256, pattern=whole(r"[^\x00-\x1f\x7f]*"))]
    | Annotated[int, Meta(ge=-(2**53), le=2**53)]
    | Annotated[float, Meta(ge=-1e15, le=1e15)]
    | bool
    | None
)
Metadata = Annotated[dict[MetaKey, MetaValue], Meta(max_length=32)]
NodeStatusFilter = Literal["active", "maintenance", "offline", "deactivated"]
ContractStatusFilter = Literal["active", "completed", "failed", "failed_over"]
BidStatusFilter = Literal["open", "filled", "cancelled", "expired"]


class _Request(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies and query strings: unknown fields are an error. A body's
    `json_schema_rules` are JSON Schema keywords its OpenAPI component gets besides its fields'
    (rules of two fields together, which the handler enforces)."""

    json_schema_rules: ClassVar[dict[str, Any]] = {}


def _together(a: str, b: str) -> dict[str, Any]:
    """`a` and `b` (nullable numbers) are given both or neither: both numbers, or each absent or
    null."""
    both = {"properties": {a: {"type": "number"}, b: {"type": "number"}}, "required": [a, b]}
    neither = {"properties": {a: {"type": "null"}, b: {"type": "null"}}}
    return {"anyOf": [both, neither]}


class _Response(Struct, kw_only=True):
    """Base of response bodies."""


# ---------------------------------------------------------------------------------------------
# Accounts


class SignupRequest(_Request, kw_only=True):
    email: Email
    password: Password
    full_name: Name | None = None
    organization: Name | None = None
    role: Literal["user", "provider"] = "user"
    """`user` rents memory (a renter or a bot); `provider` lends it. Admins are made by operators."""


class UserOut(_Response, kw_only=True):
    id: str
    email: str
    role: Literal["user", "provider", "admin"]
    full_name: str | None
    organization: str | None
    created_at: dt.datetime


class ApiKeyCreateRequest(_Request, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=_PRINTABLE)] | None = None


class ApiKeyCreated(_Response, kw_only=True):
    """A new API key. `key` is shown once and never again (the server keeps only its SHA-256);
    a replayed idempotent request returns `key: null`."""

    id: str
    prefix: str
    name: str | None
    key: str | None
    created_at: dt.datetime


class ApiKeyOut(_Response, kw_only=True):
    id: str
    prefix: str
    name: str | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class ApiKeyList(_Response, kw_only=True):
    api_keys: list[ApiKeyOut]


class SignupResponse(_Response, kw_only=True):
    user: UserOut
    api_key: ApiKeyCreated


class TokenRequest(_Request, kw_only=True):
    email: Email
    password: Password


class TokenResponse(_Response, kw_only=True):
    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    """Seconds until the token expires."""


class MeResponse(_Response, kw_only=True):
    user: UserOut
    via: Literal["jwt", "api_key", "session"]


class ClientCreateRequest(_Request, kw_only=True):
    """The renter profile of the spec's `clients` table. Latitude and longitude come together."""

    json_schema_rules: ClassVar[dict[str, Any]] = _together("latitude", "longitude")

    org_name: Name
    default_region: Region | None = None
    latitude: Latitude | None = None
    longitude: Longitude | None = None
    budget_monthly_usd: Annotated[float, Meta(ge=0.0, le=99_999_999.0)] | None = None
    """USD per month (the column is DECIMAL(10,2))."""
    prefer_local: bool = True
    max_latency_ms: Annotated[float, Meta(gt=0.0, le=60_000.0)] | None = None
    min_reliability: UptimeScore | None = None


class ClientOut(_Response, kw_only=True):
    id: str
    user_id: str
    org_name: str
    default_region: str | None
    latitude: float | None
    longitude: float | None
    budget_monthly_usd: float | None
    current_spend_usd: float
    prefer_local: bool
    max_latency_ms: float | None
    min_reliability: float | None
    created_at: dt.datetime
    current_spend_pusd: int = 0


class ClientList(_Response, kw_only=True):
    clients: list[ClientOut]


# ---------------------------------------------------------------------------------------------
# Nodes


NodeName = Annotated[str, Meta(min_length=1, max_length=200, pattern=_PRINTABLE)]


class NodeRegisterRequest(_Request, kw_only=True):
    """The spec's registration body, plus optional terms (`max_*_gb`: how much of the machine the
    provider lends; by default all of it). `total_ram_gb + total_vram_gb` must be positive and
    `min_duration_sec` at most `max_duration_sec`."""

    node_type: NodeType
    name: NodeName
    region: Region
    latitude: Latitude
    longitude: Longitude
    total_ram_gb: Gigabytes
    total_vram_gb: Gigabytes
    bandwidth_mbps: Annotated[int, Meta(ge=1, le=10_000_000)] = 1000
    base_latency_ms: Annotated[float, Meta(ge=0.0, le=60_000.0)] = 1.0
    price_per_gb_sec: PriceUsd
    egress_price_per_gb: EgressPrice = 0.0
    max_ram_gb: Gigabytes | None = None
    max_vram_gb: Gigabytes | None = None
    min_duration_sec: DurationSec = 60
    max_duration_sec: DurationSec = 86_400
    metadata: Metadata = {}
    delivers: bool = False
    """The node's agent delivers its RAM leases (a Valkey server per lease, ready and closed
    reports, meters in heartbeats): its RAM contracts bill from the ready report. Leave it
    false for an agent that does not (the spec's `node_agent.py`): its leases are reserved,
    not delivered, and bill from the reserve."""


MAX_REGISTER_BATCH = 1000
"""Most nodes in one `POST /api/nodes/register/batch`."""
MAX_REGISTER_BATCH_BYTES = 4 * 1024 * 1024
"""Largest body of a batch registration (about 350 bytes a typical node; big metadata on every
node of a full batch does not fit: send smaller batches)."""


class NodeBatchRegisterRequest(_Request, kw_only=True):
    """Several nodes of the caller at once, each the body of `POST /api/nodes/register`."""

    nodes: Annotated[list[NodeRegisterRequest], Meta(min_length=1, max_length=MAX_REGISTER_BATCH)]


class NodeUpdateRequest(_Request, kw_only=True):
    """Fields to change; absent fields stay as they are. `latitude` and `longitude` change
    together; `min_duration_sec` stays at most `max_duration_sec`."""

    json_schema_rules: ClassVar[dict[str, Any]] = _together("latitude", "longitude")

    name: NodeName | None = None
    price_per_gb_sec: PriceUsd | None = None
    egress_price_per_gb: EgressPrice | None = None
    min_duration_sec: DurationSec | None = None
    max_duration_sec: DurationSec | None = None
    bandwidth_mbps: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    base_latency_ms: Annotated[float, Meta(ge=0.0, le=60_000.0)] | None = None
    ask_expires_ms: Annotated[int, Meta(ge=0, le=core.MAX_TIME_MS)] | None = None
    """Unix ms after which the node offers nothing new; 0: never."""
    status: Literal["active", "maintenance"] | None = None
    latitude: Latitude | None = None
    longitude: Longitude | None = None
    metadata: Metadata | None = None
    delivers: bool | None = None
    """Whether the node's agent delivers its RAM leases (see registration); contracts already
    made keep what they were."""


class NodeEarnings(_Response, kw_only=True):
    """What the node has earned: settled contracts (history, from the journal) plus what its
    active contracts have accrued so far."""

    total_earned_usd: float
    settled_contracts: int
    active_contracts: int
    accrued_active_usd: float
    total_earned_pusd: int = 0
    accrued_active_pusd: int = 0


class NodeOut(_Response, kw_only=True):
    node_id: str
    owner_id: str | None
    """Shown to the node's owner and admins only."""
    node_type: NodeType
    name: str
    region: str
    latitude: float
    longitude: float
    total_ram_gb: int
    total_vram_gb: int
    offered_ram_gb: int
    offered_vram_gb: int
    reserved_ram_gb: int
    reserved_vram_gb: int
    available_ram_gb: int
    available_vram_gb: int
    bandwidth_mbps: int
    base_latency_ms: float
    uptime_score: float
    reputation_score: int
    price_per_gb_sec: float
    egress_price_per_gb: float
    min_duration_sec: int
    max_duration_sec: int
    status: Literal["active", "maintenance", "offline", "deactivated"]
    ask_expires_ms: int
    heartbeat_interval_sec: float
    last_heartbeat_ms: int
    created_ms: int
    metadata: dict[str, str]
    price_pusd: int = 0
    egress_price_pusd: int = 0
    uptime_new: bool = False
    """Fewer than 7 days of measured history: `uptime_score` is 90 blended with what was
    measured so far, in proportion to `uptime_history_windows` out of 168."""
    uptime_history_windows: int = 0
    """Hours (uptime windows) of the last 30 days that count in `uptime_score`."""
    suspended: bool = False
    """Suspended from new leases (its score stayed below 60 past the grace); running leases go
    on. Reinstated once the score is back at 62."""
    suspended_since_ms: int = 0
    suspension_due_ms: int = 0
    """Warned: suspended at this instant unless the score is back at 60 by then (0: no warning)."""
    maintenance_start_ms: int = 0
    maintenance_end_ms: int = 0
    """The announced maintenance window (0: none): not counted as downtime."""
    delivered_contracts: int = 0
    """Contracts served to their end (or settled by the renter)."""
    cut_contracts: int = 0
    """Contracts cut short by the node (failed, or failed over to another node)."""
    stake_usd: float = 0.0
    stake_pusd: int = 0
    """The stake locked for the node: it covers the leases it may take (10 % of their value
    beyond 10 USD) and pays renters' SLA credits."""
    stake_held_usd: float = 0.0
    stake_held_pusd: int = 0
    """The part of the stake held back from the provider's earnings."""
    delivers: bool = False
    """The node's agent delivers its RAM leases (`GET /api/contracts/{id}/access`)."""


class NodeDetail(NodeOut, kw_only=True):
    earnings: NodeEarnings | None
    """The owner's (and admins') view only; null for everyone else."""
    stake_required_usd: float = 0.0
    stake_required_pusd: int = 0
    """The stake its active leases require now: what a release must leave (a new lease
    raises it)."""


class NodeRegistered(_Response, kw_only=True):
    node_id: str
    node: NodeOut


class NodeBatchRegistered(_Response, kw_only=True):
    node_ids: list[str]
    """The registered nodes' ids, in the order of the request's `nodes`."""


class NodeList(_Response, kw_only=True):
    nodes: list[NodeOut]
    total_count: int
    offset: int
    limit: int


class NodeListQuery(_Request, kw_only=True):
    node_type: NodeType | None = None
    region: Region | None = None
    status: NodeStatusFilter | None = None
    min_ram: Gigabytes | None = None
    """At least this much free RAM (GB), as in the spec's `?min_ram=32`."""
    min_vram: Gigabytes | None = None
    mine: bool = False
    """Only the caller's own nodes."""
    offset: Offset = 0
    limit: Limit = 50


class StakeRequest(_Request, kw_only=True):
    """`POST /api/nodes/{id}/stake`: lock `amount_usd` of the provider's earnings (not yet paid
    out) as the node's stake; `/stake/release`: release that much of it to the earnings. A
    lock applies once per `lock_id` (repeat a lock that failed half-way with the same one)."""

    amount_usd: Annotated[
        float,
        Meta(ge=1e-12, le=MAX_MOVEMENT_USD, description="USD (at least 1e-12: one pico-USD)."),
    ]
    lock_id: Id | None = None


class MaintenanceRequest(_Request, kw_only=True):
    """`POST /api/nodes/{id}/maintenance`: the node will be down for maintenance from `start_ms`
    to `end_ms` (Unix ms). Announced 1 h to 90 days ahead, at most 4 h long, at most one window
    starting per 7 days; a pending window is replaced. That time is not counted as downtime."""

    start_ms: Annotated[int, Meta(ge=0, le=core.MAX_TIME_MS)]
    end_ms: Annotated[int, Meta(ge=0, le=core.MAX_TIME_MS)]


class ScoredWindowOut(_Response, kw_only=True):
    window_start_ms: int
    """The window is the hour from here."""
    up_pct: int | None
    """Its up share in whole percent (null: not counted, e.g. announced maintenance)."""
    uptime_score: float
    """The node's 30-day score once this window closed."""
    notice: Literal["warned", "cleared", "suspended", "reinstated"] | None
    """A change of standing decided as it closed."""


class ScoresQuery(_Request, kw_only=True):
    start: dt.datetime | None = None
    """RFC 3339 (without an offset: UTC); default: 30 days before `end`."""
    end: dt.datetime | None = None
    """RFC 3339; default: now."""


class NodeScores(_Response, kw_only=True):
    """`GET /api/nodes/{id}/scores`: the node's uptime, hour by hour, from the journal (it
    trails the live market by its lag), and its standing now."""

    node_id: str
    start: dt.datetime
    end: dt.datetime
    windows: list[ScoredWindowOut]
    uptime_score: float
    uptime_new: bool
    uptime_history_windows: int
    reputation_score: int
    suspended: bool
    suspension_due_ms: int


class HeartbeatResponse(_Response, kw_only=True):
    status: Literal["ok"]
    node_id: str
    node_status: Literal["active", "maintenance", "offline", "deactivated"]
    offered_ram_gb: int
    offered_vram_gb: int
    reserved_ram_gb: int
    reserved_vram_gb: int
    available_ram_gb: int
    available_vram_gb: int
    next_heartbeat_in_sec: float
    min_interval_sec: float


# ---------------------------------------------------------------------------------------------
# Marketplace


class MarketplaceQuery(_Request, kw_only=True):
    """The spec's browse filters, plus pagination."""

    node_type: NodeType | None = None
    region: Region | None = None
    min_ram_gb: Gigabytes | None = None
    min_vram_gb: Gigabytes | None = None
    max_price_per_gb_sec: PriceUsd | None = None
    min_uptime_score: UptimeScore | None = None
    client_lat: (
        Annotated[Latitude, Meta(description="Degrees north; give with `client_lng`.")] | None
    ) = None
    client_lng: (
        Annotated[Longitude, Meta(description="Degrees east; give with `client_lat`.")] | None
    ) = None
    max_distance_km: (
        Annotated[DistanceKm, Meta(description="Needs `client_lat` and `client_lng`.")] | None
    ) = None
    offset: Offset = 0
    limit: Limit = 50


class OfferOut(_Response, kw_only=True):
    node_id: str
    node_name: str
    node_type: NodeType
    region: str
    available_ram_gb: int
    available_vram_gb: int
    price_per_gb_sec: float
    uptime_score: float
    distance_km: float | None
    estimated_latency_ms: float
    price_pusd: int = 0
    uptime_new: bool = False
    """Fewer than 7 days of measured history (see `GET /api/nodes/{id}`)."""
    reputation_score: int = 100
    stake_usd: float = 0.0
    stake_pusd: int = 0
    """The stake locked for the node (see `GET /api/nodes/{id}`): it pays renters' SLA
    credits when the node cuts a lease short."""
    stake_held_usd: float = 0.0
    stake_held_pusd: int = 0
    """The part of the stake held back from the provider's earnings."""


class MarketplaceResponse(_Response, kw_only=True):
    offers: list[OfferOut]
    total_count: int
    offset: int
    limit: int


class MatchRequest(_Request, kw_only=True):
    """The spec's request body. The client's location comes from `client_lat`/`client_lng`
    (given together), else from the profile named by `client_id`, else from the caller's first
    client profile. `ram_gb + vram_gb` must be positive."""

    json_schema_rules: ClassVar[dict[str, Any]] = _together("client_lat", "client_lng")

    ram_gb: Gigabytes
    vram_gb: Gigabytes
    duration_sec: DurationSec = 3600
    max_price_per_gb_sec: PriceUsd
    prefer_local: bool = True
    max_distance_km: DistanceKm | None = None
    min_uptime_score: UptimeScore | None = None
    """Only nodes whose measured uptime score is at least this; unset: the client profile's
    `min_reliability` (the profile named by `client_id`, else the caller's first), else 0."""
    node_type: NodeType | None = None
    region: Region | None = None
    client_id: Id | None = None
    client_lat: Latitude | None = None
    client_lng: Longitude | None = None
    limit: Annotated[int, Meta(ge=1, le=100)] = 10
    max_latency_ms: Annotated[float, Meta(gt=0.0, le=60_000.0)] | None = None
    """Only nodes whose `base_latency_ms` is at most this; unset: the client profile's
    `max_latency_ms`, else any."""


class ScoreBreakdown(_Response, kw_only=True):
    proximity: float
    price: float
    reliability: float
    capacity: float
    type_bonus: float


class MatchOut(_Response, kw_only=True):
    node_id: str
    node_name: str
    node_type: NodeType
    region: str
    match_score: float
    proximity_score: float
    price_score: float
    reliability_score: float
    capacity_score: float
    score_breakdown: ScoreBreakdown
    distance_km: float | None
    estimated_cost: float
    """USD for the whole duration at the node's current price."""
    estimated_latency_ms: float
    price_per_gb_sec: float
    available_ram_gb: int
    available_vram_gb: int
    uptime_score: float
    estimated_cost_pusd: int = 0
    price_pusd: int = 0
    uptime_new: bool = False
    """Fewer than 7 days of measured history (see `GET /api/nodes/{id}`)."""
    reputation_score: int = 100


class MatchResponse(_Response, kw_only=True):
    request_id: str
    location_source: Literal["body", "client_profile", "none"]
    matches: list[MatchOut]


# ---------------------------------------------------------------------------------------------
# Contracts


class ContractCreateRequest(_Request, kw_only=True):
    """Take capacity on one node. `max_price_per_gb_sec` caps the price; by default the node's
    price as the request arrives (so a concurrent price rise refuses instead of overcharging).
    `ram_gb + vram_gb` must be positive. A lease may be worth at most 1,000,000 USD,
    (ram_gb + vram_gb) x duration_sec x the price cap: above, 422 naming `duration_sec`."""

    client_id: Id
    node_id: Id
    ram_gb: Gigabytes
    vram_gb: Gigabytes
    duration_sec: DurationSec = 3600
    max_price_per_gb_sec: PriceUsd | None = None


class ContractExtendRequest(_Request, kw_only=True):
    """The total duration stays within the node's `max_duration_sec` (422 `outside_node_terms`)
    and the lease's value within 1,000,000 USD (422): both name `additional_duration_sec`."""

    additional_duration_sec: DurationSec


class ContractSettleRequest(_Request, kw_only=True):
    """Egress is billed at the node's egress price; one contract may bill at most
    1,000,000 USD of egress (else 422 naming `actual_egress_gb`). A delivered lease bills the
    egress its node measured instead: `actual_egress_gb` is then recorded beside it
    (`claimed_egress_gb`), never billed."""

    actual_egress_gb: Annotated[float, Meta(ge=0.0, le=MAX_EGRESS_GB)] | None = None


class ContractList(_Response, kw_only=True):
    contracts: list[ContractOut]
    total_count: int
    offset: int
    limit: int


class ContractListQuery(_Request, kw_only=True):
    client_id: Id | None = None
    node_id: Id | None = None
    status: ContractStatusFilter | None = None
    offset: Offset = 0
    limit: Limit = 50


# ---------------------------------------------------------------------------------------------
# Bids and the book


class BidCreateRequest(_Request, kw_only=True):
    """A limit bid that rests in `region`'s book until it fills, is cancelled or expires.
    Location: `client_lat`/`client_lng`, else the client profile's. `ram_gb + vram_gb` must be
    positive and at least `min_fill_gb`. A bid may be worth at most 1,000,000 USD,
    (ram_gb + vram_gb) x duration_sec x max_price_per_gb_sec: above, 422 naming
    `duration_sec`."""

    json_schema_rules: ClassVar[dict[str, Any]] = _together("client_lat", "client_lng")

    client_id: Id
    region: Region
    ram_gb: Gigabytes
    vram_gb: Gigabytes
    duration_sec: DurationSec = 3600
    max_price_per_gb_sec: PriceUsd
    client_lat: Latitude | None = None
    client_lng: Longitude | None = None
    max_distance_km: DistanceKm | None = None
    min_uptime_score: UptimeScore = 0.0
    prefer_local: bool = True
    node_type: NodeType | None = None
    allow_split: bool = False
    min_fill_gb: Gigabytes = 0
    expires_in_sec: Annotated[int, Meta(ge=0, le=MAX_DURATION_S)] = 0
    """0: good till cancelled."""


class BidList(_Response, kw_only=True):
    bids: list[BidOut]
    total_count: int
    offset: int
    limit: int


class BidListQuery(_Request, kw_only=True):
    region: Region | None = None
    client_id: Id | None = None
    status: BidStatusFilter | None = None
    offset: Offset = 0
    limit: Limit = 50


# ---------------------------------------------------------------------------------------------
# Health


class HealthOut(_Response, kw_only=True):
    status: Literal["ok"]


class ReadyOut(_Response, kw_only=True):
    status: Literal["ready", "unavailable"]
    redis: bool
    postgres: bool


# ---------------------------------------------------------------------------------------------
# Converters between the market's exact integers and the wire's USD floats


# ---------------------------------------------------------------------------------------------
# Money (issue 14): balances, operators' credits and clawbacks, credit lines

MAX_MOVEMENT_USD = 1_000_000
"""The most one credit or clawback may move (`engine.market.MAX_MOVEMENT_PUSD`)."""
AmountUsd = Annotated[float, Meta(gt=0.0, le=MAX_MOVEMENT_USD, description="USD.")]
AmountPusd = Annotated[int, Meta(ge=1, le=MAX_MOVEMENT_USD * PUSD_PER_USD)]
Reason = Annotated[str, Meta(min_length=1, max_length=1000, pattern=_PRINTABLE)]
OpKey = Annotated[str, Meta(min_length=1, max_length=200, pattern=_PRINTABLE)]


class CreditRequest(_Request, kw_only=True):
    """An operator's credit (or clawback) of a renter's balance: `amount_usd` or its exact
    `amount_pusd` twin (one of them), a `reason` kept in the ledger, and a `key` that makes it
    happen once (the same key again changes nothing and answers `applied: false`). A clawback
    takes the money back from the funding wallet after moving the renter's idle money there
    from the regions; with `allow_negative` it may leave a debt, else a shortfall is 402."""

    json_schema_rules: ClassVar[dict[str, Any]] = {
        "oneOf": [{"required": ["amount_usd"]}, {"required": ["amount_pusd"]}]
    }

    amount_usd: AmountUsd | None = None
    amount_pusd: AmountPusd | None = None
    reason: Reason
    key: OpKey
    allow_negative: bool = False


class CreditOut(_Response, kw_only=True):
    client_id: str
    applied: bool
    """False: the key was used before; nothing changed."""
    balance_usd: float
    balance_pusd: int
    """The renter's funding balance now."""
    event_id: str
    """The market event that applied the key (now or the first time)."""


class CreditLineRequest(_Request, kw_only=True):
    """The postpaid limit (invoice terms) an operator grants: the renter's balance may go this
    far below zero. 0 withdraws it (a balance already below zero stays a debt)."""

    json_schema_rules: ClassVar[dict[str, Any]] = {
        "oneOf": [{"required": ["credit_line_usd"]}, {"required": ["credit_line_pusd"]}]
    }

    credit_line_usd: Annotated[float, Meta(ge=0.0, le=MAX_MOVEMENT_USD)] | None = None
    credit_line_pusd: Annotated[int, Meta(ge=0, le=MAX_MOVEMENT_USD * PUSD_PER_USD)] | None = None


class RegionBalance(_Response, kw_only=True):
    region: str
    available_usd: float
    available_pusd: int
    held_usd: float
    held_pusd: int


class BalanceOut(_Response, kw_only=True):
    """A renter's money: one balance (the funding wallet and every region's together), what is
    held for open contracts and bids, the credit line, and this month's spend (captured +
    held) against the monthly budget."""

    client_id: str
    available_usd: float
    available_pusd: int
    """Spendable now: the funding wallet plus every region's available money (negative: a
    debt, or credit-line use)."""
    held_usd: float
    held_pusd: int
    funding_usd: float
    funding_pusd: int
    regions: list[RegionBalance]
    in_transit_pusd: int
    """Money between two wallets (a transfer not yet received: the repair loop finishes it)."""
    credit_line_usd: float
    credit_line_pusd: int
    budget_monthly_usd: float | None
    month: str
    month_spend_usd: float
    month_spend_pusd: int


class BalanceList(_Response, kw_only=True):
    balances: list[BalanceOut]


def to_pusd(amount_usd: float) -> int:
    """USD (as sent) to integer pico-USD."""
    return pusd(amount_usd)


_EXACT = 2**53


def to_usd(amount_pusd: int) -> float:
    """Integer pico-USD to USD for the wire (the double nearest the exact decimal amount)."""
    if -_EXACT < amount_pusd < _EXACT:
        # Both operands are exact doubles and IEEE division rounds correctly, so this is the
        # same double as float(Decimal): the nearest to amount / 10**12, without the Decimal.
        return amount_pusd / 1e12
    return float(usd(amount_pusd))


_PUSD_PER_USD = Decimal(PUSD_PER_USD)


def decimal_to_usd(amount_pusd: Decimal) -> float:
    """A fraction of a pico-USD (a mean: an average price, a VWAP) to USD for the wire, rounded
    once from the exact quotient (to 28 digits) to the nearest double."""
    return float(amount_pusd / _PUSD_PER_USD)


def metadata_to_market(metadata: dict[str, Any]) -> dict[str, str]:
    """The node's free-form metadata as the market stores it: strings, nulls dropped."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def node_out(node: Node, *, show_owner: bool) -> NodeOut:
    return NodeOut(**_node_fields(node, show_owner=show_owner))


def node_detail(node: Node, *, show_owner: bool, earnings: NodeEarnings | None) -> NodeDetail:
    required = trust.required_stake(node.lease_value_pusd)
    return NodeDetail(
        **_node_fields(node, show_owner=show_owner),
        earnings=earnings,
        stake_required_usd=to_usd(required),
        stake_required_pusd=required,
    )


def _node_fields(node: Node, *, show_owner: bool) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "owner_id": node.owner_id if show_owner else None,
        "node_type": node.node_type,
        "name": node.name,
        "region": node.region,
        "latitude": node.lat,
        "longitude": node.lng,
        "total_ram_gb": node.total_ram_gb,
        "total_vram_gb": node.total_vram_gb,
        "offered_ram_gb": node.offered_ram_gb,
        "offered_vram_gb": node.offered_vram_gb,
        "reserved_ram_gb": node.reserved_ram_gb,
        "reserved_vram_gb": node.reserved_vram_gb,
        "available_ram_gb": max(0, node.available_ram_gb),
        "available_vram_gb": max(0, node.available_vram_gb),
        "bandwidth_mbps": node.bandwidth_mbps,
        "base_latency_ms": node.base_latency_ms,
        "uptime_score": node.uptime_score,
        "reputation_score": node.reputation_score,
        "price_per_gb_sec": to_usd(node.price_pusd),
        "egress_price_per_gb": to_usd(node.egress_price_pusd),
        "min_duration_sec": node.min_duration_s,
        "max_duration_sec": node.max_duration_s,
        "status": node.status,
        "ask_expires_ms": node.ask_expires_ms,
        "heartbeat_interval_sec": node.heartbeat_interval_s,
        "last_heartbeat_ms": node.last_heartbeat_ms,
        "created_ms": node.created_ms,
        "metadata": dict(node.metadata),
        "price_pusd": node.price_pusd,
        "egress_price_pusd": node.egress_price_pusd,
        "uptime_new": node.uptime_new,
        "uptime_history_windows": node.uptime_windows,
        "suspended": node.suspended_ms != 0,
        "suspended_since_ms": node.suspended_ms,
        "suspension_due_ms": node.suspend_at_ms,
        "maintenance_start_ms": node.maint_start_ms,
        "maintenance_end_ms": node.maint_end_ms,
        "delivered_contracts": node.delivered_contracts,
        "cut_contracts": node.cut_contracts,
        "stake_usd": to_usd(node.stake_pusd),
        "stake_pusd": node.stake_pusd,
        "stake_held_usd": to_usd(node.stake_held_pusd),
        "stake_held_pusd": node.stake_held_pusd,
        "delivers": node.delivers,
    }


def contract_out(contract: Contract, *, live: ContractLive | None = None) -> ContractOut:
    return ContractOut(
        contract_id=contract.contract_id,
        client_id=contract.client_id,
        node_id=contract.node_id,
        region=contract.region,
        ram_gb=contract.ram_gb,
        vram_gb=contract.vram_gb,
        duration_sec=contract.duration_s,
        start_ms=contract.start_ms,
        end_ms=contract.end_ms,
        price_per_gb_sec=to_usd(contract.price_pusd),
        egress_price_per_gb=to_usd(contract.egress_price_pusd),
        max_price_per_gb_sec=to_usd(contract.max_price_pusd),
        status=contract.status,
        bid_id=contract.bid_id,
        predecessor_id=contract.predecessor_id,
        successor_id=contract.successor_id,
        extensions=contract.extensions,
        used_sec=contract.used_s,
        egress_gb=contract.egress_mgb / 1000,
        total_cost_usd=to_usd(contract.cost_pusd),
        settlement_hash=contract.settlement_hash,
        completed_ms=contract.completed_ms,
        live=live,
        price_pusd=contract.price_pusd,
        egress_price_pusd=contract.egress_price_pusd,
        max_price_pusd=contract.max_price_pusd,
        total_cost_pusd=contract.cost_pusd,
        delivered=contract.lease_state != "none",
        lease_state=public_lease_state(contract.lease_state),
        ready_ms=contract.ready_ms,
        egress_bytes=contract.egress_bytes,
        peak_memory_bytes=contract.peak_memory_bytes,
        claimed_egress_gb=None
        if contract.claimed_egress_mgb is None
        else contract.claimed_egress_mgb / 1000,
        lease_digest=contract.lease_digest,
    )


_PUBLIC_LEASE_STATES: dict[str, LeaseState | None] = {
    "none": None,
    "pending": "pending",
    "ready": "ready",
    "closing": "closed",
    "closed": "closed",
    "failed": "failed",
}


def public_lease_state(state: str) -> LeaseState | None:
    """A lease's state as the API names it (`closing`, the close ordered, is `closed`: the
    node is stopping the server); None: not delivered."""
    return _PUBLIC_LEASE_STATES[state]


def lease_endpoint(contract: Contract) -> LeaseEndpoint:
    """Where a lease is served, without its secret (`leases` notices, the agent's lease list).
    A lease that is not delivered has no endpoint, and its state follows the contract."""
    state = public_lease_state(contract.lease_state)
    if state is None:
        state = _RESERVATION_STATES[contract.status]
    ready = contract.lease_state == "ready"
    return LeaseEndpoint(
        contract_id=contract.contract_id,
        node_id=contract.node_id,
        kind="ram" if contract.ram_gb > 0 else "vram",
        state=state,
        host=contract.lease_host if ready else None,
        port=contract.lease_port if ready else None,
        tls=contract.lease_tls,
        expires_ms=contract.end_ms,
        ram_gb=contract.ram_gb,
    )


_RESERVATION_STATES: dict[str, LeaseState] = {
    "active": "ready",
    "completed": "closed",
    "failed": "failed",
    "failed_over": "failed",
}


def bid_out(bid: Bid) -> BidOut:
    return BidOut(
        bid_id=bid.bid_id,
        client_id=bid.client_id,
        region=bid.region,
        ram_gb=bid.ram_gb,
        vram_gb=bid.vram_gb,
        duration_sec=bid.duration_s,
        max_price_per_gb_sec=to_usd(bid.max_price_pusd),
        client_lat=bid.lat,
        client_lng=bid.lng,
        max_distance_km=bid.max_distance_km,
        min_uptime_score=bid.min_uptime_score,
        prefer_local=bid.prefer_local,
        node_type=bid.node_type,
        allow_split=bid.allow_split,
        min_fill_gb=bid.min_fill_gb,
        filled_ram_gb=bid.filled_ram_gb,
        filled_vram_gb=bid.filled_vram_gb,
        remaining_ram_gb=bid.remaining_ram_gb,
        remaining_vram_gb=bid.remaining_vram_gb,
        status=bid.status,
        created_ms=bid.created_ms,
        expires_ms=bid.expires_ms,
        contract_ids=list(bid.contract_ids),
        max_price_pusd=bid.max_price_pusd,
    )


def book_out(quote: Quote) -> BookOut:
    def price(p: int | None) -> float | None:
        return None if p is None else to_usd(p)

    return BookOut(
        region=quote.region,
        ts_ms=quote.ts_ms,
        best_ask_per_gb_sec=price(quote.best_ask_pusd),
        best_bid_per_gb_sec=price(quote.best_bid_pusd),
        last_fill_per_gb_sec=price(quote.last_fill_pusd),
        ask_depth=[depth_level(p, gb) for p, gb in quote.ask_depth],
        bid_depth=[depth_level(p, gb) for p, gb in quote.bid_depth],
        volume_24h_gb_sec=quote.volume_24h_gb_s,
        best_ask_pusd=quote.best_ask_pusd,
        best_bid_pusd=quote.best_bid_pusd,
        last_fill_pusd=quote.last_fill_pusd,
    )


def depth_level(price_pusd: int, gb: int) -> DepthLevel:
    return DepthLevel(price_per_gb_sec=to_usd(price_pusd), gb=gb, price_pusd=price_pusd)


JSON_ENCODER = msgspec.json.Encoder()
"""Encoder for every response body (built once, reused)."""
