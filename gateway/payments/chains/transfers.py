"""What a chain verifier is asked and what it answers, whatever the chain.

A verifier is given a transaction id and what the payment request expects (`Expected`) and
either returns the matching `Transfer` (final or not yet) or raises `Refused` with a stable code.
It reads the chain and nothing else: no database, no market, no clock but the chain's own.
Amounts are integers of the asset's base units (wei, token units, lamports), never floats.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.settings import FinalityTier

__all__ = ["REFUSALS", "Expected", "Refused", "Transfer", "finality_rule"]

REFUSALS: dict[str, int] = {
    "malformed_tx_hash": 422,
    "wrong_chain": 422,
    "tx_not_found": 404,
    "tx_failed": 422,
    "wrong_recipient": 422,
    "wrong_asset": 422,
    "wrong_reference": 422,
    "wrong_payer": 422,
    "underpaid": 422,
    "request_expired": 422,
    "tx_dropped": 422,
    "chain_unavailable": 503,
}
"""Every refusal code a verifier raises, with its HTTP status."""


class Refused(Exception):
    """The chain says this transaction does not pay the request; `code` is one of `REFUSALS`."""

    def __init__(self, code: str, message: str) -> None:
        assert code in REFUSALS, code
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class Expected:
    """What a payment request expects of the transfer that pays it."""

    pay_to: str
    """Ethereum: the request's deposit address; Solana: the receiving wallet (the owner of the
    token account for SPL)."""
    token: str | None
    """The ERC-20 contract or the SPL mint; None for the chain's own coin."""
    amount_base: int
    reference: str | None
    """Solana: the reference key the transaction must carry; Ethereum: None."""
    payer: str | None
    """The wallet the payer says it paid from (the spec's `wallet_address`), checked if given."""
    expires_at_s: int
    """A transfer in a block later than this (Unix seconds) is refused (the quote lapsed)."""
    rule: str
    """Finality: a number of confirmations, `finalized` or (Solana) `confirmed`."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """The transfer that pays a request, as the chain shows it now."""

    log_index: int
    """The ERC-20 Transfer log's index; -1 for a whole transaction (native ETH, Solana)."""
    amount_base: int
    payer: str | None
    block_number: int | None
    """The block (Ethereum) or slot (Solana) that holds it."""
    block_hash: str | None
    final: bool
    confirmations: int | None
    """Blocks on top of it, counting its own (Ethereum); Solana: None."""


def finality_rule(tiers: tuple[FinalityTier, ...], amount_pusd: int) -> str:
    """The rule of the first tier whose bound covers `amount_pusd`."""
    for tier in tiers:
        if tier.max_pusd is None or amount_pusd <= tier.max_pusd:
            return tier.rule
    return tiers[-1].rule
