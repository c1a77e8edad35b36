"""REST operations of the crypto rail (registered only when a chain is configured).

    POST /api/payments/crypto/requests        a renter's payment request: what to pay, where
    GET  /api/payments/crypto/requests        a client's requests (`?client_id=&status=&limit=`)
    GET  /api/payments/crypto/requests/{id}   the request and its payment (its user and admins)
    POST /api/payments/crypto                 submit a transaction (the spec's route and body,
                                              plus `request_id`): 200 credited, 202 pending
    GET  /api/payments/crypto/rates           the rates requests are priced with
    PUT  /api/payments/crypto/rates/{asset}   an operator sets a volatile asset's rate (admins)

Money on the wire: USD with `_pusd` twins, as everywhere; asset amounts as decimal strings
(`amount`) with their integer base units as strings (`amount_base`: wei exceed 2**53).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

import asyncpg
from msgspec import Meta, Struct

from engine.errors import NotFound
from gateway.errors import ApiError
from gateway.operations import Call, Link, Operation, Reply
from gateway.payments.crypto import CryptoRail, PaymentRefused, Quote
from gateway.protocol import Id, whole
from gateway.routes.accounts import RENTERS, owned_client
from gateway.schemas import to_pusd, to_usd
from persistence import crypto_payments as store

__all__ = ["OPERATIONS"]

Blockchain = Literal["ethereum", "solana"]
AssetSymbol = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=10,
        pattern=whole("[A-Z0-9]+"),
        description="ETH or the configured ERC-20 (e.g. USDC) on ethereum; SOL or USDC on solana.",
    ),
]
TxId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=100,
        pattern=whole("[A-Za-z0-9]+"),
        description="Ethereum: the tx hash (0x and 64 hex digits, any case). Solana: the "
        "transaction's signature (base 58).",
    ),
]
Wallet = Annotated[str, Meta(min_length=1, max_length=64, pattern=whole("[A-Za-z0-9]+"))]
RateText = Annotated[
    str,
    Meta(
        max_length=32,
        pattern=whole(r"[0-9]{1,18}(\.[0-9]{1,12})?"),
        description="USD per whole unit of the asset, an exact decimal (at most 12 places).",
        examples=["3012.55"],
    ),
]


class _Request(Struct, forbid_unknown_fields=True, kw_only=True):
    json_schema_rules: ClassVar[dict[str, Any]] = {}


class CryptoRequestCreate(_Request, kw_only=True):
    """Pay `amount_usd` in `asset` on `blockchain`, credited to `client_id`'s balance."""

    client_id: Id
    blockchain: Blockchain
    asset: AssetSymbol
    amount_usd: Annotated[float, Meta(ge=0.01, le=1_000_000.0)]


class CryptoSubmit(_Request, kw_only=True):
    """The spec's body (`blockchain`, `tx_hash`, `wallet_address`) plus the request it pays.
    `wallet_address`, if given, must be the transfer's sender."""

    request_id: Id
    blockchain: Blockchain
    tx_hash: TxId
    wallet_address: Wallet | None = None


class CryptoRequestQuery(_Request, kw_only=True):
    client_id: Id
    status: Literal["open", "pending", "credited"] | None = None
    limit: Annotated[int, Meta(ge=1, le=100)] = 20


class RateSet(_Request, kw_only=True):
    usd_per_unit: RateText


class CryptoPaymentOut(Struct, kw_only=True):
    """A transaction submitted for a request. `status`: pending (seen, not final), confirmed
    (final, being credited), credited, failed (`error_code`: e.g. tx_dropped by a reorg)."""

    request_id: str
    blockchain: str
    network: str
    tx_hash: str
    log_index: int
    status: str
    amount_base: str
    payer: str | None
    block_number: int | None
    confirmations: int | None
    error_code: str | None
    error_message: str | None
    first_seen_at: dt.datetime
    credited_at: dt.datetime | None
    credited_usd: float
    credited_pusd: int


class CryptoRequestOut(Struct, kw_only=True):
    """A payment request: send `amount` (`amount_base` base units) of `asset` to `pay_to` (with
    `reference` among the transfer's keys, on Solana) before `expires_at`; `payment_uri` says
    the same for a wallet (EIP-681 / Solana Pay)."""

    id: str
    client_id: str
    blockchain: str
    network: str
    asset: str
    token: str | None
    amount_usd: float
    amount_pusd: int
    amount: str
    amount_base: str
    decimals: int
    usd_per_unit: str
    rate_set_at: dt.datetime | None
    pay_to: str
    reference: str | None
    payment_uri: str
    status: str
    created_at: dt.datetime
    expires_at: dt.datetime
    credited_at: dt.datetime | None
    payment: CryptoPaymentOut | None = None


class CryptoRequestList(Struct, kw_only=True):
    requests: list[CryptoRequestOut]


class RateOut(Struct, kw_only=True):
    asset: str
    usd_per_unit: str
    fixed: bool
    set_at: dt.datetime | None
    max_age_s: int | None
    stale: bool


class RateList(Struct, kw_only=True):
    rates: list[RateOut]


class _Refused(ApiError):
    pass


def _refusal(exc: PaymentRefused) -> ApiError:
    error = _Refused(exc.message, field=exc.field, code=exc.code)
    error.status = exc.status
    return error


def _rail(call: Call) -> CryptoRail:
    rail: CryptoRail = call.state.crypto
    return rail


def _units(amount_base: int, decimals: int) -> str:
    text = format(Decimal(amount_base).scaleb(-decimals), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _uri(row: asyncpg.Record) -> str:
    amount_base = int(row["amount_base"])
    if row["blockchain"] == "ethereum":
        chain = row["network"].split(":", 1)[1]
        if row["token"] is None:
            return f"ethereum:{row['pay_to']}@{chain}?value={amount_base}"
        return f"ethereum:{row['token']}@{chain}/transfer?address={row['pay_to']}&uint256={amount_base}"
    uri = f"solana:{row['pay_to']}?amount={_units(amount_base, row['decimals'])}"
    if row["token"] is not None:
        uri += f"&spl-token={row['token']}"
    return uri + f"&reference={row['reference']}&label=Mnemo"


def _payment_out(row: asyncpg.Record, request: asyncpg.Record) -> CryptoPaymentOut:
    credited = int(request["amount_pusd"]) if row["status"] == "credited" else 0
    return CryptoPaymentOut(
        request_id=str(row["request_id"]),
        blockchain=request["blockchain"],
        network=row["network"],
        tx_hash=row["tx_id"],
        log_index=row["log_index"],
        status=row["status"],
        amount_base=str(int(row["amount_base"])),
        payer=row["payer"],
        block_number=row["block_number"],
        confirmations=row["confirmations"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        first_seen_at=row["first_seen_at"],
        credited_at=row["credited_at"],
        credited_usd=to_usd(credited),
        credited_pusd=credited,
    )


def _request_out(row: asyncpg.Record, payment: asyncpg.Record | None) -> CryptoRequestOut:
    return CryptoRequestOut(
        id=str(row["id"]),
        client_id=str(row["client_id"]),
        blockchain=row["blockchain"],
        network=row["network"],
        asset=row["asset"],
        token=row["token"],
        amount_usd=to_usd(int(row["amount_pusd"])),
        amount_pusd=int(row["amount_pusd"]),
        amount=_units(int(row["amount_base"]), row["decimals"]),
        amount_base=str(int(row["amount_base"])),
        decimals=row["decimals"],
        usd_per_unit=_decimal_text(row["usd_per_unit"]),
        rate_set_at=row["rate_set_at"],
        pay_to=row["pay_to"],
        reference=row["reference"],
        payment_uri=_uri(row),
        status=row["status"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        credited_at=row["credited_at"],
        payment=None if payment is None else _payment_out(payment, row),
    )


def _decimal_text(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _rate_out(quote: Quote) -> RateOut:
    return RateOut(
        asset=quote.asset,
        usd_per_unit=_decimal_text(quote.usd_per_unit),
        fixed=quote.set_at is None,
        set_at=quote.set_at,
        max_age_s=quote.max_age_s,
        stale=quote.stale(dt.datetime.now(dt.UTC)),
    )


async def _owned_request(call: Call, request_id: str, field: str) -> asyncpg.Record:
    row = await store.request(call.state.pool, request_id)
    if row is None or (str(row["user_id"]) != call.user.user_id and not call.user.is_admin):
        raise NotFound("no such payment request", field=field)
    return row


# ---------------------------------------------------------------------------------------------
# Handlers


async def create_request(call: Call) -> Reply:
    body: CryptoRequestCreate = call.body
    client = await owned_client(call.state.pool, call.user, body.client_id)
    try:
        row = await _rail(call).create_request(
            client_id=str(client["id"]),
            user_id=str(client["user_id"]),
            blockchain=body.blockchain,
            symbol=body.asset,
            amount_pusd=to_pusd(body.amount_usd),
        )
    except PaymentRefused as exc:
        raise _refusal(exc) from None
    return Reply(_request_out(row, None))


async def get_request(call: Call) -> CryptoRequestOut:
    row = await _owned_request(call, call.path["request_id"], "request_id")
    # One snapshot: a payment credited meanwhile shows with its request credited too.
    async with call.state.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            payment = await store.payment_for_request(conn, row["id"])
            fresh = await store.request(conn, str(row["id"]))
    assert fresh is not None
    return _request_out(fresh, payment)


async def list_requests(call: Call) -> CryptoRequestList:
    query: CryptoRequestQuery = call.query
    client = await owned_client(call.state.pool, call.user, query.client_id)
    async with call.state.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await store.requests_of_client(conn, client["id"], query.status, query.limit)
            payments = await store.payments_for_requests(conn, [r["id"] for r in rows])
    return CryptoRequestList(requests=[_request_out(r, payments.get(r["id"])) for r in rows])


async def submit(call: Call) -> Reply:
    body: CryptoSubmit = call.body
    request = await _owned_request(call, body.request_id, "request_id")
    try:
        row = await _rail(call).submit(
            request, blockchain=body.blockchain, tx_id=body.tx_hash, payer=body.wallet_address
        )
    except PaymentRefused as exc:
        raise _refusal(exc) from None
    fresh = await store.request(call.state.pool, str(request["id"]))
    assert fresh is not None
    return Reply(_payment_out(row, fresh), status=200 if row["status"] == "credited" else 202)


async def list_rates(call: Call) -> RateList:
    return RateList(rates=[_rate_out(q) for q in await _rail(call).quotes()])


async def set_rate(call: Call) -> RateOut:
    body: RateSet = call.body
    asset = call.path["asset"]
    try:
        quote = await _rail(call).set_rate(asset, Decimal(body.usd_per_unit), call.user.user_id)
    except PaymentRefused as exc:
        raise _refusal(exc) from None
    return _rate_out(quote)


_REFUSALS = (404, 409, 422, 503)

OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/payments/crypto/requests",
        create_request,
        name="create_crypto_request",
        summary="Ask to pay an amount of USD in ETH, an ERC-20, SOL or SPL USDC",
        description=(
            "Prices the amount at the asset's current rate (refused with 503 `rate_unavailable` "
            "if none is set or it is older than its bound) and binds it to a deposit address of "
            "its own (Ethereum) or a reference key (Solana)."
        ),
        tag="payments",
        body=CryptoRequestCreate,
        response=CryptoRequestOut,
        status=201,
        roles=RENTERS,
        idempotent=True,
        limit="writes",
        errors=(403, 422, 409, 503),
        links={
            "Submit": Link("submit_crypto_payment", body={"request_id": "$response.body#/id"}),
            "Get": Link("get_crypto_request", {"request_id": "$response.body#/id"}),
        },
    ),
    Operation(
        "GET",
        "/api/payments/crypto/requests",
        list_requests,
        name="list_crypto_requests",
        summary="A client's payment requests, newest first, each with its payment",
        tag="payments",
        query=CryptoRequestQuery,
        response=CryptoRequestList,
        errors=(403,),
    ),
    Operation(
        "GET",
        "/api/payments/crypto/requests/{request_id}",
        get_request,
        name="get_crypto_request",
        summary="A payment request and its payment (its user and admins only)",
        tag="payments",
        response=CryptoRequestOut,
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/payments/crypto",
        submit,
        name="submit_crypto_payment",
        summary="Submit a transaction that pays a request; 200 credited, 202 pending finality",
        description=(
            "Verified on chain: chain id or genesis hash, success, recipient, asset (token "
            "contract or mint), amount in base units, the request's binding, finality. A "
            "transaction credits once: submitted again for the same request it answers the "
            "same; for another request it is refused (409 `tx_already_used`)."
        ),
        tag="payments",
        body=CryptoSubmit,
        response=CryptoPaymentOut,
        roles=RENTERS,
        limit="writes",
        errors=_REFUSALS,
        other_responses={202: CryptoPaymentOut},
    ),
    Operation(
        "GET",
        "/api/payments/crypto/rates",
        list_rates,
        name="list_crypto_rates",
        summary="The USD rates crypto requests are priced with, and whether each is stale",
        tag="payments",
        response=RateList,
    ),
    Operation(
        "PUT",
        "/api/payments/crypto/rates/{asset}",
        set_rate,
        name="set_crypto_rate",
        summary="Set a volatile asset's USD rate (admins); requests are refused once it is stale",
        tag="payments",
        body=RateSet,
        response=RateOut,
        roles=frozenset({"admin"}),
        errors=(409, 422),
        path_types={"asset": AssetSymbol},
    ),
]
