"""The Stripe calls as Mnemo makes them, against localstripe and the Connect fake: what comes
back, how Stripe's refusals map to our errors, and webhook signatures."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import stripe

from engine.settings import Settings
from gateway.errors import ApiError, IdempotencyConflict, ValidationFailed
from gateway.payments.stripe_rail import PaymentDeclined, PaymentsOff, StripeRail
from tests.payments.stripe_doubles import card, signed


@pytest.fixture
async def rail(stripe_settings: Settings):
    r = StripeRail(stripe_settings)
    try:
        yield r
    finally:
        await r.aclose()


async def test_payment_intent_succeeds_and_refunds(
    rail: StripeRail, customer: stripe.StripeClient
) -> None:
    """A good card: the PaymentIntent succeeds with our metadata; partial refunds add up."""
    pm = await card(customer)
    pi = await rail.create_payment_intent(
        amount_cents=1234,
        payment_method=pm,
        idempotency_key="k-1",
        metadata={"mnemo_payment_id": "p1"},
    )
    assert (pi.status, pi.amount_cents, pi.currency) == ("succeeded", 1234, "usd")
    assert pi.metadata == {"mnemo_payment_id": "p1"}
    assert (await rail.payment_intent(pi.id)).status == "succeeded"
    first = await rail.refund(
        payment_intent_id=pi.id, amount_cents=200, idempotency_key="r-1", metadata={"a": "b"}
    )
    assert (first.status, first.amount_cents, first.payment_intent) == ("succeeded", 200, pi.id)
    assert first.metadata == {"a": "b"}
    assert (await rail.refund_by_id(first.id)).amount_cents == 200
    assert [r.id for r in await rail.refunds_of(pi.id)] == [first.id]


async def test_declined_card_and_unknown_method(
    rail: StripeRail, customer: stripe.StripeClient
) -> None:
    """A declined card is a 402 `card_declined`; a PaymentMethod Stripe does not know is a 422
    naming `stripe_token`."""
    pm = await card(customer, "4000000000000341")
    with pytest.raises(PaymentDeclined) as declined:
        await rail.create_payment_intent(
            amount_cents=500, payment_method=pm, idempotency_key="k-2", metadata={}
        )
    assert (declined.value.status, declined.value.code) == (402, "card_declined")
    with pytest.raises(ValidationFailed) as unknown:
        await rail.create_payment_intent(
            amount_cents=500,
            payment_method="pm_nope",
            idempotency_key="k-3",
            metadata={},
        )
    assert unknown.value.field == "stripe_token"


async def test_no_key_means_payments_off(redis_url: str) -> None:
    """Without MNEMO_STRIPE_SECRET_KEY there is no rail: a 503 that says what to set."""
    with pytest.raises(PaymentsOff) as off:
        StripeRail(Settings(redis_url=redis_url))
    assert off.value.status == 503
    assert "MNEMO_STRIPE_SECRET_KEY" in off.value.message


async def test_event_signature(rail: StripeRail) -> None:
    """Only Stripe's signature over the exact bytes, within 5 minutes, is accepted."""
    body = json.dumps(
        {
            "id": "evt_1",
            "object": "event",
            "type": "payment_intent.succeeded",
            "data": {"object": {"id": "pi_1", "object": "payment_intent"}},
        }
    ).encode()
    event = rail.verify_event(body, signed(body))
    assert (event.id, event.type, event.object_type, event.object_id) == (
        "evt_1",
        "payment_intent.succeeded",
        "payment_intent",
        "pi_1",
    )
    refusals = {
        "forged": signed(body, secret="whsec_someone_else"),
        "tampered": signed(body.replace(b"pi_1", b"pi_2")),
        "stale": signed(body, at=int(time.time()) - 301),
        "missing": None,
        "garbage": "t=abc,v1=zz",
    }
    for why, header in refusals.items():
        with pytest.raises(ApiError) as refused:
            rail.verify_event(body, header)
        assert (refused.value.status, refused.value.code) == (400, "invalid_signature"), why
    not_json = b"\xff\xfe not an event"
    with pytest.raises(ApiError) as bad:
        rail.verify_event(not_json, signed(not_json))
    assert bad.value.code in ("malformed_event", "invalid_signature")


async def test_connect_onboarding_and_idempotent_transfers(
    rail: StripeRail, connect_fake: str
) -> None:
    """An Express account onboards through its link; a transfer retried with its key is made
    once; the key with other parameters is refused; an account not onboarded gets nothing."""
    acct = await rail.create_express_account(
        email="p@example.com", user_id="u1", idempotency_key="a-1"
    )
    again = await rail.create_express_account(
        email="p@example.com", user_id="u1", idempotency_key="a-1"
    )
    assert again.id == acct.id and not acct.transfers_active
    with pytest.raises(ValidationFailed):
        await rail.transfer(
            amount_cents=100,
            destination=acct.id,
            transfer_group="g",
            idempotency_key="t-0",
            metadata={},
        )
    url = await rail.onboarding_link(
        acct.id, refresh_url="https://x.test/r", return_url="https://x.test/done"
    )
    async with httpx.AsyncClient() as browser:
        r = await browser.get(url)
    assert r.status_code == 303 and r.headers["location"] == "https://x.test/done"
    assert (await rail.account(acct.id)).transfers_active
    one = await rail.transfer(
        amount_cents=250,
        destination=acct.id,
        transfer_group="g",
        idempotency_key="t-1",
        metadata={"p": "1"},
    )
    two = await rail.transfer(
        amount_cents=250,
        destination=acct.id,
        transfer_group="g",
        idempotency_key="t-1",
        metadata={"p": "1"},
    )
    assert one == two and one.amount_cents == 250 and one.transfer_group == "g"
    with pytest.raises(IdempotencyConflict):
        await rail.transfer(
            amount_cents=999,
            destination=acct.id,
            transfer_group="g",
            idempotency_key="t-1",
            metadata={"p": "1"},
        )
    assert [t.id for t in await rail.transfers(transfer_group="g")] == [one.id]
