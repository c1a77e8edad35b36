"""Errors of the market. Small classes with a useful `str`; the gateway maps `code` to HTTP.

A lost race (a reserve that finds the capacity gone) is a normal outcome and is reported as a
`CapacityTaken` result by the adapter, which callers may also raise to the HTTP layer.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "CapacityTaken",
    "Conflict",
    "InsufficientFunds",
    "InsufficientStake",
    "InvalidRequest",
    "MarketError",
    "NotFound",
    "OutsideTerms",
    "PaymentRequired",
    "TooManyOpen",
    "Unavailable",
]


class MarketError(Exception):
    """Base class. `code` is machine-readable and stable; `field` names the offending input."""

    code = "market_error"
    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.message} ({self.field})" if self.field else self.message


class InvalidRequest(MarketError):
    """The input breaks a rule (negative size, zero total, price cap <= 0, bad coordinate...)."""

    code = "invalid_request"
    status = 422


class OutsideTerms(InvalidRequest):
    """The request breaks the node's standing terms (an extension past its `max_duration_s`):
    not a race to retry elsewhere but a request to change."""

    code = "outside_node_terms"


class NotFound(MarketError):
    code = "not_found"
    status = 404


class Conflict(MarketError):
    """The object is not in a state that allows this change (settled contract, filled bid...)."""

    code = "conflict"
    status = 409


class CapacityTaken(MarketError):
    """The node no longer has the capacity (or terms) asked for: someone else reserved it first."""

    code = "capacity_taken"
    status = 409


class InsufficientStake(MarketError):
    """The node's stake does not cover the lease (engine.trust.required_stake): it takes no
    new lease until its provider locks more."""

    code = "insufficient_stake"
    status = 409


class Unavailable(MarketError):
    """The node is not taking new leases (offline, maintenance, deactivated, ask expired)."""

    code = "node_unavailable"
    status = 409


class PaymentRequired(MarketError):
    """Money refusals (issue 14): `shortfall_pusd` is what would have to come in first."""

    code = "payment_required"
    status = 402

    def __init__(self, message: str, *, field: str | None = None, shortfall_pusd: int = 0) -> None:
        super().__init__(message, field=field)
        self.shortfall_pusd = shortfall_pusd


class InsufficientFunds(PaymentRequired):
    """The renter's balance (with its credit line) cannot cover the hold or debit asked for."""

    code = "insufficient_funds"


class BudgetExceeded(PaymentRequired):
    """The hold would take the month's spend past the renter's `budget_monthly_usd`."""

    code = "budget_exceeded"


class TooManyOpen(MarketError):
    """The user already has as many open contracts (or resting bids) in the region as allowed."""

    code = "too_many_open"
    status = 429
