"""The issue's path end to end: a card top-up -> a contract -> settled -> the invoice -> the
provider onboarded to Connect -> the day's payout transfer -> the provider's statement, with
the ledger agreeing at every step, and reconciliation finding nothing to say."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
import stripe

from engine.market import Market
from engine.settings import Settings
from gateway.payments import stripe_payouts, stripe_reconcile
from gateway.payments.stripe_cards import CardPayments
from gateway.payments.stripe_rail import StripeRail
from tests.gateway.conftest import assert_error, eventually, give_stake, register_node, signup
from tests.payments.stripe_doubles import WEBHOOK, Served, card, register_webhook, top_up

PUSD = 10**12
ORG = "Ada <script>alert('x')</script> & Sons"


async def _fake_calls(connect_fake: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as c:
        calls: list[dict[str, Any]] = (await c.get(f"{connect_fake}/_test/calls")).json()
        return calls


async def test_card_to_contract_to_invoice_to_payout(
    served: Served,
    localstripe: str,
    connect_fake: str,
    customer: stripe.StripeClient,
    stripe_market: Market,
    stripe_journal: None,
    pool: asyncpg.Pool,
    stripe_settings: Settings,
) -> None:
    """Every step, and the money adding up to the pico-USD in the invoice and the statement."""
    api = served.client
    await register_webhook(localstripe, served.url + WEBHOOK)
    renter = await signup(served, "user")  # type: ignore[arg-type]
    provider = await signup(served, "provider")  # type: ignore[arg-type]
    admin = await signup(served, "user")  # type: ignore[arg-type]
    await pool.execute("UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(admin.user_id))
    r = await api.post("/api/clients", json={"org_name": ORG}, headers=renter.headers)
    assert r.status_code == 201, r.text
    client_id = r.json()["id"]

    # 1. a card top-up of 50 USD
    paid = await top_up(served, renter, client_id, await card(customer), 50.00)
    assert paid["status"] == "succeeded" and paid["credited"]

    # 2. a contract on the provider's node, held from that balance
    node_id = await register_node(  # type: ignore[arg-type]
        served, provider, price_per_gb_sec=0.001, egress_price_per_gb=0.1
    )
    # staked for its 36 USD lease (10 % of it: none of the earnings is held back into the stake)
    await give_stake(stripe_market, node_id, provider.user_id, 3.6)
    now_ms = int(time.time() * 1000)
    # The contracts route moves money from the funding wallet to the region's as it needs it
    # once money-core wires it; until then the test does that step itself.
    await stripe_market.fund_region(client_id, "us-east-2", 40 * PUSD, now_ms=now_ms)
    r = await api.post(
        "/api/contracts/create",
        json={
            "client_id": client_id,
            "node_id": node_id,
            "ram_gb": 10,
            "vram_gb": 0,
            "duration_sec": 3600,
        },
        headers=renter.headers,
    )
    assert r.status_code == 201, r.text
    contract_id = r.json()["contract_id"]
    await asyncio.sleep(1.2)

    # 3. settled with 1.5 GB of egress
    r = await api.post(
        f"/api/contracts/{contract_id}/settle",
        json={"actual_egress_gb": 1.5},
        headers=renter.headers,
    )
    assert r.status_code == 200, r.text
    cost = r.json()["total_cost_pusd"]
    egress = 1500 * (PUSD // 10) // 1000  # 1.5 GB at 0.1 USD
    assert cost > egress > 0
    fee = cost // 10  # the default platform fee, 10 %

    # 4. the invoice, once the journal has the settlement and the ledger its movements
    async def invoiced() -> dict[str, Any] | None:
        r = await api.get(f"/api/payments/invoice/{client_id}", headers=renter.headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body if body["contracts"] and body["charges_pusd"] else None

    inv = await eventually(invoiced, timeout_s=20)
    assert inv["period"] == dt.datetime.now(dt.UTC).strftime("%Y-%m")
    [line] = inv["contracts"]
    assert (line["contract_id"], line["total_cost_pusd"], line["egress_pusd"]) == (
        contract_id,
        cost,
        egress,
    )
    assert line["usage_pusd"] == cost - egress and line["egress_gb"] == 1.5
    assert inv["payments_pusd"] == 50 * PUSD
    assert inv["charges_pusd"] == cost and inv["fees_pusd"] == fee
    assert inv["refunds_pusd"] == 0 and inv["opening_balance_pusd"] == 0
    assert inv["closing_balance_pusd"] == 50 * PUSD - cost
    assert inv["closing_balance_pusd"] == (
        inv["opening_balance_pusd"]
        + inv["payments_pusd"]
        - inv["refunds_pusd"]
        - inv["charges_pusd"]
        + inv["adjustments_pusd"]
    )
    kinds = [(x["kind"], x["reference"]) for x in inv["lines"]]
    assert ("payment", paid["payment_intent_id"]) in kinds and ("charge", None) in kinds
    page = await api.get(
        f"/api/payments/invoice/{client_id}", params={"format": "html"}, headers=renter.headers
    )
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
    assert "Ada &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Sons" in page.text
    assert "50.00" in page.text and "http" not in page.text.split("</title>", 1)[1]
    accept = await api.get(
        f"/api/payments/invoice/{client_id}", headers={**renter.headers, "Accept": "text/html"}
    )
    assert accept.headers["content-type"].startswith("text/html")
    assert f"Invoice {inv['invoice_number']}" in accept.text
    r = await api.get(f"/api/payments/invoice/{client_id}", headers=admin.headers)
    assert r.status_code == 200
    r = await api.get(f"/api/payments/invoice/{client_id}", headers=provider.headers)
    assert_error(r, 404, field="client_id")
    r = await api.get(
        f"/api/payments/invoice/{client_id}", params={"period": "2026-13"}, headers=renter.headers
    )
    assert_error(r, 422, field="period")
    r = await api.get(
        f"/api/payments/invoice/{client_id}", params={"period": "2001-01"}, headers=renter.headers
    )
    assert r.json()["contracts"] == [] and r.json()["closing_balance_pusd"] == 0

    # 5. the provider onboards to Stripe Connect (Stripe's hosted form: the fake's link)
    r = await api.post(
        "/api/payments/connect/onboard",
        json={"return_url": "https://app.example/done", "refresh_url": "https://app.example/again"},
        headers=provider.headers,
    )
    assert r.status_code == 200, r.text
    account = r.json()
    assert account["account_id"].startswith("acct_") and not account["transfers_active"]
    async with httpx.AsyncClient() as browser:
        done = await browser.get(account["onboarding_url"])
    assert done.headers["location"] == "https://app.example/done"
    r = await api.get("/api/payments/connect", headers=provider.headers)
    assert r.json()["transfers_active"] is True
    r = await api.post(
        "/api/payments/connect/onboard",
        json={"return_url": "https://a.example/x", "refresh_url": "https://a.example/y"},
        headers=renter.headers,
    )
    assert_error(r, 403)

    # 6. the day's payout: the provider's net earnings in whole cents, once
    today = dt.datetime.now(dt.UTC).date()
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    net = cost - fee
    cents = net // (PUSD // 100)
    rail = StripeRail(stripe_settings)
    try:
        with pytest.raises(Exception, match="has not ended"):
            await stripe_payouts.pay_providers(pool, rail, today)
        report = await stripe_payouts.pay_providers(pool, rail, today, now=tomorrow)
        assert list(report.paid) == [provider.user_id], report.lines()
        again = await stripe_payouts.pay_providers(pool, rail, today, now=tomorrow)
        assert again.paid == {} and "paid already" in again.skipped[provider.user_id]
        found = await stripe_reconcile.reconcile(
            pool, CardPayments(pool, rail, stripe_market), days=1, settle_s=0
        )
    finally:
        await rail.aclose()
    transfers = [
        c
        for c in await _fake_calls(connect_fake)
        if (c["method"], c["path"]) == ("POST", "/v1/transfers")
    ]
    assert [c["replayed"] for c in transfers] == [False]
    params = transfers[0]["params"]
    assert params["amount"] == str(cents) and params["destination"] == account["account_id"]
    assert params["transfer_group"] == f"mnemo-payouts-{today.isoformat()}"
    assert found.differences == [], found.lines()

    # 7. the provider's statement over all its nodes
    r = await api.get("/api/payments/statement", headers=provider.headers)
    assert r.status_code == 200, r.text
    st = r.json()
    [node] = st["nodes"]
    assert (node["node_id"], node["contracts"], node["gross_pusd"]) == (node_id, 1, cost)
    assert (st["earnings_pusd"], st["fees_pusd"]) == (net, fee)
    assert st["payouts_pusd"] == cents * (PUSD // 100)
    assert st["balance_pusd"] == net - cents * (PUSD // 100) < PUSD // 100
    assert [p["status"] for p in st["payouts"]] == ["paid"]
    r = await api.get("/api/payments/statement", headers=renter.headers)
    assert_error(r, 403)


async def test_invoice_of_an_unknown_client(served: Served) -> None:
    """Unknown and malformed client ids are a 404, like another tenant's."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    for client_id in (uuid.uuid4().hex, "not-a-uuid"):
        r = await served.client.get(f"/api/payments/invoice/{client_id}", headers=renter.headers)
        assert_error(r, 404)
