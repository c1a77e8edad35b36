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

from engine.trust import MIN_WINDOWS

NodeType = Literal["datacenter", "edge_cluster", "mist_node"]
NodeStatus = Literal["active", "maintenance", "offline", "deactivated"]
BidStatus = Literal["open", "filled", "cancelled", "expired"]
ContractStatus = Literal["active", "completed", "failed", "failed_over"]
LeaseStatus = Literal["none", "pending", "ready", "closing", "closed", "failed"]
"""Where a contract's delivery stands (the `lease_state` of `Contract`): `none` (not delivered:
a VRAM-only lease, or a node whose agent does not deliver), `pending` (waiting for the node's
ready report), `ready` (served at its endpoint), `closing` (the close was ordered: the node
stops and wipes the server, then reports), `closed` (settled after delivery), `failed` (the node
did not deliver, or died with it)."""

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
    # Trust (engine.trust): measured uptime, standing, announced maintenance, contract record
    # (copies: the accounting itself is in the region's `uptime` hash).
    uptime_windows: int = 0
    """Counted windows in the trailing 30 days (the history; new below engine.trust.MIN_WINDOWS)."""
    suspend_at_ms: int = 0
    """Warned: suspended at this instant unless the score recovers (0: no warning)."""
    suspended_ms: int = 0
    """Suspended from new leases since this instant (0: not suspended)."""
    maint_start_ms: int = 0
    maint_end_ms: int = 0
    """The announced maintenance window (0, 0: none)."""
    maint_last_ms: int = 0
    """Start of the last announced window that took effect (announcements are spaced)."""
    delivered_contracts: int = 0
    cut_contracts: int = 0
    """Contracts served in full, and cut short by the node (failed or failed over)."""
    stake_pusd: int = 0
    """The stake locked for the node (engine.trust): it covers the leases it may take and pays
    renters' SLA credits."""
    stake_held_pusd: int = 0
    """The part of `stake_pusd` held back from the provider's earnings."""
    lease_value_pusd: int = 0
    """The sum of the holds of the node's active contracts (the stake required grows with it)."""

    @property
    def uptime_new(self) -> bool:
        """Too little history for a measured score (engine.trust.MIN_WINDOWS)."""
        return self.uptime_windows < MIN_WINDOWS

    delivers: bool = False
    """The node's agent delivers its RAM leases (a Valkey server per lease, ready reports,
    meters): its RAM contracts are `pending` until the agent reports them ready, and bill from
    then. False (the spec's agent): its leases are reserved, not delivered."""

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
    hold_pusd: int = 0
    """Money held from the renter's region wallet for what is left of the bid: remaining GB x
    duration x `max_price_pusd` (issue 14)."""
    hold_month: str = ""
    """The month (YYYY-MM, UTC) whose budget the hold counts against."""

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
    hold_pusd: int = 0
    """Money held from the renter's region wallet for this contract (its estimated cost, plus
    extensions; 0 once closed). Not part of the settlement record."""
    hold_month: str = ""
    """The month (YYYY-MM, UTC) of the contract's last hold, whose budget a release refills."""
    # Delivery (see `LeaseStatus`). Billing of a delivered lease counts from `ready_ms` (0:
    # never ready, nothing billed) to `closing_ms` (when the close was ordered) or the end.
    lease_state: LeaseStatus = "none"
    ready_ms: int = 0
    lease_host: str | None = None
    lease_port: int = 0
    lease_tls: bool = False
    closing_ms: int = 0
    reported_ms: int = 0
    """When the node's final meter was recorded (its closed report, or the last heartbeat's at
    the close timeout); 0: not yet."""
    egress_bytes: int = 0
    """Bytes the node's lease server sent to clients (its meter): what egress bills."""
    peak_memory_bytes: int = 0
    claimed_egress_mgb: int | None = None
    """The renter's own `actual_egress_gb` at settle (recorded, never billed above the meter)."""
    lease_digest: str | None = None
    """SHA-256 (hex) of the lease's data when its server closed, as the node reported it."""

    @property
    def delivered(self) -> bool:
        return self.lease_state != "none"


class LeaseMeter(msgspec.Struct, frozen=True, kw_only=True):
    """One lease server's meter as its node measured it, cumulative since the lease began."""

    contract_id: str
    egress_bytes: int
    peak_memory_bytes: int


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
    leases: list[LeaseMeter] | None = None


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
    delivers: bool | None = None


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


class MeterEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A lease's meter as a heartbeat stored it: its egress so far (`counter_bytes`, the node's
    counter as reported, plus what earlier counters reached before one started over: a
    restarted agent's new server counts from 0) and the peak of memory used."""

    contract_id: str
    egress_bytes: int
    peak_memory_bytes: int
    counter_bytes: int = 0


class HeartbeatsApplied(_Event, frozen=True, tag="heartbeats"):
    """One batched heartbeat call: every accepted entry (rejected ones are not in the log), and
    the lease meters it stored (meters of contracts not on the beat's node are dropped)."""

    entries: list[HeartbeatEntry]
    meters: list[MeterEntry] = []


class NodeOffline(_Event, frozen=True, tag="node_offline"):
    node_id: str
    last_heartbeat_ms: int


class BidPlaced(_Event, frozen=True, tag="bid_placed"):
    bid: Bid
    wallet: WalletState | None = None
    """The renter's region wallet after the bid's hold (`bid.hold_pusd`)."""


class BidCancelled(_Event, frozen=True, tag="bid_cancelled"):
    bid_id: str
    released_pusd: int = 0
    wallet: WalletState | None = None


class BidExpired(_Event, frozen=True, tag="bid_expired"):
    bid_id: str
    released_pusd: int = 0
    wallet: WalletState | None = None


class WalletState(msgspec.Struct, frozen=True, kw_only=True):
    """A renter's wallet in one slot (a region or the funding slot) after a change (issue 14).

    `avail_pusd` is spendable money (negative: a debt, or credit-line use in the funding slot),
    `held_pusd` the sum of the holds of its open contracts and bids (regions), `allow_pusd` the
    budget allowance: in a region what is left of it for `month`, in the funding slot what has
    been granted to regions in `month`."""

    client_id: str
    avail_pusd: int = 0
    held_pusd: int = 0
    allow_pusd: int = 0
    month: str = ""


class WalletCredited(_Event, frozen=True, tag="wallet_credited"):
    """Money came into a renter's funding wallet from a rail (`stripe`, `eth`, `sol`, `operator`)
    under the caller's idempotency `key` (applied once)."""

    client_id: str
    amount_pusd: int
    key: str
    rail: str
    wallet: WalletState
    reference: str = ""
    reason: str = ""


class WalletDebited(_Event, frozen=True, tag="wallet_debited"):
    """Money left a renter's funding wallet to a rail (a refund, a clawback), once per `key`."""

    client_id: str
    amount_pusd: int
    key: str
    rail: str
    wallet: WalletState
    reference: str = ""
    reason: str = ""


class TransferSent(_Event, frozen=True, tag="transfer_sent"):
    """Step 1 of moving a renter's money between two slots (funding <-> a region): debited here
    and put in this slot's outbox; `to_slot` credits it under `transfer_id` (step 2)."""

    transfer_id: str
    client_id: str
    to_slot: str
    amount_pusd: int
    wallet: WalletState
    allow_pusd: int = 0
    month: str = ""


class TransferReceived(_Event, frozen=True, tag="transfer_received"):
    """Step 2 of a transfer: credited here, once per `transfer_id`."""

    transfer_id: str
    client_id: str
    from_slot: str
    amount_pusd: int
    wallet: WalletState
    allow_pusd: int = 0
    month: str = ""


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
    released_pusd: int = 0
    """A fill: what the bid held for this fill beyond the contract's hold, back to the wallet."""
    bid_hold_pusd: int = 0
    """A fill: the bid's hold after it."""
    wallet: WalletState | None = None
    """The renter's region wallet after the hold (None: a failover's successor, whose hold
    moved from its predecessor, or an event older than issue 14)."""


class ContractExtended(_Event, frozen=True, tag="contract_extended"):
    contract_id: str
    duration_s: int
    end_ms: int
    version: int
    node_id: str | None = None
    """The contract's node (None: an older event)."""
    hold_pusd: int = 0
    """The extension's hold (added to the contract's)."""
    hold_month: str = ""
    wallet: WalletState | None = None


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
    owner_id: str = ""
    """The provider paid (issue 14's money fields follow; all 0 before it)."""
    hold_pusd: int = 0
    """The contract's hold when it closed."""
    released_pusd: int = 0
    """Held and not used: back to the wallet."""
    charged_pusd: int = 0
    """Cost beyond the hold (egress), taken from the wallet (which may go into debt)."""
    moved_pusd: int = 0
    """A failover: the hold left after the cost, moved to the successor."""
    fee_pusd: int = 0
    """The platform's fee out of `cost_pusd`; the provider earns the rest."""
    wallet: WalletState | None = None
    lease_state: LeaseStatus | None = None
    """A delivered lease's final state (`closed` or `failed`); None: not delivered."""
    node_delivered_contracts: int | None = None
    node_cut_contracts: int | None = None
    node_reputation_score: int | None = None
    """The node's contract record and reputation after this one (None: an older event)."""
    sla_credit_pusd: int = 0
    """Cut short by the node: what its renter was credited out of the node's stake."""
    stake_held_pusd: int = 0
    """Completed: what of the provider's earnings was held back into the node's stake."""
    node_stake_pusd: int | None = None
    node_stake_held_pusd: int | None = None
    """The node's stake after this (None: an older event)."""


class StakeChanged(_Event, frozen=True, tag="stake_changed"):
    """A provider locked stake for its node out of its earnings (`lock`: the gateway moved
    `amount_pusd` to the ledger's `stake_transit:<node>` under `key` first), or released some
    back to its earnings (`release`). The node's stake after it."""

    node_id: str
    owner_id: str
    kind: Literal["lock", "release"]
    amount_pusd: int
    node_stake_pusd: int
    node_stake_held_pusd: int = 0
    key: str | None = None


class TrustEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One node's uptime after a change (engine.trust): its score and history, the windows it
    closed (`(window, value, score)`: value -1 not counted, the score in hundredths once that
    window closed), its standing and a change of it. The sweep's and the announcements' entries
    carry the whole accounting too (`up_win` and on, absolute values); a heartbeat's do not
    (None): engine.replay computes what a beat changes as the script does."""

    node_id: str
    uptime_score: float
    uptime_windows: int
    suspend_at_ms: int = 0
    suspended_ms: int = 0
    closed: list[tuple[int, int, int]] = []
    reset: bool = False
    """The history was dropped before `closed` (silent for longer than the period)."""
    notice: Literal["warned", "cleared", "suspended", "reinstated"] | None = None
    up_win: int | None = None
    down_ms: int = 0
    exc_ms: int = 0
    at_ms: int = 0
    from_ms: int = 0
    fail_win: int = 0
    total: int = 0
    maint_start_ms: int | None = None
    maint_end_ms: int | None = None
    maint_last_ms: int | None = None


class TrustUpdated(_Event, frozen=True, tag="trust_updated"):
    """Uptime windows closed (by heartbeats or the engine's sweep of offline nodes) or
    maintenance announced: each entry is a node's accounting after the change. With `sweep`,
    the sweep's: its nodes are due again at the end of the window, or (silent for the whole
    period) not any more; `dropped` left the sweep's index without an entry (not offline)."""

    entries: list[TrustEntry] = []
    sweep: bool = False
    dropped: list[str] = []


LeaseChange = Literal["ready", "closing", "reported"]


class LeaseChanged(_Event, frozen=True, tag="lease_changed"):
    """A delivered lease's state changed without closing its contract: `ready` (the node
    reported its endpoint; `ready_ms` is the first such report), `closing` (the renter settled
    or the term ended: the node is told to stop the server), `reported` (the final meter and
    digest were recorded: the node's closed report, or the last heartbeat's meter at the close
    timeout). The lease fields are the contract's after the change."""

    contract_id: str
    node_id: str
    change: LeaseChange
    lease_state: LeaseStatus
    version: int
    ready_ms: int = 0
    lease_host: str | None = None
    lease_port: int = 0
    lease_tls: bool = False
    closing_ms: int = 0
    reported_ms: int = 0
    egress_bytes: int = 0
    peak_memory_bytes: int = 0
    claimed_egress_mgb: int | None = None
    lease_digest: str | None = None


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
    | TrustUpdated
    | StakeChanged
    | WalletCredited
    | WalletDebited
    | TransferSent
    | TransferReceived
    | LeaseChanged
    | ContractSettled
)
