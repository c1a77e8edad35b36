"""Money through the real gateway (issue 14): 402 refusals before anything is reserved, one
balance (the funding wallet moved to the region by itself), budgets, credit lines, caps, and
the operators' credit and clawback."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from engine import core
from engine.keys import Keys
from engine.settings import Settings

from .conftest import (
    Actor,
    Gateway,
    assert_error,
    create_client,
    make_settings,
    register_node,
    signup,
)

USD = 10**12
PRICE_USD = 0.0000008  # per GB-second: the spec's example node
PRICE = 800_000


@pytest.fixture
def settings(redis_url: str, db_url: str, keys: Keys) -> Settings:
    return make_settings(redis_url, db_url, keys, max_open_contracts=2, max_open_bids=1)


async def admin(gw: Gateway) -> Actor:
    actor = await signup(gw, "user")
    await gw.state["pool"].execute(
        "UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(actor.user_id)
    )
    actor.role = "admin"
    return actor


async def balance(gw: Gateway, renter: Actor, client_id: str) -> dict[str, Any]:
    r = await gw.client.get(f"/api/clients/{client_id}/balance", headers=renter.headers)
    assert r.status_code == 200, r.text
    return r.json()


def take(client_id: str, node_id: str, **kw: Any) -> dict[str, Any]:
    body = {"client_id": client_id, "node_id": node_id, "ram_gb": 10, "vram_gb": 0}
    body.update(duration_sec=3600, **kw)
    return body


async def test_an_unfunded_contract_or_bid_is_402_and_reserves_nothing(gw: Gateway) -> None:
    """No balance: the contract is refused with the shortfall before any capacity is
    reserved, and the bid does not rest."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    client_id = await create_client(gw, renter, fund_usd=None)
    node_id = await register_node(gw, provider)
    r = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id), headers=renter.headers
    )
    hold = core.hold_pusd(10, 3600, PRICE)
    err = assert_error(r, 402, "insufficient_funds")
    assert err["shortfall_pusd"] == hold and err["shortfall_usd"] == hold / USD
    node = (await gw.client.get(f"/api/nodes/{node_id}", headers=provider.headers)).json()
    assert node["reserved_ram_gb"] == 0
    bid = {"client_id": client_id, "region": "us-east-2", "ram_gb": 4, "vram_gb": 0,
           "duration_sec": 600, "max_price_per_gb_sec": 0.000001}  # fmt: skip
    r = await gw.client.post("/api/bids", json=bid, headers=renter.headers)
    assert_error(r, 402, "insufficient_funds")
    book = (await gw.client.get("/api/book/us-east-2", headers=renter.headers)).json()
    assert book["bid_depth"] == [] and book["best_bid_pusd"] is None


async def test_one_balance_pays_for_contracts_in_any_region(gw: Gateway) -> None:
    """An operator's credit lands in the funding wallet; a contract moves what it needs to its
    region and holds it; settling captures what was used and releases the rest; the renter
    sees one balance."""
    provider, renter, op = await signup(gw, "provider"), await signup(gw, "user"), await admin(gw)
    client_id = await create_client(gw, renter, fund_usd=None)
    r = await gw.client.post(
        f"/api/admin/accounts/{client_id}/credit",
        json={"amount_usd": 5, "reason": "welcome credit", "key": "welcome-1"},
        headers=op.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["applied"] and r.json()["balance_pusd"] == 5 * USD
    again = await gw.client.post(
        f"/api/admin/accounts/{client_id}/credit",
        json={"amount_usd": 5, "reason": "welcome credit", "key": "welcome-1"},
        headers=op.headers,
    )
    assert again.json()["applied"] is False and again.json()["balance_pusd"] == 5 * USD
    node_id = await register_node(gw, provider)
    r = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id), headers=renter.headers
    )
    assert r.status_code == 201, r.text
    hold = core.hold_pusd(10, 3600, PRICE)
    b = await balance(gw, renter, client_id)
    assert (b["available_pusd"], b["held_pusd"]) == (5 * USD - hold, hold)
    assert b["regions"] == [
        {"region": "us-east-2", "available_usd": 0.0, "available_pusd": 0,
         "held_usd": hold / USD, "held_pusd": hold}
    ]  # fmt: skip
    assert b["month_spend_pusd"] == hold
    cid = r.json()["contract_id"]
    r = await gw.client.post(
        f"/api/contracts/{cid}/settle", json={"actual_egress_gb": 0}, headers=renter.headers
    )
    assert r.status_code == 200, r.text
    cost = r.json()["total_cost_pusd"]
    b = await balance(gw, renter, client_id)
    assert (b["available_pusd"], b["held_pusd"], b["month_spend_pusd"]) == (5 * USD - cost, 0, cost)
    mine = (await gw.client.get("/api/accounts/me/balance", headers=renter.headers)).json()
    assert mine["balances"] == [b]


async def test_the_monthly_budget_refuses_what_would_pass_it(gw: Gateway) -> None:
    """With `budget_monthly_usd`, a contract that would take the month's spend (captured +
    held) past it is 402 budget_exceeded, though the balance could pay; settling early frees
    the unused part of the budget again."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    r = await gw.client.post(
        "/api/clients",
        json={"org_name": "frugal", "budget_monthly_usd": 0.05},
        headers=renter.headers,
    )
    client_id = r.json()["id"]
    await gw.state["market"].credit(client_id, 10 * USD, key="k", rail="operator", now_ms=1)
    node_id = await register_node(gw, provider)
    first = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id), headers=renter.headers
    )
    assert first.status_code == 201, first.text  # 0.0288 USD held of 0.05
    r = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id), headers=renter.headers
    )
    err = assert_error(r, 402, "budget_exceeded")
    assert err["shortfall_pusd"] == 2 * core.hold_pusd(10, 3600, PRICE) - 5 * 10**10
    b = await balance(gw, renter, client_id)
    assert b["budget_monthly_usd"] == 0.05 and b["held_pusd"] == core.hold_pusd(10, 3600, PRICE)
    r = await gw.client.post(
        f"/api/contracts/{first.json()['contract_id']}/settle", json={}, headers=renter.headers
    )
    assert r.status_code == 200, r.text
    r = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id), headers=renter.headers
    )
    assert r.status_code == 201, r.text


async def test_a_credit_line_lets_the_balance_go_negative_up_to_it(gw: Gateway) -> None:
    """Postpaid terms: with a credit line the renter may hold beyond its balance, no further."""
    provider, renter, op = await signup(gw, "provider"), await signup(gw, "user"), await admin(gw)
    client_id = await create_client(gw, renter, fund_usd=None)
    node_id = await register_node(gw, provider)
    hold = core.hold_pusd(10, 3600, PRICE)
    r = await gw.client.put(
        f"/api/admin/accounts/{client_id}/credit-line",
        json={"credit_line_pusd": hold + 1},
        headers=op.headers,
    )
    assert r.status_code == 200 and r.json()["credit_line_pusd"] == hold + 1, r.text
    r = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id), headers=renter.headers
    )
    assert r.status_code == 201, r.text
    assert (await balance(gw, renter, client_id))["available_pusd"] == -hold
    r = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id), headers=renter.headers
    )
    assert assert_error(r, 402, "insufficient_funds")["shortfall_pusd"] == hold - 1


async def test_clawback_takes_back_idle_money_and_refuses_beyond_it(gw: Gateway) -> None:
    """A clawback reaches the renter's idle money in every region, not its holds; beyond it,
    402 unless the operator allows a debt."""
    provider, renter, op = await signup(gw, "provider"), await signup(gw, "user"), await admin(gw)
    client_id = await create_client(gw, renter, fund_usd=1)
    node_id = await register_node(gw, provider)
    r = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id), headers=renter.headers
    )
    assert r.status_code == 201, r.text
    hold = core.hold_pusd(10, 3600, PRICE)
    url = f"/api/admin/accounts/{client_id}/clawback"
    r = await gw.client.post(
        url, json={"amount_usd": 1, "reason": "chargeback", "key": "cb1"}, headers=op.headers
    )
    assert_error(r, 402, "insufficient_funds")
    r = await gw.client.post(
        url,
        json={"amount_pusd": USD - hold, "reason": "chargeback", "key": "cb2"},
        headers=op.headers,
    )
    assert r.status_code == 200 and r.json()["balance_pusd"] == 0, r.text
    r = await gw.client.post(
        url,
        json={"amount_usd": 1, "reason": "fraud", "key": "cb3", "allow_negative": True},
        headers=op.headers,
    )
    assert r.json()["balance_pusd"] == -USD
    b = await balance(gw, renter, client_id)
    assert (b["available_pusd"], b["held_pusd"]) == (-USD, hold)


async def test_caps_on_open_contracts_and_bids(gw: Gateway) -> None:
    """One user cannot lock up a region: past the caps, 429 too_many_open."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    client_id = await create_client(gw, renter)
    node_id = await register_node(gw, provider)
    for _ in range(2):
        r = await gw.client.post(
            "/api/contracts/create", json=take(client_id, node_id, ram_gb=1), headers=renter.headers
        )
        assert r.status_code == 201, r.text
    r = await gw.client.post(
        "/api/contracts/create", json=take(client_id, node_id, ram_gb=1), headers=renter.headers
    )
    assert_error(r, 429, "too_many_open")
    bid = {"client_id": client_id, "region": "eu-west-1", "ram_gb": 4, "vram_gb": 0,
           "duration_sec": 600, "max_price_per_gb_sec": 0.000001}  # fmt: skip
    assert (await gw.client.post("/api/bids", json=bid, headers=renter.headers)).status_code == 201
    r = await gw.client.post("/api/bids", json=bid, headers=renter.headers)
    assert_error(r, 429, "too_many_open")
