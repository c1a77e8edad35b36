"""The card top-up on Stripe Checkout (the web app's), end to end through the real gateway, the
Checkout fake's hosted page, localstripe and the journal: paid on Stripe's page, credited once
whichever of the payer's return, Stripe's webhooks and a retry reports it; declined, abandoned
or expired, credited nothing."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from engine.market import Market
from tests.gateway.conftest import Actor, assert_error, create_client, eventually, signup
from tests.payments.stripe_doubles import STRIPE_KEY, WEBHOOK, Served, funding, register_webhook
from tests.payments.test_cards import event_for, ledger_movements, post_event, stripe_events

PUSD_PER_USD = 10**12
RETURN = "http://127.0.0.1:9/renter#balance"


async def checkout(
    served: Served, actor: Actor, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    headers = {**actor.headers, "Idempotency-Key": key or uuid.uuid4().hex}
    return await served.client.post("/api/payments/checkout", json=body, headers=headers)


async def payment(served: Served, actor: Actor, payment_id: str) -> dict[str, Any]:
    r = await served.client.get(f"/api/payments/cards/{payment_id}", headers=actor.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_paid_on_the_hosted_page_is_credited_once(
    served: Served,
    localstripe: str,
    connect_fake: str,
    stripe_market: Market,
    stripe_journal: None,
    db_url: str,
) -> None:
    """The renter gets Stripe's page, is declined once, pays, comes back to the app with the
    payment named, and finds it credited; Stripe's webhooks (the PaymentIntent's, from
    localstripe, and the session's) and a retry of the request credit nothing more."""
    await register_webhook(localstripe, served.url + WEBHOOK)
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    body = {"client_id": client_id, "amount_usd": 30.0, "return_url": RETURN}
    r = await checkout(served, renter, body, key="checkout-1")
    assert r.status_code == 201, r.text
    made = r.json()
    assert (made["status"], made["credited"], made["amount_pusd"]) == (
        "requires_payment_method",
        False,
        30 * PUSD_PER_USD,
    )
    url = made["checkout_url"]
    assert url.startswith(f"{connect_fake}/checkout/pay/cs_test_")
    again = await checkout(served, renter, body, key="checkout-1")
    assert again.status_code == 201 and again.json()["payment_id"] == made["payment_id"]
    assert again.json()["checkout_url"] == url
    other = await checkout(served, renter, {**body, "amount_usd": 31.0}, key="checkout-1")
    assert_error(other, 409, "idempotency_key_reused")
    no_key = await served.client.post("/api/payments/checkout", json=body, headers=renter.headers)
    assert_error(no_key, 422, field="Idempotency-Key")
    async with httpx.AsyncClient() as payer:
        page = await payer.get(url)
        assert page.status_code == 200 and "Pay 30.00 USD" in page.text
        declined = await payer.post(url, data={"card_number": "4000 0000 0000 0341"})
        assert declined.status_code == 400 and "declined" in declined.text.lower()
        assert (await payment(served, renter, made["payment_id"]))["credited"] is False
        paid = await payer.post(url, data={"card_number": "4242 4242 4242 4242"})
    assert paid.status_code == 303
    back = paid.headers["location"]
    assert back == f"http://127.0.0.1:9/renter?checkout={made['payment_id']}#balance"
    # The app, back from Stripe, asks about the payment it names: credited.
    done = await payment(served, renter, made["payment_id"])
    assert (done["status"], done["credited"], done["checkout_url"]) == ("succeeded", True, None)
    pi = done["payment_intent_id"]
    assert pi and await funding(stripe_market, client_id) == 30 * PUSD_PER_USD

    async def delivered() -> bool:
        # localstripe's own delivery (events of earlier tests' payments may arrive too: ignored)
        events = await stripe_events(db_url)
        return any(
            k.startswith("payment_intent.succeeded")
            and o == f"payment {made['payment_id']} is succeeded"
            for k, o in events.items()
        )

    assert await eventually(delivered, timeout_s=15)
    session_id = url.rsplit("/", 1)[1]
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {STRIPE_KEY}"}) as stripe:
        session = (await stripe.get(f"{connect_fake}/v1/checkout/sessions/{session_id}")).json()
    assert (session["status"], session["payment_intent"]) == ("complete", pi)
    event = event_for(session, "checkout.session.completed")
    for _ in range(2):  # and Stripe's redelivery of it
        hook = await post_event(served, event)
        assert hook.status_code == 200, hook.text
    assert hook.json()["outcome"] == "duplicate: already processed"
    events = await stripe_events(db_url)
    assert events[f"checkout.session.completed {event['id']}"] == (
        f"payment {made['payment_id']} is succeeded"
    )
    replay = await checkout(served, renter, body, key="checkout-1")
    assert replay.json()["payment_id"] == made["payment_id"]  # the first answer, nothing new
    assert await funding(stripe_market, client_id) == 30 * PUSD_PER_USD

    async def journaled() -> list[tuple[str, int]] | None:
        return await ledger_movements(db_url, client_id) or None

    assert await eventually(journaled, timeout_s=15) == [
        (f"credit:stripe:pi:{pi}", 30 * PUSD_PER_USD)
    ]


async def test_abandoned_or_expired_checkout_credits_nothing(
    served: Served, connect_fake: str, stripe_market: Market
) -> None:
    """The page's way back returns to the app saying so; a session that expires unpaid cancels
    the payment, and its page is gone."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    body = {"client_id": client_id, "amount_usd": 5.0, "return_url": RETURN}
    made = (await checkout(served, renter, body)).json()
    async with httpx.AsyncClient() as payer:
        page = await payer.get(made["checkout_url"])
        assert f"checkout={made['payment_id']}&amp;checkout_canceled=1#balance" in page.text
        session_id = made["checkout_url"].rsplit("/", 1)[1]
        expired = await payer.post(
            f"{connect_fake}/v1/checkout/sessions/{session_id}/expire",
            headers={"Authorization": f"Bearer {STRIPE_KEY}"},
        )
        assert expired.status_code == 200 and expired.json()["status"] == "expired"
        assert (await payer.get(made["checkout_url"])).status_code == 404
    gone = await payment(served, renter, made["payment_id"])
    assert (gone["status"], gone["credited"], gone["checkout_url"]) == ("canceled", False, None)
    assert await funding(stripe_market, client_id) == 0


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"amount_usd": 0.49}, 422, "amount_usd"),
        ({"amount_usd": 10.001}, 422, "amount_usd"),
        ({"return_url": "javascript:alert(1)"}, 422, "return_url"),
        ({"return_url": "http://[::1/renter"}, 422, "return_url"),
        ({"client_id": str(uuid.uuid4())}, 403, "client_id"),
    ],
)
async def test_a_bad_checkout_is_refused_before_stripe(
    served: Served, connect_fake: str, change: dict[str, Any], status: int, field: str
) -> None:
    """Too little, not whole cents, a return that is not a web address, someone else's client:
    refused with the field named, and no session is made."""
    renter = await signup(served, "user")  # type: ignore[arg-type]
    client_id = await create_client(served, renter, fund_usd=0)  # type: ignore[arg-type]
    body = {"client_id": client_id, "amount_usd": 5.0, "return_url": RETURN, **change}
    assert_error(await checkout(served, renter, body), status, field=field)
    async with httpx.AsyncClient() as http:
        calls = (await http.get(f"{connect_fake}/_test/calls")).json()
    assert [c for c in calls if c["path"].startswith("/v1/checkout")] == []
