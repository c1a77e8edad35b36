"""Card payments end to end through the real gateway, localstripe and the journal: top-ups
credited once whatever is retried or replayed, declines and forgeries refused, refunds (partial,
full, made in the Stripe dashboard) debited once."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import stripe

from engine.market import Market
from engine.settings import Settings
from gateway.payments import stripe_reconcile
from gateway.payments.stripe_cards import CardPayments
from gateway.payments.stripe_rail import StripeRail, StripeUnavailable
from tests.gateway.conftest import Actor, assert_error, create_client, eventually, signup
from tests.payments.stripe_doubles import (
    WEBHOOK,
    Served,
    card,
    free_port,
    funding,
    pay,
    register_webhook,
    signed,
    top_up,
)

PUSD_PER_USD = 10**12


async def refund(
    served: Served, actor: Actor, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    headers = dict(actor.headers)
    headers["Idempotency-Key"] = key or uuid.uuid4().hex
    return await served.client.post("/api/payments/refund", json=body, headers=headers)


async def ledger_movements(db_url: str, client_id: str) -> list[tuple[str, int]]:
    """(key, amount to the client's funding wallet) of every ledger movement of the client."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            """
            SELECT m.key, e.amount_pusd FROM ledger_movements m
            JOIN ledger_entries e ON e.movement = m.key
            WHERE e.account = $1 ORDER BY m.ts, m.key
            """,
            f"client:{client_id}:funding",
        )
    finally:
        await conn.close()
    return [(r["key"], int(r["amount_pusd"])) for r in rows]


async def stripe_events(db_url: str) -> dict[str, str | None]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT event_id, type, outcome FROM stripe_events")
    finally:
        await conn.close()
    return {f"{r['type']} {r['event_id']}": r["outcome"] for r in rows}


async def post_event(served: Served, event: dict[str, Any], **sign: Any) -> httpx.Response:
    raw = json.dumps(event).encode()
    return await served.client.post(
        WEBHOOK,
        content=raw,
        headers={"Stripe-Signature": signed(raw, **sign), "Content-Type": "application/json"},
    )


def event_for(obj: Any, kind: str) -> dict[str, Any]:
    """A webhook event as Stripe would send it, carrying `obj` (a StripeObject)."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else obj
    return {
        "id": f"evt_{uuid.uuid4().hex[:16]}",
        "object": "event",
        "type": kind,
        "created": int(time.time()),
        "data": {"object": data},
    }


async def test_top_up_is_credited_once(
    served: Served,
    localstripe: str,
    customer: stripe.StripeClient,
    stripe_market: Market,
    stripe_journal: None,
    db_url: str,
) -> None:
    """A top-up is credited when the PaymentIntent succeeds: once, although the API answer,
    the retry with the same key and Stripe's signed webhook all report it."""
    await register_webhook(localstripe, served.url + WEBHOOK)
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    pm = await card(customer)
    first = await top_up(served, renter, client_id, pm, 25.00, key="topup-1")
    assert (first["status"], first["credited"], first["amount_pusd"]) == (
        "succeeded",
        True,
        25 * PUSD_PER_USD,
    )
    assert first["amount_usd"] == 25.0 and first["client_id"] == client_id
    again = await pay(
        served,
        renter,
        {"client_id": client_id, "amount_usd": 25.00, "stripe_token": pm},
        key="topup-1",
    )
    assert again.status_code == 201 and again.json()["payment_id"] == first["payment_id"]
    # Stripe's own delivery of payment_intent.succeeded (signed by localstripe, a second later).
    pi = first["payment_intent_id"]

    async def delivered() -> str | None:
        events = await stripe_events(db_url)
        return next(
            (o for k, o in events.items() if k.startswith("payment_intent.succeeded")), None
        )

    outcome = await eventually(delivered, timeout_s=15)
    assert outcome == f"payment {first['payment_id']} is succeeded"
    assert await funding(stripe_market, client_id) == 25 * PUSD_PER_USD

    async def journaled() -> list[tuple[str, int]] | None:
        found = await ledger_movements(db_url, client_id)
        return found or None

    assert await eventually(journaled, timeout_s=15) == [
        (f"credit:stripe:pi:{pi}", 25 * PUSD_PER_USD)
    ]
    # The same key with another body is refused; no key at all is refused.
    other = await pay(
        served,
        renter,
        {"client_id": client_id, "amount_usd": 26.00, "stripe_token": pm},
        key="topup-1",
    )
    assert_error(other, 409, "idempotency_key_reused")
    r = await served.client.post(
        "/api/payments/create",
        json={"client_id": client_id, "amount_usd": 5.0, "stripe_token": pm},
        headers=renter.headers,
    )
    assert_error(r, 422, field="Idempotency-Key")
    assert await funding(stripe_market, client_id) == 25 * PUSD_PER_USD


async def test_webhooks_replayed_forged_or_lying_credit_nothing(
    served: Served, customer: stripe.StripeClient, stripe_market: Market, db_url: str
) -> None:
    """A redelivered event changes nothing; a forged, tampered or stale signature is a 400 and
    is not recorded; an event whose payload lies (says succeeded) is checked against Stripe."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    paid = await top_up(served, renter, client_id, await card(customer), 10.00)
    pi = await customer.v1.payment_intents.retrieve_async(paid["payment_intent_id"])
    event = event_for(pi, "payment_intent.succeeded")
    for _ in range(2):
        r = await post_event(served, event)
        assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "duplicate: already processed"
    assert await funding(stripe_market, client_id) == 10 * PUSD_PER_USD

    forged = event_for(pi, "payment_intent.succeeded")
    for how in ({"secret": "whsec_not_stripes"}, {"at": int(time.time()) - 3600}):
        r = await post_event(served, forged, **how)
        assert_error(r, 400, "invalid_signature", field="Stripe-Signature")
    raw = json.dumps(forged).encode()
    tampered = raw.replace(b'"amount": 1000', b'"amount": 99900')
    assert tampered != raw
    r = await served.client.post(
        WEBHOOK, content=tampered, headers={"Stripe-Signature": signed(raw)}
    )
    assert_error(r, 400, "invalid_signature")
    r = await served.client.post(WEBHOOK, content=raw)
    assert_error(r, 400, "invalid_signature")
    assert forged["id"] not in json.dumps(await stripe_events(db_url))

    # A declined card's PaymentIntent, dressed up as succeeded in a correctly signed event:
    # the re-fetch says otherwise and nothing is credited.
    declined = await pay(
        served,
        renter,
        {
            "client_id": client_id,
            "amount_usd": 7.00,
            "stripe_token": await card(customer, "4000000000000341"),
        },
    )
    assert_error(declined, 402, "card_declined", field="stripe_token")
    listed = await customer.v1.payment_intents.list_async(params={"limit": 100})
    failed = next(p for p in listed.data if p.status == "requires_payment_method")
    lie = event_for(failed, "payment_intent.succeeded")
    lie["data"]["object"]["status"] = "succeeded"
    r = await post_event(served, lie)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"].startswith(("ignored", "payment")), r.json()
    assert "succeeded" not in r.json()["outcome"]
    unknown = event_for(
        {"id": "pi_doesnotexist", "object": "payment_intent"}, "payment_intent.succeeded"
    )
    r = await post_event(served, unknown)
    assert r.status_code == 200 and r.json()["outcome"].startswith("ignored"), r.text
    assert await funding(stripe_market, client_id) == 10 * PUSD_PER_USD


async def test_declined_card(
    served: Served, customer: stripe.StripeClient, stripe_market: Market
) -> None:
    """A declined card is a 402 naming stripe_token, again for a retry with its key; a bad
    token, an amount in fractions of a cent or a foreign client are refused before Stripe."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    body = {
        "client_id": client_id,
        "amount_usd": 12.34,
        "stripe_token": await card(customer, "4000000000000341"),
    }
    for _ in range(2):
        r = await pay(served, renter, body, key="declined-1")
        assert_error(r, 402, "card_declined", field="stripe_token")
    r = await pay(served, renter, {**body, "stripe_token": "pm_unknown123"})
    assert_error(r, 422, "stripe_invalid_request", field="stripe_token")
    r = await pay(served, renter, {**body, "stripe_token": "tok_visa"})
    assert_error(r, 422, field="stripe_token")
    r = await pay(served, renter, {**body, "amount_usd": 12.345})
    assert_error(r, 422, field="amount_usd")
    r = await pay(served, renter, {**body, "amount_usd": 0.2})
    assert_error(r, 422, field="amount_usd")
    r = await pay(served, renter, {**body, "payment_method": "crypto"})
    assert_error(r, 422, field="payment_method")
    other = await signup(served, "user")  # type: ignore[arg-type]
    r = await pay(served, other, body)
    assert_error(r, 403, field="client_id")
    assert await funding(stripe_market, client_id) == 0


async def test_partial_and_full_refunds(
    served: Served,
    customer: stripe.StripeClient,
    stripe_market: Market,
    stripe_journal: None,
    db_url: str,
) -> None:
    """A refund leaves the balance first and then the card; partial refunds add up to the
    payment and no further; a retried refund is the same refund."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    paid = await top_up(served, renter, client_id, await card(customer), 30.00)
    pid = paid["payment_id"]
    r = await refund(served, renter, {"payment_id": pid, "amount_usd": 10.0}, key="re-1")
    assert r.status_code == 201, r.text
    part = r.json()
    assert (part["status"], part["amount_pusd"]) == ("succeeded", 10 * PUSD_PER_USD)
    again = await refund(served, renter, {"payment_id": pid, "amount_usd": 10.0}, key="re-1")
    assert again.json()["refund_id"] == part["refund_id"]
    assert await funding(stripe_market, client_id) == 20 * PUSD_PER_USD
    r = await refund(served, renter, {"payment_id": pid, "amount_usd": 25.0})
    assert_error(r, 422, "refund_exceeds_payment", field="amount_usd")
    stranger = await signup(served, "user")  # type: ignore[arg-type]
    r = await refund(served, stranger, {"payment_id": pid})
    assert_error(r, 404, field="payment_id")
    r = await served.client.get(f"/api/payments/cards/{pid}", headers=stranger.headers)
    assert_error(r, 404, field="payment_id")
    r = await refund(served, renter, {"payment_id": pid}, key="re-all")
    assert r.status_code == 201, r.text
    assert r.json()["amount_pusd"] == 20 * PUSD_PER_USD
    r = await refund(served, renter, {"payment_id": pid})
    assert_error(r, 409, "already_refunded")
    assert await funding(stripe_market, client_id) == 0
    stripe_refunds = await customer.v1.refunds.list_async(
        params={"payment_intent": paid["payment_intent_id"]}
    )
    assert sorted(x.amount for x in stripe_refunds.data) == [1000, 2000]
    r = await served.client.get(f"/api/payments/cards/{pid}", headers=renter.headers)
    assert r.json()["refunded_pusd"] == 30 * PUSD_PER_USD

    async def journaled() -> list[tuple[str, int]] | None:
        found = await ledger_movements(db_url, client_id)
        return found if len(found) == 3 else None

    moves = await eventually(journaled, timeout_s=15)
    assert sum(amount for _, amount in moves) == 0
    assert [amount for _, amount in moves] == [
        30 * PUSD_PER_USD,
        -10 * PUSD_PER_USD,
        -20 * PUSD_PER_USD,
    ]


async def test_refund_of_spent_money_is_refused(
    served: Served, customer: stripe.StripeClient, stripe_market: Market
) -> None:
    """Money no longer in the balance cannot go back to the card: 409, nothing refunded."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    paid = await top_up(served, renter, client_id, await card(customer), 5.00)
    now = int(time.time() * 1000)
    await stripe_market.debit(
        client_id, 4 * PUSD_PER_USD, key="spent", rail="operator", reason="spent", now_ms=now
    )
    r = await refund(served, renter, {"payment_id": paid["payment_id"]})
    assert_error(r, 409, "insufficient_funds")
    assert await funding(stripe_market, client_id) == 1 * PUSD_PER_USD
    listed = await customer.v1.refunds.list_async(
        params={"payment_intent": paid["payment_intent_id"]}
    )
    assert listed.data == []
    r = await refund(served, renter, {"payment_id": paid["payment_id"], "amount_usd": 1.0})
    assert r.status_code == 201, r.text
    assert await funding(stripe_market, client_id) == 0


async def test_refund_made_in_the_dashboard_is_debited_once(
    served: Served, customer: stripe.StripeClient, stripe_market: Market, db_url: str
) -> None:
    """A refund made in Stripe (not through Mnemo) arrives as webhooks and is debited once,
    whichever events and redeliveries report it."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    paid = await top_up(served, renter, client_id, await card(customer), 8.00)
    made = await customer.v1.refunds.create_async(
        params={"payment_intent": paid["payment_intent_id"], "amount": 300}
    )
    charge = await customer.v1.charges.retrieve_async(made.charge)
    events = [
        event_for(made, "refund.created"),
        event_for(charge, "charge.refunded"),
        event_for(made, "refund.updated"),
    ]
    for event in [*events, events[0]]:
        r = await post_event(served, event)
        assert r.status_code == 200, r.text
    assert await funding(stripe_market, client_id) == 5 * PUSD_PER_USD
    r = await served.client.get(f"/api/payments/cards/{paid['payment_id']}", headers=renter.headers)
    assert r.json()["refunded_pusd"] == 3 * PUSD_PER_USD
    # What is left of the payment is still refundable through Mnemo, and no more.
    r = await refund(served, renter, {"payment_id": paid["payment_id"], "amount_usd": 5.01})
    assert_error(r, 422, "refund_exceeds_payment")


async def test_paying_a_contract(
    served: Served, customer: stripe.StripeClient, stripe_market: Market
) -> None:
    """A contract's payment is its cost (in cents, at least 0.50 USD), paid once."""
    renter, pm, contract_id = await _ten_gb_hour(served, customer, stripe_market, 0.000001)
    r = await pay(served, renter, {"contract_id": contract_id, "stripe_token": pm})
    assert r.status_code == 201, r.text
    # 10 GB x 3600 s x 1e-6 USD = 0.036 USD: Stripe's minimum, 0.50 USD, is charged
    assert r.json()["amount_pusd"] == PUSD_PER_USD // 2 and r.json()["contract_id"] == contract_id
    r = await pay(served, renter, {"contract_id": contract_id, "stripe_token": pm})
    assert_error(r, 409, "already_paid", field="contract_id")
    r = await pay(
        served, renter, {"contract_id": contract_id, "stripe_token": pm, "amount_usd": 1.0}
    )
    assert_error(r, 422, field="amount_usd")
    stranger = await signup(served, "user")  # type: ignore[arg-type]
    r = await pay(served, stranger, {"contract_id": contract_id, "stripe_token": pm})
    assert_error(r, 404, field="contract_id")
    r = await pay(served, renter, {"contract_id": uuid.uuid4().hex, "stripe_token": pm})
    assert_error(r, 404, field="contract_id")


async def test_paying_a_settled_contract_charges_what_it_cost(
    served: Served, customer: stripe.StripeClient, stripe_market: Market
) -> None:
    """A contract that has ended is paid for what it cost, not its estimate (the stateful
    schemathesis walk found this a 500)."""
    # 10 GB x 3600 s x 1e-4 USD: an estimate of 3.60 USD
    renter, pm, contract_id = await _ten_gb_hour(served, customer, stripe_market, 0.0001)
    r = await served.client.post(
        f"/api/contracts/{contract_id}/settle", json={}, headers=renter.headers
    )
    assert r.status_code == 200, r.text
    cost_pusd = r.json()["total_cost_pusd"]
    assert cost_pusd < PUSD_PER_USD // 2  # settled at once: a moment's use
    r = await pay(served, renter, {"contract_id": contract_id, "stripe_token": pm})
    assert r.status_code == 201, r.text
    assert r.json()["amount_pusd"] == PUSD_PER_USD // 2  # Stripe's minimum, not the 3.60 USD


async def _ten_gb_hour(
    served: Served, customer: stripe.StripeClient, stripe_market: Market, price: float
) -> tuple[Actor, str, str]:
    """A renter topped up by card (50 USD), its card, and its contract for 10 GB for an hour
    on a new node at `price` USD per GB-second."""
    from tests.gateway.conftest import register_node

    renter = await signup(served, "user")  # type: ignore[arg-type]
    provider = await signup(served, "provider")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    pm = await card(customer)
    await top_up(served, renter, client_id, pm, 50.00)
    node_id = await register_node(served, provider, price_per_gb_sec=price)  # type: ignore[arg-type]
    await stripe_market.fund_region(
        client_id, "us-east-2", 40 * PUSD_PER_USD, now_ms=int(time.time() * 1000)
    )
    r = await served.client.post(
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
    return renter, pm, r.json()["contract_id"]


async def test_3d_secure_payment_is_credited_when_stripe_says_so(
    served: Served,
    localstripe: str,
    customer: stripe.StripeClient,
    stripe_market: Market,
    pool: asyncpg.Pool,
    stripe_settings: Settings,
    stripe_journal: None,
    db_url: str,
) -> None:
    """A card that needs 3-D Secure: nothing is credited while it `requires_action`; once the
    customer authenticates (and with no webhook to tell us), reconciliation credits it once,
    and checks it in the ledger once the journal has written it."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    pm = await card(customer, "4000002500003155")
    body = await top_up(served, renter, client_id, pm, 15.00)
    assert (body["status"], body["credited"], body["next_action"]) == (
        "requires_action",
        False,
        "use_stripe_sdk",
    )
    assert body["client_secret"].startswith(body["payment_intent_id"])
    assert await funding(stripe_market, client_id) == 0
    async with httpx.AsyncClient() as browser:  # Stripe.js, finishing the authentication
        r = await browser.post(
            f"{localstripe}/v1/payment_intents/{body['payment_intent_id']}/_authenticate",
            data={"client_secret": body["client_secret"], "success": "true", "key": "pk_test_x"},
        )
        assert r.status_code == 200, r.text
    rail = StripeRail(stripe_settings)
    try:
        cards = CardPayments(pool, rail, stripe_market)
        found = await stripe_reconcile.reconcile(pool, cards, days=1, settle_s=0)
        assert found.finished == [f"card payment {body['payment_id']}: succeeded"], found.lines()

        async def journaled() -> list[tuple[str, int]] | None:
            return await ledger_movements(db_url, client_id) or None

        await eventually(journaled, timeout_s=15)
        again = await stripe_reconcile.reconcile(pool, cards, days=1, settle_s=0)
        assert again.finished == [] and again.differences == []
    finally:
        await rail.aclose()
    assert await funding(stripe_market, client_id) == 15 * PUSD_PER_USD
    r = await served.client.get(f"/api/payments/cards/{body['payment_id']}", headers=renter.headers)
    assert (r.json()["status"], r.json()["credited"]) == ("succeeded", True)


async def test_no_answer_from_stripe_then_a_retry_pays_once(
    served: Served,
    customer: stripe.StripeClient,
    stripe_market: Market,
    pool: asyncpg.Pool,
    stripe_settings: Settings,
) -> None:
    """Stripe unreachable: a 502 `stripe_unavailable`, the payment kept as 'creating' with its
    Stripe key; the caller's retry with the same Idempotency-Key (Stripe back) pays it once."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    pm = await card(customer)
    down = msgspec.structs.replace(
        stripe_settings, stripe_api_base=f"http://127.0.0.1:{free_port()}"
    )
    request = {
        "user_id": renter.user_id,
        "client_id": client_id,
        "contract_id": None,
        "amount_cents": 999,
        "payment_method": pm,
        "idempotency_key": "retry-me",
        "request_hash": "f" * 64,
    }
    rails = [StripeRail(down, max_network_retries=0), StripeRail(stripe_settings)]
    try:
        with pytest.raises(StripeUnavailable) as lost:
            await CardPayments(pool, rails[0], stripe_market).pay(**request)
        assert lost.value.status == 502
        row = await pool.fetchrow("SELECT * FROM card_payments WHERE idempotency_key = 'retry-me'")
        assert (row["status"], row["payment_intent_id"]) == ("creating", None)
        paid = await CardPayments(pool, rails[1], stripe_market).pay(**request)
        again = await CardPayments(pool, rails[1], stripe_market).pay(**request)
    finally:
        for rail in rails:
            await rail.aclose()
    assert paid["id"] == row["id"] == again["id"]
    assert (paid["status"], paid["stripe_idempotency_key"]) == (
        "succeeded",
        row["stripe_idempotency_key"],
    )
    assert await funding(stripe_market, client_id) == 999 * PUSD_PER_USD // 100
