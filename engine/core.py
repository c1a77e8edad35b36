"""The pure core of the live market: its rules and arithmetic. No Redis, no clock, no await.

Time is an argument; functions return values or a `MarketError` describing a refusal. The Redis
adapter (`engine.market`) computes here whatever needs exact big-integer money (a settlement's
cost and hash) and hands it to a Lua script, which repeats the cheap checks below inside the
atomic step. A plain model of the market (tests/engine/model.py) runs on these functions and is
compared with the scripts after every step of a property-based test, so the two cannot drift.

Rules
- Money is integer pico-USD. Prices and price caps are at most `MAX_PRICE_PUSD` (1 USD per
  GB-second) so that a price is exact in a Lua double (< 2**53) and as a sorted-set score. Amounts
  (a contract's cost) are Python ints and reach Lua as strings.
- Bounds: every quantity has one (`MAX_GB`, `MAX_DURATION_S`, `MAX_PRICE_PUSD`,
  `MAX_EGRESS_PRICE_PUSD`, `MAX_EGRESS_MGB`), and a lease's value, size x duration x price cap,
  is at most `MAX_LEASE_VALUE_PUSD` (1,000,000 USD, the spec's `total_cost_usd DECIMAL(10,4)`)
  at reserve, bid and every extension; egress billed at settlement is at most
  `MAX_EGRESS_VALUE_PUSD`. So a contract's cost is at most 2e18 pico-USD, under a signed 64-bit
  integer (9.2e18: Postgres `bigint`, Redis `INCRBY`) by a factor of 4.6, whatever the inputs.
- Cost of a contract: `(ram_gb + vram_gb) * used_s * price_pusd
  + egress_mgb * egress_price_pusd // 1000`, with `used_s = ceil((now_ms - start_ms) / 1000)`
  clamped to `[0, duration_s]` (a second started is a second paid, never beyond the term).
- Settlement hash: SHA-256 (hex) of the canonical record of the closed contract: every field of
  `Contract` except `settlement_hash`, `version`, `hold_pusd` and `hold_month`, as JSON with
  sorted keys, no whitespace, integers as integers, UTF-8. Anyone holding the record can
  recompute it. The delivery fields (`lease_state` and after it, `LEASE_FIELDS`) are in the
  record of a delivered lease only, so the hash of a contract that was not delivered is what it
  was before delivery existed; a delivered lease's record holds its meter and the digest its node
  reported.
- Delivered leases (`Contract.lease_state` other than `none`) bill delivered time: from the
  node's ready report (`ready_ms`; never ready: nothing) to the first of now, the end of the
  term, the close order (`closing_ms`) and, for a node that went offline, its last heartbeat.
  Egress bills the node's meter (`egress_bytes`, 1 GB = 10**9 bytes, rounded to the nearest
  thousandth of a GB, half to even) on completion only: a lease that failed or failed over
  bills no egress, as before. The renter's own figure (`claimed_egress_mgb`) is recorded, never
  billed.
- Asks: a node is listed (in its region's asks sorted set, at its price) iff it is `active`,
  has free capacity (`available_ram_gb + available_vram_gb > 0`) and its ask has not expired
  (`ask_expires_ms == 0 or now_ms < ask_expires_ms`). The rule is evaluated at every change to
  the node; `expire_asks` delists nodes whose ask expired with no change since.
- Capacity: a heartbeat sets `offered = min(total, available + reserved)` per dimension (the
  beat's `available` excludes what Mnemo already leases); reserve adds to `reserved` only if
  `available` covers it; settle subtracts. So `reserved + available == offered <= total` and
  nothing is ever negative.
- Offline deadline: `last heartbeat (or registration) + floor(missed * heartbeat_interval_s *
  1000)`; a node whose deadline has passed may be marked offline.
- Bid priority: higher `max_price_pusd` first, then earlier `seq` (arrival). The book stores a bid
  as sorted-set member `"<seq:016d>:<bid_id>"` with score `-max_price_pusd`, so ascending order
  (score, then member bytes) is priority order.
- Bid fills: a fill never exceeds the remaining size (per dimension). Without `allow_split` a
  fill is the whole remainder; with it, a fill is at least `max(min_fill_gb, 1)` GB (ram + vram)
  unless it is the whole remainder. `filled + remaining == original` always; a bid whose
  remainder reaches zero is `filled` and leaves the book.
- Reserve preconditions, in the order the scripts check them: node exists; (bid exists, is open,
  not expired, matches the request, fill rules); node active; ask not expired; duration within
  the node's `[min_duration_s, max_duration_s]`; node price <= cap; free capacity covers the
  request. Location, uptime and node-type filters belong to the matcher (`engine.scoring`).

Complexity: every function is O(size of its arguments); `plan_fills` is O(candidates).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, TypeVar

import msgspec

from engine import trust
from engine.errors import (
    BudgetExceeded,
    CapacityTaken,
    Conflict,
    InsufficientFunds,
    InvalidRequest,
    MarketError,
    NotFound,
    PaymentRequired,
    TooManyOpen,
    Unavailable,
)
from engine.trust import (  # noqa: F401  (refusal messages the scripts share, as the others)
    MAINTENANCE_EMPTY,
    MAINTENANCE_IN_PROGRESS,
    MAINTENANCE_NONE,
    MAINTENANCE_NOT_OWNER,
    MAINTENANCE_TOO_EARLY,
    MAINTENANCE_TOO_LATE,
    MAINTENANCE_TOO_LONG,
    MAINTENANCE_TOO_SOON,
)
from engine.types import NODE_TYPES, Bid, Contract, Heartbeat, Node, NodeChanges

__all__ = [
    "FILLS_WINDOW_MS",
    "GEO_LAT_LIMIT",
    "LEASE_FIELDS",
    "MAX_DURATION_S",
    "MAX_EGRESS_MGB",
    "MAX_EGRESS_PRICE_PUSD",
    "MAX_EGRESS_VALUE_PUSD",
    "MAX_GB",
    "MAX_LEASE_VALUE_PUSD",
    "MAX_PRICE_PUSD",
    "MAX_TIME_MS",
    "Fill",
    "accrued_cost_pusd",
    "apply_fill",
    "ask_listed",
    "bid_expired",
    "bid_member",
    "bid_priority",
    "bid_refusal",
    "bid_score",
    "billed_seconds",
    "change_fields",
    "close_contract",
    "contract_cost_pusd",
    "egress_mgb",
    "egress_mgb_of_bytes",
    "egress_value_refusal",
    "fill_refusal",
    "fill_size",
    "from_fields",
    "geo_lat",
    "hb_deadline_ms",
    "hold_pusd",
    "hold_refusal",
    "lease_value_refusal",
    "longest_lease_s",
    "month_of",
    "new_bid",
    "new_node",
    "offered_after_heartbeat",
    "open_refusal",
    "parse_bid_member",
    "plan_fills",
    "platform_fee_pusd",
    "reserve_refusal",
    "settlement_hash",
    "settlement_record",
    "successor_duration_s",
    "to_fields",
    "used_seconds",
    "validate_changes",
    "validate_heartbeat",
    "validate_reserve",
]

MAX_PRICE_PUSD = 10**12
"""The highest price or price cap accepted: 1 USD per GB-second (about a thousand times what
memory rents for; anything above is a unit mistake)."""
MAX_EGRESS_PRICE_PUSD = 10**15
"""The highest egress price: 1,000 USD per GB."""
MAX_GB = 65_536
"""The most RAM (or VRAM) one node, bid or contract may hold, in GB (64 TiB)."""
MAX_DURATION_S = 30 * 86_400
"""Thirty days: the longest term a node may offer or a request may ask for (with extensions)."""
MAX_EGRESS_MGB = 10**9
"""The most egress a settlement may report: 1,000,000 GB, in thousandths of a GB."""
MAX_LEASE_VALUE_PUSD = 10**18
"""The most a lease may be worth, size x duration x price cap: 1,000,000 USD."""
MAX_EGRESS_VALUE_PUSD = 10**18
"""The most egress one contract may bill: 1,000,000 USD."""
MAX_TIME_MS = 253_402_300_799_999
"""The last instant any time field may name (9999-12-31T23:59:59.999Z), so every time converts
to a date in Python and Postgres alike."""
FILLS_WINDOW_MS = 86_400_000
"""Fills are kept this long for quotes (last fill price, 24 h volume)."""
GEO_LAT_LIMIT = 85.05112878
"""Redis GEO cannot index latitudes beyond this; the index clamps, the node keeps its own."""

_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_REGION = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

# Refusal messages: the Lua scripts return the same strings (tests compare them verbatim).
NODE_NOT_FOUND = "node not found"
BID_NOT_FOUND = "bid not found"
CONTRACT_NOT_FOUND = "contract not found"
ID_IN_USE = "id already in use"
ASK_EXPIRED = "ask expired"
BAD_DURATION = "duration outside the node's terms"
PRICE_ABOVE_CAP = "price above cap"
CAPACITY_TAKEN = "capacity taken"
BID_EXPIRED = "bid expired"
BID_MISMATCH = "reserve does not match the bid"
FILL_TOO_BIG = "fill exceeds the bid's remaining size"
FILL_NOT_SPLIT = "bid does not allow split fills"
FILL_TOO_SMALL = "fill below the bid's minimum size"
CONTRACT_ENDED = "contract has ended"
NOT_STALE = "heartbeat deadline has not passed"
SAME_NODE = "failover needs another node"
MIN_OVER_MAX = "min_duration_s exceeds max_duration_s"
LEASE_NOT_FOUND = "no such lease on this node"
NOT_DELIVERED = "the lease is not delivered"
NOT_CLOSED = "the lease has not been closed"
LEASE_CLOSING = "lease is closing"


# ---------------------------------------------------------------------------------------------
# Validation of inputs (InvalidRequest names the offending field)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(message, field=field)


def _check_id(value: object, field: str) -> None:
    _check(
        isinstance(value, str) and bool(_ID.fullmatch(value)),
        field,
        "must be 1-128 characters of letters, digits, '_', '.', '-'",
    )


def _check_int(value: object, field: str, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest("must be an integer", field=field)
    _check(lo <= value <= hi, field, f"must be between {lo} and {hi}")


def _check_float(value: object, field: str, lo: float, hi: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequest("must be a number", field=field)
    _check(math.isfinite(value) and lo <= value <= hi, field, f"must be between {lo} and {hi}")


def _check_coordinates(lat: object, lng: object) -> None:
    _check_float(lat, "lat", -90.0, 90.0)
    _check_float(lng, "lng", -180.0, 180.0)


_S = TypeVar("_S", bound=msgspec.Struct)


def _typed(obj: _S) -> _S:
    """`obj` re-validated against its own type (Structs built in code are not type-checked)."""
    try:
        return msgspec.convert(msgspec.to_builtins(obj), type(obj))
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = text.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in text else None
        raise InvalidRequest(text.split(" - at ")[0], field=field) from None


def new_node(node: Node, now_ms: int) -> Node:
    """The node as registration stores it, or InvalidRequest.

    `offered = min(total, given offered)`, nothing reserved, `active`, no heartbeat yet
    (`last_heartbeat_ms = 0`), `created_ms = now_ms`; the script assigns `arrival_seq`.
    """
    node = _typed(node)
    _check_id(node.node_id, "node_id")
    _check(bool(node.owner_id), "owner_id", "must not be empty")
    _check(
        bool(_REGION.fullmatch(node.region)),
        "region",
        "must be 1-64 characters of letters, digits, '_', '.', '-'",
    )
    _check(node.node_type in NODE_TYPES, "node_type", f"must be one of {', '.join(NODE_TYPES)}")
    _check(0 < len(node.name) <= 200, "name", "must be 1-200 characters")
    _check_coordinates(node.lat, node.lng)
    _check_int(node.total_ram_gb, "total_ram_gb", 0, MAX_GB)
    _check_int(node.total_vram_gb, "total_vram_gb", 0, MAX_GB)
    _check(
        node.total_ram_gb + node.total_vram_gb > 0,
        "total_ram_gb",
        "a node must have some RAM or VRAM",
    )
    _check_int(node.offered_ram_gb, "offered_ram_gb", 0, MAX_GB)
    _check_int(node.offered_vram_gb, "offered_vram_gb", 0, MAX_GB)
    _check_int(node.price_pusd, "price_pusd", 1, MAX_PRICE_PUSD)
    _check_int(node.egress_price_pusd, "egress_price_pusd", 0, MAX_EGRESS_PRICE_PUSD)
    _check_int(node.min_duration_s, "min_duration_s", 1, MAX_DURATION_S)
    _check_int(node.max_duration_s, "max_duration_s", 1, MAX_DURATION_S)
    _check(node.min_duration_s <= node.max_duration_s, "min_duration_s", MIN_OVER_MAX)
    _check_int(node.bandwidth_mbps, "bandwidth_mbps", 0, 10**9)
    _check_float(node.base_latency_ms, "base_latency_ms", 0.0, 1e9)
    _check_float(node.uptime_score, "uptime_score", 0.0, 100.0)
    _check_int(node.reputation_score, "reputation_score", 0, 10**9)
    _check_float(node.heartbeat_interval_s, "heartbeat_interval_s", 0.001, 86_400.0)
    _check_int(node.ask_expires_ms, "ask_expires_ms", 0, MAX_TIME_MS)
    return msgspec.structs.replace(
        node,
        offered_ram_gb=min(node.total_ram_gb, node.offered_ram_gb),
        offered_vram_gb=min(node.total_vram_gb, node.offered_vram_gb),
        reserved_ram_gb=0,
        reserved_vram_gb=0,
        status="active",
        last_heartbeat_ms=0,
        arrival_seq=0,
        created_ms=now_ms,
        uptime_score=trust.NEW_NODE_SCORE,
        reputation_score=trust.reputation(0, 0),
        uptime_windows=0,
        suspend_at_ms=0,
        suspended_ms=0,
        maint_start_ms=0,
        maint_end_ms=0,
        maint_last_ms=0,
        delivered_contracts=0,
        cut_contracts=0,
        stake_pusd=0,
        stake_held_pusd=0,
        lease_value_pusd=0,
    )


def validate_changes(changes: NodeChanges) -> NodeChanges:
    """The changes re-validated (each given field by the registration rules), or InvalidRequest.

    Whether `min_duration_s <= max_duration_s` after the change depends on the stored node and
    is checked inside the update script.
    """
    changes = _typed(changes)
    if changes.name is not None:
        _check(0 < len(changes.name) <= 200, "name", "must be 1-200 characters")
    if changes.price_pusd is not None:
        _check_int(changes.price_pusd, "price_pusd", 1, MAX_PRICE_PUSD)
    if changes.egress_price_pusd is not None:
        _check_int(changes.egress_price_pusd, "egress_price_pusd", 0, MAX_EGRESS_PRICE_PUSD)
    if changes.min_duration_s is not None:
        _check_int(changes.min_duration_s, "min_duration_s", 1, MAX_DURATION_S)
    if changes.max_duration_s is not None:
        _check_int(changes.max_duration_s, "max_duration_s", 1, MAX_DURATION_S)
    if changes.bandwidth_mbps is not None:
        _check_int(changes.bandwidth_mbps, "bandwidth_mbps", 0, 10**9)
    if changes.base_latency_ms is not None:
        _check_float(changes.base_latency_ms, "base_latency_ms", 0.0, 1e9)
    if changes.ask_expires_ms is not None:
        _check_int(changes.ask_expires_ms, "ask_expires_ms", 0, MAX_TIME_MS)
    if (changes.lat is None) != (changes.lng is None):
        raise InvalidRequest("lat and lng change together", field="lat")
    if changes.lat is not None:
        _check_coordinates(changes.lat, changes.lng)
    return changes


def validate_heartbeat(beat: Heartbeat) -> Heartbeat:
    """The beat checked field by field (float fields made floats), or InvalidRequest. This is
    on the hot path of heartbeat batches, so it checks types directly instead of re-encoding,
    and a beat of the common shape (no location or bandwidth, every field of its exact type and
    in range) is passed by one expression; anything else takes the full checks."""
    if (
        type(beat) is Heartbeat
        and type(beat.node_id) is str
        and beat.node_id
        and type(ram := beat.available_ram_gb) is int
        and 0 <= ram <= MAX_GB
        and type(vram := beat.available_vram_gb) is int
        and 0 <= vram <= MAX_GB
        and beat.lat is None
        and beat.lng is None
        and beat.bandwidth_mbps is None
        and ((cpu := beat.cpu_usage_pct) is None or (type(cpu) is float and 0.0 <= cpu <= 100.0))
        and ((gpu := beat.gpu_usage_pct) is None or (type(gpu) is float and 0.0 <= gpu <= 100.0))
        and ((temp := beat.temperature_c) is None or (type(temp) is int and -100 <= temp <= 300))
    ):
        return beat
    return _validate_heartbeat_fully(beat)


def _validate_heartbeat_fully(beat: Heartbeat) -> Heartbeat:
    """validate_heartbeat's plain twin: every check, one by one (the tests compare the two)."""
    if not isinstance(beat, Heartbeat):
        raise InvalidRequest("must be a heartbeat", field="beats")
    _check(isinstance(beat.node_id, str) and bool(beat.node_id), "node_id", "must not be empty")
    _check_int(beat.available_ram_gb, "available_ram_gb", 0, MAX_GB)
    _check_int(beat.available_vram_gb, "available_vram_gb", 0, MAX_GB)
    if (beat.lat is None) != (beat.lng is None):
        raise InvalidRequest("lat and lng come together", field="lat")
    if beat.lat is not None:
        _check_coordinates(beat.lat, beat.lng)
    if beat.bandwidth_mbps is not None:
        _check_int(beat.bandwidth_mbps, "bandwidth_mbps", 0, 10**9)
    if beat.cpu_usage_pct is not None:
        _check_float(beat.cpu_usage_pct, "cpu_usage_pct", 0.0, 100.0)
    if beat.gpu_usage_pct is not None:
        _check_float(beat.gpu_usage_pct, "gpu_usage_pct", 0.0, 100.0)
    if beat.temperature_c is not None:
        _check_int(beat.temperature_c, "temperature_c", -100, 300)
    if any(type(v) is int for v in (beat.lat, beat.lng, beat.cpu_usage_pct, beat.gpu_usage_pct)):
        beat = msgspec.structs.replace(
            beat,
            **{
                name: float(v)
                for name in ("lat", "lng", "cpu_usage_pct", "gpu_usage_pct")
                if type(v := getattr(beat, name)) is int
            },
        )
    return beat


def validate_reserve(
    *,
    node_id: str,
    client_id: str,
    user_id: str,
    ram_gb: int,
    vram_gb: int,
    duration_s: int,
    max_price_pusd: int,
) -> None:
    """Refuse a malformed reserve (InvalidRequest) before anything is sent to Redis."""
    _check(isinstance(node_id, str) and bool(node_id), "node_id", "must not be empty")
    _check_id(client_id, "client_id")
    _check(isinstance(user_id, str) and bool(user_id), "user_id", "must not be empty")
    _check_int(ram_gb, "ram_gb", 0, MAX_GB)
    _check_int(vram_gb, "vram_gb", 0, MAX_GB)
    _check(ram_gb + vram_gb > 0, "ram_gb", "ram_gb + vram_gb must be positive")
    _check_int(duration_s, "duration_s", 1, MAX_DURATION_S)
    _check_int(max_price_pusd, "max_price_pusd", 1, MAX_PRICE_PUSD)
    if refusal := lease_value_refusal(ram_gb + vram_gb, duration_s, max_price_pusd, "duration_s"):
        raise refusal


def lease_value_refusal(
    size_gb: int, duration_s: int, max_price_pusd: int, field: str
) -> InvalidRequest | None:
    """Why a lease of `size_gb` (ram + vram) for `duration_s` at up to `max_price_pusd` may not
    be taken (worth over `MAX_LEASE_VALUE_PUSD`), naming `field`; None if it may."""
    value = size_gb * duration_s * max_price_pusd
    if value <= MAX_LEASE_VALUE_PUSD:
        return None
    return InvalidRequest(
        f"the lease would be worth up to {usd_text(value)} USD (size x duration x price cap), "
        f"over the {usd_text(MAX_LEASE_VALUE_PUSD)} USD one contract may be worth: ask for "
        "less memory, a shorter term or a lower price cap",
        field=field,
    )


def longest_lease_s(size_gb: int, max_price_pusd: int) -> int:
    """The longest term a lease of `size_gb` at up to `max_price_pusd` may reach within
    `MAX_LEASE_VALUE_PUSD` (extensions included)."""
    return MAX_LEASE_VALUE_PUSD // (size_gb * max_price_pusd)


def egress_value_refusal(egress_mgb: int, egress_price_pusd: int) -> InvalidRequest | None:
    """Why this much egress may not be billed (over `MAX_EGRESS_MGB` or worth over
    `MAX_EGRESS_VALUE_PUSD`); None if it may."""
    if egress_mgb > MAX_EGRESS_MGB:
        return InvalidRequest(
            f"at most {MAX_EGRESS_MGB // 1000:,} GB of egress per contract", field="egress_gb"
        )
    value = egress_mgb * egress_price_pusd // 1000
    if value <= MAX_EGRESS_VALUE_PUSD:
        return None
    return InvalidRequest(
        f"that egress would bill {usd_text(value)} USD, over the "
        f"{usd_text(MAX_EGRESS_VALUE_PUSD)} USD of egress one contract may bill",
        field="egress_gb",
    )


def usd_text(amount_pusd: int) -> str:
    """Pico-USD as a decimal USD text without trailing zeros, e.g. `1000000` or `0.5`."""
    text = f"{amount_pusd // 10**12:,}"
    cents = amount_pusd % 10**12
    return f"{text}.{cents:012d}".rstrip("0") if cents else text


def new_bid(bid: Bid, now_ms: int) -> Bid:
    """The bid as `place_bid` stores it, or InvalidRequest: open, nothing filled,
    `created_ms = now_ms`; the script assigns `seq`."""
    bid = _typed(bid)
    _check_id(bid.bid_id, "bid_id")
    _check(
        bool(_REGION.fullmatch(bid.region)),
        "region",
        "must be 1-64 characters of letters, digits, '_', '.', '-'",
    )
    _check_id(bid.client_id, "client_id")
    _check(bool(bid.user_id), "user_id", "must not be empty")
    _check_int(bid.ram_gb, "ram_gb", 0, MAX_GB)
    _check_int(bid.vram_gb, "vram_gb", 0, MAX_GB)
    _check(bid.ram_gb + bid.vram_gb > 0, "ram_gb", "ram_gb + vram_gb must be positive")
    _check_int(bid.duration_s, "duration_s", 1, MAX_DURATION_S)
    _check_int(bid.max_price_pusd, "max_price_pusd", 1, MAX_PRICE_PUSD)
    if refusal := lease_value_refusal(
        bid.ram_gb + bid.vram_gb, bid.duration_s, bid.max_price_pusd, "duration_s"
    ):
        raise refusal
    if (bid.lat is None) != (bid.lng is None):
        raise InvalidRequest("lat and lng come together", field="lat")
    if bid.lat is not None:
        _check_coordinates(bid.lat, bid.lng)
    if bid.max_distance_km is not None:
        _check_float(bid.max_distance_km, "max_distance_km", 1e-9, 1e5)
    _check_float(bid.min_uptime_score, "min_uptime_score", 0.0, 100.0)
    _check(
        bid.node_type is None or bid.node_type in NODE_TYPES,
        "node_type",
        f"must be one of {', '.join(NODE_TYPES)}",
    )
    _check_int(bid.min_fill_gb, "min_fill_gb", 0, 2 * MAX_GB)
    _check_int(bid.expires_ms, "expires_ms", 0, MAX_TIME_MS)
    _check(bid.expires_ms == 0 or bid.expires_ms > now_ms, "expires_ms", "is in the past")
    return msgspec.structs.replace(
        bid,
        filled_ram_gb=0,
        filled_vram_gb=0,
        status="open",
        created_ms=now_ms,
        seq=0,
        contract_ids=[],
    )


# ---------------------------------------------------------------------------------------------
# Nodes: asks, heartbeats, terms


def ask_listed(node: Node, now_ms: int) -> bool:
    """Whether the node belongs in its region's asks sorted set at `now_ms`."""
    return (
        node.status == "active"
        and not node.suspended_ms
        and node.available_ram_gb + node.available_vram_gb > 0
        and (node.ask_expires_ms == 0 or now_ms < node.ask_expires_ms)
    )


def offered_after_heartbeat(total_gb: int, available_gb: int, reserved_gb: int) -> int:
    """What the node offers after a beat reporting `available_gb` free beyond Mnemo's leases."""
    return min(total_gb, available_gb + reserved_gb)


def hb_deadline_ms(last_ms: int, interval_s: float, missed: int) -> int:
    """The instant after which a node that last beat (or registered) at `last_ms` is offline.
    The Lua scripts compute the same double expression, so the results are bit-identical."""
    return last_ms + math.floor(missed * interval_s * 1000)


def geo_lat(lat: float) -> float:
    """The latitude as the GEO index holds it (clamped to what Redis can index)."""
    return max(-GEO_LAT_LIMIT, min(GEO_LAT_LIMIT, lat))


def reserve_refusal(
    node: Node, *, ram_gb: int, vram_gb: int, duration_s: int, max_price_pusd: int, now_ms: int
) -> MarketError | None:
    """Why this node cannot take this lease now (status, ask expiry, terms, price, capacity),
    or None. The reserve and failover scripts check the same things in the same order."""
    if node.status != "active":
        return Unavailable(f"node is {node.status}", field="node_id")
    if node.suspended_ms:
        return Unavailable("node is suspended", field="node_id")
    if node.ask_expires_ms != 0 and now_ms >= node.ask_expires_ms:
        return Unavailable(ASK_EXPIRED, field="node_id")
    if not node.min_duration_s <= duration_s <= node.max_duration_s:
        return CapacityTaken(BAD_DURATION, field="duration_s")
    if node.price_pusd > max_price_pusd:
        return CapacityTaken(PRICE_ABOVE_CAP, field="max_price_pusd")
    if ram_gb > node.available_ram_gb or vram_gb > node.available_vram_gb:
        return CapacityTaken(CAPACITY_TAKEN, field="node_id")
    return None


# ---------------------------------------------------------------------------------------------
# Contracts: pricing and settlement


def used_seconds(start_ms: int, now_ms: int, duration_s: int) -> int:
    """Seconds to bill at `now_ms`: every started second, never below 0 nor beyond the term."""
    return min(duration_s, max(0, -(-(now_ms - start_ms) // 1000)))


def egress_mgb(egress_gb: float | int | str | Decimal) -> int:
    """Egress in GB (as the API gives it) to exact thousandths of a GB, half-even."""
    try:
        amount = Decimal(str(egress_gb))
    except InvalidOperation:
        raise InvalidRequest("must be a number", field="egress_gb") from None
    _check(amount.is_finite() and amount >= 0, "egress_gb", "must be a non-negative number")
    _check(
        amount * 1000 <= MAX_EGRESS_MGB, "egress_gb", f"must be at most {MAX_EGRESS_MGB // 1000}"
    )
    return int((amount * 1000).to_integral_value(rounding=ROUND_HALF_EVEN))


def contract_cost_pusd(
    *,
    ram_gb: int,
    vram_gb: int,
    used_s: int,
    price_pusd: int,
    egress_mgb: int = 0,
    egress_price_pusd: int = 0,
) -> int:
    """`(ram_gb + vram_gb) * used_s * price_pusd + egress_mgb * egress_price_pusd // 1000`."""
    return (ram_gb + vram_gb) * used_s * price_pusd + egress_mgb * egress_price_pusd // 1000


def billed_seconds(contract: Contract, now_ms: int, stop_ms: int | None = None) -> int:
    """Seconds to bill at `now_ms`. Not delivered: `used_seconds` from the start (the
    reservation). Delivered: from the ready report to the first of `now_ms`, the end of the
    term, the close order and `stop_ms` (a failed node's last heartbeat); never ready: 0."""
    if contract.lease_state == "none":
        return used_seconds(contract.start_ms, now_ms, contract.duration_s)
    if contract.ready_ms == 0:
        return 0
    stop = min(now_ms, contract.end_ms)
    if contract.closing_ms:
        stop = min(stop, contract.closing_ms)
    if stop_ms is not None:
        stop = min(stop, stop_ms)
    return used_seconds(contract.ready_ms, stop, contract.duration_s)


BYTES_PER_MGB = 10**6
"""Egress is priced per GB of 10**9 bytes (decimal, as network traffic is counted); the market's
unit is the thousandth of a GB, 10**6 bytes."""


def egress_mgb_of_bytes(egress_bytes: int, egress_price_pusd: int = 0) -> int:
    """A meter's bytes in thousandths of a GB, rounded half to even, and clamped to what one
    contract may bill (`MAX_EGRESS_MGB`, `MAX_EGRESS_VALUE_PUSD` at `egress_price_pusd`): a
    meter is a measurement, and an automatic settlement must not be refused."""
    q, r = divmod(max(0, egress_bytes), BYTES_PER_MGB)
    if 2 * r > BYTES_PER_MGB or (2 * r == BYTES_PER_MGB and q % 2):
        q += 1
    q = min(q, MAX_EGRESS_MGB)
    if egress_price_pusd > 0:
        q = min(q, MAX_EGRESS_VALUE_PUSD * 1000 // egress_price_pusd)
    return q


def accrued_cost_pusd(contract: Contract, now_ms: int) -> int:
    """What an open contract has cost so far: its `billed_seconds` at `now_ms` at its price.
    Egress is left out: it is billed at settlement."""
    return contract_cost_pusd(
        ram_gb=contract.ram_gb,
        vram_gb=contract.vram_gb,
        used_s=billed_seconds(contract, now_ms),
        price_pusd=contract.price_pusd,
    )


_UNHASHED = frozenset({"settlement_hash", "version", "hold_pusd", "hold_month"})
LEASE_FIELDS = (
    "lease_state",
    "ready_ms",
    "lease_host",
    "lease_port",
    "lease_tls",
    "closing_ms",
    "reported_ms",
    "egress_bytes",
    "peak_memory_bytes",
    "claimed_egress_mgb",
    "lease_digest",
)
"""The delivery fields of `Contract` (in the settlement record of a delivered lease only)."""
_LEASE = frozenset(LEASE_FIELDS)


def settlement_record(contract: Contract) -> dict[str, Any]:
    """The fields the settlement hash covers (all but `settlement_hash`, `version` and the money
    held for it, `hold_pusd` and `hold_month`: how it was paid for is not the lease; the delivery
    fields only for a delivered lease)."""
    skip = _UNHASHED if contract.lease_state != "none" else _UNHASHED | _LEASE
    return {
        name: getattr(contract, name) for name in contract.__struct_fields__ if name not in skip
    }


def settlement_hash(contract: Contract) -> str:
    """SHA-256 hex of the canonical JSON of `settlement_record(contract)`."""
    canonical = json.dumps(
        settlement_record(contract), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def close_contract(
    contract: Contract,
    *,
    now_ms: int,
    status: str,
    egress_mgb: int = 0,
    successor_id: str | None = None,
    stop_ms: int | None = None,
) -> Contract:
    """The contract as it is after closing at `now_ms` with `status` (completed, failed or
    failed_over): time used, cost, completion time, the next version and the settlement hash.
    InvalidRequest (`egress_gb`) when the egress is more than a contract may bill.

    A delivered lease bills its `billed_seconds` (`stop_ms`: its failed node's last heartbeat)
    and, completed, its metered egress (`egress_mgb` is then ignored: the renter's figure is
    `claimed_egress_mgb`); its `lease_state` becomes `closed` (completed) or `failed`."""
    lease_state = contract.lease_state
    if lease_state != "none":
        egress_mgb = 0
        if status == "completed":
            egress_mgb = egress_mgb_of_bytes(contract.egress_bytes, contract.egress_price_pusd)
        lease_state = "closed" if status == "completed" else "failed"
    elif refusal := egress_value_refusal(egress_mgb, contract.egress_price_pusd):
        raise refusal
    used = billed_seconds(contract, now_ms, stop_ms)
    closed = msgspec.structs.replace(
        contract,
        lease_state=lease_state,
        status=status,  # type: ignore[arg-type]
        used_s=used,
        egress_mgb=egress_mgb,
        cost_pusd=contract_cost_pusd(
            ram_gb=contract.ram_gb,
            vram_gb=contract.vram_gb,
            used_s=used,
            price_pusd=contract.price_pusd,
            egress_mgb=egress_mgb,
            egress_price_pusd=contract.egress_price_pusd,
        ),
        completed_ms=now_ms,
        successor_id=successor_id,
        settlement_hash=None,
        version=contract.version + 1,
    )
    return msgspec.structs.replace(closed, settlement_hash=settlement_hash(closed))


def successor_duration_s(contract: Contract, now_ms: int, stop_ms: int | None = None) -> int:
    """The term a failover successor gets: what the contract has not yet billed (may be 0)."""
    return contract.duration_s - billed_seconds(contract, now_ms, stop_ms)


# ---------------------------------------------------------------------------------------------
# Bids: priority, fills, crossing


def bid_member(seq: int, bid_id: str) -> str:
    """The bid's member in the region's book (ties in price break by this, ascending)."""
    return f"{seq:016d}:{bid_id}"


def parse_bid_member(member: str) -> tuple[int, str]:
    """(seq, bid_id) from a book member."""
    seq, _, bid_id = member.partition(":")
    return int(seq), bid_id


def bid_score(max_price_pusd: int) -> int:
    """The bid's score in the book: negative price, so the best bid sorts first."""
    return -max_price_pusd


def bid_priority(bid: Bid) -> tuple[int, int]:
    """A sort key giving book order: higher price first, then earlier arrival."""
    return (-bid.max_price_pusd, bid.seq)


def bid_expired(bid: Bid, now_ms: int) -> bool:
    return bid.expires_ms != 0 and now_ms >= bid.expires_ms


def fill_refusal(bid: Bid, ram_gb: int, vram_gb: int) -> MarketError | None:
    """Why a fill of this size is not allowed for the bid as it stands, or None."""
    if ram_gb > bid.remaining_ram_gb or vram_gb > bid.remaining_vram_gb:
        return Conflict(FILL_TOO_BIG, field="bid_id")
    whole = ram_gb == bid.remaining_ram_gb and vram_gb == bid.remaining_vram_gb
    if whole:
        return None
    if not bid.allow_split:
        return InvalidRequest(FILL_NOT_SPLIT, field="ram_gb")
    if ram_gb + vram_gb < max(bid.min_fill_gb, 1):
        return InvalidRequest(FILL_TOO_SMALL, field="ram_gb")
    return None


def fill_size(bid: Bid, available_ram_gb: int, available_vram_gb: int) -> tuple[int, int] | None:
    """The largest allowed fill of the bid on a node with this free capacity, or None."""
    if not bid.allow_split:
        if bid.remaining_ram_gb <= available_ram_gb and bid.remaining_vram_gb <= available_vram_gb:
            return bid.remaining_ram_gb, bid.remaining_vram_gb
        return None
    ram = min(bid.remaining_ram_gb, max(available_ram_gb, 0))
    vram = min(bid.remaining_vram_gb, max(available_vram_gb, 0))
    if ram + vram == 0 or fill_refusal(bid, ram, vram) is not None:
        return None
    return ram, vram


def apply_fill(bid: Bid, ram_gb: int, vram_gb: int, contract_id: str) -> Bid:
    """The bid after a fill (no checks: call `fill_refusal` first)."""
    filled_ram = bid.filled_ram_gb + ram_gb
    filled_vram = bid.filled_vram_gb + vram_gb
    done = filled_ram == bid.ram_gb and filled_vram == bid.vram_gb
    return msgspec.structs.replace(
        bid,
        filled_ram_gb=filled_ram,
        filled_vram_gb=filled_vram,
        status="filled" if done else bid.status,
        contract_ids=[*bid.contract_ids, contract_id],
    )


class Fill(msgspec.Struct, frozen=True, kw_only=True):
    """One reserve the crossing decided on: this much of the bid on this node at its price."""

    node_id: str
    ram_gb: int
    vram_gb: int
    price_pusd: int


def plan_fills(bid: Bid, candidates: Sequence[Node], now_ms: int) -> list[Fill]:
    """The crossing decision: the fills that would take the bid, best candidate first.

    `candidates` come ranked by the matcher (it applied the location, uptime and type filters);
    here each is checked against the reserve preconditions for the fill it would take. Without
    `allow_split` this is at most one fill (the first node taking the whole bid); with it, fills
    go down the list until the bid is filled. Empty when the bid is not open or has expired.
    The engine then reserves them in order; a lost race (CapacityTaken) just skips that fill.
    """
    if bid.status != "open" or bid_expired(bid, now_ms):
        return []
    fills: list[Fill] = []
    left = bid
    for node in candidates:
        size = fill_size(left, node.available_ram_gb, node.available_vram_gb)
        if size is None:
            continue
        ram, vram = size
        if (
            reserve_refusal(
                node,
                ram_gb=ram,
                vram_gb=vram,
                duration_s=bid.duration_s,
                max_price_pusd=bid.max_price_pusd,
                now_ms=now_ms,
            )
            is not None
        ):
            continue
        fills.append(
            Fill(node_id=node.node_id, ram_gb=ram, vram_gb=vram, price_pusd=node.price_pusd)
        )
        left = apply_fill(left, ram, vram, "")
        if left.status == "filled":
            break
    return fills


def bid_refusal(
    bid: Bid | None,
    *,
    client_id: str,
    user_id: str,
    ram_gb: int,
    vram_gb: int,
    duration_s: int,
    max_price_pusd: int,
    now_ms: int,
) -> MarketError | None:
    """Why a reserve cannot fill this bid (the script's bid checks, in its order), or None."""
    if bid is None:
        return NotFound(BID_NOT_FOUND, field="bid_id")
    if bid.status != "open":
        return Conflict(f"bid is {bid.status}", field="bid_id")
    if bid_expired(bid, now_ms):
        return Conflict(BID_EXPIRED, field="bid_id")
    if (bid.client_id, bid.user_id, bid.duration_s, bid.max_price_pusd) != (
        client_id,
        user_id,
        duration_s,
        max_price_pusd,
    ):
        return InvalidRequest(BID_MISMATCH, field="bid_id")
    return fill_refusal(bid, ram_gb, vram_gb)


# ---------------------------------------------------------------------------------------------
# Stored form: how Node, Bid and Contract sit in Redis hashes (one field per attribute)
#
# Every value is a string: ints in decimal, floats as Python's repr (exact round trip), bools as
# "true"/"false", `metadata` as JSON with sorted keys, `contract_ids` comma-joined (absent when
# empty), None absent. The Lua scripts copy these strings into events unchanged, and
# engine.log.DECODER (strict=False) turns them back into exact ints and floats.


_sorted_json = msgspec.json.Encoder(order="sorted").encode


def _field_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        # The text of json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        # for the string-valued dicts stored here, ten times faster; text UTF-8 cannot carry
        # (lone surrogates) goes the plain way, to fail where it always has.
        try:
            return _sorted_json(value).decode()
        except UnicodeEncodeError:
            return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    raise TypeError(f"cannot store {type(value).__name__}")


def to_fields(obj: Node | Bid | Contract) -> dict[str, str]:
    """The hash fields of a stored object. Registering a batch of nodes spends much of its
    gateway time here: the common exact types are handled before the generic dispatch."""
    out: dict[str, str] = {}
    for name in obj.__struct_fields__:
        value = getattr(obj, name)
        kind = type(value)
        if kind is str:
            out[name] = value
        elif kind is int:
            out[name] = str(value)
        elif kind is float:
            out[name] = repr(value)
        elif value is None:
            continue
        elif kind is list:
            if value:
                out[name] = ",".join(value)
        else:
            out[name] = _field_text(value)
    return out


_T = TypeVar("_T", Node, Bid, Contract)


def from_fields(cls: type[_T], fields: Mapping[str, str]) -> _T:
    """The object stored in these hash fields (as `to_fields` or a script wrote them)."""
    data: dict[str, Any] = dict(fields)
    if "metadata" in data:
        data["metadata"] = json.loads(data["metadata"])
    if "contract_ids" in data:
        data["contract_ids"] = data["contract_ids"].split(",") if data["contract_ids"] else []
    return msgspec.convert(data, cls, strict=False)


def change_fields(changes: NodeChanges) -> dict[str, str]:
    """The hash fields a node update writes (the given changes, in stored form)."""
    return {
        name: _field_text(getattr(changes, name))
        for name in changes.__struct_fields__
        if getattr(changes, name) is not None
    }


# ---------------------------------------------------------------------------------------------
# Money (issue 14): holds, fees, budget months. The scripts compute the same with exact integers
# (engine/lua/_lib.lua, section "Money"); tests/engine/test_money.py compares them.


def hold_pusd(size_gb: int, duration_s: int, price_pusd: int) -> int:
    """What a lease of `size_gb` (ram + vram) for `duration_s` at `price_pusd` holds: its whole
    cost at that price (egress is not known before settlement and is not held)."""
    return size_gb * duration_s * price_pusd


def platform_fee_pusd(cost_pusd: int, fee_bps: int) -> int:
    """The platform's fee out of a settled cost: `cost * fee_bps // 10000` (rounded down: the
    provider gets the odd pico-USD)."""
    return cost_pusd * fee_bps // 10_000


def month_of(ms: int) -> str:
    """The UTC calendar month (`YYYY-MM`) of an instant; a budget counts per month."""
    days = ms // 86_400_000
    # Howard Hinnant's civil_from_days, as the scripts compute it (no clock, no tz database).
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return f"{year:04d}-{month:02d}"


def hold_refusal(
    hold: int, avail: int, allow: int, *, budgeted: bool, field: str
) -> PaymentRequired | None:
    """Why a region wallet with `avail` money and `allow` budget allowance left cannot take a
    hold of `hold` now (the scripts' `hold_refusal`, same order and text), or None. The money
    comes first; the allowance only counts for a renter with a monthly budget."""
    if avail < hold:
        short = hold - avail
        return InsufficientFunds(
            f"the balance cannot cover the hold of {hold} pico-USD (short by {short})",
            field=field,
            shortfall_pusd=short,
        )
    if budgeted and allow < hold:
        short = hold - max(allow, 0)
        return BudgetExceeded(
            f"the hold of {hold} pico-USD would take this month's spend past the monthly "
            f"budget (over by {short})",
            field=field,
            shortfall_pusd=short,
        )
    return None


def open_refusal(count: int, limit: int, kind: str, field: str) -> TooManyOpen | None:
    """Why a user with `count` open contracts (`kind` "c") or resting bids ("b") in a region may
    not open another under `limit` (0: no cap), or None (the scripts' `open_refusal`)."""
    if limit > 0 and count >= limit:
        what = "open contracts" if kind == "c" else "resting bids"
        return TooManyOpen(
            f"at most {limit} {what} per user in a region; close some first", field=field
        )
    return None
