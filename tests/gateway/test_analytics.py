"""The analytics wire types against the query records they are mapped from (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest

from gateway import analytics as wire
from persistence import analytics as q

T = datetime(2026, 3, 1, tzinfo=UTC)
# Record fields in pico-USD and the wire field each becomes (in USD); every one but a mean also
# keeps its exact pico-USD twin, after the record's fields.
_MONEY = {
    "avg_price_pusd": "avg_price_per_gb_sec",
    "price_pusd": "price_per_gb_sec",
    "revenue_pusd": "revenue_usd",
    "amount_pusd": "amount_usd",
    "total_pusd": "total_usd",
    "open_pusd": "open",
    "high_pusd": "high",
    "low_pusd": "low",
    "close_pusd": "close",
    "vwap_pusd": "vwap",
}
_MEANS = {"avg_price_pusd", "vwap_pusd"}
_PAIRS = [
    (q.Cluster, wire.Cluster),
    (q.ClusterNode, wire.ClusterNode),
    (q.ClusterNodes, wire.ClusterNodes),
    (q.ClusterStatsBucket, wire.ClusterStatsBucket),
    (q.ClusterStats, wire.ClusterStats),
    (q.EarningsBucket, wire.EarningsBucket),
    (q.NodeEarnings, wire.NodeEarningsHistory),
    (q.SpendingBreakdown, wire.SpendingBreakdown),
    (q.ClientSpending, wire.ClientSpending),
    (q.Candle, wire.Candle),
    (q.MarketPricing, wire.MarketPricing),
]


@pytest.mark.parametrize(("record", "wire_type"), _PAIRS, ids=[w.__name__ for _, w in _PAIRS])
def test_every_record_field_has_its_wire_field_in_order(
    record: type[msgspec.Struct], wire_type: type[msgspec.Struct]
) -> None:
    """A field added to a record cannot be left out of the API silently, nor one renamed; each
    exact amount is there in USD and in pico-USD."""
    fields = record.__struct_fields__
    twins = [f for f in fields if f in _MONEY and f not in _MEANS]
    assert [_MONEY.get(f, f) for f in fields] + twins == list(wire_type.__struct_fields__)


def _cluster() -> q.Cluster:
    return q.Cluster(
        region="us-east-2",
        center=q.Center(40.1, -83.0),
        total_nodes=3,
        active_nodes=2,
        node_composition={"datacenter": 1, "edge_cluster": 0, "mist_node": 2},
        total_ram_gb=96,
        available_ram_gb=40,
        total_vram_gb=24,
        available_vram_gb=8,
        offered_ram_gb=64,
        offered_vram_gb=16,
        reserved_ram_gb=24,
        reserved_vram_gb=8,
        avg_price_pusd=Decimal("1500000.333333"),
        last_updated=T,
    )


def test_money_becomes_usd_and_nothing_else_changes() -> None:
    """Pico-USD integers and means become the USD doubles nearest the exact amounts."""
    stats = wire.cluster_stats_out(
        q.ClusterStats(
            region="us-east-2",
            cluster=_cluster(),
            start=T,
            end=T,
            bucket_s=3600,
            fills=2,
            volume_gb=12,
            revenue_pusd=126_720_000_000,
            buckets=[q.ClusterStatsBucket(start=T, fills=2, revenue_pusd=3, reporting_nodes=1)],
        )
    )
    assert stats.revenue_usd == 0.12672 and stats.buckets[0].revenue_usd == 3e-12
    assert stats.revenue_pusd == 126_720_000_000 and stats.buckets[0].revenue_pusd == 3
    assert stats.cluster is not None and stats.cluster.center == q.Center(40.1, -83.0)
    assert stats.cluster.avg_price_per_gb_sec == float(Decimal("1.500000333333E-6"))
    assert stats.buckets[0].reporting_nodes == 1 and stats.buckets[0].fills == 2

    pricing = wire.market_pricing_out(
        q.MarketPricing(
            start=T,
            end=T,
            bucket_s=60,
            candles=[
                q.Candle(
                    region="eu-west-1",
                    start=T,
                    open_pusd=800_000,
                    high_pusd=900_000,
                    low_pusd=700_000,
                    close_pusd=850_000,
                    vwap_pusd=Decimal(2_450_000) / 3,
                    fills=3,
                    volume_gb=10,
                    volume_gb_s=600,
                )
            ],
        )
    )
    (candle,) = pricing.candles
    assert (candle.open, candle.high, candle.low, candle.close) == (8e-7, 9e-7, 7e-7, 8.5e-7)
    prices = (candle.open_pusd, candle.high_pusd, candle.low_pusd, candle.close_pusd)
    assert prices == (800_000, 900_000, 700_000, 850_000)
    assert candle.vwap == pytest.approx(2.45e-6 / 3, rel=1e-15)
    assert (candle.fills, candle.volume_gb, candle.volume_gb_s) == (3, 10, 600)

    spending = wire.client_spending_out(
        q.ClientSpending(
            client_id="c",
            start=T,
            end=T,
            bucket_s=3600,
            total_pusd=2**60,
            contracts=1,
            gb_seconds=7,
            by_node_type=[
                q.SpendingBreakdown(key="mist_node", amount_pusd=5, contracts=1, gb_seconds=7)
            ],
            by_region=[],
            buckets=[q.EarningsBucket(start=T, amount_pusd=5, contracts=1, gb_seconds=7)],
        )
    )
    assert spending.total_usd == float(Decimal(2**60) / 10**12)
    assert spending.total_pusd == 2**60  # past 2**53: only the integer twin is exact
    assert spending.by_node_type[0].amount_usd == spending.buckets[0].amount_usd == 5e-12
