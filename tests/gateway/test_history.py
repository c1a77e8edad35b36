"""With the journal running: earnings and closed contracts come from Postgres history."""

from __future__ import annotations

from .conftest import Gateway, create_client, eventually, register_node, signup


async def test_earnings_and_closed_contracts_from_the_journal(gw: Gateway, journal: None) -> None:
    """A settled contract shows in the node's earnings and in the contract history of both sides."""
    api = gw.client
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    node_id = await register_node(gw, provider)
    client_id = await create_client(gw, renter)
    r = await api.post(
        "/api/contracts/create",
        json={
            "client_id": client_id,
            "node_id": node_id,
            "ram_gb": 8,
            "vram_gb": 2,
            "duration_sec": 600,
        },
        headers=renter.headers,
    )
    assert r.status_code == 201, r.text
    cid = r.json()["contract_id"]
    r = await api.post(
        f"/api/contracts/{cid}/settle", json={"actual_egress_gb": 1.5}, headers=renter.headers
    )
    assert r.status_code == 200, r.text
    settled = r.json()

    async def earned() -> dict | None:
        r = await api.get(f"/api/nodes/{node_id}", headers=provider.headers)
        earnings = r.json()["earnings"]
        return earnings if earnings["settled_contracts"] == 1 else None

    earnings = await eventually(earned, timeout_s=20)
    assert earnings["total_earned_usd"] == settled["total_cost_usd"]
    assert earnings["total_earned_pusd"] == settled["total_cost_pusd"] > 0
    assert settled["total_cost_pusd"] == round(settled["total_cost_usd"] * 1e12)

    for who, params in (
        (renter, {"status": "completed"}),
        (provider, {"node_id": node_id}),
        (renter, {}),
    ):
        r = await api.get("/api/contracts", params=params, headers=who.headers)
        page = r.json()
        assert page["total_count"] == 1, page
        row = page["contracts"][0]
        for name in (
            "contract_id",
            "client_id",
            "node_id",
            "status",
            "total_cost_usd",
            "total_cost_pusd",
            "price_pusd",
            "egress_price_pusd",
            "max_price_pusd",
            "settlement_hash",
            "used_sec",
            "egress_gb",
            "start_ms",
            "end_ms",
            "completed_ms",
        ):
            assert row[name] == settled[name], name
    other = await signup(gw, "user")
    r = await api.get("/api/contracts", headers=other.headers)
    assert r.json()["total_count"] == 0
