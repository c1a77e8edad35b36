"""Scoring: rank a region's live asks for one request, the spec's `match_nodes` made fast.

The formula is the spec's, unchanged (all scores are floats, unrounded; rounding is presentation):
    hard filters   available_ram >= ram, available_vram >= vram, price <= cap, status active,
                   plus the offer's terms: ask not expired (ask_expires_ms == 0 or > now),
                   min_duration_s <= duration_s <= max_duration_s; and the request's own filters:
                   not suspended (engine.trust), uptime_score >= min_uptime_score (the measured
                   score, engine.trust), base_latency_ms <= max_latency_ms when the request
                   names one, node_type, region, and, when the request has a
                   location, haversine distance <= max_distance_km (default 10,000 km).
    proximity      max(0, 100 - distance_km / 10), x3 when prefer_local; only with a location
    price          (1 - price / cap) * 50
    reliability    uptime_score * 0.5
    capacity       min(30, (available_ram + available_vram) / (ram + vram) * 10)
    type bonus     +20 for a mist_node
    match_score    ((((0 + weight * proximity) + price) + reliability) + capacity) + bonus,
                   summed in the spec's order so the fast path and the oracle agree bit for bit.
Order: higher score first; ties by lower price, then earlier arrival (`Node.arrival_seq`, unique
within a region). Two deliberate fixes to the spec's sketch: a coordinate of 0.0 is a location
(the sketch tested truthiness, so the equator and the Greenwich meridian counted as "no location"),
and the haversine term `a` is clamped to [0, 1] (rounding near antipodes made `sqrt(1 - a)` fail).

`AskBook` holds one region's nodes as columns of NumPy arrays (upsert/remove in O(1): swap-remove
plus an id -> row dict; the arrays double when full): exact float64/int64 columns, and float32
copies of every field a filter or the score reads, plus each node's unit vector on the sphere
(trigonometry once per upsert, never per request). `rank` runs a Numba kernel, block by block
(256 rows):
1. bound pass, branch-free float32 (vectorised): for every row, -inf if a filter surely fails,
   else an upper bound of its score. Filters on the copies never drop a true candidate, because
   rounding to nearest is monotone (x >= y implies f32(x) >= f32(y)). Distance needs no trig:
   the great-circle distance is increasing in the chord |u_node - u_request|, so "within
   max_distance" is `chord^2 <= (2 sin(D / 2R))^2`, widened for float32 error (< 1e-6 on the
   unit sphere, i.e. < 7 m), and proximity is bounded with d >= R * chord (asin x >= x) less a
   50 m slack. The bound's own rounding (< 1e-4 points) is far inside the 0.05-point margin.
2. exact pass, float64, only for rows whose bound reaches the K-th best score so far (less the
   margin): the spec's filters and formula (its haversine; chord only as a sure early-out with
   a 1 m margin), into a K-slot binary heap keyed (score, -price, -arrival). O(n log K), no sort
   of the book; the K winners' components are recomputed with the same expressions.
Cost: the bound pass reads 44 bytes per ask and is memory-bound: ~1.5-1.8 ms of CPU for 1M asks
on this 2-core dev box (~30 GB/s), ~0.15 ms for 100k (bench/bench_scoring.py). A two-thread
`prange` variant was measured slower on 2 shared cores (p50 9-17 ms vs 1.6 ms), so it is serial.
`rank_reference` is the plain-Python twin (same contract, no NumPy); tests hold them equal, and
both to the spec's `match_nodes` (tests/engine/oracle.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, assert_never

import msgspec
import numpy as np
from numba import njit

from engine.errors import InvalidRequest
from engine.types import (
    NODE_TYPES,
    BidCancelled,
    BidExpired,
    BidPlaced,
    ContractCreated,
    ContractExtended,
    ContractSettled,
    Event,
    HeartbeatsApplied,
    LeaseChanged,
    Node,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeType,
    NodeUpdated,
    StakeChanged,
    TransferReceived,
    TransferSent,
    TrustEntry,
    TrustUpdated,
    WalletCredited,
    WalletDebited,
)

__all__ = [
    "DEFAULT_MAX_DISTANCE_KM",
    "EARTH_RADIUS_KM",
    "AskBook",
    "Match",
    "MatchRequest",
    "Offer",
    "browse",
    "haversine_km",
    "rank",
    "rank_reference",
    "warm_up",
]

EARTH_RADIUS_KM = 6371.0
DEFAULT_MAX_DISTANCE_KM = 10_000.0
"""The spec's default `max_distance_km` when a request with a location names none."""
_MARGIN_KM = 1e-3  # far above the ~1e-11 km float error of either distance formula
_STATUSES: tuple[str, ...] = ("active", "maintenance", "offline", "deactivated")
_MIST = NODE_TYPES.index("mist_node")
_NO_EXPIRY = np.iinfo(np.int64).max
_JSON = msgspec.json.Encoder()
_META_DECODER = msgspec.json.Decoder(dict[str, str])


class MatchRequest(msgspec.Struct, kw_only=True):
    """What a renter asks for (`POST /api/marketplace/request`, a resting bid, a failover).

    `max_price_pusd`: the cap in pico-USD per GB-second. `lat`/`lng`: the renter's location,
    both or neither; without one there is no proximity score and no distance limit.
    `max_distance_km`: None means the spec's default of 10,000 km (only with a location).
    """

    ram_gb: int
    vram_gb: int
    max_price_pusd: int
    duration_s: int = 3600
    lat: float | None = None
    lng: float | None = None
    prefer_local: bool = True
    max_distance_km: float | None = None
    min_uptime_score: float = 0.0
    node_type: NodeType | None = None
    region: str | None = None
    limit: int = 10
    max_latency_ms: float | None = None
    """Only nodes whose `base_latency_ms` is at most this (None: any)."""

    def validate(self) -> MatchRequest:
        """Return self, or raise InvalidRequest naming the first offending field."""
        _check_int(self.ram_gb, "ram_gb", minimum=0)
        _check_int(self.vram_gb, "vram_gb", minimum=0)
        if self.ram_gb + self.vram_gb == 0:
            raise InvalidRequest(
                "ask for some memory: ram_gb + vram_gb must be > 0", field="ram_gb"
            )
        _check_int(self.max_price_pusd, "max_price_pusd", minimum=1)
        _check_int(self.duration_s, "duration_s", minimum=1)
        _check_int(self.limit, "limit", minimum=1)
        _check_location(self.lat, self.lng)
        _check_distance(self.max_distance_km)
        _check_uptime(self.min_uptime_score)
        if self.max_latency_ms is not None:
            latency = _check_real(self.max_latency_ms, "max_latency_ms")
            if not latency >= 0.0:
                raise InvalidRequest("max_latency_ms must be >= 0", field="max_latency_ms")
        if self.node_type is not None and self.node_type not in NODE_TYPES:
            raise InvalidRequest(
                f"node_type must be one of {', '.join(NODE_TYPES)}", field="node_type"
            )
        if not isinstance(self.prefer_local, bool):
            raise InvalidRequest("prefer_local must be a boolean", field="prefer_local")
        return self

    @property
    def has_location(self) -> bool:
        return self.lat is not None and self.lng is not None


class Match(msgspec.Struct, kw_only=True):
    """One ranked node with the score breakdown (unrounded) and what the lease would cost.

    `proximity_score` is the unweighted 0-100 component (0.0 without a request location);
    `match_score` includes its x3 weight when prefer_local. `distance_km` is None without a request
    location. `estimated_cost_pusd` = (ram_gb + vram_gb) * duration_s * price_pusd, exact.
    """

    node_id: str
    node_name: str
    node_type: NodeType
    region: str
    match_score: float
    proximity_score: float
    price_score: float
    reliability_score: float
    capacity_score: float
    type_bonus: float
    distance_km: float | None
    estimated_cost_pusd: int
    estimated_latency_ms: float
    price_pusd: int
    available_ram_gb: int
    available_vram_gb: int
    uptime_score: float
    arrival_seq: int = 0
    uptime_windows: int = 0
    """The measured history behind `uptime_score` (engine.trust: new below 168)."""
    reputation_score: int = 100


class Offer(msgspec.Struct, kw_only=True):
    """A row of `GET /api/marketplace`: a live ask with free capacity."""

    node_id: str
    node_name: str
    node_type: NodeType
    region: str
    available_ram_gb: int
    available_vram_gb: int
    price_pusd: int
    egress_price_pusd: int
    min_duration_s: int
    max_duration_s: int
    uptime_score: float
    distance_km: float | None
    estimated_latency_ms: float
    bandwidth_mbps: int
    uptime_windows: int = 0
    reputation_score: int = 100
    stake_pusd: int = 0
    """The node's stake (engine.trust) and the part of it held back from earnings."""
    stake_held_pusd: int = 0


# ---------------------------------------------------------------------------------------------
# Validation


def _check_int(value: Any, field: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{field} must be an integer", field=field)
    if value < minimum:
        raise InvalidRequest(f"{field} must be >= {minimum}", field=field)


def _check_real(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{field} must be a finite number", field=field)
    return float(value)


def _check_location(lat: float | None, lng: float | None) -> None:
    if (lat is None) != (lng is None):
        raise InvalidRequest(
            "give both lat and lng, or neither", field="lng" if lng is None else "lat"
        )
    if lat is None or lng is None:
        return
    if abs(_check_real(lat, "lat")) > 90.0:
        raise InvalidRequest("lat must be within [-90, 90]", field="lat")
    if abs(_check_real(lng, "lng")) > 180.0:
        raise InvalidRequest("lng must be within [-180, 180]", field="lng")


def _check_distance(max_distance_km: float | None) -> None:
    if max_distance_km is None:
        return
    if isinstance(max_distance_km, bool) or not isinstance(max_distance_km, (int, float)):
        raise InvalidRequest("max_distance_km must be a number", field="max_distance_km")
    # +inf is a legitimate "no limit"; NaN and negatives are not
    if math.isnan(max_distance_km) or max_distance_km < 0:
        raise InvalidRequest("max_distance_km must be >= 0", field="max_distance_km")


def _check_uptime(min_uptime_score: float) -> None:
    value = _check_real(min_uptime_score, "min_uptime_score")
    if not 0.0 <= value <= 100.0:
        raise InvalidRequest("min_uptime_score must be within [0, 100]", field="min_uptime_score")


# ---------------------------------------------------------------------------------------------
# Geometry (plain Python; the kernel has the same formulas)


def haversine_km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle distance in km: the spec's `calculate_distance`, `a` clamped to [0, 1]."""
    # squares as products, not `** 2` (libm pow can differ from x * x in the last bit), so this
    # and the kernel agree bit for bit
    dlat = math.radians(lat2 - lat1)
    dlng = math.radians(lng2 - lng1)
    s1 = math.sin(dlat / 2)
    s2 = math.sin(dlng / 2)
    a = s1 * s1 + math.cos(math.radians(lat1)) * math.cos(math.radians(lat2)) * (s2 * s2)
    a = min(1.0, max(0.0, a))
    c = 2 * math.atan2(math.sqrt(a), math.sqrt(1 - a))
    return EARTH_RADIUS_KM * c


def _unit_vector(lat: float, lng: float) -> tuple[float, float, float]:
    # math (not numpy) for both nodes and requests: identical inputs give identical vectors,
    # so a node at the request's very point has chord exactly 0
    phi = math.radians(lat)
    lam = math.radians(lng)
    cos_phi = math.cos(phi)
    return cos_phi * math.cos(lam), cos_phi * math.sin(lam), math.sin(phi)


def _chord2(distance_km: float) -> float:
    """Squared chord (unit sphere) of a great-circle distance; +inf past the antipode.

    d = 2R asin(chord / 2) is increasing in the chord, so `chord^2 <= _chord2(D)` is exactly
    `d <= D`. Callers widen D by `_MARGIN_KM` on the side that must not drop a candidate: the
    computed chord of a node is within ~1e-15 of the truth (~1e-11 km), far inside the margin.
    """
    if distance_km < 0:
        return -1.0
    half = distance_km / (2 * EARTH_RADIUS_KM)
    if half >= math.pi / 2:
        return math.inf
    s = 2 * math.sin(half)
    return s * s


# ---------------------------------------------------------------------------------------------
# Columns


def _liveness(status: str, ask_expires_ms: int, suspended_ms: int = 0) -> tuple[int, float]:
    """(_I_LIVE_UNTIL, _H_LIVE): one comparison with `now` answers "active, not suspended
    (engine.trust) and ask not expired"."""
    if status != "active" or suspended_ms:
        return -1, -math.inf
    if ask_expires_ms > 0:
        return ask_expires_ms, float(ask_expires_ms)
    return _NO_EXPIRY, math.inf


# float64 columns
_F_PRICE, _F_UPTIME, _F_LAT, _F_LNG, _F_UX, _F_UY, _F_UZ, _F_LATENCY, _F_HB_INTERVAL = range(9)
_NF = 9
# int64 columns
(
    _I_AVAIL_RAM,
    _I_AVAIL_VRAM,
    _I_LIVE_UNTIL,
    _I_MIN_DUR,
    _I_MAX_DUR,
    _I_TYPE,
    _I_ARRIVAL,
    _I_OFFERED_RAM,
    _I_OFFERED_VRAM,
    _I_RESERVED_RAM,
    _I_RESERVED_VRAM,
    _I_STATUS,
    _I_EXPIRES,
    _I_PRICE_PUSD,
    _I_BANDWIDTH,
    _I_LAST_HB,
    _I_TOTAL_RAM,
    _I_TOTAL_VRAM,
    _I_REPUTATION,
    _I_EGRESS_PUSD,
    _I_CREATED,
    _I_UP_WINDOWS,
    _I_SUSPEND_AT,
    _I_SUSPENDED,
    _I_MAINT_START,
    _I_MAINT_END,
    _I_DELIVERED,
    _I_CUT,
) = range(28)
_NI = 28
# float32 copies of every field a filter or the score reads, for the bound pass (never used for a
# score). Rounding to nearest is monotone, so `x >= y` implies `f32(x) >= f32(y)`: a filter
# applied to the copies never drops a row the exact filter keeps. _H_LIVE is +inf for an active
# node whose ask never expires, f32(ask_expires_ms) if it does, -inf when not active.
(
    _H_RAM,
    _H_VRAM,
    _H_PRICE,
    _H_UPTIME,
    _H_TYPE,
    _H_LIVE,
    _H_MIN_DUR,
    _H_MAX_DUR,
    _H_UX,
    _H_UY,
    _H_UZ,
) = range(11)
_NH = 11
# columns of the result table after the 7 score/distance ones (ints < 2**53: exact as floats)
_T_PRICE_PUSD, _T_AVAIL_RAM, _T_AVAIL_VRAM, _T_UPTIME, _T_LATENCY, _T_ARRIVAL, _T_TYPE = range(
    7, 14
)
_NT = 14
_BLOCK = 256
_BOUND_SLACK_KM = 0.05  # > 10x the float32 chord error (~4 m)
_BOUND_MARGIN = 0.05  # score points; > 1000x the float32 error of the bound


class AskBook:
    """One region's nodes as columns (NumPy), kept current by `upsert`, `remove` and `apply`.

    Every node of the region is kept, live or not (a node offline now may come back by a
    heartbeat); the kernels filter. Row order is arbitrary (swap-remove); ties never depend on
    it. Not thread-safe: one owner applies events and ranks (the asyncio loop of a process).
    `version` increases with every change, for callers that cache results.

    The book holds nothing Python's cyclic GC must walk: arrays, and dicts of strings and ints
    only (CPython leaves such dicts untracked; metadata is kept as JSON bytes). A million Node
    objects made every full collection take 0.7 s, and lists of a million scattered strings
    0.3 s: a pause for whatever request was running. `node()` builds a Node on demand.
    """

    __slots__ = (
        "_delivers",
        "_f",
        "_h",
        "_i",
        "_id_at",
        "_meta",
        "_money",
        "_name",
        "_owner",
        "_row",
        "region",
        "version",
    )

    def __init__(self, region: str, capacity: int = 1024) -> None:
        self.region = region
        capacity = max(16, capacity)
        self._f = np.zeros((_NF, capacity), dtype=np.float64)
        self._i = np.zeros((_NI, capacity), dtype=np.int64)
        self._h = np.zeros((_NH, capacity), dtype=np.float32)
        self._row: dict[str, int] = {}  # node id -> row
        self._id_at: dict[int, str] = {}  # row -> node id
        self._name: dict[str, str] = {}  # node id -> name
        self._owner: dict[str, str] = {}  # node id -> owner id
        self._meta: dict[str, bytes] = {}  # node id -> metadata JSON, when not empty
        # node id -> (stake, held back, lease value), pico-USD, when not all 0 (engine.trust;
        # may pass 64 bits: Python ints)
        self._money: dict[str, tuple[int, int, int]] = {}
        self._delivers: dict[str, bool] = {}  # ids of the nodes whose agent delivers
        self.version = 0

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._row

    def node_ids(self) -> list[str]:
        return [self._id_at[row] for row in range(len(self._row))]

    def node(self, node_id: str) -> Node | None:
        """The node as the book sees it now."""
        row = self._row.get(node_id)
        return None if row is None else self._materialise(row)

    def nodes(self) -> list[Node]:
        return [self._materialise(row) for row in range(len(self._row))]

    def upsert(self, node: Node) -> None:
        """Insert or replace a node (the whole node, as in NodeRegistered/NodeUpdated)."""
        if node.region != self.region:
            raise ValueError(f"node {node.node_id} is in {node.region}, not {self.region}")
        node_id = node.node_id
        row = self._row.get(node_id)
        if row is None:
            row = len(self._row)
            if row == self._f.shape[1]:
                self._grow()
            self._row[node_id] = row
            self._id_at[row] = node_id
        self._name[node_id] = node.name
        self._owner[node_id] = node.owner_id
        if node.delivers:
            self._delivers[node_id] = True
        else:
            self._delivers.pop(node_id, None)
        if node.metadata:
            self._meta[node_id] = _JSON.encode(node.metadata)
        else:
            self._meta.pop(node_id, None)
        self._set_money(node_id, node.stake_pusd, node.stake_held_pusd, node.lease_value_pusd)
        node_type = NODE_TYPES.index(node.node_type)
        ux, uy, uz = _unit_vector(node.lat, node.lng)
        avail_ram = max(0, node.offered_ram_gb - node.reserved_ram_gb)
        avail_vram = max(0, node.offered_vram_gb - node.reserved_vram_gb)
        live_until, live32 = _liveness(node.status, node.ask_expires_ms, node.suspended_ms)
        # whole columns of the row at once: one conversion each instead of a numpy call per field
        f = [0.0] * _NF
        f[_F_PRICE] = float(node.price_pusd)
        f[_F_UPTIME] = node.uptime_score
        f[_F_LAT], f[_F_LNG] = node.lat, node.lng
        f[_F_UX], f[_F_UY], f[_F_UZ] = ux, uy, uz
        f[_F_LATENCY] = node.base_latency_ms
        f[_F_HB_INTERVAL] = node.heartbeat_interval_s
        self._f[:, row] = f
        i = [0] * _NI
        i[_I_AVAIL_RAM], i[_I_AVAIL_VRAM] = avail_ram, avail_vram
        i[_I_LIVE_UNTIL] = live_until
        i[_I_MIN_DUR] = node.min_duration_s
        i[_I_MAX_DUR] = node.max_duration_s
        i[_I_TYPE] = node_type
        i[_I_ARRIVAL] = node.arrival_seq
        i[_I_OFFERED_RAM], i[_I_OFFERED_VRAM] = node.offered_ram_gb, node.offered_vram_gb
        i[_I_RESERVED_RAM], i[_I_RESERVED_VRAM] = node.reserved_ram_gb, node.reserved_vram_gb
        i[_I_STATUS] = _STATUSES.index(node.status)
        i[_I_EXPIRES] = node.ask_expires_ms
        i[_I_PRICE_PUSD] = node.price_pusd
        i[_I_BANDWIDTH] = node.bandwidth_mbps
        i[_I_LAST_HB] = node.last_heartbeat_ms
        i[_I_TOTAL_RAM] = node.total_ram_gb
        i[_I_TOTAL_VRAM] = node.total_vram_gb
        i[_I_REPUTATION] = node.reputation_score
        i[_I_EGRESS_PUSD] = node.egress_price_pusd
        i[_I_CREATED] = node.created_ms
        i[_I_UP_WINDOWS] = node.uptime_windows
        i[_I_SUSPEND_AT] = node.suspend_at_ms
        i[_I_SUSPENDED] = node.suspended_ms
        i[_I_MAINT_START] = node.maint_start_ms
        i[_I_MAINT_END] = node.maint_end_ms
        i[_I_DELIVERED] = node.delivered_contracts
        i[_I_CUT] = node.cut_contracts
        self._i[:, row] = i
        h = [0.0] * _NH
        h[_H_RAM], h[_H_VRAM] = avail_ram, avail_vram
        h[_H_PRICE] = node.price_pusd
        h[_H_UPTIME] = node.uptime_score
        h[_H_TYPE] = node_type
        h[_H_LIVE] = live32
        h[_H_MIN_DUR] = node.min_duration_s
        h[_H_MAX_DUR] = node.max_duration_s
        h[_H_UX], h[_H_UY], h[_H_UZ] = ux, uy, uz
        self._h[:, row] = h
        self.version += 1

    def remove(self, node_id: str) -> bool:
        """Drop a node; False if it was not there. O(1): the last row moves into its place."""
        row = self._row.pop(node_id, None)
        if row is None:
            return False
        last = len(self._row)  # the last row, now that the node's entry is gone
        if row != last:
            self._f[:, row] = self._f[:, last]
            self._i[:, row] = self._i[:, last]
            self._h[:, row] = self._h[:, last]
            moved = self._id_at[last]
            self._id_at[row] = moved
            self._row[moved] = row
        del self._id_at[last]
        del self._name[node_id], self._owner[node_id]
        self._delivers.pop(node_id, None)
        self._meta.pop(node_id, None)
        self._money.pop(node_id, None)
        self.version += 1
        return True

    def set_status(self, node_id: str, status: str) -> bool:
        row = self._row.get(node_id)
        if row is None:
            return False
        self._set_status(row, status)
        return True

    def set_reserved(self, node_id: str, reserved_ram_gb: int, reserved_vram_gb: int) -> bool:
        row = self._row.get(node_id)
        if row is None:
            return False
        i = self._i
        self._set_capacity(
            row,
            int(i[_I_OFFERED_RAM, row]),
            int(i[_I_OFFERED_VRAM, row]),
            reserved_ram_gb,
            reserved_vram_gb,
        )
        return True

    def apply(self, event: Event) -> None:
        """Bring the book up to date with one event of this region's stream.

        Events set absolute values (whole node, offered/available, reserved after the change), so
        applying an event the snapshot already reflects is harmless: replaying from any point at
        or before the snapshot converges to the live state. Events about other objects (bids,
        extensions) or unknown nodes are ignored.
        """
        match event:
            case NodeRegistered(node=node) | NodeUpdated(node=node):
                self.upsert(node)
            case NodeDeactivated(node_id=node_id):
                self.set_status(node_id, "deactivated")
            case NodeOffline(node_id=node_id):
                self.set_status(node_id, "offline")
            case HeartbeatsApplied(entries=entries):
                for entry in entries:
                    row = self._row.get(entry.node_id)
                    if row is None:
                        continue
                    self._set_capacity(
                        row,
                        entry.offered_ram_gb,
                        entry.offered_vram_gb,
                        entry.offered_ram_gb - entry.available_ram_gb,
                        entry.offered_vram_gb - entry.available_vram_gb,
                    )
                    self._set_status(row, entry.status)
                    if entry.lat is not None and entry.lng is not None:
                        self._set_location(row, entry.lat, entry.lng)
                    if entry.bandwidth_mbps is not None:
                        self._i[_I_BANDWIDTH, row] = entry.bandwidth_mbps
                    self._i[_I_LAST_HB, row] = event.ts_ms
            case ContractCreated(contract=contract):
                self.set_reserved(
                    contract.node_id, event.node_reserved_ram_gb, event.node_reserved_vram_gb
                )
                self._add_value(contract.node_id, contract.hold_pusd)
            case ContractSettled(node_id=node_id):
                self.set_reserved(node_id, event.node_reserved_ram_gb, event.node_reserved_vram_gb)
                if node_id in self._row:
                    stake, held, value = self._money.get(node_id, (0, 0, 0))
                    if event.node_stake_pusd is not None:
                        stake, held = event.node_stake_pusd, event.node_stake_held_pusd or 0
                    self._set_money(node_id, stake, held, max(0, value - event.hold_pusd))
                row = self._row.get(node_id)
                if row is not None and event.node_reputation_score is not None:
                    i = self._i
                    i[_I_REPUTATION, row] = event.node_reputation_score
                    i[_I_DELIVERED, row] = event.node_delivered_contracts or 0
                    i[_I_CUT, row] = event.node_cut_contracts or 0
            case TrustUpdated(entries=entries):
                for e in entries:
                    self.set_trust(e)
            case StakeChanged():
                if event.node_id in self._row:
                    value = self._money.get(event.node_id, (0, 0, 0))[2]
                    self._set_money(
                        event.node_id, event.node_stake_pusd, event.node_stake_held_pusd, value
                    )
            case ContractExtended():
                self._add_value(event.node_id, event.hold_pusd)
            case BidPlaced() | BidCancelled() | BidExpired() | LeaseChanged():
                pass  # bids, extensions and deliveries leave every ask as it was
            case WalletCredited() | WalletDebited() | TransferSent() | TransferReceived():
                pass  # money leaves every ask as it was
            case _:
                assert_never(event)

    def _set_money(self, node_id: str, stake: int, held: int, value: int) -> None:
        if stake or held or value:
            self._money[node_id] = (stake, held, value)
        else:
            self._money.pop(node_id, None)

    def _add_value(self, node_id: str | None, amount: int) -> None:
        if node_id is not None and node_id in self._row and amount:
            stake, held, value = self._money.get(node_id, (0, 0, 0))
            self._set_money(node_id, stake, held, value + amount)

    def set_trust(self, e: TrustEntry) -> bool:
        """A node's measured uptime, standing and maintenance window (engine.trust): the
        reliability column the kernels read, and whether it may take new leases."""
        row = self._row.get(e.node_id)
        if row is None:
            return False
        self._f[_F_UPTIME, row] = e.uptime_score
        self._h[_H_UPTIME, row] = e.uptime_score
        i = self._i
        i[_I_UP_WINDOWS, row] = e.uptime_windows
        i[_I_SUSPEND_AT, row] = e.suspend_at_ms
        if e.maint_start_ms is not None and e.maint_end_ms is not None:
            i[_I_MAINT_START, row] = e.maint_start_ms
            i[_I_MAINT_END, row] = e.maint_end_ms
        if int(i[_I_SUSPENDED, row]) != e.suspended_ms:
            i[_I_SUSPENDED, row] = e.suspended_ms
            self._set_status(row, _STATUSES[int(i[_I_STATUS, row])])
        self.version += 1
        return True

    # -- internals

    def _grow(self) -> None:
        capacity = self._f.shape[1] * 2
        f = np.zeros((_NF, capacity), dtype=np.float64)
        i = np.zeros((_NI, capacity), dtype=np.int64)
        h = np.zeros((_NH, capacity), dtype=np.float32)
        n = len(self._row)
        f[:, :n] = self._f[:, :n]
        i[:, :n] = self._i[:, :n]
        h[:, :n] = self._h[:, :n]
        self._f, self._i, self._h = f, i, h

    def _set_location(self, row: int, lat: float, lng: float) -> None:
        f = self._f
        f[_F_LAT, row] = lat
        f[_F_LNG, row] = lng
        ux, uy, uz = _unit_vector(lat, lng)
        f[_F_UX, row], f[_F_UY, row], f[_F_UZ, row] = ux, uy, uz
        h = self._h
        h[_H_UX, row], h[_H_UY, row], h[_H_UZ, row] = ux, uy, uz
        self.version += 1

    def _set_capacity(
        self, row: int, offered_ram: int, offered_vram: int, reserved_ram: int, reserved_vram: int
    ) -> None:
        i = self._i
        i[_I_OFFERED_RAM, row] = offered_ram
        i[_I_OFFERED_VRAM, row] = offered_vram
        i[_I_RESERVED_RAM, row] = reserved_ram
        i[_I_RESERVED_VRAM, row] = reserved_vram
        i[_I_AVAIL_RAM, row] = max(0, offered_ram - reserved_ram)
        i[_I_AVAIL_VRAM, row] = max(0, offered_vram - reserved_vram)
        self._h[_H_RAM, row] = i[_I_AVAIL_RAM, row]
        self._h[_H_VRAM, row] = i[_I_AVAIL_VRAM, row]
        self.version += 1

    def _set_status(self, row: int, status: str) -> None:
        i = self._i
        i[_I_STATUS, row] = _STATUSES.index(status)
        i[_I_LIVE_UNTIL, row], self._h[_H_LIVE, row] = _liveness(
            status, int(i[_I_EXPIRES, row]), int(i[_I_SUSPENDED, row])
        )
        self.version += 1

    def _materialise(self, row: int) -> Node:
        f = self._f[:, row].tolist()
        i = self._i[:, row].tolist()
        node_id = self._id_at[row]
        meta = self._meta.get(node_id)
        money = self._money.get(node_id, (0, 0, 0))
        return Node(
            node_id=node_id,
            owner_id=self._owner[node_id],
            region=self.region,
            node_type=NODE_TYPES[i[_I_TYPE]],  # type: ignore[arg-type]
            name=self._name[node_id],
            lat=f[_F_LAT],
            lng=f[_F_LNG],
            total_ram_gb=i[_I_TOTAL_RAM],
            total_vram_gb=i[_I_TOTAL_VRAM],
            offered_ram_gb=i[_I_OFFERED_RAM],
            offered_vram_gb=i[_I_OFFERED_VRAM],
            reserved_ram_gb=i[_I_RESERVED_RAM],
            reserved_vram_gb=i[_I_RESERVED_VRAM],
            bandwidth_mbps=i[_I_BANDWIDTH],
            base_latency_ms=f[_F_LATENCY],
            uptime_score=f[_F_UPTIME],
            reputation_score=i[_I_REPUTATION],
            price_pusd=i[_I_PRICE_PUSD],
            egress_price_pusd=i[_I_EGRESS_PUSD],
            min_duration_s=i[_I_MIN_DUR],
            max_duration_s=i[_I_MAX_DUR],
            status=_STATUSES[i[_I_STATUS]],  # type: ignore[arg-type]
            ask_expires_ms=i[_I_EXPIRES],
            heartbeat_interval_s=f[_F_HB_INTERVAL],
            last_heartbeat_ms=i[_I_LAST_HB],
            arrival_seq=i[_I_ARRIVAL],
            created_ms=i[_I_CREATED],
            metadata=_META_DECODER.decode(meta) if meta else {},
            uptime_windows=i[_I_UP_WINDOWS],
            suspend_at_ms=i[_I_SUSPEND_AT],
            suspended_ms=i[_I_SUSPENDED],
            maint_start_ms=i[_I_MAINT_START],
            maint_end_ms=i[_I_MAINT_END],
            delivered_contracts=i[_I_DELIVERED],
            cut_contracts=i[_I_CUT],
            stake_pusd=money[0],
            stake_held_pusd=money[1],
            lease_value_pusd=money[2],
            delivers=node_id in self._delivers,
        )


# ---------------------------------------------------------------------------------------------
# Kernels


@njit(cache=True, nogil=True, inline="always")
def _haversine(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    deg = math.pi / 180.0
    dlat = (lat2 - lat1) * deg
    dlng = (lng2 - lng1) * deg
    s1 = math.sin(dlat / 2)
    s2 = math.sin(dlng / 2)
    a = s1 * s1 + math.cos(lat1 * deg) * math.cos(lat2 * deg) * (s2 * s2)
    a = min(1.0, max(0.0, a))
    return EARTH_RADIUS_KM * (2 * math.atan2(math.sqrt(a), math.sqrt(1 - a)))


@njit(cache=True, nogil=True, inline="always")
def _better(s1: float, p1: float, a1: int, s2: float, p2: float, a2: int) -> bool:
    if s1 != s2:
        return s1 > s2
    if p1 != p2:
        return p1 < p2
    return a1 < a2


@njit(cache=True, nogil=True)
def _sift_down(h_s, h_p, h_a, h_i, size):  # type: ignore[no-untyped-def]
    # min-heap on goodness: the root is the worst of the kept K
    j = 0
    while True:
        left = 2 * j + 1
        if left >= size:
            return
        w = left
        right = left + 1
        if right < size and _better(h_s[w], h_p[w], h_a[w], h_s[right], h_p[right], h_a[right]):
            w = right
        if _better(h_s[j], h_p[j], h_a[j], h_s[w], h_p[w], h_a[w]):
            h_s[j], h_s[w] = h_s[w], h_s[j]
            h_p[j], h_p[w] = h_p[w], h_p[j]
            h_a[j], h_a[w] = h_a[w], h_a[j]
            h_i[j], h_i[w] = h_i[w], h_i[j]
            j = w
        else:
            return


@njit(cache=True, nogil=True)
def _sift_up(h_s, h_p, h_a, h_i, j):  # type: ignore[no-untyped-def]
    while j > 0:
        parent = (j - 1) // 2
        if _better(h_s[parent], h_p[parent], h_a[parent], h_s[j], h_p[j], h_a[j]):
            h_s[j], h_s[parent] = h_s[parent], h_s[j]
            h_p[j], h_p[parent] = h_p[parent], h_p[j]
            h_a[j], h_a[parent] = h_a[parent], h_a[j]
            h_i[j], h_i[parent] = h_i[parent], h_i[j]
            j = parent
        else:
            return


@njit(cache=True, nogil=True)
def _sorted_heap(h_s, h_p, h_a, h_i, size):  # type: ignore[no-untyped-def]
    # K is small: insertion sort, best first
    order = np.arange(size)
    for x in range(1, size):
        y = x
        while y > 0:
            a = order[y - 1]
            b = order[y]
            if _better(h_s[b], h_p[b], h_a[b], h_s[a], h_p[a], h_a[a]):
                order[y - 1], order[y] = b, a
                y -= 1
            else:
                break
    return order


@njit(cache=True, nogil=True, inline="always")
def _exact_score(  # type: ignore[no-untyped-def]
    fc,
    ic,
    r,
    ram,
    vram,
    cap,
    now_ms,
    duration_s,
    min_uptime,
    max_latency,
    type_code,
    need,
    has_loc,
    qlat,
    qlng,
    qx,
    qy,
    qz,
    weight,
    max_dist,
    chord_out2,
):
    """(passes every hard filter, score) of row r: the spec's formula in the spec's order."""
    avail_ram = ic[_I_AVAIL_RAM, r]
    avail_vram = ic[_I_AVAIL_VRAM, r]
    price = fc[_F_PRICE, r]
    uptime = fc[_F_UPTIME, r]
    ntype = ic[_I_TYPE, r]
    if (
        avail_ram < ram
        or avail_vram < vram
        or price > cap
        or ic[_I_LIVE_UNTIL, r] <= now_ms
        or duration_s < ic[_I_MIN_DUR, r]
        or duration_s > ic[_I_MAX_DUR, r]
        or uptime < min_uptime
        or fc[_F_LATENCY, r] > max_latency
        or (type_code >= 0 and ntype != type_code)
    ):
        return False, 0.0
    score = 0.0
    if has_loc:
        dx = fc[_F_UX, r] - qx
        dy = fc[_F_UY, r] - qy
        dz = fc[_F_UZ, r] - qz
        c2 = dx * dx + dy * dy + dz * dz
        if c2 > chord_out2:
            return False, 0.0
        dist = _haversine(qlat, qlng, fc[_F_LAT, r], fc[_F_LNG, r])
        if dist > max_dist:
            return False, 0.0
        score += max(0.0, 100.0 - dist / 10.0) * weight
    score += (1.0 - price / cap) * 50.0
    score += uptime * 0.5
    score += min(30.0, (avail_ram + avail_vram) / need * 10.0)
    score += 20.0 if ntype == _MIST else 0.0
    return True, score


@njit(cache=True, nogil=True, error_model="numpy")
def _top_rows(  # type: ignore[no-untyped-def]
    fc,
    ic,
    hc,
    lo,
    hi,
    ram,
    vram,
    cap,
    now_ms,
    duration_s,
    min_uptime,
    max_latency,
    type_code,
    has_loc,
    qlat,
    qlng,
    qx,
    qy,
    qz,
    weight,
    max_dist,
    chord_out2,
    loose_out2,
    k,
):
    """The top k of rows [lo, hi) as a heap: (scores, prices, arrivals, rows, size).

    Block by block: a branch-free float32 pass writes an upper bound of every row's score
    (-inf where a cheap filter surely fails); rows whose bound reaches the current K-th best
    (less a margin far above float32 error) get the exact float64 evaluation.
    """
    h_s = np.empty(k, np.float64)
    h_p = np.empty(k, np.float64)
    h_a = np.empty(k, np.int64)
    h_i = np.empty(k, np.int64)
    size = 0
    need = float(ram + vram)
    # float32 constants, so the bound loop stays in float32 (and vectorises)
    f0 = np.float32(0.0)
    f30 = np.float32(30.0)
    f50 = np.float32(50.0)
    f100 = np.float32(100.0)
    fhalf = np.float32(0.5)
    fbonus = np.float32(20.0)
    fmist = np.float32(_MIST)
    ninf = np.float32(-np.inf)
    lowest = np.float32(-3.4028234e38)  # below any real bound, above the -inf of a failed row
    now32 = np.float32(now_ms)
    dur32 = np.float32(duration_s)
    ram32 = np.float32(ram)
    vram32 = np.float32(vram)
    cap32 = np.float32(cap)  # rounding is monotone: price <= cap implies price32 <= cap32
    inv_cap32 = np.float32(1.0 / cap)
    inv_need32 = np.float32(10.0 / need)
    min_up32 = np.float32(min_uptime)
    type32 = np.float32(type_code)
    any_type = type_code < 0
    w32 = np.float32(weight)
    r10 = np.float32(EARTH_RADIUS_KM / 10.0)
    slack10 = np.float32(_BOUND_SLACK_KM / 10.0)
    out2_32 = np.float32(loose_out2)
    qx32 = np.float32(qx)
    qy32 = np.float32(qy)
    qz32 = np.float32(qz)
    h_ram = hc[_H_RAM]
    h_vram = hc[_H_VRAM]
    h_price = hc[_H_PRICE]
    h_up = hc[_H_UPTIME]
    h_type = hc[_H_TYPE]
    h_live = hc[_H_LIVE]
    h_min_dur = hc[_H_MIN_DUR]
    h_max_dur = hc[_H_MAX_DUR]
    h_ux = hc[_H_UX]
    h_uy = hc[_H_UY]
    h_uz = hc[_H_UZ]
    buf = np.empty(_BLOCK, np.float32)
    for base in range(lo, hi, _BLOCK):
        m = min(_BLOCK, hi - base)
        thr32 = np.float32(h_s[0] - _BOUND_MARGIN) if size == k else lowest
        hits = 0
        # block views: indexing by j in range(m) (provably >= 0) lets LLVM vectorise
        b_ram = h_ram[base : base + m]
        b_vram = h_vram[base : base + m]
        b_price = h_price[base : base + m]
        b_up = h_up[base : base + m]
        b_type = h_type[base : base + m]
        b_live = h_live[base : base + m]
        b_min_dur = h_min_dur[base : base + m]
        b_max_dur = h_max_dur[base : base + m]
        if has_loc:
            b_ux = h_ux[base : base + m]
            b_uy = h_uy[base : base + m]
            b_uz = h_uz[base : base + m]
            for j in range(m):
                ar = b_ram[j]
                av = b_vram[j]
                p = b_price[j]
                up = b_up[j]
                t = b_type[j]
                dx = b_ux[j] - qx32
                dy = b_uy[j] - qy32
                dz = b_uz[j] - qz32
                c2 = dx * dx + dy * dy + dz * dz
                prox = max(f0, f100 - (math.sqrt(c2) * r10 - slack10))
                ub = (
                    w32 * prox
                    + (f50 - f50 * p * inv_cap32)
                    + up * fhalf
                    + min(f30, (ar + av) * inv_need32)
                    + (fbonus if t == fmist else f0)
                )
                ok = (
                    (ar >= ram32)
                    & (av >= vram32)
                    & (p <= cap32)
                    & (up >= min_up32)
                    & (any_type | (t == type32))
                    & (b_live[j] >= now32)
                    & (b_min_dur[j] <= dur32)
                    & (b_max_dur[j] >= dur32)
                    & (c2 <= out2_32)
                )
                ub = ub if ok else ninf
                buf[j] = ub
                hits += ub >= thr32  # type: ignore[assignment]
        else:
            for j in range(m):
                ar = b_ram[j]
                av = b_vram[j]
                p = b_price[j]
                up = b_up[j]
                t = b_type[j]
                ub = (
                    (f50 - f50 * p * inv_cap32)
                    + up * fhalf
                    + min(f30, (ar + av) * inv_need32)
                    + (fbonus if t == fmist else f0)
                )
                ok = (
                    (ar >= ram32)
                    & (av >= vram32)
                    & (p <= cap32)
                    & (up >= min_up32)
                    & (any_type | (t == type32))
                    & (b_live[j] >= now32)
                    & (b_min_dur[j] <= dur32)
                    & (b_max_dur[j] >= dur32)
                )
                ub = ub if ok else ninf
                buf[j] = ub
                hits += ub >= thr32  # type: ignore[assignment]
        if hits == 0:
            continue
        for j in range(m):
            if buf[j] < thr32:
                continue
            r = base + j
            ok, score = _exact_score(
                fc,
                ic,
                r,
                ram,
                vram,
                cap,
                now_ms,
                duration_s,
                min_uptime,
                max_latency,
                type_code,
                need,
                has_loc,
                qlat,
                qlng,
                qx,
                qy,
                qz,
                weight,
                max_dist,
                chord_out2,
            )
            if not ok:
                continue
            price = fc[_F_PRICE, r]
            arrival = ic[_I_ARRIVAL, r]
            if size < k:
                h_s[size] = score
                h_p[size] = price
                h_a[size] = arrival
                h_i[size] = r
                size += 1
                _sift_up(h_s, h_p, h_a, h_i, size - 1)
            elif _better(score, price, arrival, h_s[0], h_p[0], h_a[0]):
                h_s[0] = score
                h_p[0] = price
                h_a[0] = arrival
                h_i[0] = r
                _sift_down(h_s, h_p, h_a, h_i, size)
            else:
                continue
            if size == k:
                thr32 = np.float32(h_s[0] - _BOUND_MARGIN)
    return h_s, h_p, h_a, h_i, size


@njit(cache=True, nogil=True)
def _finish(fc, ic, h_s, h_p, h_a, h_i, size, cap, need, has_loc, qlat, qlng):  # type: ignore[no-untyped-def]
    """(rows, table) best first; table columns (`_T_*`): the score and its components, the
    distance (NaN: no location), and the row's values a Match reports (all exact in float64)."""
    order = _sorted_heap(h_s, h_p, h_a, h_i, size)
    rows = np.empty(size, np.int64)
    table = np.empty((size, _NT), np.float64)
    for x in range(size):
        r = h_i[order[x]]
        rows[x] = r
        # the components of the few winners (same expressions as _exact_score, same bits)
        price = fc[_F_PRICE, r]
        uptime = fc[_F_UPTIME, r]
        avail = ic[_I_AVAIL_RAM, r] + ic[_I_AVAIL_VRAM, r]
        prox = 0.0
        dist = math.nan
        if has_loc:
            dist = _haversine(qlat, qlng, fc[_F_LAT, r], fc[_F_LNG, r])
            prox = max(0.0, 100.0 - dist / 10.0)
        table[x, 0] = h_s[order[x]]
        table[x, 1] = prox
        table[x, 2] = (1.0 - price / cap) * 50.0
        table[x, 3] = uptime * 0.5
        table[x, 4] = min(30.0, avail / need * 10.0)
        table[x, 5] = 20.0 if ic[_I_TYPE, r] == _MIST else 0.0
        table[x, 6] = dist
        table[x, _T_PRICE_PUSD] = ic[_I_PRICE_PUSD, r]
        table[x, _T_AVAIL_RAM] = ic[_I_AVAIL_RAM, r]
        table[x, _T_AVAIL_VRAM] = ic[_I_AVAIL_VRAM, r]
        table[x, _T_UPTIME] = uptime
        table[x, _T_LATENCY] = fc[_F_LATENCY, r]
        table[x, _T_ARRIVAL] = ic[_I_ARRIVAL, r]
        table[x, _T_TYPE] = ic[_I_TYPE, r]
    return rows, table


@njit(cache=True, nogil=True)
def _rank_kernel(  # type: ignore[no-untyped-def]
    fc,
    ic,
    hc,
    n,
    ram,
    vram,
    cap,
    now_ms,
    duration_s,
    min_uptime,
    max_latency,
    type_code,
    has_loc,
    qlat,
    qlng,
    qx,
    qy,
    qz,
    weight,
    max_dist,
    chord_out2,
    loose_out2,
    k,
):
    """Top-k rows of the book, best first: (rows, table) as `_finish` gives them."""
    h_s, h_p, h_a, h_i, size = _top_rows(
        fc, ic, hc, 0, n, ram, vram, cap, now_ms, duration_s, min_uptime, max_latency, type_code,
        has_loc, qlat, qlng, qx, qy, qz, weight, max_dist, chord_out2, loose_out2, k,
    )  # fmt: skip
    return _finish(fc, ic, h_s, h_p, h_a, h_i, size, cap, float(ram + vram), has_loc, qlat, qlng)


@njit(cache=True, nogil=True)
def _browse_kernel(  # type: ignore[no-untyped-def]
    fc,
    ic,
    n,
    now_ms,
    min_ram,
    min_vram,
    cap,
    min_uptime,
    type_code,
    has_loc,
    qlat,
    qlng,
    qx,
    qy,
    qz,
    max_dist,
    chord_out2,
    chord_in2,
    m,
):
    """Count the live asks passing the filters; return the first m by (price, arrival)."""
    h_s = np.zeros(m, np.float64)
    h_p = np.empty(m, np.float64)
    h_a = np.empty(m, np.int64)
    h_i = np.empty(m, np.int64)
    size = 0
    total = 0
    for r in range(n):
        avail_ram = ic[_I_AVAIL_RAM, r]
        avail_vram = ic[_I_AVAIL_VRAM, r]
        if avail_ram < min_ram or avail_vram < min_vram or avail_ram + avail_vram <= 0:
            continue
        price = fc[_F_PRICE, r]
        if price > cap:
            continue
        if ic[_I_LIVE_UNTIL, r] <= now_ms:
            continue
        if fc[_F_UPTIME, r] < min_uptime:
            continue
        if type_code >= 0 and ic[_I_TYPE, r] != type_code:
            continue
        if has_loc:
            dx = fc[_F_UX, r] - qx
            dy = fc[_F_UY, r] - qy
            dz = fc[_F_UZ, r] - qz
            c2 = dx * dx + dy * dy + dz * dz
            if c2 > chord_out2:
                continue
            if c2 >= chord_in2 and _haversine(qlat, qlng, fc[_F_LAT, r], fc[_F_LNG, r]) > max_dist:
                continue
        total += 1
        if m == 0:
            continue
        arrival = ic[_I_ARRIVAL, r]
        if size < m:
            h_p[size] = price
            h_a[size] = arrival
            h_i[size] = r
            size += 1
            _sift_up(h_s, h_p, h_a, h_i, size - 1)
        elif _better(0.0, price, arrival, 0.0, h_p[0], h_a[0]):
            h_p[0] = price
            h_a[0] = arrival
            h_i[0] = r
            _sift_down(h_s, h_p, h_a, h_i, size)
    order = _sorted_heap(h_s, h_p, h_a, h_i, size)
    rows = np.empty(size, np.int64)
    dists = np.empty(size, np.float64)
    for x in range(size):
        r = h_i[order[x]]
        rows[x] = r
        dists[x] = _haversine(qlat, qlng, fc[_F_LAT, r], fc[_F_LNG, r]) if has_loc else math.nan
    return total, rows, dists


# ---------------------------------------------------------------------------------------------
# Public entry points


def _loose_chord2(distance_km: float) -> float:
    """`_chord2` widened for a chord computed in float32 (error < 1e-6 on the unit sphere)."""
    c2 = _chord2(distance_km)
    return c2 if math.isinf(c2) else (math.sqrt(max(0.0, c2)) + 2e-6) ** 2


def _distance_thresholds(max_dist: float) -> tuple[float, float]:
    """(chord_out2, chord_in2): beyond the first surely too far, below the second surely in."""
    return _chord2(max_dist + _MARGIN_KM), _chord2(max_dist - _MARGIN_KM)


def rank(book: AskBook, req: MatchRequest, now_ms: int, k: int | None = None) -> list[Match]:
    """The top `k` (default `req.limit`) matches in `book`, best first (see module docstring).

    Validates `req` (InvalidRequest). Returns [] when `req.region` names another region.
    """
    req.validate()
    k = req.limit if k is None else k
    n = len(book)
    if k <= 0 or n == 0 or (req.region is not None and req.region != book.region):
        return []
    k = min(k, n)  # the kernel allocates k slots: a huge limit must not allocate a huge heap
    has_loc = req.has_location
    qlat = float(req.lat) if req.lat is not None else 0.0
    qlng = float(req.lng) if req.lng is not None else 0.0
    qx, qy, qz = _unit_vector(qlat, qlng)
    max_dist = (
        DEFAULT_MAX_DISTANCE_KM if req.max_distance_km is None else float(req.max_distance_km)
    )
    rows, table = _rank_kernel(
        book._f,
        book._i,
        book._h,
        n,
        req.ram_gb,
        req.vram_gb,
        float(req.max_price_pusd),
        now_ms,
        req.duration_s,
        float(req.min_uptime_score),
        math.inf if req.max_latency_ms is None else float(req.max_latency_ms),
        -1 if req.node_type is None else NODE_TYPES.index(req.node_type),
        has_loc,
        qlat,
        qlng,
        qx,
        qy,
        qz,
        3.0 if req.prefer_local else 1.0,
        max_dist,
        _chord2(max_dist + _MARGIN_KM),
        _loose_chord2(max_dist + _BOUND_SLACK_KM),
        k,
    )
    total_gb = req.ram_gb + req.vram_gb
    out: list[Match] = []
    ic = book._i
    # one conversion for the whole table: numpy scalar access per field costs more than the kernel
    for row, values in zip(rows.tolist(), table.tolist(), strict=True):
        score, prox, price_s, rel_s, cap_s, bonus, dist, price, ram, vram, up, lat_ms, arr, t = (
            values
        )
        price_pusd = int(price)
        out.append(
            Match(
                node_id=(node_id := book._id_at[row]),
                node_name=book._name[node_id],
                node_type=NODE_TYPES[int(t)],  # type: ignore[arg-type]
                region=book.region,
                match_score=score,
                proximity_score=prox,
                price_score=price_s,
                reliability_score=rel_s,
                capacity_score=cap_s,
                type_bonus=bonus,
                distance_km=dist if has_loc else None,
                estimated_cost_pusd=total_gb * req.duration_s * price_pusd,
                estimated_latency_ms=lat_ms,
                price_pusd=price_pusd,
                available_ram_gb=int(ram),
                available_vram_gb=int(vram),
                uptime_score=up,
                arrival_seq=int(arr),
                uptime_windows=int(ic[_I_UP_WINDOWS, row]),
                reputation_score=int(ic[_I_REPUTATION, row]),
            )
        )
    return out


def rank_reference(
    nodes: Iterable[Node], req: MatchRequest, now_ms: int, k: int | None = None
) -> list[Match]:
    """Plain-Python twin of `rank` over Node objects: same filters, scores, order and result."""
    req.validate()
    k = req.limit if k is None else k
    has_loc = req.has_location
    weight = 3.0 if req.prefer_local else 1.0
    max_dist = (
        DEFAULT_MAX_DISTANCE_KM if req.max_distance_km is None else float(req.max_distance_km)
    )
    need = req.ram_gb + req.vram_gb
    cap = req.max_price_pusd
    scored: list[tuple[tuple[float, int, int], Match]] = []
    for node in nodes:
        avail_ram = max(0, node.available_ram_gb)
        avail_vram = max(0, node.available_vram_gb)
        if (
            avail_ram < req.ram_gb
            or avail_vram < req.vram_gb
            or node.price_pusd > cap
            or node.status != "active"
            or node.suspended_ms
            or 0 < node.ask_expires_ms <= now_ms
            or not node.min_duration_s <= req.duration_s <= node.max_duration_s
            or node.uptime_score < req.min_uptime_score
            or (req.max_latency_ms is not None and node.base_latency_ms > req.max_latency_ms)
            or (req.node_type is not None and node.node_type != req.node_type)
            or (req.region is not None and node.region != req.region)
        ):
            continue
        prox = 0.0
        dist: float | None = None
        if has_loc:
            assert req.lat is not None and req.lng is not None
            dist = haversine_km(req.lat, req.lng, node.lat, node.lng)
            if dist > max_dist:
                continue
            prox = max(0.0, 100.0 - dist / 10.0)
        price_s = (1.0 - node.price_pusd / cap) * 50.0
        rel_s = node.uptime_score * 0.5
        cap_s = min(30.0, (avail_ram + avail_vram) / need * 10.0)
        bonus = 20.0 if node.node_type == "mist_node" else 0.0
        score = 0.0
        if has_loc:
            score += prox * weight
        score += price_s
        score += rel_s
        score += cap_s
        score += bonus
        match = Match(
            node_id=node.node_id,
            node_name=node.name,
            node_type=node.node_type,
            region=node.region,
            match_score=score,
            proximity_score=prox,
            price_score=price_s,
            reliability_score=rel_s,
            capacity_score=cap_s,
            type_bonus=bonus,
            distance_km=dist,
            estimated_cost_pusd=need * req.duration_s * node.price_pusd,
            estimated_latency_ms=node.base_latency_ms,
            price_pusd=node.price_pusd,
            available_ram_gb=avail_ram,
            available_vram_gb=avail_vram,
            uptime_score=node.uptime_score,
            arrival_seq=node.arrival_seq,
            uptime_windows=node.uptime_windows,
            reputation_score=node.reputation_score,
        )
        scored.append(((-score, node.price_pusd, node.arrival_seq), match))
    scored.sort(key=lambda item: item[0])
    return [match for _, match in scored[:k]]


def merge_matches(parts: Iterable[Sequence[Match]], k: int) -> list[Match]:
    """Merge per-region rankings into one, best first (ties: price, arrival, region, id)."""
    everything = [m for part in parts for m in part]
    everything.sort(
        key=lambda m: (-m.match_score, m.price_pusd, m.arrival_seq, m.region, m.node_id)
    )
    return everything[:k]


def browse(
    books: AskBook | Iterable[AskBook],
    *,
    now_ms: int,
    node_type: str | None = None,
    region: str | None = None,
    min_ram_gb: int = 0,
    min_vram_gb: int = 0,
    max_price_pusd: int | None = None,
    min_uptime_score: float = 0.0,
    lat: float | None = None,
    lng: float | None = None,
    max_distance_km: float | None = None,
    offset: int = 0,
    limit: int = 50,
) -> tuple[list[Offer], int]:
    """Live asks with free capacity passing the filters, cheapest first (ties: earlier arrival,
    then region), as (page, total_count). `max_distance_km` applies only with lat/lng and has no
    default. Raises InvalidRequest for a bad filter.
    """
    _check_int(min_ram_gb, "min_ram_gb", minimum=0)
    _check_int(min_vram_gb, "min_vram_gb", minimum=0)
    if max_price_pusd is not None:
        _check_int(max_price_pusd, "max_price_pusd", minimum=1)
    _check_uptime(min_uptime_score)
    _check_location(lat, lng)
    _check_distance(max_distance_km)
    _check_int(offset, "offset", minimum=0)
    _check_int(limit, "limit", minimum=0)
    if node_type is not None and node_type not in NODE_TYPES:
        raise InvalidRequest(f"node_type must be one of {', '.join(NODE_TYPES)}", field="node_type")
    has_loc = lat is not None and lng is not None
    qlat = float(lat) if lat is not None else 0.0
    qlng = float(lng) if lng is not None else 0.0
    qx, qy, qz = _unit_vector(qlat, qlng)
    max_dist = math.inf if max_distance_km is None else float(max_distance_km)
    chord_out2, chord_in2 = _distance_thresholds(max_dist)
    cap = math.inf if max_price_pusd is None else float(max_price_pusd)
    type_code = -1 if node_type is None else NODE_TYPES.index(node_type)
    book_list = [books] if isinstance(books, AskBook) else list(books)
    m = offset + limit
    total = 0
    candidates: list[tuple[int, int, str, Offer]] = []
    for book in book_list:
        if (region is not None and book.region != region) or len(book) == 0:
            continue
        count, rows, dists = _browse_kernel(
            book._f,
            book._i,
            len(book),
            now_ms,
            min_ram_gb,
            min_vram_gb,
            cap,
            float(min_uptime_score),
            type_code,
            has_loc,
            qlat,
            qlng,
            qx,
            qy,
            qz,
            max_dist,
            chord_out2,
            chord_in2,
            min(m, len(book)),
        )
        total += int(count)
        for row, dist in zip(rows.tolist(), dists.tolist(), strict=True):
            offer = _offer(book, row, dist if has_loc else None)
            candidates.append((offer.price_pusd, int(book._i[_I_ARRIVAL, row]), book.region, offer))
    candidates.sort(key=lambda c: c[:3])
    return [c[3] for c in candidates[offset:m]], total


def _offer(book: AskBook, row: int, distance_km: float | None) -> Offer:
    f = book._f[:, row].tolist()
    i = book._i[:, row].tolist()
    node_id = book._id_at[row]
    stake, held, _value = book._money.get(node_id, (0, 0, 0))
    return Offer(
        node_id=node_id,
        node_name=book._name[node_id],
        node_type=NODE_TYPES[i[_I_TYPE]],  # type: ignore[arg-type]
        region=book.region,
        available_ram_gb=i[_I_AVAIL_RAM],
        available_vram_gb=i[_I_AVAIL_VRAM],
        price_pusd=i[_I_PRICE_PUSD],
        egress_price_pusd=i[_I_EGRESS_PUSD],
        min_duration_s=i[_I_MIN_DUR],
        max_duration_s=i[_I_MAX_DUR],
        uptime_score=f[_F_UPTIME],
        distance_km=distance_km,
        estimated_latency_ms=f[_F_LATENCY],
        bandwidth_mbps=i[_I_BANDWIDTH],
        uptime_windows=i[_I_UP_WINDOWS],
        reputation_score=i[_I_REPUTATION],
        stake_pusd=stake,
        stake_held_pusd=held,
    )


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel, so no request pays for it."""
    book = AskBook("warm-up", capacity=16)
    book.upsert(
        Node(
            node_id="w",
            owner_id="w",
            region="warm-up",
            node_type="mist_node",
            name="w",
            lat=1.0,
            lng=2.0,
            total_ram_gb=8,
            total_vram_gb=8,
            offered_ram_gb=8,
            offered_vram_gb=8,
            price_pusd=10,
        )
    )
    rank(book, MatchRequest(ram_gb=1, vram_gb=1, max_price_pusd=100, lat=1.0, lng=2.0), 0)
    rank(book, MatchRequest(ram_gb=1, vram_gb=1, max_price_pusd=100), 0)
    browse(book, now_ms=0, lat=1.0, lng=2.0, max_distance_km=10.0)
    browse(book, now_ms=0)
