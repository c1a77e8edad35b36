"""Card payments through Stripe: top-ups (or a contract's cost) paid with a PaymentIntent,
refunds, and the webhook events that finish what the API started.

Rules:
- A payment is written in Postgres (`card_payments`, 'creating') under the caller's
  Idempotency-Key before Stripe is called, with the Stripe idempotency key every attempt will
  carry (`mnemo-pay-<payment id>`), so a retry after a lost answer finds the same PaymentIntent
  and the same key with another body is a 409.
- Money is credited to the client's balance when, and only when, Stripe says the PaymentIntent
  `succeeded` (in the API's answer, a webhook, or reconciliation), through the market's credit
  (one Lua call, idempotent on `stripe:pi:<PaymentIntent id>`), whichever comes first; the others
  find the key used and change nothing. `credited_at` records it in Postgres afterwards.
- A refund asked through the API is debited from the client's balance first (key
  `stripe:refund:<refund id>`: what was spent cannot be refunded, 409 `insufficient_funds`),
  then asked of Stripe with the refund's id as idempotency key; if Stripe refuses or later fails
  it, the debit is credited back once (`stripe:refund-reversal:<refund id>`). A refund made
  elsewhere (the Stripe dashboard) arrives as a webhook and is debited once, even below zero:
  the money has left already.
- A payment on Stripe Checkout (`checkout`: the web app's card top-up) is the same row with a
  Checkout Session, created under `mnemo-checkout-<payment id>`; the payer pays on Stripe's
  page, which makes the PaymentIntent (with this payment's metadata), and from there it is
  credited as above: when the session is read again (the payer's return, `GET`, a
  `checkout.session.*` webhook, reconciliation) or when its PaymentIntent's webhook arrives.
  A session that expires unpaid cancels the payment.
- Webhook events are verified by the caller (`StripeRail.verify_event`), recorded by event id
  (`stripe_events`; a redelivery of a finished event does nothing) and never trusted for
  amounts or states: the PaymentIntent or Refund is fetched again from Stripe.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from engine.errors import MarketError
from gateway.errors import ApiError, IdempotencyConflict, ValidationFailed
from gateway.payments.stripe_rail import (
    PUSD_PER_CENT,
    CheckoutSession,
    PaymentConflict,
    PaymentDeclined,
    PaymentIntent,
    Refund,
    StripeRail,
    StripeUnavailable,
    WebhookEvent,
)
from persistence import card_payments as db

__all__ = ["FINAL", "CardPayments", "Wallets"]

log = logging.getLogger("mnemo.payments.cards")

FINAL = frozenset({"succeeded", "canceled", "failed"})
_REFUND_FINAL = frozenset({"succeeded", "failed", "canceled"})
RAIL = "stripe"


class Wallets(Protocol):
    """The market's money primitives (`engine.market.Market`): each one Lua call that applies
    once per `key` and appends its event to the funding stream, which the journal folds into
    the Postgres ledger. A debit beyond the funding wallet's balance raises a `MarketError`
    (`insufficient_funds`) unless `allow_negative`; `gather` moves a client's idle money from
    its region wallets back to the funding wallet."""

    async def credit(
        self,
        account_id: str,
        amount_pusd: int,
        *,
        key: str,
        rail: str,
        reference: str = "",
        reason: str = "",
        now_ms: int,
    ) -> Any: ...

    async def debit(
        self,
        account_id: str,
        amount_pusd: int,
        *,
        key: str,
        rail: str,
        reference: str = "",
        reason: str = "",
        now_ms: int,
        allow_negative: bool = False,
    ) -> Any: ...

    async def gather(self, client_id: str, now_ms: int) -> int: ...


class CardPayments:
    """Card payments and refunds over one pool, one Stripe rail and the market's wallets."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        rail: StripeRail,
        wallets: Wallets,
        *,
        attempt_stale_s: float = 30.0,
    ) -> None:
        self.pool = pool
        self.rail = rail
        self.wallets = wallets
        self.attempt_stale_s = attempt_stale_s

    # -- paying ----------------------------------------------------------------------------------

    async def _claim(
        self,
        stripe_prefix: str,
        *,
        user_id: str,
        client_id: str,
        contract_id: str | None,
        amount_cents: int,
        idempotency_key: str,
        request_hash: str,
    ) -> tuple[asyncpg.Record, bool]:
        """The payment of (user, key), written 'creating' if it is new (Stripe's idempotency
        key: `<stripe_prefix>-<payment id>`), and whether this call makes the attempt at Stripe
        (a new payment, or one whose last attempt went stale) rather than replay what Stripe
        said. The same key with another request is a 409; with an attempt under way, too."""
        payment_id = uuid.uuid4()
        row = await db.open_payment(
            self.pool,
            payment_id=payment_id,
            user_id=user_id,
            client_id=client_id,
            contract_id=contract_id,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            stripe_idempotency_key=f"{stripe_prefix}-{payment_id.hex}",
            amount_cents=amount_cents,
        )
        if row is not None:
            return row, True
        row = await db.payment_by_key(self.pool, user_id, idempotency_key)
        assert row is not None
        if row["request_hash"] != request_hash:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with a different request",
                code="idempotency_key_reused",
                field="Idempotency-Key",
            )
        if row["status"] != "creating":
            return row, False
        if not await db.take_attempt(self.pool, row["id"], stale_after_s=self.attempt_stale_s):
            raise IdempotencyConflict(
                "this payment is still being made; retry in a moment with the same key",
                code="payment_in_progress",
                field="Idempotency-Key",
                headers={"Retry-After": "2"},
            )
        return row, True

    async def pay(
        self,
        *,
        user_id: str,
        client_id: str,
        contract_id: str | None,
        amount_cents: int,
        payment_method: str,
        idempotency_key: str,
        request_hash: str,
    ) -> asyncpg.Record:
        """Create and confirm a PaymentIntent for this payment once per (user, key); the
        payment's row as it stands after Stripe's answer (credited if it succeeded)."""
        row, attempt = await self._claim(
            "mnemo-pay",
            user_id=user_id,
            client_id=client_id,
            contract_id=contract_id,
            amount_cents=amount_cents,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        if not attempt:
            return await self._replay(row)
        return await self._attempt(row, payment_method)

    async def checkout(
        self,
        *,
        user_id: str,
        client_id: str,
        amount_cents: int,
        return_url: str,
        idempotency_key: str,
        request_hash: str,
    ) -> asyncpg.Record:
        """Open a Stripe Checkout Session for a top-up of `amount_cents`, once per (user, key);
        the payment's row, its `checkout_url` where the payer goes to pay. Stripe sends the
        payer back to `return_url` with `checkout=<payment id>` (and `checkout_canceled=1` if
        they gave up)."""
        row, attempt = await self._claim(
            "mnemo-checkout",
            user_id=user_id,
            client_id=client_id,
            contract_id=None,
            amount_cents=amount_cents,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        if not attempt:
            if row["status"] == "failed" and row["checkout_session_id"] is None:
                raise ValidationFailed(
                    row["error_message"] or "Stripe refused the request",
                    code=row["error_code"] or "stripe_invalid_request",
                    field="amount_usd",
                )
            return await self.refresh(row)
        ours = row["id"].hex
        async with self._attempting(row):
            session = await self.rail.create_checkout_session(
                amount_cents=row["amount_cents"],
                description="Mnemo balance top-up",
                success_url=_with_query(return_url, checkout=ours),
                cancel_url=_with_query(return_url, checkout=ours, checkout_canceled="1"),
                client_reference_id=str(row["client_id"]),
                idempotency_key=row["stripe_idempotency_key"],
                metadata={"mnemo_payment_id": ours, "mnemo_client_id": str(row["client_id"])},
            )
        return await self.apply_session(row, session)

    async def apply_session(self, row: asyncpg.Record, session: CheckoutSession) -> asyncpg.Record:
        """Record a payment's Checkout Session as Stripe has it now; once the page made its
        PaymentIntent, go on as `apply_intent` (credited if it succeeded)."""
        _must_match(row, session, "Checkout Session")
        waiting = "processing" if session.status == "complete" else "requires_payment_method"
        row = await db.record_checkout(
            self.pool, row["id"], session_id=session.id, url=session.url, status=waiting
        )
        if session.payment_intent is not None:
            row = await self.apply_intent(
                row, await self.rail.payment_intent(session.payment_intent)
            )
        if session.status == "expired" and row["status"] != "succeeded":
            row = await db.record_intent(
                self.pool, row["id"], payment_intent_id=None, status="canceled"
            )
        return row

    async def _attempt(self, row: asyncpg.Record, payment_method: str) -> asyncpg.Record:
        metadata = {
            "mnemo_payment_id": row["id"].hex,
            "mnemo_client_id": str(row["client_id"]),
        }
        if row["contract_id"] is not None:
            metadata["mnemo_contract_id"] = row["contract_id"].hex
        async with self._attempting(row):
            pi = await self.rail.create_payment_intent(
                amount_cents=row["amount_cents"],
                payment_method=payment_method,
                idempotency_key=row["stripe_idempotency_key"],
                metadata=metadata,
            )
        return await self.apply_intent(row, pi)

    @contextlib.asynccontextmanager
    async def _attempting(self, row: asyncpg.Record) -> AsyncIterator[None]:
        """Around one creating call to Stripe for a payment. A refusal is Stripe's final word
        on this attempt (recorded failed, replayed as such for the same key); no answer leaves
        it open: Stripe may or may not have the object, and a retry (same Stripe key) finds it
        or makes it, once, without waiting for this attempt to age."""
        try:
            yield
        except (PaymentDeclined, ValidationFailed) as exc:
            await db.record_intent(
                self.pool,
                row["id"],
                payment_intent_id=None,
                status="failed",
                error_code=exc.code,
                error_message=exc.message,
            )
            raise
        except StripeUnavailable:
            await db.release_attempt(self.pool, row["id"])
            raise

    async def _replay(self, row: asyncpg.Record) -> asyncpg.Record:
        """The answer for a retried request whose payment already heard from Stripe."""
        if row["status"] == "failed":
            error = PaymentDeclined if row["error_code"] != "stripe_invalid_request" else None
            if error is None:
                raise ValidationFailed(
                    row["error_message"] or "Stripe refused the request",
                    code="stripe_invalid_request",
                    field="stripe_token",
                )
            raise error(
                row["error_message"] or "the card was declined",
                code=row["error_code"] or None,
                field="stripe_token",
            )
        if row["status"] not in FINAL or (row["status"] == "succeeded" and not row["credited_at"]):
            return await self.refresh(row)
        return row

    async def refresh(self, row: asyncpg.Record) -> asyncpg.Record:
        """Ask Stripe again about a payment that has its PaymentIntent (or its Checkout
        Session) and apply the answer."""
        if row["payment_intent_id"] is None:
            if row["checkout_session_id"] is not None:
                return await self.apply_session(
                    row, await self.rail.checkout_session(row["checkout_session_id"])
                )
            return row
        return await self.apply_intent(
            row, await self.rail.payment_intent(row["payment_intent_id"])
        )

    async def apply_intent(self, row: asyncpg.Record, pi: PaymentIntent) -> asyncpg.Record:
        """Record a PaymentIntent as Stripe has it now, and credit the client if it succeeded."""
        _must_match(row, pi, "PaymentIntent")
        row = await db.record_intent(
            self.pool,
            row["id"],
            payment_intent_id=pi.id,
            status=pi.status,
            error_code=pi.error_code,
            error_message=pi.error_message,
        )
        if pi.status == "succeeded" and row["credited_at"] is None:
            contract = row["contract_id"]
            reason = f"card payment for contract {contract.hex}" if contract else "card top-up"
            await self.wallets.credit(
                str(row["client_id"]),
                row["amount_cents"] * PUSD_PER_CENT,
                key=f"stripe:pi:{pi.id}",
                rail=RAIL,
                reference=pi.id,
                reason=reason,
                now_ms=_now_ms(),
            )
            await db.mark_credited(self.pool, row["id"])
            credited = await db.payment(self.pool, row["id"])
            assert credited is not None
            return credited
        return row

    # -- refunding -------------------------------------------------------------------------------

    async def refund(
        self,
        payment: asyncpg.Record,
        *,
        requested_by: str,
        amount_cents: int | None,
        reason: str,
        idempotency_key: str,
        request_hash: str,
    ) -> asyncpg.Record:
        """Refund `amount_cents` (None: all that is left) of a succeeded payment, once per
        (user, key); the refund's row."""
        row = await db.refund_by_key(self.pool, requested_by, idempotency_key)
        if row is None:
            if payment["status"] != "succeeded" or payment["credited_at"] is None:
                raise PaymentConflict(
                    f"only a succeeded payment can be refunded (this one is {payment['status']})",
                    code="not_refundable",
                    field="payment_id",
                )
            left = payment["amount_cents"] - await self._refunds_taken(payment["id"])
            wanted = left if amount_cents is None else amount_cents
            if wanted < 1:
                raise PaymentConflict(
                    "this payment is refunded in full", code="already_refunded", field="payment_id"
                )
            row, left = await db.open_refund(
                self.pool,
                refund_id=uuid.uuid4(),
                payment_id=payment["id"],
                requested_by=requested_by,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                amount_cents=wanted,
                reason=reason,
            )
            if row is None:
                again = await db.refund_by_key(self.pool, requested_by, idempotency_key)
                if again is None:
                    raise ValidationFailed(
                        f"at most {left / 100:.2f} USD of this payment is left to refund",
                        code="refund_exceeds_payment",
                        field="amount_usd",
                    )
                row = again
        if row["request_hash"] != request_hash:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with a different request",
                code="idempotency_key_reused",
                field="Idempotency-Key",
            )
        return await self.drive_refund(row, payment)

    async def _refunds_taken(self, payment_id: uuid.UUID) -> int:
        rows = await db.refunds_of(self.pool, payment_id)
        return sum(r["amount_cents"] for r in rows if r["status"] not in ("failed", "canceled"))

    async def drive_refund(self, row: asyncpg.Record, payment: asyncpg.Record) -> asyncpg.Record:
        """Take a refund of ours as far as it goes: the debit (once), then Stripe (with the
        refund's own key), then the ledger in line with Stripe's answer."""
        if row["status"] == "failed":
            raise _RefundFailed(row["error_message"] or "the refund failed")
        if row["status"] in _REFUND_FINAL:
            return row
        if row["debited_at"] is None:
            # Idle money in the client's region wallets comes home first: a debit reaches the
            # funding wallet only.
            await self.wallets.gather(str(payment["client_id"]), _now_ms())
            try:
                await self.wallets.debit(
                    str(payment["client_id"]),
                    row["amount_cents"] * PUSD_PER_CENT,
                    key=f"stripe:refund:{row['id'].hex}",
                    rail=RAIL,
                    reference=payment["payment_intent_id"],
                    reason=row["reason"] or "card refund",
                    now_ms=_now_ms(),
                )
            except MarketError as exc:
                await db.record_refund(
                    self.pool,
                    row["id"],
                    stripe_refund_id=None,
                    status="failed",
                    error_message=exc.message,
                )
                raise PaymentConflict(
                    f"the balance no longer holds this amount: {exc.message}",
                    code="insufficient_funds",
                    field="amount_usd",
                ) from None
            await db.mark_debited(self.pool, row["id"])
        try:
            refund = await self.rail.refund(
                payment_intent_id=payment["payment_intent_id"],
                amount_cents=row["amount_cents"],
                idempotency_key=f"mnemo-refund-{row['id'].hex}",
                metadata={"mnemo_refund_id": row["id"].hex},
            )
        except (ValidationFailed, PaymentDeclined, IdempotencyConflict) as exc:
            row = await db.record_refund(
                self.pool,
                row["id"],
                stripe_refund_id=None,
                status="failed",
                error_message=exc.message,
            )
            await self._settle_refund(row, payment)
            raise _RefundFailed(exc.message) from None
        applied = await self.apply_refund(refund)
        assert applied is not None, "Stripe answered a refund of another payment"
        return applied

    async def apply_refund(self, refund: Refund) -> asyncpg.Record | None:
        """Record a Stripe refund as Stripe has it now and move the money once: the refund's row,
        or None if the refund is not of a payment of ours."""
        row = await db.refund_by_stripe_id(self.pool, refund.id)
        if row is None and (ours := refund.metadata.get("mnemo_refund_id")):
            try:
                row = await db.refund(self.pool, uuid.UUID(ours))
            except ValueError:
                row = None
        payment = None
        if refund.payment_intent is not None:
            payment = await db.payment_by_intent(self.pool, refund.payment_intent)
        if payment is None or (row is not None and row["payment_id"] != payment["id"]):
            return None
        if row is None:  # made in Stripe (the dashboard), not through Mnemo
            row, _ = await db.open_refund(
                self.pool,
                refund_id=uuid.uuid4(),
                payment_id=payment["id"],
                requested_by=None,
                idempotency_key=None,
                request_hash=None,
                amount_cents=refund.amount_cents,
                reason="refunded in Stripe",
                stripe_refund_id=refund.id,
                status=_refund_status(refund.status),
            )
            if row is None:  # another delivery of the same refund wrote it first
                row = await db.refund_by_stripe_id(self.pool, refund.id)
                assert row is not None
        row = await db.record_refund(
            self.pool, row["id"], stripe_refund_id=refund.id, status=_refund_status(refund.status)
        )
        await self._settle_refund(row, payment)
        return await db.refund(self.pool, row["id"])

    async def _settle_refund(self, row: asyncpg.Record, payment: asyncpg.Record) -> None:
        """Bring the ledger in line with the refund's status: debited while it stands, credited
        back once if Stripe failed it after the debit."""
        client = str(payment["client_id"])
        amount = row["amount_cents"] * PUSD_PER_CENT
        reference = row["stripe_refund_id"] or payment["payment_intent_id"]
        made_elsewhere = row["requested_by"] is None
        if row["status"] in ("failed", "canceled"):
            if row["debited_at"] is None and not made_elsewhere:
                return  # ours, refused before Stripe was asked: nothing was taken
            if row["reversed_at"] is not None:
                return
            if row["debited_at"] is None:
                # Made elsewhere and failed: the debit may have been applied just before a crash;
                # applying it now (a no-op if so) makes the reversal exact either way.
                await self._debit_refund(row, client, amount, reference, allow_negative=True)
            await self.wallets.credit(
                client,
                amount,
                key=f"stripe:refund-reversal:{row['id'].hex}",
                rail=RAIL,
                reference=reference,
                reason="card refund failed: credited back",
                now_ms=_now_ms(),
            )
            await db.mark_reversed(self.pool, row["id"])
            return
        if row["debited_at"] is None:
            await self._debit_refund(row, client, amount, reference, allow_negative=made_elsewhere)

    async def _debit_refund(
        self,
        row: asyncpg.Record,
        client: str,
        amount: int,
        reference: str,
        *,
        allow_negative: bool,
    ) -> None:
        await self.wallets.debit(
            client,
            amount,
            key=f"stripe:refund:{row['id'].hex}",
            rail=RAIL,
            reference=reference,
            reason=row["reason"] or "card refund",
            allow_negative=allow_negative,
            now_ms=_now_ms(),
        )
        await db.mark_debited(self.pool, row["id"])

    # -- webhook events --------------------------------------------------------------------------

    async def on_event(self, event: WebhookEvent) -> str:
        """Apply one verified webhook event (at most once to completion); what was done, in words."""
        if not await db.claim_event(self.pool, event.id, event.type, event.object_id):
            return "duplicate: already processed"
        outcome = await self._apply_event(event)
        await db.finish_event(self.pool, event.id, outcome)
        return outcome

    async def _apply_event(self, event: WebhookEvent) -> str:
        try:
            return await self._apply_object(event)
        except ValidationFailed as exc:  # Stripe refused to show the object: not one of ours
            return f"ignored: Stripe does not show {event.object_id} ({exc.message})"

    async def _ours(
        self, found: asyncpg.Record | None, obj: PaymentIntent | CheckoutSession
    ) -> asyncpg.Record | None:
        """The payment Stripe's object belongs to: the one that recorded it (`found`), else the
        one its metadata names (an event that came before our record of it); None: not ours."""
        if found is None and (ours := obj.metadata.get("mnemo_payment_id")):
            return await db.payment(self.pool, ours)
        return found

    async def _apply_object(self, event: WebhookEvent) -> str:
        if event.object_type == "payment_intent":
            pi = await self.rail.payment_intent(event.object_id)
            row = await self._ours(await db.payment_by_intent(self.pool, pi.id), pi)
            if row is None:
                return f"ignored: PaymentIntent {pi.id} is not a Mnemo payment"
            row = await self.apply_intent(row, pi)
            return f"payment {row['id'].hex} is {row['status']}"
        if event.object_type == "checkout.session":
            session = await self.rail.checkout_session(event.object_id)
            row = await self._ours(await db.payment_by_checkout(self.pool, session.id), session)
            if row is None:
                return f"ignored: Checkout Session {session.id} is not a Mnemo payment"
            row = await self.apply_session(row, session)
            return f"payment {row['id'].hex} is {row['status']}"
        if event.object_type == "refund":
            refund = await self.rail.refund_by_id(event.object_id)
            return _refund_outcome(refund, await self.apply_refund(refund))
        if event.object_type == "charge" and event.type.startswith("charge.refund"):
            pi_id = await self.rail.charge_payment_intent(event.object_id)
            if pi_id is None or await db.payment_by_intent(self.pool, pi_id) is None:
                return f"ignored: charge {event.object_id} is not of a Mnemo payment"
            outcomes = [
                _refund_outcome(r, await self.apply_refund(r))
                for r in await self.rail.refunds_of(pi_id)
            ]
            return "; ".join(outcomes) or "no refunds"
        return f"ignored: {event.type}"


def _must_match(row: asyncpg.Record, obj: PaymentIntent | CheckoutSession, kind: str) -> None:
    """Stripe's object is this payment's (its metadata names it) for its amount and currency;
    else nothing is credited (409 `payment_mismatch`, logged)."""
    if (
        obj.metadata.get("mnemo_payment_id") != row["id"].hex
        or obj.amount_cents != row["amount_cents"]
        or obj.currency != row["currency"]
    ):
        log.error(
            "%s %s does not match payment %s (%s %s, metadata %s): not credited",
            kind,
            obj.id,
            row["id"],
            obj.amount_cents,
            obj.currency,
            obj.metadata,
        )
        raise PaymentConflict(
            f"Stripe's {kind} does not match this payment", code="payment_mismatch"
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _with_query(url: str, **params: str) -> str:
    """`url` with `params` added to its query (before any fragment)."""
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params.items()])
    return urlunsplit(parts._replace(query=query))


class _RefundFailed(ApiError):
    code = "refund_failed"
    status = 409


def _refund_status(status: str) -> str:
    return status if status in ("pending", "requires_action", *_REFUND_FINAL) else "pending"


def _refund_outcome(refund: Refund, row: asyncpg.Record | None) -> str:
    if row is None:
        return f"ignored: refund {refund.id} is not of a Mnemo payment"
    return f"refund {row['id'].hex} is {row['status']}"
