"""The crypto rail: payment requests, verification of submitted transactions, and crediting.

The flow (README, "Crypto payments"):
1. `create_request`: a renter asks to pay an amount of USD in an asset (ETH or the ERC-20 on
   Ethereum, SOL or USDC on Solana). The amount is priced in the asset's integer base units at
   a rate no older than its bound (`Rates`), rounded up, and bound to the request: a deposit
   address of its own (Ethereum) or a reference key the transfer must carry (Solana).
2. The renter pays, then `submit`s the transaction (`POST /api/payments/crypto`).
3. The chain's verifier checks it. Refused: a 4xx naming why, nothing recorded. Not yet final:
   recorded `pending` (202), and the re-check loop (`run_rechecks`, in every gateway process)
   looks again until it is final (credited) or gone (a reorg dropped it: `failed`, never
   credited). Final: recorded `confirmed`, then credited, then `credited` (200).

Never twice: a transfer's row is keyed (network, tx id, log index) whatever its state, and the
credit is asked of the market under the same key (`credit_key`), which it applies once. The same
transaction submitted again for the same request answers the recorded result; for another
request it is refused (`tx_already_used`); a second transfer for a request that has one is
refused (`request_already_paid`). Hashes are normalised first (case, `0x`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any, Protocol

import asyncpg

from engine.settings import CryptoSettings
from engine.types import PUSD_PER_USD
from gateway.payments.chains.eth import DepositKeys, EthVerifier, normalize_tx_hash
from gateway.payments.chains.transfers import (
    REFUSALS,
    Expected,
    Refused,
    Transfer,
    finality_rule,
)
from persistence import crypto_payments as store

__all__ = [
    "Asset",
    "CreditFn",
    "CryptoRail",
    "PaymentRefused",
    "Quote",
    "RateUnavailable",
    "open_rail",
]

log = logging.getLogger("mnemo.payments.crypto")

_RECHECK_BATCH = 50
_RECHECK_LEASE_S = 60.0


class CreditFn(Protocol):
    """The market's crediting primitive (`engine.market.Market.credit`): applies the credit once
    per `key`, in one script call, and logs it for the ledger."""

    def __call__(
        self,
        account_id: str,
        amount_pusd: int,
        *,
        key: str,
        rail: str,
        reference: str,
        reason: str,
        now_ms: int,
    ) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class Asset:
    blockchain: str
    symbol: str
    token: str | None
    decimals: int


class PaymentRefused(Exception):
    """A request or submission refused; `code` is stable, `status` its HTTP status."""

    def __init__(self, code: str, message: str, status: int, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.field = field


class RateUnavailable(PaymentRefused):
    def __init__(self, message: str) -> None:
        super().__init__("rate_unavailable", message, 503)


@dataclass(frozen=True, slots=True)
class Quote:
    """A rate: USD per whole unit of an asset, and when it was set (None: fixed by config)."""

    asset: str
    usd_per_unit: Decimal
    set_at: datetime | None
    max_age_s: int | None

    def stale(self, now: datetime) -> bool:
        if self.set_at is None or self.max_age_s is None:
            return False
        return now - self.set_at > timedelta(seconds=self.max_age_s)


def base_units(amount_pusd: int, usd_per_unit: Decimal, decimals: int) -> int:
    """The asset's base units that buy `amount_pusd`, rounded up (never a float)."""
    pusd_per_unit = usd_per_unit * PUSD_PER_USD
    exact = Decimal(amount_pusd) * (Decimal(10) ** decimals) / pusd_per_unit
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def _network_key(network: str, tx_id: str, log_index: int) -> str:
    return f"crypto:{network}:{tx_id}:{log_index}"


class CryptoRail:
    """The crypto payment rail of one gateway process (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: CryptoSettings,
        credit: CreditFn,
        *,
        eth: EthVerifier | None = None,
        deposits: DepositKeys | None = None,
        sol: Any = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.credit = credit
        self.eth = eth
        self.deposits = deposits
        self.sol = sol
        self._fixed = {asset: Decimal(rate) for asset, rate in settings.fixed_rates}

    # -- assets and rates ---------------------------------------------------------------------

    def assets(self) -> list[Asset]:
        """The assets this exchange takes, by chain."""
        s = self.settings
        found = []
        if self.eth is not None:
            found.append(Asset("ethereum", "ETH", None, 18))
            if s.eth_token_address:
                found.append(
                    Asset("ethereum", s.eth_token_symbol, s.eth_token_address, s.eth_token_decimals)
                )
        if self.sol is not None:
            found.append(Asset("solana", "SOL", None, 9))
            if s.sol_usdc_mint:
                found.append(Asset("solana", "USDC", s.sol_usdc_mint, s.sol_usdc_decimals))
        return found

    def asset(self, blockchain: str, symbol: str) -> Asset:
        for asset in self.assets():
            if asset.blockchain == blockchain and asset.symbol == symbol:
                return asset
        chains = {a.blockchain for a in self.assets()}
        if blockchain not in chains:
            raise PaymentRefused(
                "chain_not_accepted",
                f"this exchange takes no payments on {blockchain}",
                422,
                "blockchain",
            )
        taken = ", ".join(a.symbol for a in self.assets() if a.blockchain == blockchain)
        raise PaymentRefused(
            "asset_not_accepted", f"on {blockchain} this exchange takes {taken}", 422, "asset"
        )

    def is_fixed(self, symbol: str) -> bool:
        return symbol in self._fixed

    async def quote(self, symbol: str) -> Quote:
        """The rate of `symbol`: fixed by configuration, else the operator's latest."""
        if symbol in self._fixed:
            return Quote(symbol, self._fixed[symbol], None, None)
        row = await store.latest_rate(self.pool, symbol)
        if row is None:
            raise RateUnavailable(f"no rate for {symbol} has been set by an operator")
        return Quote(symbol, row["usd_per_unit"], row["set_at"], self.settings.rate_max_age_s)

    async def quotes(self) -> list[Quote]:
        symbols = sorted({a.symbol for a in self.assets()})
        found = []
        for symbol in symbols:
            with contextlib.suppress(RateUnavailable):
                found.append(await self.quote(symbol))
        return found

    async def set_rate(self, symbol: str, usd_per_unit: Decimal, user_id: str) -> Quote:
        if symbol in self._fixed:
            raise PaymentRefused(
                "rate_fixed",
                f"the rate of {symbol} is fixed by MNEMO_RATE_{symbol}_USD",
                409,
                "asset",
            )
        if symbol not in {a.symbol for a in self.assets()}:
            raise PaymentRefused("asset_not_accepted", f"no chain here takes {symbol}", 422)
        row = await store.add_rate(self.pool, symbol, usd_per_unit, user_id)
        return Quote(symbol, row["usd_per_unit"], row["set_at"], self.settings.rate_max_age_s)

    # -- requests ------------------------------------------------------------------------------

    async def create_request(
        self, *, client_id: str, user_id: str, blockchain: str, symbol: str, amount_pusd: int
    ) -> asyncpg.Record:
        """A new payment request priced now; its row."""
        asset = self.asset(blockchain, symbol)
        quote = await self.quote(symbol)
        now = datetime.now(UTC)
        if quote.stale(now):
            raise RateUnavailable(
                f"the {symbol} rate was set at {quote.set_at:%Y-%m-%dT%H:%M:%SZ}, longer ago than "
                f"{self.settings.rate_max_age_s} s: an operator must set it again"
            )
        amount_base = base_units(amount_pusd, quote.usd_per_unit, asset.decimals)
        values: dict[str, Any] = {
            "client_id": client_id,
            "user_id": user_id,
            "blockchain": blockchain,
            "asset": symbol,
            "token": asset.token,
            "amount_pusd": amount_pusd,
            "amount_base": Decimal(amount_base),
            "decimals": asset.decimals,
            "usd_per_unit": quote.usd_per_unit,
            "rate_set_at": quote.set_at,
            "expires_at": now + timedelta(seconds=self.settings.request_ttl_s),
        }
        if blockchain == "ethereum":
            assert self.eth is not None and self.deposits is not None
            values["network"] = self.eth.network
            while True:
                index = await store.next_derivation_index(self.pool)
                try:
                    values["pay_to"] = self.deposits.address(index)
                except ValueError:
                    continue  # BIP-32's invalid child (p < 2**-127): take the next index
                values["derivation_index"] = index
                break
        else:
            assert self.sol is not None
            values["network"] = self.sol.network
            values["pay_to"] = self.settings.sol_recipient
            values["reference"] = self.sol.new_reference()
        return await store.create_request(self.pool, **values)

    def _expected(self, request: asyncpg.Record, payer: str | None) -> Expected:
        s = self.settings
        tiers = s.eth_finality if request["blockchain"] == "ethereum" else s.sol_finality
        return Expected(
            pay_to=request["pay_to"],
            token=request["token"],
            amount_base=int(request["amount_base"]),
            reference=request["reference"],
            payer=payer,
            expires_at_s=int(request["expires_at"].timestamp()),
            rule=finality_rule(tiers, int(request["amount_pusd"])),
        )

    def _verifier(self, blockchain: str) -> Any:
        verifier = self.eth if blockchain == "ethereum" else self.sol
        if verifier is None:
            raise PaymentRefused(
                "chain_not_accepted", f"this exchange takes no payments on {blockchain}", 422
            )
        return verifier

    def normalize(self, blockchain: str, tx_id: str) -> str:
        try:
            if blockchain == "ethereum":
                return normalize_tx_hash(tx_id)
            return str(self._verifier(blockchain).normalize(tx_id))
        except Refused as exc:
            raise PaymentRefused(exc.code, exc.message, 422, "tx_hash") from None

    # -- submissions ---------------------------------------------------------------------------

    async def submit(
        self, request: asyncpg.Record, *, blockchain: str, tx_id: str, payer: str | None
    ) -> asyncpg.Record:
        """Verify `tx_id` as the payment of `request`; the payment row (pending, credited), or
        `PaymentRefused`."""
        if blockchain != request["blockchain"]:
            raise PaymentRefused(
                "wrong_chain",
                f"this request is paid on {request['blockchain']}, not {blockchain}",
                422,
                "blockchain",
            )
        verifier = self._verifier(blockchain)
        tx_id = self.normalize(blockchain, tx_id)
        network = request["network"]
        if verifier.network != network:
            raise PaymentRefused(
                "wrong_chain",
                f"this request was made on {network}; the exchange now verifies {verifier.network}",
                422,
                "blockchain",
            )
        rows = await store.payments_of_tx(self.pool, network, tx_id)
        for row in rows:
            if row["request_id"] == request["id"]:
                return await self._answer_recorded(row, request, payer)
        used = PaymentRefused(
            "tx_already_used",
            "this transaction was submitted as the payment of another request",
            409,
            "tx_hash",
        )
        if any(row["log_index"] == -1 for row in rows):
            raise used  # the whole transaction (ETH, a Solana signature) pays another request
        try:
            transfer = await verifier.check(tx_id, self._expected(request, payer))
        except Refused as exc:
            if rows and exc.code != "chain_unavailable":
                # A token transaction that pays another request, and nothing to this one.
                raise used from None
            raise PaymentRefused(exc.code, exc.message, _status(exc.code), "tx_hash") from None
        values = {
            "network": network,
            "tx_id": tx_id,
            "log_index": transfer.log_index,
            "request_id": request["id"],
            "status": "confirmed" if transfer.final else "pending",
            "amount_base": Decimal(transfer.amount_base),
            "payer": transfer.payer,
            "block_number": transfer.block_number,
            "block_hash": transfer.block_hash,
            "confirmations": transfer.confirmations,
            "credit_key": _network_key(network, tx_id, transfer.log_index),
            "next_check_at": datetime.now(UTC)
            + timedelta(seconds=self.settings.recheck_interval_s),
        }
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await store.record_payment(conn, **values)
        except store.PaymentTaken as taken:
            if taken.which == "request":
                raise PaymentRefused(
                    "request_already_paid",
                    "this request is paid by another transaction",
                    409,
                    "tx_hash",
                ) from None
            # A concurrent submission of the same transfer won: answer as it did.
            winner = await store.payment(self.pool, network, tx_id, transfer.log_index)
            if winner is None or winner["request_id"] != request["id"]:
                raise used from None
            return await self._answer_recorded(winner, request, payer)
        if row["status"] == "confirmed":
            row = await self._credit(row, request)
        return row

    async def _answer_recorded(
        self, row: asyncpg.Record, request: asyncpg.Record, payer: str | None
    ) -> asyncpg.Record:
        """A transfer submitted again for its request: the recorded result, or a fresh look if
        it is not settled yet (pending, or dropped and perhaps back)."""
        if row["status"] == "credited":
            return row
        if row["status"] == "failed" and row["error_code"] != "tx_dropped":
            raise PaymentRefused(
                row["error_code"], row["error_message"], _status(row["error_code"]), "tx_hash"
            )
        return await self._recheck(row, request, payer)

    async def _recheck(
        self, row: asyncpg.Record, request: asyncpg.Record, payer: str | None
    ) -> asyncpg.Record:
        """Look at a recorded transfer again: credit it once final, fail it once gone."""
        if row["status"] == "confirmed":
            return await self._credit(row, request)
        verifier = self._verifier(request["blockchain"])
        key = (row["network"], row["tx_id"], row["log_index"])
        try:
            transfer: Transfer = await verifier.check(row["tx_id"], self._expected(request, payer))
        except Refused as exc:
            if exc.code == "chain_unavailable":
                raise PaymentRefused(exc.code, exc.message, 503) from None
            if exc.code in ("wrong_payer",):
                raise PaymentRefused(exc.code, exc.message, 422, "wallet_address") from None
            code = "tx_dropped" if exc.code == "tx_not_found" else exc.code
            message = (
                "the transaction left the chain (a reorganisation or an eviction) before it "
                "was final; it was not credited"
                if code == "tx_dropped"
                else exc.message
            )
            if row["status"] != "failed":
                async with self.pool.acquire() as conn, conn.transaction():
                    await store.update_payment(
                        conn, key, status="failed", error_code=code, error_message=message
                    )
                    await store.fail_request_payment(conn, request["id"])
            raise PaymentRefused(code, message, _status(code), "tx_hash") from None
        changes: dict[str, Any] = {
            "status": "confirmed" if transfer.final else "pending",
            "amount_base": Decimal(transfer.amount_base),
            "payer": transfer.payer,
            "block_number": transfer.block_number,
            "block_hash": transfer.block_hash,
            "confirmations": transfer.confirmations,
            "error_code": None,
            "error_message": None,
        }
        if transfer.block_number is not None and transfer.log_index != row["log_index"]:
            # First seen in the mempool (no log yet); now mined: the key takes its log index.
            changes["log_index"] = transfer.log_index
            changes["credit_key"] = _network_key(row["network"], row["tx_id"], transfer.log_index)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await store.update_payment(conn, key, **changes)
                if row["status"] in ("pending", "confirmed"):
                    await conn.execute(
                        "UPDATE crypto_requests SET status = 'pending' "
                        "WHERE id = $1 AND status = 'open'",
                        request["id"],
                    )
        except store.PaymentTaken as taken:
            code = "request_already_paid" if taken.which == "request" else "tx_already_used"
            raise PaymentRefused(
                code, "another payment holds this request or transfer", 409, "tx_hash"
            ) from None
        if row["status"] == "confirmed":
            row = await self._credit(row, request)
        return row

    async def _credit(self, row: asyncpg.Record, request: asyncpg.Record) -> asyncpg.Record:
        """Credit a confirmed payment (once per key, whoever calls), then mark it credited."""
        await self.credit(
            str(request["client_id"]),
            int(request["amount_pusd"]),
            key=row["credit_key"],
            rail="eth" if request["blockchain"] == "ethereum" else "sol",
            reference=row["tx_id"],
            reason=f"crypto payment request {request['id']} ({request['asset']})",
            now_ms=time.time_ns() // 1_000_000,
        )
        return await store.mark_credited(self.pool, row["network"], row["tx_id"], row["log_index"])

    # -- the re-check loop ---------------------------------------------------------------------

    async def recheck_due(self) -> int:
        """Re-check every payment whose turn came (pending: finality or a reorg; confirmed: its
        credit); how many were looked at."""
        rows = await store.claim_due(self.pool, limit=_RECHECK_BATCH, lease_s=_RECHECK_LEASE_S)
        if not rows:
            return 0
        requests = await store.requests_of(self.pool, [r["request_id"] for r in rows])
        for row in rows:
            request = requests[row["request_id"]]
            try:
                await self._recheck(row, request, None)
            except PaymentRefused as exc:
                if exc.code == "chain_unavailable":
                    log.warning("payment %s: %s; retried later", row["tx_id"], exc.message)
                else:
                    log.info("payment %s failed: %s", row["tx_id"], exc.message)
                continue
            except Exception:
                log.exception("re-checking payment %s failed; retried later", row["tx_id"])
                continue
            delay = self.settings.recheck_interval_s
            await self.pool.execute(
                "UPDATE crypto_payments SET next_check_at = now() + make_interval(secs => $4) "
                "WHERE network = $1 AND tx_id = $2 AND log_index = $3 "
                "AND status IN ('pending', 'confirmed')",
                row["network"],
                row["tx_id"],
                row["log_index"],
                delay,
            )
        return len(rows)

    async def run_rechecks(self, stop: asyncio.Event | None = None) -> None:
        """Re-check due payments every `recheck_interval_s` until cancelled (or `stop`)."""
        interval = self.settings.recheck_interval_s
        while stop is None or not stop.is_set():
            started = time.monotonic()
            try:
                while await self.recheck_due() == _RECHECK_BATCH:
                    pass
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("payment re-checks paused: %s", exc)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


def _status(code: str) -> int:
    return REFUSALS.get(code, 422)


@contextlib.asynccontextmanager
async def open_rail(
    pool: asyncpg.Pool, settings: CryptoSettings, credit: CreditFn
) -> AsyncIterator[CryptoRail]:
    """The rail with its chain clients open (closed on exit)."""
    async with contextlib.AsyncExitStack() as stack:
        eth = deposits = sol = None
        if settings.eth_rpc_url is not None:
            from web3 import AsyncWeb3
            from web3.providers import AsyncHTTPProvider

            assert settings.eth_chain_id is not None and settings.eth_xpub is not None
            w3 = AsyncWeb3(AsyncHTTPProvider(settings.eth_rpc_url))
            stack.push_async_callback(w3.provider.disconnect)
            eth = EthVerifier(w3, chain_id=settings.eth_chain_id, token=settings.eth_token_address)
            deposits = DepositKeys(settings.eth_xpub)
        if settings.sol_rpc_url is not None:
            from gateway.payments.chains.solana import SolVerifier

            sol = await stack.enter_async_context(SolVerifier.open(settings))
        yield CryptoRail(pool, settings, credit, eth=eth, deposits=deposits, sol=sol)
