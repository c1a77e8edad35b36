"""Providers' Stripe Connect accounts: onboarding (`POST /api/payments/connect/onboard`) and
its state (`GET /api/payments/connect`).

A provider gets one Express account (created once: the Stripe idempotency key is derived from
the user, and the account id is kept in `connect_accounts`); each onboarding call answers a
fresh one-time link to Stripe's hosted form, where Stripe collects identity and bank details.
Payouts (`gateway.payments.stripe_payouts`) go only to accounts whose `transfers` capability
Stripe reports active. Providers and admins only (an admin onboards an account of their own).
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from engine.errors import NotFound
from gateway.operations import Call, Operation, route
from gateway.payments.stripe_rail import PaymentsOff, StripeRail
from gateway.protocol import whole
from gateway.routes.nodes import PROVIDERS
from persistence import accounts, payouts

__all__ = ["OPERATIONS", "ConnectAccountOut", "OnboardRequest", "routes"]

Url = Annotated[
    str,
    Meta(
        min_length=8,
        max_length=2000,
        pattern=whole(r"https?://[^\s\x00-\x1f\x7f]+"),
        description="An absolute http(s) URL.",
    ),
]


class OnboardRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Where Stripe sends the provider back: `return_url` when the form is done (or left),
    `refresh_url` when the link has expired (call onboard again from there for a new one)."""

    return_url: Url
    refresh_url: Url


class ConnectAccountOut(Struct, kw_only=True):
    account_id: str
    """The Stripe Connect account (`acct_...`)."""
    transfers_active: bool
    """Stripe accepts transfers to it: payouts can be made."""
    details_submitted: bool
    onboarding_url: str | None = None
    """A one-time link to Stripe's hosted onboarding (onboard only; it expires in minutes)."""


def _rail(call: Call) -> StripeRail:
    cards = call.state.cards
    if cards is None:
        raise PaymentsOff("Stripe is not configured here (MNEMO_STRIPE_SECRET_KEY)")
    rail: StripeRail = cards.rail
    return rail


async def _account(call: Call, rail: StripeRail) -> str:
    """The caller's Connect account id, created at Stripe (once) if it has none."""
    pool = call.state.pool
    row = await payouts.connect_account(pool, call.user.user_id)
    if row is not None:
        account_id: str = row["stripe_account_id"]
        return account_id
    user = await accounts.user(pool, call.user.user_id)
    assert user is not None
    created = await rail.create_express_account(
        email=user["email"],
        user_id=call.user.user_id,
        idempotency_key=f"mnemo-connect-{call.user.user_id}",
    )
    row = await payouts.add_connect_account(pool, call.user.user_id, created.id)
    account_id = row["stripe_account_id"]
    return account_id


async def _refreshed(call: Call, rail: StripeRail, account_id: str) -> ConnectAccountOut:
    state = await rail.account(account_id)
    await payouts.set_account_state(
        call.state.pool,
        call.user.user_id,
        transfers_active=state.transfers_active,
        details_submitted=state.details_submitted,
    )
    return ConnectAccountOut(
        account_id=account_id,
        transfers_active=state.transfers_active,
        details_submitted=state.details_submitted,
    )


async def onboard(call: Call) -> ConnectAccountOut:
    body: OnboardRequest = call.body
    rail = _rail(call)
    account_id = await _account(call, rail)
    url = await rail.onboarding_link(
        account_id, refresh_url=body.refresh_url, return_url=body.return_url
    )
    out = await _refreshed(call, rail, account_id)
    out.onboarding_url = url
    return out


async def get_account(call: Call) -> ConnectAccountOut:
    rail = _rail(call)
    row = await payouts.connect_account(call.state.pool, call.user.user_id)
    if row is None:
        raise NotFound(
            "no Stripe account yet: POST /api/payments/connect/onboard", field="account_id"
        )
    return await _refreshed(call, rail, row["stripe_account_id"])


OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/payments/connect/onboard",
        onboard,
        name="connect_onboard",
        summary="Onboard to Stripe Connect for payouts (a one-time link to Stripe's form)",
        tag="payments",
        body=OnboardRequest,
        response=ConnectAccountOut,
        roles=PROVIDERS,
        limit="writes",
        errors=(502, 503),
    ),
    Operation(
        "GET",
        "/api/payments/connect",
        get_account,
        name="connect_account",
        summary="The caller's Stripe Connect account and whether it can be paid",
        tag="payments",
        response=ConnectAccountOut,
        roles=PROVIDERS,
        errors=(404, 502, 503),
    ),
]

routes = [route(op) for op in OPERATIONS]
