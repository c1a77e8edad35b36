"""Domain types and events of the live market.

Units live in names: `_gb` gigabytes (integers), `_ms` Unix milliseconds, `_s` seconds,
`_km` kilometres. Money is exact: prices and amounts are integers of pico-US-dollars
(`_pusd`, 1e-12 USD); `price_pusd` is pico-USD per GB-second, `egress_price_pusd` pico-USD per
GB of egress. The API converts to decimal USD at its edge (`usd()`, `pusd()`).

Events are frozen, tagged by `type`, and carry the id the Lua script assigned (`"<region>:<seq>"`,
strictly increasing per region) and the time the change took effect. They are the only thing that
crosses from the live market to Postgres, so they follow msgspec's schema-evolution rules: new
fields get defaults; a field's type never changes.

Capacity accounting (the one definition every package follows):
- `offered_*_gb` is what the provider lends to Mnemo *in total, leases included*. A heartbeat's
  `available_*_gb` is "memory I could lend to Mnemo right now, not counting what Mnemo already
  leases from me" and the engine stores `offered = min(total, available + reserved)`.
- `reserved_*_gb` is the sum over the node's active contracts.
- `available_*_gb = offered - reserved`, never negative: a heartbeat can shrink what is free for
  new leases down to zero but cannot revoke a lease.
So `reserved + available == offered <= total` for every node at every moment.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal

import msgspec

NodeType = Literal["datacenter", "edge_cluster", "mist_node"]
NodeStatus = Literal["active", "maintenance", "offline", "deactivated"]
BidStatus = Literal["open", "filled", "cancelled", "expired"]
ContractStatus = Literal["active", "completed", "failed", "failed_over"]

PUSD_PER_USD = 10**12
NODE_TYPES: tuple[str, ...] = ("datacenter", "edge_cluster", "mist_node")


def pusd(usd: float | str | Decimal) -> int:
    """Decimal USD (float, str or Decimal) to integer pico-USD, rounding half-even."""
    amount = Decimal(str(usd)) * PUSD_PER_USD
    return int(amount.to_integral_value(rounding=ROUND_HALF_EVEN))


def usd(amount_pusd: int) -> Decimal:
    """Integer pico-USD to an exact Decimal USD."""
    return Decimal(amount_pusd).scaleb(-12)


class Node(msgspec.Struct, kw_only=True):
    """A provider's machine as the live market sees it (its ask is the node's free capacity)."""

    node_id: str
    owner_id: str
    region: str
    node_type: NodeType
    name: str
    lat: float
    lng: float
    total_ram_gb: int
    total_vram_gb: int
    offered_ram_gb: int = 0
    offered_vram_gb: int = 0
    reserved_ram_gb: int = 0
    reserved_vram_gb: int = 0
    bandwidth_mbps: int = 1000
    base_latency_ms: float = 1.0
    uptime_score: float = 99.0
    reputation_score: int = 100
    price_pusd: int = 0
    egress_price_pusd: int = 0
    min_duration_s: int = 60
    max_duration_s: int = 86_400
    status: NodeStatus = "active"
    ask_expires_ms: int = 0
    """0: the ask never expires; otherwise the node offers nothing after this instant."""
    heartbeat_interval_s: float = 60.0
    last_heartbeat_ms: int = 0
    arrival_seq: int = 0
    """Order of arrival in the region's book (ties in scoring break by it)."""
    created_ms: int = 0
    metadata: dict[str, str] = {}

    @property
    def available_ram_gb(self) -> int:
        return self.offered_ram_gb - self.reserved_ram_gb

    @property
    def available_vram_gb(self) -> int:
        return self.offered_vram_gb - self.reserved_vram_gb


class Bid(msgspec.Struct, kw_only=True):
    """A renter's or bot's limit order, resting in its region's book until it fills or ends.

    Priority: higher `max_price_pusd` first, then earlier `seq`. A fill is a contract at the ask's
    price (the bid's price is a cap). With `allow_split` a bid may fill across several nodes, each
    fill at least `min_fill_gb` (ram + vram); `filled_* + remaining_* == original` always.
    """

    bid_id: str
    region: str
    client_id: str
    user_id: str
    ram_gb: int
    vram_gb: int
    duration_s: int
    max_price_pusd: int
    lat: float | None = None
    lng: float | None = None
    max_distance_km: float | None = None
    min_uptime_score: float = 0.0
    prefer_local: bool = True
    node_type: NodeType | None = None
    allow_split: bool = False
    min_fill_gb: int = 0
    filled_ram_gb: int = 0
    filled_vram_gb: int = 0
    status: BidStatus = "open"
    created_ms: int = 0
    expires_ms: int = 0
    """0: good till cancelled."""
    seq: int = 0
    contract_ids: list[str] = []

    @property
    def remaining_ram_gb(self) -> int:
        return self.ram_gb - self.filled_ram_gb

    @property
    def remaining_vram_gb(self) -> int:
        return self.vram_gb - self.filled_vram_gb


class Contract(msgspec.Struct, kw_only=True):
    """A lease of `ram_gb + vram_gb` on one node from `start_ms` to `end_ms` at `price_pusd`.

    `active -> completed | failed | failed_over`. `failed_over` means the node went offline and
    the remaining time moved to `successor_id` on another node; the cost of the time served is
    settled on this contract.
    """

    contract_id: str
    region: str
    client_id: str
    user_id: str
    node_id: str
    owner_id: str
    ram_gb: int
    vram_gb: int
    duration_s: int
    start_ms: int
    end_ms: int
    price_pusd: int
    egress_price_pusd: int = 0
    max_price_pusd: int = 0
    """The most the renter accepted per GB-second (the bid's cap); failover re-matches within it."""
    status: ContractStatus = "active"
    bid_id: str | None = None
    predecessor_id: str | None = None
    successor_id: str | None = None
    extensions: int = 0
    used_s: int = 0
    egress_mgb: int = 0
    """Egress in thousandths of a GB."""
    cost_pusd: int = 0
    settlement_hash: str | None = None
    completed_ms: int = 0
    version: int = 0
    """Bumped by every change; settle/extend scripts compare it (optimistic concurrency)."""


class Heartbeat(msgspec.Struct, kw_only=True):
    """What a node reports every interval (the spec's heartbeat body, units in names).

    `available_*_gb`: memory the node could lend to Mnemo right now, NOT counting what Mnemo
    already leases from it (see the module docstring for how the engine derives `offered`).
    """

    node_id: str
    available_ram_gb: int
    available_vram_gb: int
    cpu_usage_pct: float | None = None
    gpu_usage_pct: float | None = None
    temperature_c: int | None = None
    bandwidth_mbps: int | None = None
    lat: float | None = None
    lng: float | None = None


class NodeChanges(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A provider's update of its node's terms; `None` leaves a field as it is."""

    name: str | None = None
    price_pusd: int | None = None
    egress_price_pusd: int | None = None
    min_duration_s: int | None = None
    max_duration_s: int | None = None
    bandwidth_mbps: int | None = None
    base_latency_ms: float | None = None
    ask_expires_ms: int | None = None
    status: Literal["active", "maintenance"] | None = None
    lat: float | None = None
    lng: float | None = None
    metadata: dict[str, str] | None = None


class Quote(msgspec.Struct, kw_only=True):
    """A region's top of book and recent trading, published at most 10 times a second."""

    region: str
    ts_ms: int
    best_ask_pusd: int | None
    best_bid_pusd: int | None
    ask_depth: list[tuple[int, int]]
    """(price_pusd, gb available at that price), best first, at most 20 levels."""
    bid_depth: list[tuple[int, int]]
    """(price_pusd, gb wanted at that price), best first, at most 20 levels."""
    last_fill_pusd: int | None
    volume_24h_gb_s: int
    """Sum over fills in the last 24 h of (ram_gb + vram_gb) * duration_s."""


# ---------------------------------------------------------------------------------------------
# Events: one per state change, appended to the region's stream by the script that made it.


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    event_id: str
    region: str
    ts_ms: int


class NodeRegistered(_Event, frozen=True, tag="node_registered"):
    node: Node


class NodeUpdated(_Event, frozen=True, tag="node_updated"):
    """The provider changed the node's terms; `node` is the whole node after the change."""

    node: Node


class NodeDeactivated(_Event, frozen=True, tag="node_deactivated"):
    node_id: str


class HeartbeatEntry(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    offered_ram_gb: int
    offered_vram_gb: int
    available_ram_gb: int
    available_vram_gb: int
    cpu_usage_pct: float | None = None
    gpu_usage_pct: float | None = None
    temperature_c: int | None = None
    bandwidth_mbps: int | None = None
    lat: float | None = None
    lng: float | None = None
    status: NodeStatus = "active"


class HeartbeatsApplied(_Event, frozen=True, tag="heartbeats"):
    """One batched heartbeat call: every accepted entry (rejected ones are not in the log)."""

    entries: list[HeartbeatEntry]


class NodeOffline(_Event, frozen=True, tag="node_offline"):
    node_id: str
    last_heartbeat_ms: int


class BidPlaced(_Event, frozen=True, tag="bid_placed"):
    bid: Bid


class BidCancelled(_Event, frozen=True, tag="bid_cancelled"):
    bid_id: str


class BidExpired(_Event, frozen=True, tag="bid_expired"):
    bid_id: str


class ContractCreated(_Event, frozen=True, tag="contract_created"):
    """A reserve succeeded. With `bid_id`, the bid's fill state after this fill is given too."""

    contract: Contract
    node_reserved_ram_gb: int = 0
    node_reserved_vram_gb: int = 0
    """The node's reserved capacity after this reserve."""
    bid_id: str | None = None
    bid_filled_ram_gb: int = 0
    bid_filled_vram_gb: int = 0
    bid_status: BidStatus | None = None


class ContractExtended(_Event, frozen=True, tag="contract_extended"):
    contract_id: str
    duration_s: int
    end_ms: int
    version: int


class ContractSettled(_Event, frozen=True, tag="contract_settled"):
    """The contract ended (`completed`, `failed`, `failed_over`) and its capacity returned."""

    contract_id: str
    node_id: str
    client_id: str
    ram_gb: int
    vram_gb: int
    status: ContractStatus
    used_s: int
    egress_mgb: int
    cost_pusd: int
    settlement_hash: str
    completed_ms: int
    successor_id: str | None = None
    node_reserved_ram_gb: int = 0
    node_reserved_vram_gb: int = 0
    """The node's reserved capacity after the capacity returned."""


Event = (
    NodeRegistered
    | NodeUpdated
    | NodeDeactivated
    | HeartbeatsApplied
    | NodeOffline
    | BidPlaced
    | BidCancelled
    | BidExpired
    | ContractCreated
    | ContractExtended
    | ContractSettled
)
