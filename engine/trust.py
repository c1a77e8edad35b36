"""Trust: a node's uptime as the exchange measured it, its reputation, and suspension.

Pure functions (no Redis, no clock: time is an argument). The Lua scripts do the same
arithmetic on the live market (`engine/lua/_lib.lua`, section "Trust", its constants mirrored
from here; tests/engine/test_trust.py runs both over the same schedules and compares them).

Uptime, measured:
- Time is cut into fixed windows of `WINDOW_MS` (1 h): window `w` is `[w * 1 h, (w + 1) * 1 h)`.
- A heartbeat is on time when it comes within `GRACE_INTERVALS` (1.5) of the node's heartbeat
  interval after the previous one (or the registration). A longer silence is downtime from that
  grace's end until the next heartbeat: a node beating every 60 s is never down; one silent for
  10 min is down for 8.5 min. Silence goes on counting while the node is offline.
- A window's value is its up share in whole percent, rounded half up: `v = round(100 * (E - D)
  / E)`, where `E` is the part of the window the node was expected to be up (after it began to
  be tracked, less declared maintenance) and `D` the downtime in it. A window with `E = 0` (all
  of it maintenance, or before the node existed) is not counted. A window in which a lease of
  the node failed to become ready (delivery) counts 0 (`Uptime.fail_win`).
- The score averages the values of the counted windows among the last `PERIOD_WINDOWS` (720,
  30 days) closed ones, each weighing the same, plus a buffer for restarts of `BUFFER_S`
  (10 min) per 30 days, the most it can reach being 100: `min(100, mean + 100 * BUFFER_S /
  (WINDOW_S * PERIOD_WINDOWS))`. Exactly: `score_centi()` in hundredths of a point, floored.
- A node with fewer than `MIN_WINDOWS` (7 days) counted windows is new: its score blends the
  measured value with `NEW_NODE_SCORE` (90) in proportion to the history it has, `(measured *
  n + 90 * (168 - n)) / 168`, so it starts at 90 (not 99), and re-registering a node never
  buys a better score than keeping it.
- Windows close when the node's first heartbeat of a later window arrives, or, for a node that
  went offline, when the engine's sweep passes the window's end (until it has been silent for
  30 days, when nothing is left to change).

Declared maintenance: a provider announces a window `[start, end)` at least
`MAINTENANCE_NOTICE_MS` (1 h) and at most `MAINTENANCE_HORIZON_MS` (90 days) ahead, at most `MAINTENANCE_MAX_MS` (4 h) long, at most one
starting per `MAINTENANCE_SPACING_MS` (7 days); its time is neither expected nor downtime. A
pending window may be replaced or cancelled, one in progress ended early; an announcement that
comes late is refused (that outage is then unannounced and counts).

Suspension (Storj's threshold): a node that is not new and whose score falls below
`SUSPEND_BELOW` (60: down more than 12 days of 30) is warned (`suspend_at_ms` = now +
`SUSPEND_GRACE_MS`, 24 h) and told on its `trust:<node_id>` channel; if its score is back at 60
or above when a window closes, the warning is lifted; if it is still below once the grace has
passed, the node is suspended from new leases (its running leases go on), and reinstated as
soon as its score reaches `REINSTATE_AT` (62). Checked as windows close. A lower score short
of that only costs the node in ranking (the reliability term) and in renters' filters.

Reputation: `100 * (delivered + REPUTATION_PRIOR) // (delivered + cut + REPUTATION_PRIOR)`, where
`delivered` counts the node's contracts that ended `completed` (served to their end, or settled
by the renter) and `cut` those that ended `failed` or `failed_over` (cut short by the node).
There are no disputes in Mnemo, so none count.

Stake (integer pico-USD): a node may take new leases while its stake covers
`required_stake(lease value)`, where the lease value is the sum of the holds of its active
contracts (a contract holds its whole cost) and the new one's: 10 % (`STAKE_BPS`) of the value
beyond the first 10 USD (`STAKE_FREE_PUSD`), rounded up; a lease it would not cover is refused
(`insufficient_stake`). A provider locks stake out of its earnings not yet paid out
(persistence.stake, then `Market.lock_stake`, once per lock key), or earns it: while a node's
stake is below `stake_target` (10 % of its whole lease value, before a contract leaves it) as a
contract completes, half (`HOLDBACK_BPS`) of the provider's earnings from that contract are held
back into the stake (never more than the shortfall). Released stake (what the node's leases do not require) goes
to the provider's earnings.

SLA credits: a contract cut short by its node (`failed`: not replaced; `failed_over`: moved to
another node) is charged only the time delivered, and the renter is credited, out of the node's
stake (at most half of what the stake holds: one outage never takes it all), a share of that charge by how much of the term was
delivered (`sla_credit_bps`): failed with 90 % or more delivered 10 %, 50 % or more 25 %, 10 %
or more 50 %, less 100 % (the renter pays nothing); failed over (a short interruption) 10 %.
A cut inside the node's announced maintenance window costs half as much: an unannounced outage
costs twice a declared one.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "BUFFER_S",
    "GRACE_INTERVALS",
    "MAINTENANCE_HORIZON_MS",
    "MAINTENANCE_MAX_MS",
    "MAINTENANCE_NOTICE_MS",
    "MAINTENANCE_SPACING_MS",
    "MIN_WINDOWS",
    "NEW_NODE_SCORE",
    "PERIOD_WINDOWS",
    "REINSTATE_AT",
    "REPUTATION_PRIOR",
    "SUSPEND_BELOW",
    "SUSPEND_GRACE_MS",
    "WINDOW_MS",
    "Advance",
    "Notice",
    "StakeClose",
    "Uptime",
    "advance",
    "centi_text",
    "grace_ms",
    "maintenance_refusal",
    "on_time",
    "pack",
    "reputation",
    "required_stake",
    "score",
    "score_centi",
    "sla_credit_bps",
    "stake_close",
    "stake_target",
    "start",
    "unpack",
    "window_value",
]

WINDOW_MS = 3_600_000
WINDOW_S = WINDOW_MS // 1000
PERIOD_WINDOWS = 720
"""Windows in the trailing period (30 days)."""
MIN_WINDOWS = 168
"""Counted windows (7 days) before a node is no longer new."""
NEW_NODE_CENTI = 9_000
NEW_NODE_SCORE = NEW_NODE_CENTI / 100
BUFFER_S = 600
"""Downtime forgiven per 30 days (restarts, agent upgrades)."""
GRACE_INTERVALS = 1.5
SUSPEND_BELOW_CENTI = 6_000
REINSTATE_AT_CENTI = 6_200
SUSPEND_BELOW = SUSPEND_BELOW_CENTI / 100
REINSTATE_AT = REINSTATE_AT_CENTI / 100
SUSPEND_GRACE_MS = 86_400_000
MAINTENANCE_NOTICE_MS = 3_600_000
MAINTENANCE_MAX_MS = 4 * 3_600_000
MAINTENANCE_SPACING_MS = 7 * 86_400_000
MAINTENANCE_HORIZON_MS = 90 * 86_400_000
REPUTATION_PRIOR = 9
STAKE_BPS = 1_000
STAKE_FREE_PUSD = 10 * 10**12
HOLDBACK_BPS = 5_000
SLA_TIERS_BPS: tuple[tuple[int, int], ...] = ((9_000, 1_000), (5_000, 2_500), (1_000, 5_000))
"""(delivered share of the term, at least; credit) for a failed contract; below them 100 %."""
FAILOVER_CREDIT_BPS = 1_000
SLA_STAKE_CAP_BPS = 5_000
"""One contract's SLA credit takes at most this share of the stake its node has when it closes:
no single outage forfeits the whole stake."""

Notice = Literal["warned", "cleared", "suspended", "reinstated"]
"""A change of a node's standing: warned (suspension due at `suspend_at_ms` unless the score
recovers), cleared (the warning lifted), suspended (no new leases), reinstated."""


class Uptime(msgspec.Struct, kw_only=True):
    """One node's uptime accounting (the live market keeps it in the region's `uptime` hash,
    `pack()`ed; the node's hash has copies of the score, history and standing).

    `win` is the open window (0: not tracked yet); `down_ms` the downtime attributed to it so
    far; `exc_ms` the maintenance of replaced announcements already excluded from it; `at_ms`
    the instant up to which silence has been attributed; `from_ms` when tracking began (the
    registration, or the first heartbeat this version saw); `fail_win` a window in which a lease
    failed to become ready (it counts 0); `total` and `windows` the sum and number of the counted
    values in `ring`, one byte per window slot (`w % PERIOD_WINDOWS`): 0 not counted, else the
    value plus one.
    """

    win: int = 0
    down_ms: int = 0
    exc_ms: int = 0
    at_ms: int = 0
    from_ms: int = 0
    fail_win: int = 0
    total: int = 0
    windows: int = 0
    ring: bytes = b""
    suspend_at_ms: int = 0
    suspended_ms: int = 0


class Advance(msgspec.Struct, kw_only=True):
    """What `advance` did: the state after it, the windows it closed (`(w, value, score)`:
    value -1 when not counted, the score in hundredths once the window closed), whether the
    history was dropped first (a silence longer than the period), the score in hundredths, and
    the change of standing, if any."""

    uptime: Uptime
    closed: list[tuple[int, int, int]]
    reset: bool
    centi: int
    notice: Notice | None


def grace_ms(interval_s: float) -> int:
    """How late a heartbeat may be (after the previous one) and still be on time."""
    return int(GRACE_INTERVALS * float(interval_s) * 1000 // 1)


def start(from_ms: int) -> Uptime:
    """The accounting of a node tracked from `from_ms` on."""
    return Uptime(win=from_ms // WINDOW_MS, at_ms=from_ms, from_ms=from_ms)


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def _down_in(a: int, b: int, lo: int, hi: int, maint: tuple[int, int]) -> int:
    """Downtime of the silence [a, b) within [lo, hi), less declared maintenance."""
    s, e = max(a, lo), min(b, hi)
    if s >= e:
        return 0
    return e - s - _overlap(s, e, maint[0], maint[1])


def window_value(
    w: int, from_ms: int, exc_ms: int, down_ms: int, maint: tuple[int, int], failed: bool
) -> int:
    """The value of closed window `w` (-1: not counted)."""
    lo, hi = max(w * WINDOW_MS, from_ms), (w + 1) * WINDOW_MS
    if lo >= hi:
        return -1
    expected = hi - lo - exc_ms - _overlap(lo, hi, maint[0], maint[1])
    if expected <= 0:
        return -1
    if failed:
        return 0
    up = expected - min(down_ms, expected)
    return (200 * up + expected) // (2 * expected)


def score_centi(total: int, windows: int) -> int:
    """The uptime score in hundredths of a point, from the counted windows' sum and number."""
    if windows <= 0:
        return NEW_NODE_CENTI
    scale = WINDOW_S * PERIOD_WINDOWS
    measured = min(10_000, (total * 100 * scale + 10_000 * BUFFER_S * windows) // (windows * scale))
    if windows >= MIN_WINDOWS:
        return measured
    return (measured * windows + NEW_NODE_CENTI * (MIN_WINDOWS - windows)) // MIN_WINDOWS


def score(total: int, windows: int) -> float:
    """`score_centi` as the float the market stores (`Node.uptime_score`)."""
    return score_centi(total, windows) / 100


def centi_text(centi: int) -> str:
    """`repr(centi / 100)`, as the Lua scripts spell it (they store it so)."""
    whole, part = divmod(centi, 100)
    if part == 0:
        return f"{whole}.0"
    if part % 10 == 0:
        return f"{whole}.{part // 10}"
    return f"{whole}.{part:02d}"


def _standing(u: Uptime, centi: int, now_ms: int) -> Notice | None:
    """Warn, clear, suspend or reinstate by the score as a window closes (mutates `u`)."""
    if u.windows < MIN_WINDOWS:
        return None
    if u.suspended_ms:
        if centi >= REINSTATE_AT_CENTI:
            u.suspended_ms = 0
            return "reinstated"
        return None
    if centi >= SUSPEND_BELOW_CENTI:
        if u.suspend_at_ms:
            u.suspend_at_ms = 0
            return "cleared"
        return None
    if not u.suspend_at_ms:
        u.suspend_at_ms = now_ms + SUSPEND_GRACE_MS
        return "warned"
    if now_ms >= u.suspend_at_ms:
        u.suspend_at_ms = 0
        u.suspended_ms = now_ms
        return "suspended"
    return None


def advance(u: Uptime, now_ms: int, down_from_ms: int, maint: tuple[int, int] = (0, 0)) -> Advance:
    """Bring the accounting up to `now_ms`: the silence from `down_from_ms` (the previous
    heartbeat's grace end; at or after `now_ms`: none) is downtime, and every window before
    now's closes. `maint` is the declared maintenance window (`(0, 0)`: none). `u` is not
    changed."""
    now_w = now_ms // WINDOW_MS
    a = max(down_from_ms, u.at_ms, u.from_ms)
    ring = bytearray(u.ring.ljust(PERIOD_WINDOWS, b"\0"))
    total, windows = u.total, u.windows
    w, down, exc = u.win, u.down_ms, u.exc_ms
    closed: list[tuple[int, int, int]] = []
    reset = False
    if now_w - w > PERIOD_WINDOWS:
        # every window before now_w - PERIOD has left the period: the history starts afresh
        ring = bytearray(PERIOD_WINDOWS)
        total = windows = 0
        w, down, exc, reset = now_w - PERIOD_WINDOWS, 0, 0, True
    while w < now_w:
        lo = max(w * WINDOW_MS, u.from_ms)
        down += _down_in(a, now_ms, lo, (w + 1) * WINDOW_MS, maint)
        value = window_value(w, u.from_ms, exc, down, maint, u.fail_win == w)
        slot = w % PERIOD_WINDOWS
        old = ring[slot]
        if old:
            total -= old - 1
            windows -= 1
        if value >= 0:
            ring[slot] = value + 1
            total += value
            windows += 1
        else:
            ring[slot] = 0
        closed.append((w, value, score_centi(total, windows)))
        w, down, exc = w + 1, 0, 0
    down += _down_in(a, now_ms, max(now_w * WINDOW_MS, u.from_ms), (now_w + 1) * WINDOW_MS, maint)
    out = msgspec.structs.replace(
        u,
        win=now_w,
        down_ms=down,
        exc_ms=exc,
        at_ms=max(u.at_ms, now_ms),
        total=total,
        windows=windows,
        ring=bytes(ring),
    )
    centi = score_centi(total, windows)
    notice = _standing(out, centi, now_ms) if closed else None
    return Advance(uptime=out, closed=closed, reset=reset, centi=centi, notice=notice)


def excuse(u: Uptime, now_ms: int, maint: tuple[int, int]) -> Uptime:
    """`u` (advanced to `now_ms`) once the announcement `maint` is withdrawn or replaced: the
    part of it that already passed in the open window stays excluded (`exc_ms`)."""
    lo = max(u.win * WINDOW_MS, u.from_ms)
    gone = _overlap(lo, now_ms, maint[0], maint[1])
    return msgspec.structs.replace(u, exc_ms=u.exc_ms + gone) if gone else u


STAKE_NOT_COVERED = "the node's stake does not cover this lease"
"""The reserve's refusal (`insufficient_stake`) of a lease `required_stake` says the node's
stake does not cover; the stake script's refusals follow."""
STAKE_NOT_OWNER = "only the node's owner may change its stake"
STAKE_NOT_POSITIVE = "the amount must be positive"
STAKE_STILL_REQUIRED = "the node's leases require the rest of its stake"

MAINTENANCE_NOT_OWNER = "only the node's owner may announce its maintenance"
MAINTENANCE_NONE = "no maintenance window announced"
MAINTENANCE_IN_PROGRESS = "a maintenance window is in progress: end it first"
MAINTENANCE_TOO_LATE = "announce maintenance at least 60 min ahead"
MAINTENANCE_TOO_EARLY = "announce maintenance at most 90 days ahead"
MAINTENANCE_EMPTY = "end_ms must be after start_ms"
MAINTENANCE_TOO_LONG = "a maintenance window lasts at most 4 h"
MAINTENANCE_TOO_SOON = "at most one maintenance window per 7 days"


def maintenance_refusal(
    now_ms: int,
    start_ms: int,
    end_ms: int,
    current: tuple[int, int],
    last_start_ms: int,
) -> tuple[str, str] | None:
    """Why an announcement of maintenance `[start_ms, end_ms)` is refused ((code, message)),
    or None. `current` is the node's announced window ((0, 0): none), `last_start_ms` the start
    of the last one that took effect before it (`Node.maint_last_ms`)."""
    if current[0] and current[0] <= now_ms:
        last_start_ms = current[0]
    if current[0] <= now_ms < current[1]:
        return "conflict", MAINTENANCE_IN_PROGRESS
    if start_ms < now_ms + MAINTENANCE_NOTICE_MS:
        return "invalid_request", MAINTENANCE_TOO_LATE
    if start_ms > now_ms + MAINTENANCE_HORIZON_MS:
        return "invalid_request", MAINTENANCE_TOO_EARLY
    if end_ms <= start_ms:
        return "invalid_request", MAINTENANCE_EMPTY
    if end_ms - start_ms > MAINTENANCE_MAX_MS:
        return "invalid_request", MAINTENANCE_TOO_LONG
    if last_start_ms and start_ms < last_start_ms + MAINTENANCE_SPACING_MS:
        return "conflict", MAINTENANCE_TOO_SOON
    return None


def reputation(delivered: int, cut: int) -> int:
    """The reputation score (0-100) of a node with `delivered` contracts served in full and
    `cut` cut short by it."""
    return 100 * (delivered + REPUTATION_PRIOR) // (delivered + cut + REPUTATION_PRIOR)


def required_stake(lease_value_pusd: int) -> int:
    """The stake a node with this much lease value (holds of its active leases) must have."""
    over = lease_value_pusd - STAKE_FREE_PUSD
    return 0 if over <= 0 else -(-over * STAKE_BPS // 10_000)


def sla_credit_bps(status: str, used_s: int, duration_s: int) -> int:
    """The share (basis points) of a closed contract's charge credited to its renter out of
    its node's stake (before the halving for a cut inside announced maintenance)."""
    if status == "failed_over":
        return FAILOVER_CREDIT_BPS
    if status != "failed":
        return 0
    for delivered_bps, credit in SLA_TIERS_BPS:
        if used_s * 10_000 >= delivered_bps * duration_s:
            return credit
    return 10_000


def stake_target(lease_value_pusd: int) -> int:
    """The stake earnings are held back into, up to: the share of the whole lease value."""
    return -(-lease_value_pusd * STAKE_BPS // 10_000)


class StakeClose(msgspec.Struct, frozen=True, kw_only=True):
    """What a contract's close did to its node's stake (`stake_close`)."""

    lease_value_pusd: int
    stake_pusd: int
    stake_held_pusd: int
    held_back_pusd: int = 0
    credit_pusd: int = 0


def stake_close(
    *,
    lease_value_pusd: int,
    stake_pusd: int,
    stake_held_pusd: int,
    hold_pusd: int,
    status: str,
    used_s: int,
    duration_s: int,
    cost_pusd: int,
    fee_pusd: int,
    in_maintenance: bool,
) -> StakeClose:
    """A contract (its hold `hold_pusd`) closes: it leaves its node's lease value; completed, up
    to `HOLDBACK_BPS` of the provider's earnings (cost - fee) is held back while the stake is
    below `stake_target` of the lease value before; cut short by the node, its renter is
    credited `sla_credit_bps` of the charge (half inside announced maintenance), at most
    `SLA_STAKE_CAP_BPS` of the stake. The scripts' `stake_close` (engine/lua/_lib.lua)."""
    value = max(0, lease_value_pusd - hold_pusd)
    stake, held = stake_pusd, stake_held_pusd
    kept = credit = 0
    if status == "completed":
        short = stake_target(lease_value_pusd) - stake
        if short > 0:
            kept = min(max(0, cost_pusd - fee_pusd) * HOLDBACK_BPS // 10_000, short)
            stake, held = stake + kept, held + kept
    else:
        bps = sla_credit_bps(status, used_s, duration_s)
        if in_maintenance:
            bps //= 2
        credit = min(cost_pusd * bps // 10_000, stake * SLA_STAKE_CAP_BPS // 10_000)
        stake -= credit
        held = min(held, stake)
    return StakeClose(
        lease_value_pusd=value,
        stake_pusd=stake,
        stake_held_pusd=held,
        held_back_pusd=kept,
        credit_pusd=credit,
    )


def pack(u: Uptime, maint: tuple[int, int] = (0, 0)) -> bytes:
    """The region `uptime` hash's value for a node (the Lua scripts write the same bytes): the
    whole accounting, the announced maintenance window, then the ring."""
    head = (
        f"{u.win},{u.down_ms},{u.exc_ms},{u.at_ms},{u.from_ms},{u.fail_win},{u.total},"
        f"{u.windows},{u.suspend_at_ms},{u.suspended_ms},{maint[0]},{maint[1]};"
    )
    return head.encode() + u.ring


def unpack(value: bytes | str | None) -> tuple[Uptime, tuple[int, int]] | None:
    """The accounting and maintenance window stored as `value` (None: not tracked yet)."""
    if not value:
        return None
    if isinstance(value, str):
        value = value.encode()
    head, _, ring = value.partition(b";")
    win, down, exc, at, frm, fail, total, windows, sat, sed, ms, me = (
        int(x) for x in head.split(b",")
    )
    u = Uptime(
        win=win,
        down_ms=down,
        exc_ms=exc,
        at_ms=at,
        from_ms=frm,
        fail_win=fail,
        total=total,
        windows=windows,
        ring=ring,
        suspend_at_ms=sat,
        suspended_ms=sed,
    )
    return u, (ms, me)


def on_time(last_ms: int, interval_s: float, now_ms: int) -> bool:
    """A beat that changes no accounting: in the window of the previous one (which was
    accounted) and within its grace (the heartbeat script's fast check)."""
    return last_ms // WINDOW_MS == now_ms // WINDOW_MS and now_ms - last_ms <= grace_ms(interval_s)
