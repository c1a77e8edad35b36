"""Idempotency-Key on creating POSTs: replay, conflict, concurrency, per-user scope, secrets."""

from __future__ import annotations

import asyncio
import json

from .conftest import Gateway, assert_error, create_client, listed, register_node, signup


async def test_same_key_same_body_replays_the_first_response(gw: Gateway, journal: None) -> None:
    """A retried register returns the first node (marked replayed); only one node exists."""
    api = gw.client
    provider = await signup(gw, "provider")
    headers = {**provider.headers, "Idempotency-Key": "register-1"}
    body = {
        "node_type": "datacenter",
        "name": "dc-1",
        "region": "us-east-2",
        "latitude": 40.0,
        "longitude": -74.0,
        "total_ram_gb": 256,
        "total_vram_gb": 80,
        "price_per_gb_sec": 0.000001,
    }
    first = await api.post("/api/nodes/register", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    # Same request, keys in another order and with whitespace: still the same request.
    again = await api.post(
        "/api/nodes/register",
        content=json.dumps(dict(reversed(list(body.items()))), indent=2).encode(),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    page = await listed(gw, provider, {"mine": "true"}, 1)
    assert [n["node_id"] for n in page["nodes"]] == [first.json()["node_id"]]

    different = await api.post(
        "/api/nodes/register", json={**body, "name": "dc-2"}, headers=headers
    )
    assert_error(different, 409, "idempotency_key_reused", "Idempotency-Key")

    # Keys are per user: another provider with the same key creates their own node.
    other = await signup(gw, "provider")
    r = await api.post(
        "/api/nodes/register", json=body, headers={**other.headers, "Idempotency-Key": "register-1"}
    )
    assert r.status_code == 200 and r.json()["node_id"] != first.json()["node_id"]


async def test_concurrent_duplicates_create_one_contract(gw: Gateway) -> None:
    """Eight simultaneous retries of one contract creation lease the capacity once."""
    api = gw.client
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    node_id = await register_node(gw, provider, total_ram_gb=64, total_vram_gb=0)
    client_id = await create_client(gw, renter)
    body = {
        "client_id": client_id,
        "node_id": node_id,
        "ram_gb": 10,
        "vram_gb": 0,
        "duration_sec": 600,
    }
    headers = {**renter.headers, "Idempotency-Key": "take-once"}
    responses = await asyncio.gather(
        *(api.post("/api/contracts/create", json=body, headers=headers) for _ in range(8))
    )
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    assert len({r.json()["contract_id"] for r in responses}) == 1
    r = await api.get(f"/api/nodes/{node_id}", headers=provider.headers)
    assert r.json()["reserved_ram_gb"] == 10


async def test_client_errors_are_replayed_and_server_side_state_is_not_duplicated(
    gw: Gateway,
) -> None:
    """A refused request (409) is replayed as such; validation errors are never stored."""
    api = gw.client
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    node_id = await register_node(gw, provider, total_ram_gb=8, total_vram_gb=0)
    client_id = await create_client(gw, renter)
    headers = {**renter.headers, "Idempotency-Key": "too-big"}
    body = {"client_id": client_id, "node_id": node_id, "ram_gb": 16, "vram_gb": 0}
    first = await api.post("/api/contracts/create", json=body, headers=headers)
    assert_error(first, 409)
    again = await api.post("/api/contracts/create", json=body, headers=headers)
    assert again.status_code == 409 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    bad = await api.post(
        "/api/contracts/create",
        json={**body, "ram_gb": -1},
        headers={**renter.headers, "Idempotency-Key": "k2"},
    )
    assert_error(bad, 422, field="ram_gb")
    good = await api.post(
        "/api/contracts/create",
        json={**body, "ram_gb": 8},
        headers={**renter.headers, "Idempotency-Key": "k2"},
    )
    assert good.status_code == 201, good.text


async def test_replayed_api_key_creation_never_shows_the_key_again(gw: Gateway) -> None:
    """The stored response of a key creation holds no secret: a replay says `key: null`."""
    api = gw.client
    user = await signup(gw)
    headers = {**user.headers, "Idempotency-Key": "mint"}
    first = await api.post("/api/auth/api-keys", json={"name": "ci"}, headers=headers)
    assert first.status_code == 201 and first.json()["key"].startswith("mnm_")
    again = await api.post("/api/auth/api-keys", json={"name": "ci"}, headers=headers)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["key"] is None and again.json()["id"] == first.json()["id"]
    r = await api.get("/api/auth/api-keys", headers=user.headers)
    assert len(r.json()["api_keys"]) == 2


async def test_malformed_idempotency_key(gw: Gateway) -> None:
    user = await signup(gw)
    r = await gw.client.post(
        "/api/clients",
        json={"org_name": "x"},
        headers={**user.headers, "Idempotency-Key": "x" * 256},
    )
    assert_error(r, 422, field="Idempotency-Key")
