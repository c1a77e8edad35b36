"""The clusters and analytics routes through the gateway: auth, owner checks, validation, and
answers that follow the market once the journal has caught up."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from persistence.journal.clusters import refresh_clusters
from persistence.journal.worker import run_journal
from tests.gateway.conftest import (  # noqa: F401 - fixtures
    Gateway,
    assert_error,
    create_client,
    gw,
    register_node,
    settings,
    signup,
)
from tests.persistence.test_journal_worker import _eventually


async def test_routes_follow_the_journal_and_check_owners(
    gw: Gateway,  # noqa: F811 - the fixture imported above
    conn: asyncpg.Connection,
) -> None:
    """A provider sees its node's earnings, another provider is refused; a renter sees its
    client's spending, another renter is told it does not exist; clusters and candles show the
    fill once the journal has it; malformed windows are refused with the field named."""
    provider, other_provider = await signup(gw, "provider"), await signup(gw, "provider")
    renter, other_renter = await signup(gw, "user"), await signup(gw, "user")
    node_id = await register_node(gw, provider, region="an-east-1")
    client_id = await create_client(gw, renter)
    r = await gw.client.post(
        "/api/contracts/create",
        json={
            "client_id": client_id,
            "node_id": node_id,
            "ram_gb": 4,
            "vram_gb": 2,
            "duration_sec": 600,
        },
        headers=renter.headers,
    )
    assert r.status_code == 201, r.text
    contract_id = r.json()["contract_id"]
    r = await gw.client.post(
        f"/api/contracts/{contract_id}/settle", json={"actual_egress_gb": 0}, headers=renter.headers
    )
    assert r.status_code == 200, r.text

    stop = asyncio.Event()
    worker = asyncio.create_task(run_journal(gw.settings, consumer="http", stop=stop))
    try:

        async def settled() -> bool:
            status = await conn.fetchval("SELECT status FROM contracts WHERE id = $1", contract_id)
            return status is not None and status != "active"

        await _eventually(settled, 30, "the settlement to be journaled")
        await refresh_clusters(conn, ["an-east-1"])
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    cost = await conn.fetchval("SELECT total_cost_usd FROM contracts WHERE id = $1", contract_id)
    # Three days of 1-minute buckets is more than a window may hold.
    three_days_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3 * 86400))
    window = {
        "start": time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(time.time() - 86400)),
        "bucket": "1h",
    }

    r = await gw.client.get(
        f"/api/analytics/node/{node_id}/earnings", params=window, headers=provider.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["total_usd"] == float(cost) and r.json()["contracts"] == 1
    r = await gw.client.get(
        f"/api/analytics/node/{node_id}/earnings", params=window, headers=other_provider.headers
    )
    assert_error(r, 403)
    r = await gw.client.get(f"/api/analytics/node/{node_id}/earnings", params=window)
    assert_error(r, 401)

    r = await gw.client.get(
        f"/api/analytics/client/{client_id}/spending", params=window, headers=renter.headers
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total_usd"] == float(cost)
    assert [b["key"] for b in body["by_node_type"]] == ["mist_node"]
    assert [b["key"] for b in body["by_region"]] == ["an-east-1"]
    r = await gw.client.get(
        f"/api/analytics/client/{client_id}/spending", params=window, headers=other_renter.headers
    )
    assert_error(r, 404)

    r = await gw.client.get("/api/clusters", headers=renter.headers)
    assert r.status_code == 200, r.text
    (cluster,) = [c for c in r.json()["clusters"] if c["region"] == "an-east-1"]
    assert cluster["total_nodes"] == 1 and cluster["node_composition"]["mist_node"] == 1
    r = await gw.client.get("/api/clusters/an-east-1/nodes", headers=renter.headers)
    assert [n["node_id"] for n in r.json()["nodes"]] == [node_id]
    r = await gw.client.get("/api/clusters/an-east-1/stats", params=window, headers=renter.headers)
    assert r.status_code == 200 and r.json()["fills"] == 1

    r = await gw.client.get(
        "/api/analytics/market/pricing",
        params={**window, "region": "an-east-1"},
        headers=renter.headers,
    )
    (candle,) = r.json()["candles"]
    assert candle["open"] == candle["close"] == 0.0000008 and candle["volume_gb"] == 6
    r = await gw.client.get("/api/analytics/market/supply", params=window, headers=renter.headers)
    assert r.status_code == 200, r.text

    for params, field in [
        ({"bucket": "2h"}, "bucket"),
        ({"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "start"),
        ({"start": "yesterday"}, "start"),
        ({"bucket": "1m", "start": three_days_ago}, "bucket"),
        ({"colour": "red"}, "colour"),
        # The calendar's edges (each answered 500 once, dropping the connection).
        ({"end": "0001-01-01T00:00:00Z"}, "end"),
        ({"start": "0001-01-01T00:00:00+14:00", "end": "2026-01-01T00:00:00Z"}, "start"),
        ({"start": "9999-12-31T00:00:00Z", "end": "9999-12-31T23:59:59Z", "bucket": "1d"}, "start"),
        ({"end": "9999-12-31T23:59:59-23:59"}, "end"),
        ({"start": "", "end": ""}, "start"),
    ]:
        for path in ("/api/analytics/market/pricing", "/api/analytics/market/supply"):
            r = await gw.client.get(path, params=params, headers=renter.headers)
            assert r.status_code in (400, 422), (path, params, r.text)
            assert r.json()["error"].get("field") == field, (path, params, r.text)
