"""The card routes: pay by card (`POST /api/payments/create`, the spec's route), see a card
payment, refund one, and Stripe's webhook (`POST /api/payments/webhook`).

Who may do what:
- create: renters and admins, for one of their own clients (else 403, as contracts do); the
  contract a payment funds must be readable by the caller (else 404);
- get and refund: the payment's payer and admins; anyone else gets 404 (as for an unknown id);
- the webhook: Stripe, proven by `Stripe-Signature` over the raw body (no API credentials).
Every creating call needs an `Idempotency-Key` (a 422 without one: a retried card payment
without a key could pay twice); the rules of crediting are `gateway.payments.stripe_cards`'.
Without `MNEMO_STRIPE_SECRET_KEY` these routes answer 503 `payments_misconfigured`.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Literal
from urllib.parse import urlsplit

import asyncpg
import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import core
from engine.errors import NotFound
from gateway.errors import PayloadTooLarge, ValidationFailed
from gateway.idempotency import check_key
from gateway.operations import Call, Link, Operation, route
from gateway.payments.stripe_cards import FINAL, CardPayments
from gateway.payments.stripe_connect import Url
from gateway.payments.stripe_rail import PUSD_PER_CENT, PaymentConflict, PaymentsOff
from gateway.protocol import Id, whole
from gateway.routes.accounts import RENTERS, owned_client
from gateway.schemas import JSON_ENCODER, to_usd
from persistence import card_payments, history

__all__ = [
    "OPERATIONS",
    "CardPaymentOut",
    "CheckoutRequest",
    "PaymentCreateRequest",
    "RefundOut",
    "routes",
]

MIN_CHARGE_CENTS = 50
"""Stripe's smallest USD charge (0.50 USD)."""
MAX_CHARGE_CENTS = 99_999_999
"""Stripe's largest USD charge (999,999.99 USD)."""
WEBHOOK_MAX_BYTES = 1 << 20

StripeToken = Annotated[
    str,
    Meta(
        min_length=4,
        max_length=255,
        pattern=whole("pm_[A-Za-z0-9_]+"),
        description="The card's PaymentMethod id (`pm_...`), made in the browser by Stripe.js "
        "(or by the Stripe API); the card number never reaches Mnemo.",
    ),
]
AmountUsd = Annotated[
    float,
    Meta(
        ge=MIN_CHARGE_CENTS / 100,
        le=MAX_CHARGE_CENTS / 100,
        description="USD in whole cents, 0.50 to 999,999.99 (Stripe's bounds for a USD charge).",
    ),
]
RefundUsd = Annotated[
    float, Meta(ge=0.01, le=MAX_CHARGE_CENTS / 100, description="USD in whole cents.")
]
Reason = Annotated[str, Meta(max_length=500, pattern=whole(r"[^\x00-\x1f\x7f]*"))]


class PaymentCreateRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Pay by card: a top-up of `client_id`'s balance by `amount_usd`, or a contract's cost
    (`contract_id`: its full term while active, its settled cost once closed, less what cards
    already paid for it; at least 0.50 USD, the rest stays in the balance). The balance is
    credited when Stripe says the payment succeeded (at once, or after 3-D Secure: see
    `next_action`)."""

    payment_method: Literal["stripe"] = "stripe"
    stripe_token: StripeToken
    client_id: Id | None = None
    contract_id: Id | None = None
    amount_usd: AmountUsd | None = None


class CheckoutRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Top up `client_id`'s balance by `amount_usd` on Stripe Checkout, Stripe's hosted payment
    page: go to the answer's `checkout_url` to pay. Stripe sends the payer back to `return_url`
    with `checkout=<payment_id>` added to its query (and `checkout_canceled=1` if they gave
    up); the balance is credited once the payment `succeeded`."""

    client_id: Id
    amount_usd: AmountUsd
    return_url: Url


class PaymentRefundRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Refund a card payment to its card: `amount_usd` (default: all that is left of it). The
    amount leaves the client's balance first: money already spent cannot be refunded."""

    payment_id: Id
    amount_usd: RefundUsd | None = None
    reason: Reason = ""


class CardPaymentOut(Struct, kw_only=True):
    payment_id: str
    status: str
    """creating (Stripe not yet heard), requires_action (3-D Secure: finish with Stripe.js and
    `client_secret`), processing, succeeded (credited), failed, canceled, or another Stripe
    PaymentIntent status."""
    client_id: str
    contract_id: str | None
    amount_usd: float
    amount_pusd: int
    currency: str
    payment_intent_id: str | None
    credited: bool
    """The balance has the amount (once `succeeded`)."""
    refunded_usd: float
    refunded_pusd: int
    created_at: dt.datetime
    client_secret: str | None = None
    """Only while `requires_action`: for Stripe.js to finish the customer's authentication."""
    checkout_url: str | None = None
    """A Checkout payment (`POST /api/payments/checkout`) not yet final: where the payer pays."""
    next_action: str | None = None
    error_code: str | None = None
    error_message: str | None = None


class RefundOut(Struct, kw_only=True):
    refund_id: str
    payment_id: str
    status: str
    """pending, requires_action, succeeded, failed or canceled (Stripe's refund statuses)."""
    amount_usd: float
    amount_pusd: int
    reason: str
    stripe_refund_id: str | None
    created_at: dt.datetime


def _cards(call: Call | Request) -> CardPayments:
    cards: CardPayments | None = call.state.cards
    if cards is None:
        raise PaymentsOff("card payments are not configured here (MNEMO_STRIPE_SECRET_KEY)")
    return cards


def _key(call: Call) -> str:
    raw = call.request.headers.get("idempotency-key")
    if raw is None:
        raise ValidationFailed(
            "payments need an Idempotency-Key header (a retry without one could pay twice)",
            field="Idempotency-Key",
        )
    return check_key(raw)


def _fingerprint(call: Call) -> str:
    body = msgspec.json.Encoder(order="sorted").encode(call.body)
    fingerprint: str = call.state.idempotency.fingerprint(
        call.request.method, call.request.url.path, body
    )
    return fingerprint


def _cents(amount_usd: float, field: str) -> int:
    cents = round(amount_usd * 100)
    if not math.isclose(cents, amount_usd * 100, rel_tol=0, abs_tol=1e-6):
        raise ValidationFailed("give USD in whole cents", field=field)
    return cents


def payment_out(row: asyncpg.Record, *, client_secret: str | None = None) -> CardPaymentOut:
    return CardPaymentOut(
        payment_id=row["id"].hex,
        status=row["status"],
        client_id=str(row["client_id"]),
        contract_id=row["contract_id"].hex if row["contract_id"] else None,
        amount_usd=to_usd(row["amount_pusd"]),
        amount_pusd=row["amount_pusd"],
        currency=row["currency"],
        payment_intent_id=row["payment_intent_id"],
        credited=row["credited_at"] is not None,
        refunded_usd=to_usd(row["refunded_cents"] * PUSD_PER_CENT),
        refunded_pusd=row["refunded_cents"] * PUSD_PER_CENT,
        created_at=row["created_at"],
        client_secret=client_secret,
        checkout_url=row["checkout_url"] if row["status"] not in FINAL else None,
        error_code=row["error_code"],
        error_message=row["error_message"],
    )


def refund_out(row: asyncpg.Record) -> RefundOut:
    return RefundOut(
        refund_id=row["id"].hex,
        payment_id=row["payment_id"].hex,
        status=row["status"],
        amount_usd=to_usd(row["amount_pusd"]),
        amount_pusd=row["amount_pusd"],
        reason=row["reason"],
        stripe_refund_id=row["stripe_refund_id"],
        created_at=row["created_at"],
    )


async def _contract_due(call: Call, contract_id: str) -> tuple[str, str, int]:
    """(contract id, its client id, pico-USD it costs) for a contract the caller may read."""
    who = call.user
    contract = await call.state.market.get_contract(contract_id)
    if contract is not None:
        if not (who.is_admin or who.user_id == contract.user_id):
            raise NotFound("no such contract", field="contract_id")
        if contract.status == "active":
            cost = core.contract_cost_pusd(
                ram_gb=contract.ram_gb,
                vram_gb=contract.vram_gb,
                used_s=contract.duration_s,
                price_pusd=contract.price_pusd,
            )
        else:
            cost = contract.cost_pusd
        return contract.contract_id, contract.client_id, cost
    row = await history.contract(call.state.pool, contract_id)
    if row is None or not (who.is_admin or who.user_id == str(row["user_id"])):
        raise NotFound("no such contract", field="contract_id")
    return row["id"].hex, str(row["client_id"]), int(row["total_cost_pusd"])


async def create(call: Call) -> CardPaymentOut:
    body: PaymentCreateRequest = call.body
    pool = call.state.pool
    contract_id: str | None = None
    if body.contract_id is not None:
        if body.amount_usd is not None:
            raise ValidationFailed(
                "a contract's payment is its cost: give contract_id or amount_usd, not both",
                field="amount_usd",
            )
        contract_id, client_id, cost_pusd = await _contract_due(call, body.contract_id)
        if body.client_id is not None and str(
            (await owned_client(pool, call.user, body.client_id))["id"]
        ) != str(client_id):
            raise ValidationFailed("the contract is not this client's", field="client_id")
        client_row = await owned_client(pool, call.user, client_id, field="contract_id")
        due = -(-cost_pusd // PUSD_PER_CENT) - await card_payments.paid_for_contract(
            pool, contract_id
        )
        if due < 1:
            raise PaymentConflict(
                "this contract is paid by card already", code="already_paid", field="contract_id"
            )
        amount_cents = max(due, MIN_CHARGE_CENTS)
    else:
        if body.client_id is None or body.amount_usd is None:
            missing = "client_id" if body.client_id is None else "amount_usd"
            raise ValidationFailed(
                "a top-up needs client_id and amount_usd (or pay a contract: contract_id)",
                field=missing,
            )
        client_row = await owned_client(pool, call.user, body.client_id)
        amount_cents = _cents(body.amount_usd, "amount_usd")
    cards = _cards(call)
    key = _key(call)
    row = await cards.pay(
        user_id=call.user.user_id,
        client_id=str(client_row["id"]),
        contract_id=contract_id,
        amount_cents=amount_cents,
        payment_method=body.stripe_token,
        idempotency_key=key,
        request_hash=_fingerprint(call),
    )
    return await _with_action(cards, row)


async def checkout(call: Call) -> CardPaymentOut:
    body: CheckoutRequest = call.body
    try:
        host = urlsplit(body.return_url).hostname
    except ValueError:  # "http://[": a bracket that opens no IPv6 address
        host = None
    if not host:
        raise ValidationFailed("not a URL a browser can return to", field="return_url")
    client_row = await owned_client(call.state.pool, call.user, body.client_id)
    row = await _cards(call).checkout(
        user_id=call.user.user_id,
        client_id=str(client_row["id"]),
        amount_cents=_cents(body.amount_usd, "amount_usd"),
        return_url=body.return_url,
        idempotency_key=_key(call),
        request_hash=_fingerprint(call),
    )
    return payment_out(row)


async def _with_action(cards: CardPayments, row: asyncpg.Record) -> CardPaymentOut:
    if row["status"] == "requires_action" and row["payment_intent_id"]:
        pi = await cards.rail.payment_intent(row["payment_intent_id"])
        out = payment_out(row, client_secret=pi.client_secret)
        out.next_action = pi.next_action
        return out
    return payment_out(row)


async def _payment_of(call: Call, payment_id: str, field: str) -> asyncpg.Record:
    row = await card_payments.payment(call.state.pool, payment_id)
    if row is None or not (call.user.is_admin or str(row["user_id"]) == call.user.user_id):
        raise NotFound("no such payment", field=field)
    return row


async def get_payment(call: Call) -> CardPaymentOut:
    row = await _payment_of(call, call.path["payment_id"], "payment_id")
    cards = _cards(call)
    if row["status"] not in ("succeeded", "failed", "canceled") or (
        row["status"] == "succeeded" and row["credited_at"] is None
    ):
        row = await cards.refresh(row)
    return await _with_action(cards, row)


async def refund(call: Call) -> RefundOut:
    body: PaymentRefundRequest = call.body
    payment = await _payment_of(call, body.payment_id, "payment_id")
    cards = _cards(call)
    key = _key(call)
    amount = None if body.amount_usd is None else _cents(body.amount_usd, "amount_usd")
    row = await cards.refund(
        payment,
        requested_by=call.user.user_id,
        amount_cents=amount,
        reason=body.reason,
        idempotency_key=key,
        request_hash=_fingerprint(call),
    )
    return refund_out(row)


async def webhook(request: Request) -> Response:
    """Stripe's events: verified over the raw body, recorded once, applied by re-fetching."""
    cards = _cards(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > WEBHOOK_MAX_BYTES:
        raise PayloadTooLarge(f"body larger than {WEBHOOK_MAX_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > WEBHOOK_MAX_BYTES:
            raise PayloadTooLarge(f"body larger than {WEBHOOK_MAX_BYTES} bytes")
    event = cards.rail.verify_event(raw, request.headers.get("stripe-signature"))
    outcome = await cards.on_event(event)
    return Response(
        JSON_ENCODER.encode({"received": True, "event_id": event.id, "outcome": outcome}),
        media_type="application/json",
    )


OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/payments/create",
        create,
        name="create_payment",
        summary="Pay by card (a top-up, or a contract's cost)",
        tag="payments",
        body=PaymentCreateRequest,
        response=CardPaymentOut,
        status=201,
        roles=RENTERS,
        links={
            "GetPayment": Link("get_card_payment", {"payment_id": "$response.body#/payment_id"}),
            "Refund": Link("refund_payment", body={"payment_id": "$response.body#/payment_id"}),
            "Invoice": Link("client_invoice", {"client_id": "$response.body#/client_id"}),
        },
        idempotent=True,
        limit="writes",
        errors=(402, 404, 409, 502, 503),
        description="Creates and confirms a Stripe PaymentIntent for the card `stripe_token`. "
        "`Idempotency-Key` is required: a retry with the same key (after a timeout, a 502) "
        "answers the same payment and never charges twice. A declined card is 402 "
        "`card_declined`; the balance is credited once the payment `succeeded`.",
    ),
    Operation(
        "POST",
        "/api/payments/checkout",
        checkout,
        name="create_checkout",
        summary="Top up by card on Stripe Checkout (Stripe's hosted payment page)",
        tag="payments",
        body=CheckoutRequest,
        response=CardPaymentOut,
        status=201,
        roles=RENTERS,
        links={
            "GetPayment": Link("get_card_payment", {"payment_id": "$response.body#/payment_id"}),
        },
        idempotent=True,
        limit="writes",
        errors=(404, 409, 502, 503),
        description="Opens a Checkout Session for the top-up and answers the payment with its "
        "`checkout_url`; the payer enters the card there, on Stripe's page (the card number "
        "never reaches Mnemo, and Mnemo's pages load no script of Stripe's). "
        "`Idempotency-Key` is required: a retry answers the same payment and session. The "
        "balance is credited once `GET /api/payments/cards/{payment_id}` (or Stripe's webhook) "
        "finds the payment `succeeded`.",
    ),
    Operation(
        "GET",
        "/api/payments/cards/{payment_id}",
        get_payment,
        name="get_card_payment",
        summary="A card payment (asks Stripe again while it is not final)",
        tag="payments",
        response=CardPaymentOut,
        errors=(502, 503),
    ),
    Operation(
        "POST",
        "/api/payments/refund",
        refund,
        name="refund_payment",
        summary="Refund a card payment, in full or in part",
        tag="payments",
        body=PaymentRefundRequest,
        response=RefundOut,
        status=201,
        idempotent=True,
        limit="writes",
        errors=(404, 409, 502, 503),
        description="The payer or an admin. The amount leaves the client's balance first "
        "(409 `insufficient_funds` if it was spent), then Stripe refunds the card; a refund "
        "Stripe refuses (409 `refund_failed`) is credited back. `Idempotency-Key` is required.",
    ),
]

routes = [
    *(route(op) for op in OPERATIONS),
    Route("/api/payments/webhook", webhook, methods=["POST"], name="stripe_webhook"),
]
