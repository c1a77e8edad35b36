"""Solana: verifying SOL and SPL USDC payments with `solana`'s AsyncClient (jsonParsed RPC).

Binding a payment to its request, as Solana Pay does: each request has a reference key of its
own (a random public key) that the payer's wallet adds as a read-only account of the transfer
instruction (`reference=` of the request's `solana:` URI). The transfer pays the request only if
its transaction carries that key, so one transaction cannot pay two requests.

Verification (`SolVerifier.check`):
1. the cluster's genesis hash is the configured one (`getGenesisHash`: Solana's chain id);
2. `getSignatureStatuses` (history searched) knows the signature, without an error;
3. `getTransaction` (jsonParsed, `confirmed`, versioned transactions included): no `meta.err`;
   the request's reference key is among the message's account keys;
4. SOL: a System `transfer` to the receiving wallet, the amount being the wallet's lamport
   balance change; SPL: a Token (or Token-2022) `transfer`/`transferChecked` to a token account
   the receiving wallet owns, of the configured mint, the amount being that account's change
   in `post/preTokenBalances`. All instructions are scanned, inner ones too, never by position;
5. the payer, if named, is the transfer's source (SOL) or authority (SPL);
6. the block time is before the request lapsed;
7. final: `confirmationStatus` is `finalized` (or `confirmed` where the amount's tier allows).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2 as httpx
from solana.exceptions import SolanaRpcException
from solana.rpc.async_api import AsyncClient
from solana.rpc.commitment import Confirmed
from solders.pubkey import Pubkey
from solders.rpc.errors import InvalidParamsMessage
from solders.signature import Signature
from solders.transaction_status import (
    ParsedInstruction,
    TransactionConfirmationStatus,
    UiParsedMessage,
)

from engine.settings import CryptoSettings
from gateway.payments.chains.transfers import Expected, Refused, Transfer

__all__ = ["TOKEN_PROGRAMS", "SolVerifier"]

TOKEN_PROGRAMS = frozenset(
    {
        "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA",
        "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb",
    }
)
_SYSTEM_PROGRAM = "11111111111111111111111111111111"


def _parsed(message: Any, meta: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(program id, parsed) of every parsed instruction, top-level then inner."""
    instructions = list(message.instructions)
    for inner in meta.inner_instructions or ():
        instructions.extend(inner.instructions)
    for ix in instructions:
        if isinstance(ix, ParsedInstruction) and isinstance(ix.parsed, dict):
            yield str(ix.program_id), ix.parsed


def _token_accounts_of(meta: Any, keys: list[str], owner: str) -> set[str]:
    """The transaction's token accounts that `owner` holds (after it ran)."""
    return {
        keys[b.account_index]
        for b in meta.post_token_balances or ()
        if str(b.owner) == owner and b.account_index < len(keys)
    }


class SolVerifier:
    """Checks Solana payments against one cluster (see the module docstring)."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        genesis_hash: str,
        recipient: str,
        mint: str | None,
    ) -> None:
        self.client = client
        self.genesis_hash = genesis_hash
        self.recipient = recipient
        self.mint = mint

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: CryptoSettings) -> AsyncIterator[SolVerifier]:
        assert settings.sol_rpc_url and settings.sol_genesis_hash and settings.sol_recipient
        client = AsyncClient(settings.sol_rpc_url, timeout=10)
        try:
            yield cls(
                client,
                genesis_hash=settings.sol_genesis_hash,
                recipient=settings.sol_recipient,
                mint=settings.sol_usdc_mint,
            )
        finally:
            await client.close()

    @property
    def network(self) -> str:
        return f"solana:{self.genesis_hash}"

    @staticmethod
    def normalize(signature: str) -> str:
        """The signature in its canonical base-58 form."""
        try:
            return str(Signature.from_string(signature.strip()))
        except ValueError:
            raise Refused(
                "malformed_tx_hash", "a Solana signature is 64 bytes in base 58"
            ) from None

    @staticmethod
    def new_reference() -> str:
        """A fresh reference key (32 random bytes as a public key, as Solana Pay makes them)."""
        return str(Pubkey(os.urandom(32)))

    async def check(self, signature: str, expected: Expected) -> Transfer:
        try:
            return await self._check(Signature.from_string(signature), expected)
        except (OSError, httpx.HTTPError, SolanaRpcException) as exc:
            raise Refused("chain_unavailable", f"the Solana RPC failed: {exc}") from None

    async def _check(self, signature: Signature, expected: Expected) -> Transfer:
        genesis = str((await self.client.get_genesis_hash()).value)
        if genesis != self.genesis_hash:
            raise Refused(
                "wrong_chain",
                f"the RPC serves the cluster {genesis}, payments are taken on {self.genesis_hash}",
            )
        statuses = await self.client.get_signature_statuses(
            [signature], search_transaction_history=True
        )
        status = statuses.value[0]
        if status is None:
            raise Refused("tx_not_found", f"no transaction {signature} on this cluster")
        if status.err is not None:
            raise Refused("tx_failed", f"the transaction failed: {status.err}")
        response = await self.client.get_transaction(
            signature,
            encoding="jsonParsed",
            commitment=Confirmed,
            max_supported_transaction_version=0,
        )
        if isinstance(response, InvalidParamsMessage) or response.value is None:
            # Processed, not yet confirmed: its contents may still change.
            return Transfer(-1, 0, None, status.slot, None, False, None)
        found = response.value
        meta = found.transaction.meta
        message = found.transaction.transaction.message  # type: ignore[union-attr]
        if meta is None or not isinstance(message, UiParsedMessage):
            raise Refused("chain_unavailable", "the RPC did not answer in jsonParsed form")
        if meta.err is not None:
            raise Refused("tx_failed", f"the transaction failed: {meta.err}")
        # solders' stub names the transaction-status ParsedAccount's fields after another class
        keys = [str(account.pubkey) for account in message.account_keys]  # type: ignore[attr-defined]
        if expected.reference is not None and expected.reference not in keys:
            raise Refused(
                "wrong_reference",
                "the transaction does not carry this request's reference key",
            )
        if expected.token is None:
            amount, payer = self._sol(message, meta, keys, expected)
        else:
            amount, payer = self._spl(message, meta, keys, expected)
        if amount < expected.amount_base:
            raise Refused(
                "underpaid",
                f"received {amount} base units, the request needs {expected.amount_base}",
            )
        if expected.payer is not None and payer != expected.payer:
            raise Refused("wrong_payer", f"the transfer came from {payer}, not {expected.payer}")
        if found.block_time is not None and found.block_time > expected.expires_at_s:
            raise Refused(
                "request_expired", "the transaction landed after the payment request lapsed"
            )
        level = status.confirmation_status
        final = level == TransactionConfirmationStatus.Finalized or (
            expected.rule == "confirmed" and level == TransactionConfirmationStatus.Confirmed
        )
        return Transfer(-1, amount, payer, found.slot, None, final, None)

    def _token_transfers(self, message: Any, meta: Any) -> list[dict[str, Any]]:
        out = []
        for program, parsed in _parsed(message, meta):
            if program in TOKEN_PROGRAMS and parsed.get("type") in ("transfer", "transferChecked"):
                out.append(parsed.get("info") or {})
        return out

    def _sol(
        self, message: Any, meta: Any, keys: list[str], expected: Expected
    ) -> tuple[int, str | None]:
        to_us = [
            parsed.get("info") or {}
            for program, parsed in _parsed(message, meta)
            if program == _SYSTEM_PROGRAM
            and parsed.get("type") == "transfer"
            and (parsed.get("info") or {}).get("destination") == expected.pay_to
        ]
        if not to_us:
            owned = _token_accounts_of(meta, keys, expected.pay_to)
            if any(
                info.get("destination") in owned for info in self._token_transfers(message, meta)
            ):
                raise Refused("wrong_asset", "this request is paid in SOL, not in a token")
            raise Refused("wrong_recipient", f"no SOL transfer to {expected.pay_to}")
        index = keys.index(expected.pay_to)
        amount = int(meta.post_balances[index]) - int(meta.pre_balances[index])
        return amount, to_us[0].get("source")

    def _spl(
        self, message: Any, meta: Any, keys: list[str], expected: Expected
    ) -> tuple[int, str | None]:
        pre = {b.account_index: b for b in meta.pre_token_balances or ()}
        post = {b.account_index: b for b in meta.post_token_balances or ()}
        ours: list[tuple[dict[str, Any], int, str]] = []
        for info in self._token_transfers(message, meta):
            destination = info.get("destination")
            if destination not in keys:
                continue
            index = keys.index(destination)
            balance = post.get(index)
            if balance is None or str(balance.owner) != expected.pay_to:
                continue
            ours.append((info, index, str(balance.mint)))
        if not ours:
            system_to_us = any(
                program == _SYSTEM_PROGRAM
                and (parsed.get("info") or {}).get("destination") == expected.pay_to
                for program, parsed in _parsed(message, meta)
            )
            if system_to_us:
                raise Refused("wrong_asset", "this request is paid in the token, not in SOL")
            raise Refused(
                "wrong_recipient", f"no token transfer to an account of {expected.pay_to}"
            )
        of_mint = [o for o in ours if o[2] == expected.token]
        if not of_mint:
            raise Refused(
                "wrong_asset", f"the transfer is of mint {ours[0][2]}, not {expected.token}"
            )
        info, index, _ = of_mint[0]
        after = int(post[index].ui_token_amount.amount)
        before = int(pre[index].ui_token_amount.amount) if index in pre else 0
        payer = info.get("authority") or info.get("multisigAuthority")
        return after - before, payer
