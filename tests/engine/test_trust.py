"""Trust: the uptime arithmetic (engine.trust) against a plain computation from first principles,
and the scripts (engine/lua/_lib.lua) against engine.trust over the same schedules."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import trust
from engine.errors import Conflict, InvalidRequest, NotFound, Unavailable
from engine.keys import Keys
from engine.market import Market
from engine.replay import HOT_NODE_FIELDS, region_snapshot
from engine.types import Heartbeat, Node, TrustUpdated
from tests.conftest import _SEED
from tests.engine.conftest import fund

W = trust.WINDOW_MS
DAY = 86_400_000
T0 = 1_700_000_000_000 // W * W + 123_456  # inside a window, not at its start
REGION = "us-east-2"


# ---------------------------------------------------------------------------------------------
# The plain computation: silences cut into windows, nothing incremental


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def reference_centi(
    created_ms: int,
    interval_s: float,
    beats: list[int],
    now_ms: int,
    maint: tuple[int, int] = (0, 0),
) -> tuple[int, int]:
    """(score in hundredths, counted windows) of a node registered at `created_ms` that beat at
    `beats` (sorted), as of `now_ms`: every silence longer than 1.5 intervals is downtime from
    the grace's end; each window of the last 30 days counts its up share in whole percent
    (rounded half up) of the time it was expected (after registration, less maintenance); the
    mean plus 10 min a month, at most 100, blended with 90 below 168 windows."""
    grace = int(Fraction(3, 2) * Fraction(interval_s) * 1000)
    silences = []
    previous = created_ms
    for t in [*beats, now_ms]:
        if t - previous > grace:
            silences.append((previous + grace, t))
        previous = t
    values = []
    now_w = now_ms // W
    for w in range(max(created_ms // W, now_w - trust.PERIOD_WINDOWS), now_w):
        lo, hi = max(w * W, created_ms), (w + 1) * W
        expected = hi - lo - _overlap(lo, hi, *maint)
        if expected <= 0:
            continue
        down = 0
        for a, b in silences:
            s, e = max(a, lo), min(b, hi)
            if s < e:
                down += e - s - _overlap(s, e, *maint)
        share = Fraction(100 * (expected - min(down, expected)), expected)
        values.append(int(share + Fraction(1, 2)))  # half up
    n = len(values)
    if n == 0:
        return 9000, 0
    buffer = Fraction(100 * 100 * trust.BUFFER_S, 3600 * trust.PERIOD_WINDOWS)
    measured = min(10_000, int(Fraction(100 * sum(values), n) + buffer))
    if n >= trust.MIN_WINDOWS:
        return measured, n
    return (measured * n + 9000 * (trust.MIN_WINDOWS - n)) // trust.MIN_WINDOWS, n


def run_model(
    created_ms: int,
    interval_s: float,
    beats: list[int],
    now_ms: int,
    maint: tuple[int, int] = (0, 0),
    sweeps: list[int] = (),  # type: ignore[assignment]
) -> trust.Advance:
    """engine.trust driven as the scripts drive it: an advance at each beat (the silence since the
    previous one), at each sweep and at `now_ms` (the silence since the last beat)."""
    grace = trust.grace_ms(interval_s)
    u = trust.start(created_ms)
    last = created_ms
    moments = sorted([(t, "beat") for t in beats] + [(t, "sweep") for t in sweeps])
    for t, kind in moments:
        adv = trust.advance(u, t, last + grace, maint)
        u = adv.uptime
        if kind == "beat":
            last = t
    return trust.advance(u, now_ms, last + grace, maint)


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, Any]:
    interval_s = draw(st.sampled_from([600.0, 1800.0, 3600.0]))
    horizon = draw(st.integers(2 * 3_600_000, 40 * DAY))
    outages = draw(
        st.lists(st.tuples(st.integers(0, horizon), st.integers(1, 4 * DAY)), max_size=5)
    )
    jitter = draw(st.lists(st.integers(-200_000, 200_000), min_size=1, max_size=8))
    beats, t, i = [], T0, 0
    step = int(interval_s * 1000)
    while True:
        t += step + jitter[i % len(jitter)] // 4
        i += 1
        if t >= T0 + horizon:
            break
        if not any(s <= t - T0 < s + d for s, d in outages):
            beats.append(t)
    maint: tuple[int, int] = (0, 0)
    if draw(st.booleans()):
        start = T0 + draw(st.integers(0, horizon))
        maint = (start, start + draw(st.integers(1, trust.MAINTENANCE_MAX_MS)))
    sweeps = draw(st.lists(st.integers(T0, T0 + horizon), max_size=6))
    return {
        "interval_s": interval_s,
        "beats": beats,
        "now_ms": T0 + horizon,
        "maint": maint,
        "sweeps": sweeps,
    }


@settings(max_examples=60, deadline=None)
@given(schedules())
def test_the_score_is_the_plain_computation(s: dict[str, Any]) -> None:
    """Over random outage schedules (and accounting at random moments between), the score is
    within [0, 100] and equals the computation from first principles."""
    adv = run_model(T0, s["interval_s"], s["beats"], s["now_ms"], s["maint"], s["sweeps"])
    assert 0 <= adv.centi <= 10_000
    assert (adv.centi, adv.uptime.windows) == reference_centi(
        T0, s["interval_s"], s["beats"], s["now_ms"], s["maint"]
    )
    assert adv.uptime.total == sum(b - 1 for b in adv.uptime.ring if b)


@settings(max_examples=60, deadline=None)
@given(schedules(), st.data())
def test_an_outage_is_never_rewarded(s: dict[str, Any], data: st.DataObject) -> None:
    """Taking beats away (a longer silence) never raises the score."""
    beats = s["beats"]
    if not beats:
        return
    start = data.draw(st.integers(0, len(beats) - 1))
    gone = data.draw(st.integers(1, len(beats) - start))
    fewer = beats[:start] + beats[start + gone :]
    full = run_model(T0, s["interval_s"], beats, s["now_ms"], s["maint"]).centi
    cut = run_model(T0, s["interval_s"], fewer, s["now_ms"], s["maint"]).centi
    assert cut <= full


def steady(interval_s: float, days: int, skip: Any = None) -> list[int]:
    step = int(interval_s * 1000)
    return [
        T0 + k * step
        for k in range(1, days * DAY // step)
        if skip is None or not skip(T0 + k * step)
    ]


def test_steady_and_a_third_missing() -> None:
    """A node that beats steadily scores 100; one silent in every third window scores about a
    third less, exactly as the formula says."""
    days = 31
    now = T0 + days * DAY
    good = run_model(T0, 60.0, steady(60.0, days), now)
    assert good.centi == 10_000 and good.uptime.windows == trust.PERIOD_WINDOWS
    # silent from the start of every third window to its end
    flaky_beats = steady(60.0, days, skip=lambda t: (t // W) % 3 == 0)
    flaky = run_model(T0, 60.0, flaky_beats, now)
    assert flaky.centi == reference_centi(T0, 60.0, flaky_beats, now)[0]
    # the beats fall 3.5 s into each minute of a window: a silent window is down from 33.5 s
    # (90 s after its previous window's last beat) on, 1 % up; the window after it, down 3.5 s
    values = [b - 1 for b in flaky.uptime.ring]
    assert sorted(set(values)) == [1, 100] and values.count(1) == 240
    # (240 x 1 + 480 x 100) / 720 = 67.0, plus the buffer 0.023: 67.02
    assert flaky.centi == (48_240 * 100 * 3600 * 720 + 10_000 * 600 * 720) // (720 * 3600 * 720)
    assert flaky.centi == 6_702


def test_new_nodes_blend_towards_their_history() -> None:
    """No history: 90 (not 99). The measured value weighs in window by window until 7 days."""
    assert trust.score_centi(0, 0) == 9_000
    one_day = run_model(T0, 60.0, steady(60.0, 1), T0 + DAY)
    n = one_day.uptime.windows
    assert n == 24  # the registration's window (partial) counts; the open one does not yet
    assert one_day.centi == (10_000 * n + 9_000 * (168 - n)) // 168
    a_week = run_model(T0, 60.0, steady(60.0, 8), T0 + 8 * DAY)
    assert a_week.uptime.windows >= trust.MIN_WINDOWS and a_week.centi == 10_000


def test_announced_maintenance_is_not_downtime() -> None:
    """Four hours announced and taken cost nothing; the same four hours unannounced cost four
    windows (less the restart buffer)."""
    days = 31
    now = T0 + days * DAY
    start = (T0 + 10 * DAY) // W * W
    off = (start, start + 4 * 3_600_000)
    beats = steady(60.0, days, skip=lambda t: off[0] <= t < off[1])
    announced = run_model(T0, 60.0, beats, now, maint=off)
    vanished = run_model(T0, 60.0, beats, now)
    assert announced.centi == 10_000
    assert announced.uptime.windows == trust.PERIOD_WINDOWS - 4
    # down from 90 s after the last beat (33.5 s into the first hour) to the first beat after:
    # the four hours count 1, 0, 0, 0: (716 x 100 + 1) / 720 + the buffer = 99.46
    assert vanished.centi == (71_601 * 100 * 3600 * 720 + 10_000 * 600 * 720) // (720 * 3600 * 720)
    assert vanished.centi == 9_946
    assert vanished.centi < announced.centi


def test_a_short_restart_is_forgiven() -> None:
    """One restart of 10 minutes in a month leaves a full score (the buffer)."""
    days = 31
    now = T0 + days * DAY
    at = (T0 + 5 * DAY) // W * W + 20 * 60_000
    beats = steady(60.0, days, skip=lambda t: at <= t < at + 9 * 60_000)
    assert run_model(T0, 60.0, beats, now).centi == 10_000


def test_suspension_warns_then_suspends_and_reinstates() -> None:
    """Below 60: warned, suspended once 24 h of grace passed still below, reinstated at 62."""
    u = trust.Uptime(win=100, from_ms=0, at_ms=100 * W, windows=720, total=720 * 59)
    u = msgspec_replace(u, ring=bytes([60]) * 720)
    adv = trust.advance(u, 101 * W, 10**15)
    assert adv.notice == "warned" and adv.uptime.suspend_at_ms == 101 * W + DAY
    later = trust.advance(adv.uptime, 102 * W, 10**15)
    assert later.notice is None and later.uptime.suspended_ms == 0
    due = trust.advance(adv.uptime, 101 * W + DAY + W, 0)  # silent all day: still below
    assert due.notice == "suspended" and due.uptime.suspended_ms == 101 * W + DAY + W
    good = msgspec_replace(due.uptime, total=720 * 62, ring=bytes([63]) * 720)
    back = trust.advance(good, due.uptime.win * W + W, 10**15)
    assert back.notice == "reinstated" and back.uptime.suspended_ms == 0
    # a warning lifted when the score recovers within the grace
    healed = msgspec_replace(adv.uptime, total=720 * 61, ring=bytes([62]) * 720)
    assert trust.advance(healed, 102 * W, 10**15).notice == "cleared"
    # a new node is never suspended
    young = trust.Uptime(win=100, from_ms=99 * W, at_ms=100 * W, windows=1, total=0)
    assert trust.advance(young, 101 * W, 0).notice is None


def msgspec_replace(u: trust.Uptime, **kw: Any) -> trust.Uptime:
    import msgspec

    return msgspec.structs.replace(u, **kw)


def test_reputation() -> None:
    """100 with no record; each contract cut short by the node costs, each served in full heals."""
    assert trust.reputation(0, 0) == 100
    assert trust.reputation(0, 1) == 90
    assert trust.reputation(1, 1) == 90
    assert trust.reputation(91, 1) == 99
    assert trust.reputation(0, 9) == 50


def test_maintenance_rules() -> None:
    now = T0
    ok = (now + 2 * 3_600_000, now + 3 * 3_600_000)
    assert trust.maintenance_refusal(now, *ok, (0, 0), 0) is None
    assert trust.maintenance_refusal(now, now + 60_000, now + W, (0, 0), 0) == (
        "invalid_request",
        trust.MAINTENANCE_TOO_LATE,
    )
    assert trust.maintenance_refusal(now, now + 91 * DAY, now + 91 * DAY + W, (0, 0), 0) == (
        "invalid_request",
        trust.MAINTENANCE_TOO_EARLY,
    )
    assert trust.maintenance_refusal(now, ok[0], ok[0] + 5 * W, (0, 0), 0)[1] == (  # type: ignore[index]
        trust.MAINTENANCE_TOO_LONG
    )
    assert trust.maintenance_refusal(now, ok[0], ok[0] + W, (now - W, now + W), 0) == (
        "conflict",
        trust.MAINTENANCE_IN_PROGRESS,
    )
    # one per 7 days, counted from the last window that took effect
    assert trust.maintenance_refusal(now, *ok, (now - DAY, now - DAY + W), 0) == (
        "conflict",
        trust.MAINTENANCE_TOO_SOON,
    )
    # a pending one may be replaced
    assert trust.maintenance_refusal(now, *ok, (now + 5 * W, now + 6 * W), 0) is None


def test_lua_constants_are_engine_trusts() -> None:
    lib = (Path(trust.__file__).with_name("lua") / "_lib.lua").read_text()
    expected = {
        "UP_WINDOW_MS": trust.WINDOW_MS,
        "UP_PERIOD": trust.PERIOD_WINDOWS,
        "UP_MIN_WINDOWS": trust.MIN_WINDOWS,
        "UP_NEW_CENTI": trust.NEW_NODE_CENTI,
        "UP_BUFFER_S": trust.BUFFER_S,
        "UP_SUSPEND_BELOW": trust.SUSPEND_BELOW_CENTI,
        "UP_REINSTATE_AT": trust.REINSTATE_AT_CENTI,
        "UP_SUSPEND_GRACE_MS": trust.SUSPEND_GRACE_MS,
        "UP_MAINT_NOTICE_MS": trust.MAINTENANCE_NOTICE_MS,
        "UP_MAINT_MAX_MS": trust.MAINTENANCE_MAX_MS,
        "UP_MAINT_SPACING_MS": trust.MAINTENANCE_SPACING_MS,
        "UP_MAINT_HORIZON_MS": trust.MAINTENANCE_HORIZON_MS,
    }
    found = dict(re.findall(r"^local (UP_[A-Z_]+) = (\d+)$", lib, re.M))
    assert {k: int(v) for k, v in found.items()} == expected
    assert "1.5 * tonumber(interval_s)" in lib and trust.GRACE_INTERVALS == 1.5
    assert f"(delivered + {trust.REPUTATION_PRIOR})" in lib
    for centi in (0, 5, 10, 99, 100, 905, 9000, 9050, 9999, 10_000):
        assert trust.centi_text(centi) == repr(centi / 100)


def test_a_nodes_hot_fields_come_first() -> None:
    """The fields the heartbeat reads from every node, in its order, are the ones the scripts
    and the replay write first into a node's hash (a listpack: searched from its head)."""
    lua = Path(trust.__file__).with_name("lua")
    beat = (lua / "heartbeat.lua").read_text()
    read = re.search(r"redis\.call\('HMGET', nkey, (.*?)\)\n", beat, re.S)
    assert read is not None
    hmget = tuple(re.findall(r"'([a-z_]+)'", read.group(1)))
    lib = (lua / "_lib.lua").read_text()
    first = re.search(r"local HOT_FIELDS = \{(.*?)\}", lib, re.S)
    assert first is not None
    assert tuple(re.findall(r"'([a-z_]+)'", first.group(1))) == hmget == HOT_NODE_FIELDS


# ---------------------------------------------------------------------------------------------
# The scripts: the same schedules through Redis, compared with engine.trust


@pytest.fixture
async def market(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Market]:
    m = Market(redis, keys)
    await m.load_scripts()
    yield m


def a_node(node_id: str, interval_s: float, **kw: Any) -> Node:
    return Node(
        node_id=node_id, owner_id="alice", region=REGION, node_type="mist_node",
        name=node_id, lat=40.7, lng=-73.8, total_ram_gb=64, total_vram_gb=0,
        offered_ram_gb=64, price_pusd=800_000, heartbeat_interval_s=interval_s, **kw,
    )  # fmt: skip


async def drive(market: Market, node_id: str, moments: list[tuple[int, str]]) -> None:
    """Beats, liveness checks and sweeps at their times, as the gateway and the engine send them."""
    for t, kind in moments:
        if kind == "beat":
            beat = Heartbeat(node_id=node_id, available_ram_gb=64, available_vram_gb=0)
            [outcome] = await market.heartbeat("alice", [beat], t, 0)
            assert outcome.outcome == "ok"
        else:
            if node_id in await market.stale_nodes(REGION, t):
                await market.mark_offline(node_id, t)
            await market.sweep_uptime(REGION, t)


async def test_scripts_account_as_engine_trust(
    market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    """Random schedules (seeded) through the heartbeat, mark-offline and sweep scripts leave
    each node's score, history and window ring exactly as engine.trust and the plain
    computation say; and a replay of the events rebuilds the same keys."""
    rng = random.Random(_SEED)
    for n in range(6):
        node_id = f"n{n}"
        interval_s = rng.choice([600.0, 1800.0])
        await market.register_node(a_node(node_id, interval_s), T0)
        horizon = rng.randint(1, 12) * DAY + rng.randint(0, W)
        step = int(interval_s * 1000)
        outages = [(rng.randint(0, horizon), rng.randint(1, 2 * DAY)) for _ in range(3)]
        beats = [
            t
            for t in range(T0 + step, T0 + horizon, step)
            if not any(s <= t - T0 < s + d for s, d in outages)
        ]
        checks = list(range(T0 + 3_600_000, T0 + horizon, rng.choice([W // 2, W, 3 * W])))
        moments = sorted([(t, "beat") for t in beats] + [(t, "check") for t in checks])
        await drive(market, node_id, moments)
        last = moments[-1][0]
        node = await market.get_node(node_id)
        assert node is not None
        expected_centi, expected_windows = reference_centi(T0, interval_s, beats, last)
        model = run_model(T0, interval_s, beats, last)
        if moments[-1][1] == "beat" or node.status == "offline":
            assert round(node.uptime_score * 100) == expected_centi == model.centi
            assert node.uptime_windows == expected_windows
            stored = await market.uptime_of(node)
            assert stored is not None
            assert stored.ring == model.uptime.ring and stored.total == model.uptime.total
    # the replay of the log rebuilds every key, the accounting included
    events = await market.read_events(REGION)
    assert any(isinstance(e, TrustUpdated) for e in events)
    elsewhere = Keys(keys.prefix + "copy:")
    await Market(redis, elsewhere).replay(events)
    assert await region_snapshot(redis, elsewhere, REGION) == await region_snapshot(
        redis, keys, REGION
    )


async def test_maintenance_through_the_script(market: Market) -> None:
    """Announce, refuse what breaks the rules, end early; the hour taken is not counted, the
    silence after it is downtime."""
    await market.register_node(a_node("m1", 60.0), T0)
    start = (T0 // W + 2) * W
    beats = [
        t for t in range(T0 + 60_000, start + 3 * W, 60_000) if not start <= t < start + W + 600_000
    ]
    await drive(market, "m1", [(t, "beat") for t in beats if t < start])
    now = T0 + 60_000
    with pytest.raises(InvalidRequest, match="ahead"):
        await market.announce_maintenance("m1", "alice", now + 60_000, now + W, now)
    with pytest.raises(InvalidRequest, match="at most 4 h"):
        await market.announce_maintenance("m1", "alice", start, start + 5 * W, now)
    with pytest.raises(Conflict):
        await market.announce_maintenance("m1", "mallory", start, start + W, now)
    with pytest.raises(NotFound):
        await market.announce_maintenance("m1", "alice", 0, 0, now)
    event = await market.announce_maintenance("m1", "alice", start, start + 2 * W, now)
    assert event.entries[0].maint_start_ms == start
    node = await market.get_node("m1")
    assert node is not None and (node.maint_start_ms, node.maint_end_ms) == (start, start + 2 * W)
    # in progress: it cannot be replaced, but it can end early (after one hour)
    with pytest.raises(Conflict, match="in progress"):
        await market.announce_maintenance("m1", "alice", start + DAY, start + DAY + W, start + W)
    await market.announce_maintenance("m1", "alice", 0, 0, start + W)
    node = await market.get_node("m1")
    assert node is not None
    assert (node.maint_start_ms, node.maint_end_ms, node.maint_last_ms) == (0, 0, start)
    # the next one must wait 7 days from that one's start
    with pytest.raises(Conflict, match="7 days"):
        await market.announce_maintenance("m1", "alice", start + DAY, start + DAY + W, start + W)
    await drive(market, "m1", [(t, "beat") for t in beats if t >= start])
    node = await market.get_node("m1")
    assert node is not None
    stored = await market.uptime_of(node)
    assert stored is not None
    slot = (start // W) % trust.PERIOD_WINDOWS
    # before: up; the hour taken: not counted; the next: silent 603 s of 3600 -> 83 %
    assert [stored.ring[slot - 1], stored.ring[slot], stored.ring[slot + 1]] == [101, 0, 84]


async def test_suspension_through_the_scripts(
    market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    """A node down 4 of its first 7 days is warned once it has a week of history, suspended
    a day later (no new leases, out of the asks; its running lease goes on), and reinstated
    once its score is back at 62."""
    step = 1_800_000
    await market.register_node(a_node("s1", 1800.0, max_duration_s=30 * DAY // 1000), T0)
    await fund(market, "acme", now_ms=T0)
    await market.lock_stake("s1", "alice", 10**12, "s1-stake", T0)  # a 16.6 USD lease needs 0.66
    lease = await market.reserve(
        node_id="s1", client_id="acme", user_id="u", ram_gb=8, vram_gb=0,
        duration_s=30 * DAY // 1000, max_price_pusd=1_000_000, now_ms=T0,
    )  # fmt: skip
    down = (T0 + 2 * DAY, T0 + 6 * DAY)
    beats = [t for t in range(T0 + step, T0 + 7 * DAY + 2 * W, step) if not down[0] <= t < down[1]]
    checks = list(range(down[0] + W, down[1], W))
    await drive(market, "s1", sorted([(t, "beat") for t in beats] + [(t, "check") for t in checks]))
    notices = [
        (e.ts_ms, x.notice)
        for e in await market.read_events(REGION)
        if isinstance(e, TrustUpdated)
        for x in e.entries
        if x.notice
    ]
    assert [n for _, n in notices] == ["warned"]
    node = await market.get_node("s1")
    assert node is not None and node.uptime_score < trust.SUSPEND_BELOW
    assert node.uptime_windows >= trust.MIN_WINDOWS
    assert node.suspend_at_ms == notices[0][0] + trust.SUSPEND_GRACE_MS and not node.suspended_ms
    assert await redis.zscore(keys.asks(REGION), "s1") is not None  # warned, still listed
    # a day later, still below: suspended
    more = list(range(beats[-1] + step, beats[-1] + DAY + 2 * W, step))
    await drive(market, "s1", [(t, "beat") for t in more])
    node = await market.get_node("s1")
    assert node is not None and node.suspended_ms and node.status == "active"
    assert await redis.zscore(keys.asks(REGION), "s1") is None
    with pytest.raises(Unavailable, match="suspended"):
        await market.reserve(
            node_id="s1", client_id="acme", user_id="u", ram_gb=8, vram_gb=0, duration_s=600,
            max_price_pusd=1_000_000, now_ms=more[-1],
        )  # fmt: skip
    assert [c.contract_id for c in await market.contracts(node_id="s1")] == [lease.contract_id]
    # steady again: the score climbs back; reinstated at 82, listed again
    back = list(range(more[-1] + step, T0 + 18 * DAY, step))
    await drive(market, "s1", [(t, "beat") for t in back])
    node = await market.get_node("s1")
    assert node is not None and not node.suspended_ms and node.uptime_score >= trust.REINSTATE_AT
    assert await redis.zscore(keys.asks(REGION), "s1") is not None
    kinds = [
        x.notice
        for e in await market.read_events(REGION)
        if isinstance(e, TrustUpdated)
        for x in e.entries
        if x.notice
    ]
    assert kinds == ["warned", "suspended", "reinstated"]


async def test_a_lease_never_made_ready_fails_the_hour(
    market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    """Delivery: a node that beats but never serves a lease it took (the lease fails for want
    of a ready report) is down for that hour, whatever its heartbeats said."""
    await market.register_node(a_node("d1", 60.0, delivers=True), T0)
    await market.register_node(a_node("d2", 60.0, delivers=True), T0)
    await fund(market, "acme", now_ms=T0)
    beats = [Heartbeat(node_id=n, available_ram_gb=64, available_vram_gb=0) for n in ("d1", "d2")]
    hour_end = (T0 // W + 1) * W
    for t in range(T0 + 60_000, T0 + 2 * 60_000 + 1, 60_000):
        await market.heartbeat("alice", beats, t, 0)
    lease = await market.reserve(
        node_id="d1", client_id="acme", user_id="u", ram_gb=8, vram_gb=0, duration_s=600,
        max_price_pusd=1_000_000, now_ms=T0 + 2 * 60_000,
    )  # fmt: skip
    assert lease.lease_state == "pending"
    await market.fail_contract(lease.contract_id, T0 + 3 * 60_000)  # the readiness timeout
    for t in range(T0 + 3 * 60_000, hour_end + 5 * 60_000, 60_000):
        await market.heartbeat("alice", beats, t, 0)
    await _d1_failed_its_first_hour(market, redis, keys)


async def test_one_cut_lease_never_takes_the_whole_stake(market: Market) -> None:
    """A lease cut before a tenth of its term is credited its whole charge, but never more than
    half of the node's stake: the rest of the stake stays for its other leases, the renter pays
    the difference, and the stake falls by exactly the credit."""
    await fund(market, "acme", now_ms=T0)
    await market.register_node(a_node("thin", 60.0), T0)
    stake = 10**9  # 0.001 USD: less than the charge
    await market.lock_stake("thin", "alice", stake, "thin-stake", T0)
    lease = await market.reserve(
        node_id="thin", client_id="acme", user_id="u", ram_gb=8, vram_gb=0,
        duration_s=4 * 3600, max_price_pusd=1_000_000, now_ms=T0,
    )  # fmt: skip
    cut = await market.fail_contract(lease.contract_id, T0 + 600_000)
    assert trust.sla_credit_bps("failed", cut.used_s, 4 * 3600) == 10_000
    assert cut.cost_pusd > stake  # the tier alone would take the whole stake
    node = await market.get_node("thin")
    assert node is not None and node.stake_pusd == stake - stake * trust.SLA_STAKE_CAP_BPS // 10_000
    assert node.stake_pusd == stake // 2


async def test_declared_maintenance_and_an_unannounced_outage(market: Market) -> None:
    """Two nodes silent for the same two hours, each cutting a lease short 10 minutes in: the
    one that announced those hours loses no score for them and pays half the SLA credit of the
    one that vanished; both as engine.trust says."""
    await fund(market, "acme", now_ms=T0)
    for node_id in ("declared", "vanished"):
        await market.register_node(a_node(node_id, 60.0), T0)
        await market.lock_stake(node_id, "alice", 10**12, f"{node_id}-stake", T0)
    start = (T0 // W + 2) * W
    off = (start, start + 2 * W)
    await market.announce_maintenance("declared", "alice", *off, T0)
    beats = [t for t in range(T0 + 60_000, start + 5 * W, 60_000) if not off[0] <= t < off[1]]
    taken = start - 1_800_000
    await drive_both(market, [(t, "beat") for t in beats if t <= taken])
    leases = {}
    for node_id in ("declared", "vanished"):
        leases[node_id] = await market.reserve(
            node_id=node_id, client_id="acme", user_id="u", ram_gb=8, vram_gb=0,
            duration_s=4 * 3600, max_price_pusd=1_000_000, now_ms=taken,
        )  # fmt: skip
    await drive_both(market, [(t, "beat") for t in beats if taken < t < start])
    died = start + 600_000
    credit = {}
    for node_id, lease in leases.items():
        before = await market.get_node(node_id)
        cut = await market.fail_contract(lease.contract_id, died)
        after = await market.get_node(node_id)
        assert before is not None and after is not None
        credit[node_id] = before.stake_pusd - after.stake_pusd
        # 40 min of 4 h delivered (under 50 %): 50 % of the charge, half of it when declared
        bps = trust.sla_credit_bps("failed", cut.used_s, 4 * 3600)
        assert bps == 5_000 and cut.used_s == (died - taken) // 1000
        expected = cut.cost_pusd * (bps // 2 if node_id == "declared" else bps) // 10_000
        assert credit[node_id] == expected > 0
    assert credit["vanished"] == 2 * credit["declared"]
    checks = list(range(start + 900_000, off[1], 900_000))
    await drive_both(
        market, sorted([(t, "beat") for t in beats if t >= off[1]] + [(t, "check") for t in checks])
    )
    declared, vanished = await market.get_node("declared"), await market.get_node("vanished")
    assert declared is not None and vanished is not None
    last = beats[-1]
    for node, maint in ((declared, off), (vanished, (0, 0))):
        want = run_model(T0, 60.0, beats, last, maint)
        assert round(node.uptime_score * 100) == want.centi
        assert node.uptime_windows == want.uptime.windows
        assert (want.centi, want.uptime.windows) == reference_centi(T0, 60.0, beats, last, maint)
    # the two announced hours are not counted; the same two hours unannounced count 1 % (up
    # until 90 s after the last beat, 33.5 s into the first) and 0 % (values plus one)
    slot = (start // W) % trust.PERIOD_WINDOWS
    rings = [(await market.uptime_of(n)).ring for n in (declared, vanished)]  # type: ignore[union-attr]
    assert rings[0][slot - 1 : slot + 3] == bytes([101, 0, 0, 101])
    assert rings[1][slot - 1 : slot + 3] == bytes([101, 2, 1, 101])
    assert declared.uptime_windows == vanished.uptime_windows - 2
    assert declared.uptime_score > vanished.uptime_score


async def drive_both(market: Market, moments: list[tuple[int, str]]) -> None:
    """`drive` for the nodes `declared` and `vanished` together."""
    for t, kind in moments:
        if kind == "beat":
            beats = [
                Heartbeat(node_id=n, available_ram_gb=64, available_vram_gb=0)
                for n in ("declared", "vanished")
            ]
            outcomes = await market.heartbeat("alice", beats, t, 0)
            assert {o.outcome for o in outcomes} == {"ok"}
        else:
            for node_id in await market.stale_nodes(REGION, t):
                await market.mark_offline(node_id, t)
            await market.sweep_uptime(REGION, t)


async def test_a_registered_or_replayed_node_starts_with_its_hot_fields(
    market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    await market.register_node(a_node("h1", 60.0), T0)
    await market.register_many([a_node("h2", 60.0)], T0)
    elsewhere = Keys(keys.prefix + "copy:")
    await Market(redis, elsewhere).replay(await market.read_events(REGION))
    for k in (keys, elsewhere):
        for node_id in ("h1", "h2"):
            names = [f.decode() for f in await redis.hkeys(k.node(REGION, node_id))]
            assert tuple(names[: len(HOT_NODE_FIELDS)]) == HOT_NODE_FIELDS, (k.prefix, names)


async def test_a_lease_server_restarted_empty_fails_the_hour(
    market: Market, redis: aioredis.Redis, keys: Keys
) -> None:
    """Delivery: a node whose lease stopped answering (its agent started the server afresh,
    empty, and reported it ready again on a new port) is down for that hour; the renter keeps
    being billed from the first ready report only, at the new endpoint."""
    await market.register_node(a_node("d1", 60.0, delivers=True), T0)
    await market.register_node(a_node("d2", 60.0, delivers=True), T0)
    await fund(market, "acme", now_ms=T0)
    beats = [Heartbeat(node_id=n, available_ram_gb=64, available_vram_gb=0) for n in ("d1", "d2")]
    hour_end = (T0 // W + 1) * W
    for t in range(T0 + 60_000, T0 + 2 * 60_000 + 1, 60_000):
        await market.heartbeat("alice", beats, t, 0)
    lease = await market.reserve(
        node_id="d1", client_id="acme", user_id="u", ram_gb=8, vram_gb=0, duration_s=3 * 3600,
        max_price_pusd=1_000_000, now_ms=T0 + 2 * 60_000,
    )  # fmt: skip
    first = await market.lease_ready(
        lease.contract_id, "d1", host="10.0.0.1", port=42000, tls=False, now_ms=T0 + 2 * 60_000
    )
    for t in range(T0 + 3 * 60_000, T0 + 10 * 60_000, 60_000):
        await market.heartbeat("alice", beats, t, 0)
    again = await market.lease_ready(
        lease.contract_id, "d1", host="10.0.0.1", port=42001, tls=False, now_ms=T0 + 10 * 60_000
    )
    assert (again.lease_state, again.lease_port, again.ready_ms) == ("ready", 42001, first.ready_ms)
    for t in range(T0 + 10 * 60_000, hour_end + 5 * 60_000, 60_000):
        await market.heartbeat("alice", beats, t, 0)
    await _d1_failed_its_first_hour(market, redis, keys)


async def _d1_failed_its_first_hour(market: Market, redis: aioredis.Redis, keys: Keys) -> None:
    """Node d1's first hour counts 0 % and d2's (which beat the same) 100 %, and a replay of
    the log rebuilds the same uptime accounting."""
    slot = (T0 // W) % trust.PERIOD_WINDOWS
    failed, steady = (await market.get_node("d1")), (await market.get_node("d2"))
    assert failed is not None and steady is not None
    ring_failed = (await market.uptime_of(failed)).ring  # type: ignore[union-attr]
    ring_steady = (await market.uptime_of(steady)).ring  # type: ignore[union-attr]
    assert (ring_failed[slot], ring_steady[slot]) == (1, 101)  # 0 % and 100 % (plus one)
    assert failed.uptime_score < steady.uptime_score
    elsewhere = Keys(keys.prefix + "copy:")
    await Market(redis, elsewhere).replay(await market.read_events(REGION))
    copy = await region_snapshot(redis, elsewhere, REGION, suffixes=["uptime"])
    assert copy == await region_snapshot(redis, keys, REGION, suffixes=["uptime"])
