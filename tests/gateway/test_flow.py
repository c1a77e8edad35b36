"""End to end over HTTP: sign up, register nodes, heartbeat, browse, request, contract, extend, settle."""

from __future__ import annotations

import math

from gateway.schemas import to_pusd

from .conftest import (
    BOSTON,
    LONDON,
    NYC,
    Gateway,
    assert_error,
    bearer,
    create_client,
    eventually,
    in_view,
    listed,
    register_node,
    signup,
)


async def test_renter_and_provider_full_flow(gw: Gateway, journal: None) -> None:
    """A provider lists two nodes; a renter finds the near one, takes it, extends and settles."""
    api = gw.client
    provider = await signup(gw, "provider")
    renter = await signup(gw, "user")
    renter_jwt = await bearer(gw, renter)

    near = await register_node(gw, provider, name="queens-4090")
    far = await register_node(
        gw,
        provider,
        name="london-dc",
        node_type="datacenter",
        region="eu-west-1",
        latitude=LONDON[0],
        longitude=LONDON[1],
        total_ram_gb=512,
        total_vram_gb=160,
        price_per_gb_sec=0.0000005,
    )

    # Heartbeat: accepted once, then refused until the minimum interval has passed.
    beat = {
        "available_ram_gb": 48,
        "available_vram_gb": 18,
        "cpu_usage_pct": 12.5,
        "gpu_usage_pct": 8.3,
        "temperature_c": 42,
        "latitude": NYC[0],
        "longitude": NYC[1],
    }
    r = await api.post(f"/api/nodes/{near}/heartbeat", json=beat, headers=provider.headers)
    assert r.status_code == 200, r.text
    hb = r.json()
    assert hb["status"] == "ok" and hb["offered_ram_gb"] == 48 and hb["available_vram_gb"] == 18
    r = await api.post(f"/api/nodes/{near}/heartbeat", json=beat, headers=provider.headers)
    assert_error(r, 429, "heartbeat_too_soon")
    assert 1 <= int(r.headers["retry-after"]) <= 30

    # Browse near Boston within 500 km: only the Queens node, with its distance and latency.
    await in_view(gw, renter, near)
    await in_view(gw, renter, far)
    r = await api.get(
        "/api/marketplace",
        params={
            "client_lat": BOSTON[0],
            "client_lng": BOSTON[1],
            "max_distance_km": 500,
            "min_ram_gb": 32,
        },
        headers=renter_jwt,
    )
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["total_count"] == 1 and [o["node_id"] for o in page["offers"]] == [near]
    offer = page["offers"][0]
    assert offer["available_ram_gb"] == 48 and offer["price_per_gb_sec"] == 0.0000008
    assert 250 < offer["distance_km"] < 310 and offer["estimated_latency_ms"] == 0.8

    # Request with the location of the client profile: the near node ranks first.
    client_id = await create_client(gw, renter, BOSTON)
    r = await api.post(
        "/api/marketplace/request",
        json={
            "ram_gb": 32,
            "vram_gb": 12,
            "duration_sec": 3600,
            "max_price_per_gb_sec": 0.000002,
            "prefer_local": True,
            "client_id": client_id,
        },
        headers=renter.headers,
    )
    assert r.status_code == 200, r.text
    found = r.json()
    assert found["location_source"] == "client_profile" and found["request_id"]
    best = found["matches"][0]
    assert best["node_id"] == near
    assert [m["node_id"] for m in found["matches"]] == [near, far]
    parts = best["score_breakdown"]
    assert math.isclose(
        best["match_score"],
        3 * parts["proximity"]
        + parts["price"]
        + parts["reliability"]
        + parts["capacity"]
        + parts["type_bonus"],
        abs_tol=0.05,
    )
    assert best["estimated_cost"] == 44 * 3600 * 0.0000008

    # Take it: the node's free capacity drops by what was leased.
    r = await api.post(
        "/api/contracts/create",
        json={
            "client_id": client_id,
            "node_id": near,
            "ram_gb": 32,
            "vram_gb": 12,
            "duration_sec": 3600,
        },
        headers=renter.headers,
    )
    assert r.status_code == 201, r.text
    contract = r.json()
    assert contract["status"] == "active" and contract["price_per_gb_sec"] == 0.0000008
    assert contract["end_ms"] - contract["start_ms"] == 3_600_000
    r = await api.get(f"/api/nodes/{near}", headers=provider.headers)
    node = r.json()
    assert (node["reserved_ram_gb"], node["available_ram_gb"]) == (32, 16)
    assert (node["reserved_vram_gb"], node["available_vram_gb"]) == (12, 6)

    # Both sides see it; the renter extends it; the provider may not.
    cid = contract["contract_id"]
    r = await api.get(f"/api/contracts/{cid}", headers=provider.headers)
    assert r.status_code == 200 and r.json()["live"]["remaining_sec"] > 3500
    r = await api.post(
        f"/api/contracts/{cid}/extend",
        json={"additional_duration_sec": 600},
        headers=provider.headers,
    )
    assert_error(r, 403)
    r = await api.post(
        f"/api/contracts/{cid}/extend",
        json={"additional_duration_sec": 600},
        headers=renter.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["duration_sec"] == 4200 and r.json()["end_ms"] == contract["end_ms"] + 600_000
    # Past the node's max_duration_sec (a day): refused for that reason, not as a lost race.
    r = await api.post(
        f"/api/contracts/{cid}/extend",
        json={"additional_duration_sec": 86_400 - 4200 + 1},
        headers=renter.headers,
    )
    assert_error(r, 422, "outside_node_terms", "additional_duration_sec")
    assert "over the node's max_duration_sec of 86400 s" in r.json()["error"]["message"]
    r = await api.get("/api/contracts", params={"status": "active"}, headers=renter.headers)
    assert [c["contract_id"] for c in r.json()["contracts"]] == [cid]
    r = await api.get("/api/contracts", params={"node_id": near}, headers=provider.headers)
    assert [c["contract_id"] for c in r.json()["contracts"]] == [cid]

    # Settle: completed, priced for the seconds used plus egress, hashed; capacity back.
    r = await api.post(
        f"/api/contracts/{cid}/settle", json={"actual_egress_gb": 2.4}, headers=renter.headers
    )
    assert r.status_code == 200, r.text
    settled = r.json()
    assert settled["status"] == "completed" and settled["egress_gb"] == 2.4
    assert len(settled["settlement_hash"]) == 64
    used = settled["used_sec"]
    assert 1 <= used <= 5
    assert to_pusd(settled["total_cost_usd"]) == 44 * used * to_pusd(0.0000008)
    r = await api.post(f"/api/contracts/{cid}/settle", json={}, headers=renter.headers)
    assert_error(r, 409)
    r = await api.get(f"/api/nodes/{near}", headers=provider.headers)
    node = r.json()
    assert node["reserved_ram_gb"] == 0 and node["available_ram_gb"] == 48
    assert node["earnings"]["active_contracts"] == 0 and node["earnings"]["accrued_active_usd"] == 0

    # Others see the node, not its owner or earnings; the node list filters.
    r = await api.get(f"/api/nodes/{near}", headers=renter.headers)
    assert r.status_code == 200 and r.json()["owner_id"] is None and r.json()["earnings"] is None
    page = await listed(gw, renter, {"region": "eu-west-1"}, 1)
    assert [n["node_id"] for n in page["nodes"]] == [far] and page["nodes"][0]["owner_id"] is None
    page = await listed(gw, provider, {"mine": "true", "node_type": "mist_node"}, 1)
    assert [n["node_id"] for n in page["nodes"]] == [near]
    assert page["nodes"][0]["owner_id"] == provider.user_id
    assert page["nodes"][0]["metadata"]["gpu_model"] == "RTX 4090"
    page = await listed(gw, provider, {"min_ram": 100}, 1)
    assert [n["node_id"] for n in page["nodes"]] == [far]

    # The provider changes its price and deactivates the far node.
    r = await api.put(
        f"/api/nodes/{near}", json={"price_per_gb_sec": 0.000001}, headers=provider.headers
    )
    assert r.status_code == 200 and r.json()["price_per_gb_sec"] == 0.000001
    r = await api.delete(f"/api/nodes/{far}", headers=provider.headers)
    assert r.status_code == 200 and r.json()["status"] == "deactivated"


async def test_contract_price_cap_and_lost_capacity(gw: Gateway) -> None:
    """A reserve above the cap or beyond the free capacity is a 409, and nothing is leased."""
    api = gw.client
    provider = await signup(gw, "provider")
    renter = await signup(gw, "user")
    node_id = await register_node(gw, provider, total_ram_gb=16, total_vram_gb=0)
    client_id = await create_client(gw, renter)
    take = {
        "client_id": client_id,
        "node_id": node_id,
        "ram_gb": 16,
        "vram_gb": 0,
        "duration_sec": 600,
    }
    r = await api.post(
        "/api/contracts/create",
        json={**take, "max_price_per_gb_sec": 0.0000001},
        headers=renter.headers,
    )
    assert_error(r, 409, "capacity_taken")
    r = await api.post("/api/contracts/create", json=take, headers=renter.headers)
    assert r.status_code == 201, r.text
    r = await api.post("/api/contracts/create", json=take, headers=renter.headers)
    assert_error(r, 409)
    r = await api.get(f"/api/nodes/{node_id}", headers=provider.headers)
    assert r.json()["reserved_ram_gb"] == 16


async def test_bids_rest_in_the_book_and_cancel(gw: Gateway, journal: None) -> None:
    """A bid below every ask rests (visible in the book), then is cancelled by its owner only."""
    api = gw.client
    provider = await signup(gw, "provider")
    renter = await signup(gw, "user")
    other = await signup(gw, "user")
    await register_node(gw, provider, price_per_gb_sec=0.000002)
    client_id = await create_client(gw, renter)
    r = await api.post(
        "/api/bids",
        json={
            "client_id": client_id,
            "region": "us-east-2",
            "ram_gb": 8,
            "vram_gb": 4,
            "duration_sec": 600,
            "max_price_per_gb_sec": 0.000001,
        },
        headers=renter.headers,
    )
    assert r.status_code == 201, r.text
    bid = r.json()
    assert bid["status"] == "open" and bid["client_lat"] == BOSTON[0]
    r = await api.get("/api/book/us-east-2", headers=other.headers)
    assert r.status_code == 200, r.text
    book = r.json()
    assert book["best_bid_per_gb_sec"] == 0.000001
    assert {"price_per_gb_sec": 0.000001, "gb": 12, "price_pusd": 1_000_000} in book["bid_depth"]
    assert book["best_bid_pusd"] == 1_000_000

    async def listed_bids() -> list | None:
        r = await api.get("/api/bids", params={"status": "open"}, headers=renter.headers)
        return r.json()["bids"] or None

    assert await eventually(listed_bids) == [bid]
    r = await api.get("/api/bids", headers=other.headers)
    assert r.json()["bids"] == []
    r = await api.delete(f"/api/bids/{bid['bid_id']}", headers=other.headers)
    assert_error(r, 404)
    r = await api.delete(f"/api/bids/{bid['bid_id']}", headers=renter.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await api.delete(f"/api/bids/{bid['bid_id']}", headers=renter.headers)
    assert_error(r, 409)
