"""Stripe as Mnemo uses it: PaymentIntents and refunds (cards), webhook signatures, and Connect
(Express accounts, account links, transfers) for provider payouts.

One `StripeRail` per process, opened by the gateway's lifespan or by `mnemo payouts run`, built
from the settings: a `stripe.StripeClient` on the SDK's async HTTPX client (`*_async` calls), so
no call blocks the event loop. Every creating call takes an idempotency key that the caller chose
and persisted before the first attempt; the SDK retries connection errors, 409s and 5xx with that
same key (`max_network_retries`), and Stripe answers a retried key with its first response.

What the rest of Mnemo reads from Stripe comes back as the small frozen Structs below, never as
raw SDK objects. Stripe's errors are mapped here, once, to the gateway's error classes:
a declined card is 402 `card_declined`; a request Stripe calls invalid is 422 naming our field;
an unreachable or failing Stripe is 502 `stripe_unavailable` (nothing is lost: retry with the
same key); a rejected API key is 503 `payments_misconfigured` (and logged).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec
import stripe

from engine.settings import Settings
from gateway.errors import ApiError, IdempotencyConflict, ValidationFailed

__all__ = [
    "CURRENCY",
    "PUSD_PER_CENT",
    "Account",
    "CheckoutSession",
    "PaymentConflict",
    "PaymentDeclined",
    "PaymentIntent",
    "PaymentsOff",
    "Refund",
    "StripeRail",
    "StripeUnavailable",
    "Transfer",
    "WebhookEvent",
]

log = logging.getLogger("mnemo.payments.stripe")

CURRENCY = "usd"
PUSD_PER_CENT = 10**10
"""Pico-USD in one US cent: Stripe counts USD in cents, the ledger in pico-USD."""


class PaymentDeclined(ApiError):
    """The card was declined (Stripe's decline code in `code` when it gave one)."""

    code = "card_declined"
    status = 402


class PaymentConflict(ApiError):
    """The payment's state forbids this (refunded already, paid already, balance spent...)."""

    code = "payment_conflict"
    status = 409


class StripeUnavailable(ApiError):
    """Stripe did not answer, or failed; the operation may be retried with the same key."""

    code = "stripe_unavailable"
    status = 502


class PaymentsOff(ApiError):
    """Stripe is not configured here (no `MNEMO_STRIPE_SECRET_KEY`), or rejects our key."""

    code = "payments_misconfigured"
    status = 503


class PaymentIntent(msgspec.Struct, frozen=True):
    id: str
    status: str
    """requires_payment_method, requires_confirmation, requires_action, processing,
    requires_capture, canceled or succeeded."""
    amount_cents: int
    currency: str
    metadata: dict[str, str]
    client_secret: str | None = None
    next_action: str | None = None
    """The type of action the customer must take (`use_stripe_sdk`, `redirect_to_url`)."""
    error_code: str | None = None
    error_message: str | None = None


class CheckoutSession(msgspec.Struct, frozen=True):
    """A Checkout Session (Stripe's hosted payment page) of one payment."""

    id: str
    url: str | None
    """Where the payer goes to pay (None once the session is complete or expired)."""
    status: str
    """open, complete or expired."""
    payment_status: str
    """unpaid, paid or no_payment_required."""
    payment_intent: str | None
    """The PaymentIntent the page made, once the payer submitted it."""
    amount_cents: int
    currency: str
    metadata: dict[str, str]


class Refund(msgspec.Struct, frozen=True):
    id: str
    status: str
    """pending, requires_action, succeeded, failed or canceled."""
    amount_cents: int
    currency: str
    payment_intent: str | None
    metadata: dict[str, str]


class Account(msgspec.Struct, frozen=True):
    id: str
    payouts_enabled: bool
    details_submitted: bool
    transfers_active: bool


class Transfer(msgspec.Struct, frozen=True):
    id: str
    amount_cents: int
    currency: str
    destination: str
    transfer_group: str | None
    metadata: dict[str, str]
    reversed: bool = False


class WebhookEvent(msgspec.Struct, frozen=True):
    """A verified webhook event: only what is needed to re-fetch its object from Stripe."""

    id: str
    type: str
    object_type: str
    object_id: str


def _plain(obj: Any) -> dict[str, Any]:
    """A response as plain dicts and lists (StripeObjects are not dicts)."""
    if isinstance(obj, dict):
        return obj
    data: dict[str, Any] = obj.to_dict()
    return data


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    # An expanded object (localstripe expands `latest_charge`, Stripe may on request).
    found = value.get("id") if isinstance(value, dict) else None
    return found if isinstance(found, str) else None


def _metadata(obj: Any) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    return {str(k): str(v) for k, v in meta.items()}


def _payment_intent(pi: Any) -> PaymentIntent:
    pi = _plain(pi)
    action = pi.get("next_action")
    error = pi.get("last_payment_error")
    return PaymentIntent(
        id=pi["id"],
        status=pi["status"],
        amount_cents=int(pi["amount"]),
        currency=pi["currency"],
        metadata=_metadata(pi),
        client_secret=pi.get("client_secret"),
        next_action=action.get("type") if action else None,
        error_code=error.get("code") if error else None,
        error_message=error.get("message") if error else None,
    )


def _refund(r: Any) -> Refund:
    r = _plain(r)
    return Refund(
        id=r["id"],
        status=r["status"],
        amount_cents=int(r["amount"]),
        currency=r["currency"],
        payment_intent=_str(r.get("payment_intent")),
        metadata=_metadata(r),
    )


def _checkout_session(s: Any) -> CheckoutSession:
    s = _plain(s)
    return CheckoutSession(
        id=s["id"],
        url=s.get("url"),
        status=str(s.get("status") or "open"),
        payment_status=str(s.get("payment_status") or "unpaid"),
        payment_intent=_str(s.get("payment_intent")),
        amount_cents=int(s.get("amount_total") or 0),
        currency=str(s.get("currency") or CURRENCY),
        metadata=_metadata(s),
    )


def _account(a: Any) -> Account:
    a = _plain(a)
    capabilities = a.get("capabilities") or {}
    return Account(
        id=a["id"],
        payouts_enabled=bool(a.get("payouts_enabled")),
        details_submitted=bool(a.get("details_submitted")),
        transfers_active=capabilities.get("transfers") == "active",
    )


def _transfer(t: Any) -> Transfer:
    t = _plain(t)
    return Transfer(
        id=t["id"],
        amount_cents=int(t["amount"]),
        currency=t["currency"],
        destination=_str(t.get("destination")) or "",
        transfer_group=t.get("transfer_group"),
        metadata=_metadata(t),
        reversed=bool(t.get("reversed")),
    )


class StripeRail:
    """The Stripe calls of Mnemo (see the module docstring). `aclose()` when done."""

    def __init__(
        self,
        settings: Settings,
        *,
        timeout_s: float = 30.0,
        max_network_retries: int = 2,
    ) -> None:
        if not settings.stripe_secret_key:
            raise PaymentsOff("card payments are not configured (MNEMO_STRIPE_SECRET_KEY)")
        self._webhook_secret = settings.stripe_webhook_secret
        self._http = stripe.HTTPXClient(timeout=timeout_s)
        self._client = stripe.StripeClient(
            settings.stripe_secret_key,
            base_addresses={"api": settings.stripe_api_base},
            http_client=self._http,
            max_network_retries=max_network_retries,
        )
        self._connect = stripe.StripeClient(
            settings.stripe_secret_key,
            base_addresses={"api": settings.stripe_connect_api_base or settings.stripe_api_base},
            http_client=self._http,
            max_network_retries=max_network_retries,
        )
        self._checkout = stripe.StripeClient(
            settings.stripe_secret_key,
            base_addresses={"api": settings.stripe_checkout_api_base or settings.stripe_api_base},
            http_client=self._http,
            max_network_retries=max_network_retries,
        )

    async def aclose(self) -> None:
        await self._http.close_async()

    # -- cards -----------------------------------------------------------------------------------

    async def create_payment_intent(
        self,
        *,
        amount_cents: int,
        payment_method: str,
        idempotency_key: str,
        metadata: Mapping[str, str],
    ) -> PaymentIntent:
        """Create and confirm a card PaymentIntent. A declined card raises `PaymentDeclined`."""
        params: dict[str, Any] = {
            "amount": amount_cents,
            "currency": CURRENCY,
            "payment_method": payment_method,
            "payment_method_types": ["card"],
            "confirm": True,
            "metadata": dict(metadata),
        }
        with _mapped(
            param_names={"payment_method": "stripe_token", "amount": "amount_usd"},
            default_field="stripe_token",
        ):
            pi = await self._client.v1.payment_intents.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        return _payment_intent(pi)

    async def create_checkout_session(
        self,
        *,
        amount_cents: int,
        description: str,
        success_url: str,
        cancel_url: str,
        client_reference_id: str,
        idempotency_key: str,
        metadata: Mapping[str, str],
    ) -> CheckoutSession:
        """A Checkout Session for one card payment of `amount_cents`: Stripe's hosted page takes
        the card (its number never reaches Mnemo, no script of Stripe's runs on ours) and makes
        the PaymentIntent, which carries `metadata` too."""
        params: dict[str, Any] = {
            "mode": "payment",
            "payment_method_types": ["card"],
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": CURRENCY,
                        "unit_amount": amount_cents,
                        "product_data": {"name": description},
                    },
                }
            ],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "client_reference_id": client_reference_id,
            "metadata": dict(metadata),
            "payment_intent_data": {"metadata": dict(metadata)},
        }
        with _mapped(
            param_names={"success_url": "success_url", "cancel_url": "cancel_url"},
            default_field="amount_usd",
        ):
            session = await self._checkout.v1.checkout.sessions.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        return _checkout_session(session)

    async def checkout_session(self, session_id: str) -> CheckoutSession:
        with _mapped():
            return _checkout_session(
                await self._checkout.v1.checkout.sessions.retrieve_async(session_id)
            )

    async def payment_intent(self, payment_intent_id: str) -> PaymentIntent:
        with _mapped():
            return _payment_intent(
                await self._client.v1.payment_intents.retrieve_async(payment_intent_id)
            )

    async def refund(
        self,
        *,
        payment_intent_id: str,
        amount_cents: int,
        idempotency_key: str,
        metadata: Mapping[str, str],
    ) -> Refund:
        with _mapped(param_names={"amount": "amount_usd"}):
            r = await self._client.v1.refunds.create_async(
                params={
                    "payment_intent": payment_intent_id,
                    "amount": amount_cents,
                    "metadata": dict(metadata),
                },
                options={"idempotency_key": idempotency_key},
            )
        return _refund(r)

    async def refund_by_id(self, refund_id: str) -> Refund:
        with _mapped():
            return _refund(await self._client.v1.refunds.retrieve_async(refund_id))

    async def refunds_of(self, payment_intent_id: str) -> list[Refund]:
        """Every refund of a PaymentIntent (at most 100: far more than any card payment gets)."""
        with _mapped():
            page = await self._client.v1.refunds.list_async(
                params={"payment_intent": payment_intent_id, "limit": 100}
            )
        return [_refund(r) for r in page.data]

    async def charge_payment_intent(self, charge_id: str) -> str | None:
        """The PaymentIntent of a charge (refund events of the charge name only the charge)."""
        with _mapped():
            charge = _plain(await self._client.v1.charges.retrieve_async(charge_id))
        return _str(charge.get("payment_intent"))

    def verify_event(self, raw: bytes, signature: str | None) -> WebhookEvent:
        """The event in `raw` if `signature` (the `Stripe-Signature` header) is Stripe's over
        these exact bytes, made within the SDK's default tolerance (300 s); else a 400."""
        if not self._webhook_secret:
            raise PaymentsOff("Stripe webhooks are not configured (MNEMO_STRIPE_WEBHOOK_SECRET)")
        try:
            event = self._client.construct_event(raw, signature, self._webhook_secret)
        except stripe.SignatureVerificationError as exc:
            raise ApiError(
                f"Stripe-Signature does not verify: {exc.user_message or exc}",
                code="invalid_signature",
                field="Stripe-Signature",
            ) from None
        except (ValueError, UnicodeDecodeError):
            # ValueError: signed by Stripe yet not a JSON event (json.JSONDecodeError is one).
            raise ApiError("the body is not a Stripe event", code="malformed_event") from None
        data = _plain(event)
        obj = (data.get("data") or {}).get("object") or {}
        if not isinstance(data.get("id"), str) or not isinstance(obj.get("id"), str):
            raise ApiError("the event names no object", code="malformed_event")
        return WebhookEvent(
            id=data["id"],
            type=str(data.get("type", "")),
            object_type=str(obj.get("object", "")),
            object_id=obj["id"],
        )

    # -- Connect -----------------------------------------------------------------------------------

    async def create_express_account(
        self, *, email: str, user_id: str, idempotency_key: str
    ) -> Account:
        with _mapped():
            a = await self._connect.v1.accounts.create_async(
                params={
                    "type": "express",
                    "email": email,
                    "capabilities": {"transfers": {"requested": True}},
                    "metadata": {"mnemo_user_id": user_id},
                },
                options={"idempotency_key": idempotency_key},
            )
        return _account(a)

    async def account(self, account_id: str) -> Account:
        with _mapped():
            return _account(await self._connect.v1.accounts.retrieve_async(account_id))

    async def onboarding_link(self, account_id: str, *, refresh_url: str, return_url: str) -> str:
        """A one-time URL of Stripe's hosted onboarding for this account."""
        with _mapped():
            link = await self._connect.v1.account_links.create_async(
                params={
                    "account": account_id,
                    "refresh_url": refresh_url,
                    "return_url": return_url,
                    "type": "account_onboarding",
                }
            )
        return str(link["url"])

    async def transfer(
        self,
        *,
        amount_cents: int,
        destination: str,
        transfer_group: str,
        idempotency_key: str,
        metadata: Mapping[str, str],
    ) -> Transfer:
        with _mapped():
            t = await self._connect.v1.transfers.create_async(
                params={
                    "amount": amount_cents,
                    "currency": CURRENCY,
                    "destination": destination,
                    "transfer_group": transfer_group,
                    "metadata": dict(metadata),
                },
                options={"idempotency_key": idempotency_key},
            )
        return _transfer(t)

    async def transfers(self, *, transfer_group: str) -> list[Transfer]:
        """The transfers of one settlement period (for reconciliation), up to 100 per call
        page, following Stripe's pagination."""
        out: list[Transfer] = []
        params: dict[str, Any] = {"transfer_group": transfer_group, "limit": 100}
        while True:
            with _mapped():
                page = await self._connect.v1.transfers.list_async(params=params)  # type: ignore[arg-type]
            out += [_transfer(t) for t in page.data]
            if not page.has_more or not page.data:
                return out
            params["starting_after"] = page.data[-1]["id"]


@contextlib.contextmanager
def _mapped(
    *, param_names: Mapping[str, str] | None = None, default_field: str | None = None
) -> Iterator[None]:
    """Maps Stripe's exceptions raised inside to the gateway's (see the module docstring);
    `param_names` names Stripe's parameters as our API does."""
    try:
        yield
    except stripe.StripeError as exc:
        message = exc.user_message or str(exc) or type(exc).__name__
        if isinstance(exc, stripe.CardError):
            raise PaymentDeclined(message, code=exc.code or None, field="stripe_token") from exc
        if isinstance(exc, stripe.IdempotencyError):
            raise IdempotencyConflict(message, code="stripe_idempotency_error") from exc
        if isinstance(exc, stripe.InvalidRequestError):
            param = (exc.param or "").split("[", 1)[0]
            raise ValidationFailed(
                f"Stripe refused the request: {message}",
                code="stripe_invalid_request",
                field=(param_names or {}).get(param, default_field),
            ) from exc
        if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
            log.error("Stripe rejected our API key: %s", exc)
            raise PaymentsOff("payments are misconfigured on this exchange") from exc
        log.warning("Stripe unavailable: %r", exc)
        raise StripeUnavailable(
            "Stripe did not answer; retry with the same Idempotency-Key (nothing is charged twice)"
        ) from exc
