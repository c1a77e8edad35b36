"""Analytics queries against a brute computation over the `events` table."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequest
from engine.types import (
    BidCancelled,
    BidExpired,
    BidPlaced,
    ContractCreated,
    ContractSettled,
    HeartbeatsApplied,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
)
from persistence import analytics as q
from persistence.journal.batch import write_batch
from persistence.journal.clusters import refresh_clusters
from persistence.journal.stored import decode_entry
from tests.conftest import _SEED
from tests.persistence.history import History, seed_accounts

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _bucket(ms: int, size_s: int) -> datetime:
    return _EPOCH + timedelta(seconds=ms // 1000 // size_s * size_s)


def _ms(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(milliseconds=1)


@pytest.fixture
async def journaled(conn: asyncpg.Connection) -> tuple[History, list]:
    """A history journaled into Postgres, and its events as read back from `events`."""
    h = History.generate(_SEED, 600, regions=("us-east-2", "eu-west-1"))
    await seed_accounts(conn, h)
    await write_batch(conn, [decode_entry(p) for _, p in h.encoded()])
    await refresh_clusters(conn, h.regions)
    rows = await conn.fetch("SELECT payload::text FROM events ORDER BY region, seq")
    return h, [decode_entry(r[0]) for r in rows]


def _window(events: list, bucket: str) -> q.Window:
    first = min(e.ts_ms for e in events)
    last = max(e.ts_ms for e in events)
    # A window that cuts the history on both sides, so the filters are exercised too.
    span = last - first
    start = _EPOCH + timedelta(milliseconds=first + span // 5)
    end = _EPOCH + timedelta(milliseconds=last - span // 5)
    return q.window(start, end, bucket)


@pytest.mark.parametrize("bucket", ["1m", "15m"])
async def test_node_earnings_and_client_spending(
    conn: asyncpg.Connection, journaled: tuple[History, list], bucket: str
) -> None:
    """Earnings and spending per bucket equal the settled contracts' costs in the log."""
    h, stored = journaled
    w = _window(stored, bucket)
    lo, hi = _ms(w.start), _ms(w.end)
    node_type: dict[str, str] = {}
    by_node: dict[str, dict[datetime, list[int]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0, 0])
    )
    by_client: dict[str, dict[datetime, list[int]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0, 0])
    )
    client_types: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    client_regions: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in stored:
        e = s.event
        if isinstance(e, NodeRegistered | NodeUpdated):
            node_type[e.node.node_id] = e.node.node_type
        if isinstance(e, ContractSettled) and lo <= e.completed_ms < hi:
            b = _bucket(e.completed_ms, w.bucket_s)
            gbs = (e.ram_gb + e.vram_gb) * e.used_s
            for acc in (by_node[e.node_id][b], by_client[e.client_id][b]):
                acc[0] += e.cost_pusd
                acc[1] += 1
                acc[2] += gbs
            client_types[e.client_id][node_type[e.node_id]] += e.cost_pusd
            client_regions[e.client_id][e.region] += e.cost_pusd
    assert by_node, "the window should hold settled contracts"
    for node_id, buckets in by_node.items():
        got = await q.node_earnings(conn, node_id, w)
        assert [(b.start, b.amount_pusd, b.contracts, b.gb_seconds) for b in got.buckets] == [
            (t, v[0], v[1], v[2]) for t, v in sorted(buckets.items())
        ]
        assert got.total_pusd == sum(v[0] for v in buckets.values())
    for _, client_id in h.renters:
        got_c = await q.client_spending(conn, client_id, w)
        buckets = by_client.get(client_id, {})
        assert [(b.start, b.amount_pusd, b.contracts) for b in got_c.buckets] == [
            (t, v[0], v[1]) for t, v in sorted(buckets.items())
        ]
        assert {b.key: b.amount_pusd for b in got_c.by_node_type} == dict(client_types[client_id])
        assert {b.key: b.amount_pusd for b in got_c.by_region} == dict(client_regions[client_id])


@pytest.mark.parametrize("bucket", ["1m", "5m"])
async def test_pricing_candles(
    conn: asyncpg.Connection, journaled: tuple[History, list], bucket: str
) -> None:
    """Candles are the fills' prices in fill order, with volumes and a GB-second VWAP."""
    _, stored = journaled
    w = _window(stored, bucket)
    lo, hi = _ms(w.start), _ms(w.end)
    fills: dict[tuple[str, datetime], list] = defaultdict(list)
    for s in stored:
        e = s.event
        if isinstance(e, ContractCreated) and lo <= e.contract.start_ms < hi:
            c = e.contract
            fills[(c.region, _bucket(c.start_ms, w.bucket_s))].append(
                (c.start_ms, s.seq, c.price_pusd, c.ram_gb + c.vram_gb, c.duration_s)
            )
    expected = []
    for (region, start), f in sorted(fills.items()):
        f.sort()
        prices = [x[2] for x in f]
        gbs = sum(x[3] * x[4] for x in f)
        expected.append(
            (
                region,
                start,
                prices[0],
                max(prices),
                min(prices),
                prices[-1],
                pytest.approx(float(Fraction(sum(x[2] * x[3] * x[4] for x in f), gbs)), rel=1e-12),
                len(f),
                sum(x[3] for x in f),
                gbs,
            )
        )
    assert expected
    got = await q.market_pricing(conn, w)
    assert [
        (
            c.region,
            c.start,
            c.open_pusd,
            c.high_pusd,
            c.low_pusd,
            c.close_pusd,
            float(c.vwap_pusd),
            c.fills,
            c.volume_gb,
            c.volume_gb_s,
        )
        for c in got.candles
    ] == expected
    one = await q.market_pricing(conn, w, region="eu-west-1")
    assert [c.region for c in one.candles] == [x[0] for x in expected if x[0] == "eu-west-1"]


async def test_supply_and_demand(conn: asyncpg.Connection, journaled: tuple[History, list]) -> None:
    """Supply per bucket is the per-node mean of heartbeats, summed; demand is bids and fills;
    `current` is the state after the last event."""
    _, stored = journaled
    w = _window(stored, "5m")
    lo, hi = _ms(w.start), _ms(w.end)
    samples: dict[tuple[str, datetime], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    demand: dict[tuple[str, datetime], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    nodes: dict[str, dict] = {}
    bids: dict[str, dict] = {}
    for s in stored:
        e = s.event
        if isinstance(e, HeartbeatsApplied):
            for b in e.entries:
                nodes[b.node_id].update(
                    offered=(b.offered_ram_gb, b.offered_vram_gb), status=b.status
                )
                if lo <= e.ts_ms < hi:
                    samples[(e.region, _bucket(e.ts_ms, w.bucket_s))][b.node_id].append(b)
        elif isinstance(e, NodeRegistered | NodeUpdated):
            n = e.node
            nodes[n.node_id] = {
                "region": n.region,
                "status": n.status,
                "offered": (n.offered_ram_gb, n.offered_vram_gb),
                "reserved": (n.reserved_ram_gb, n.reserved_vram_gb),
            }
        elif isinstance(e, NodeOffline):
            nodes[e.node_id]["status"] = "offline"
        elif isinstance(e, NodeDeactivated):
            nodes[e.node_id]["status"] = "deactivated"
        elif isinstance(e, BidPlaced):
            bids[e.bid.bid_id] = {"bid": e.bid, "filled": (0, 0), "open": True}
            if lo <= e.bid.created_ms < hi:
                d = demand[(e.region, _bucket(e.bid.created_ms, w.bucket_s))]
                d[0] += 1
                d[1] += e.bid.ram_gb
                d[2] += e.bid.vram_gb
        elif isinstance(e, BidCancelled | BidExpired):
            bids[e.bid_id]["open"] = False
        elif isinstance(e, ContractCreated):
            c = e.contract
            nodes[c.node_id]["reserved"] = (e.node_reserved_ram_gb, e.node_reserved_vram_gb)
            if e.bid_id is not None:
                bids[e.bid_id]["filled"] = (e.bid_filled_ram_gb, e.bid_filled_vram_gb)
                bids[e.bid_id]["open"] = e.bid_status == "open"
            if lo <= c.start_ms < hi:
                d = demand[(c.region, _bucket(c.start_ms, w.bucket_s))]
                d[3] += 1
                d[4] += c.ram_gb
                d[5] += c.vram_gb
        elif isinstance(e, ContractSettled):
            nodes[e.node_id]["reserved"] = (e.node_reserved_ram_gb, e.node_reserved_vram_gb)
    expected = {}
    for key in set(samples) | set(demand):
        per_node = samples.get(key, {})

        def mean_sum(f, per_node=per_node) -> float:
            return float(sum(Fraction(sum(f(b) for b in bs), len(bs)) for bs in per_node.values()))

        d = demand[key]
        expected[key] = (
            pytest.approx(mean_sum(lambda b: b.offered_ram_gb), rel=1e-12),
            pytest.approx(mean_sum(lambda b: b.offered_vram_gb), rel=1e-12),
            pytest.approx(mean_sum(lambda b: b.offered_ram_gb - b.available_ram_gb), rel=1e-12),
            pytest.approx(mean_sum(lambda b: b.offered_vram_gb - b.available_vram_gb), rel=1e-12),
            len(per_node),
            *d,
        )
    assert any(v[4] for v in expected.values()) and any(v[5] for v in expected.values())
    got = await q.market_supply(conn, w)
    assert {
        (b.region, b.start): (
            b.offered_ram_gb,
            b.offered_vram_gb,
            b.reserved_ram_gb,
            b.reserved_vram_gb,
            b.reporting_nodes,
            b.bids,
            b.bid_ram_gb,
            b.bid_vram_gb,
            b.fills,
            b.filled_ram_gb,
            b.filled_vram_gb,
        )
        for b in got.buckets
    } == expected
    # The live picture. Every bid in the history expires well after the "now" used here.
    now = _EPOCH + timedelta(milliseconds=min(s.ts_ms for s in stored))
    current = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0, 0])
    for n in nodes.values():
        if n["status"] == "active":
            c = current[n["region"]]
            c[0] += 1
            c[1], c[2] = c[1] + n["offered"][0], c[2] + n["offered"][1]
            c[3], c[4] = c[3] + n["reserved"][0], c[4] + n["reserved"][1]
    for b in bids.values():
        if b["open"]:
            c = current[b["bid"].region]
            c[5] += 1
            c[6] += b["bid"].ram_gb - b["filled"][0]
            c[7] += b["bid"].vram_gb - b["filled"][1]
    got_now = await q.market_supply(conn, w, now=now)
    assert {
        s.region: [
            s.active_nodes,
            s.offered_ram_gb,
            s.offered_vram_gb,
            s.reserved_ram_gb,
            s.reserved_vram_gb,
            s.resting_bids,
            s.resting_bid_ram_gb,
            s.resting_bid_vram_gb,
        ]
        for s in got_now.current
    } == dict(current)


async def test_clusters_match_the_nodes(
    conn: asyncpg.Connection, journaled: tuple[History, list]
) -> None:
    """Cluster rows count, sum and average the region's nodes; stats sum to the totals."""
    h, stored = journaled
    got = {c.region: c for c in await q.clusters(conn)}
    assert set(got) == set(h.regions)
    for region, c in got.items():
        rows = await conn.fetch(
            "SELECT * FROM nodes WHERE region = $1 AND status <> 'deactivated'", region
        )
        assert c.total_nodes == len(rows)
        assert sum(c.node_composition.values()) == len(rows)
        active = [r for r in rows if r["status"] == "active"]
        assert c.available_ram_gb == sum(r["available_ram_gb"] for r in active)
        assert c.avg_price_pusd is not None
        assert float(c.avg_price_pusd) == pytest.approx(
            sum(r["price_pusd"] for r in active) / len(active), rel=1e-9
        )
        listed = await q.cluster_nodes(conn, region, limit=3)
        assert listed.total_count == len(rows) and len(listed.nodes) == min(3, len(rows))
    w = _window(stored, "1h")
    stats = await q.cluster_stats(conn, "us-east-2", w)
    settled = [
        s.event
        for s in stored
        if isinstance(s.event, ContractSettled)
        and s.region == "us-east-2"
        and _ms(w.start) <= s.event.completed_ms < _ms(w.end)
    ]
    assert stats.revenue_pusd == sum(e.cost_pusd for e in settled)
    assert sum(b.settled for b in stats.buckets) == len(settled)


def test_windows_are_validated_and_aligned() -> None:
    """Bucket sizes come from a fixed menu; ranges are bounded and widened to whole buckets."""
    now = datetime(2026, 3, 1, 12, 34, 56, tzinfo=UTC)
    w = q.window(None, None, "1h", now=now)
    assert (w.start, w.end) == (
        datetime(2026, 2, 28, 12, tzinfo=UTC),
        datetime(2026, 3, 1, 13, tzinfo=UTC),
    )
    naive = q.window(datetime(2026, 3, 1, 0, 0, 30), datetime(2026, 3, 1, 0, 5), "1m")
    assert naive.start == datetime(2026, 3, 1, tzinfo=UTC)
    for args, field in [
        ((now, now, "1h"), "start"),
        ((now, now - timedelta(hours=1), "1h"), "start"),
        ((now - timedelta(days=400), now, "1d"), "start"),
        ((now - timedelta(days=3), now, "1m"), "bucket"),
        ((None, now, "2m"), "bucket"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            q.window(*args)
        assert info.value.field == field


_ZONES = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=23, minutes=59))]
)
_EDGES = [datetime.min, datetime.max, datetime(1969, 12, 31, 23, 59, 59), datetime(9999, 12, 1)]


@settings(max_examples=500, deadline=None)
@given(
    start=st.none() | st.sampled_from(_EDGES) | st.datetimes(timezones=_ZONES),
    end=st.none() | st.sampled_from(_EDGES) | st.datetimes(timezones=_ZONES),
    bucket=st.sampled_from(sorted(q.BUCKETS)),
)
def test_any_window_is_a_window_or_a_refusal_naming_its_field(
    start: datetime | None, end: datetime | None, bucket: str
) -> None:
    """Any datetimes (year 1 to 9999, any offset) give a valid window of whole buckets inside
    the allowed range, or InvalidRequest naming the field: never another exception."""
    try:
        w = q.window(start, end, bucket)
    except InvalidRequest as e:
        assert e.field in ("start", "end", "bucket")
        return
    assert q.EARLIEST <= w.start < w.end and w.end - w.start <= q.MAX_RANGE + 2 * w.bucket
    assert (w.start - q.EARLIEST) % w.bucket == timedelta(0) == (w.end - q.EARLIEST) % w.bucket
