"""Accounts: sign-up, tokens, API keys, and renter profiles (clients).

Who may do what:
- sign-up and token: anyone (rate limited per client address; failed logins per account);
- `/api/auth/me`, API keys: the authenticated user, on their own keys only (another user's key id
  is answered 404, as if it did not exist);
- clients: renters (`user`) and admins create them; a client is visible to its user and admins.
`owned_client()` is how every other route checks that a `client_id` belongs to the caller.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg

from engine.errors import NotFound
from gateway.auth import (
    Principal,
    hash_password,
    new_api_key,
    verify_password,
)
from gateway.errors import ApiError, Forbidden, Unauthorized, ValidationFailed
from gateway.operations import Call, Link, Operation, Reply
from gateway.schemas import (
    ApiKeyCreated,
    ApiKeyCreateRequest,
    ApiKeyList,
    ApiKeyOut,
    ClientCreateRequest,
    ClientList,
    ClientOut,
    MeResponse,
    SignupRequest,
    SignupResponse,
    TokenRequest,
    TokenResponse,
    UserOut,
)
from persistence import accounts

__all__ = ["OPERATIONS", "RENTERS", "check_login", "first_client", "owned_client", "user_out"]

RENTERS = frozenset({"user", "admin"})


class EmailTaken(ApiError):
    code = "email_taken"
    status = 409


def user_out(row: asyncpg.Record) -> UserOut:
    return UserOut(
        id=str(row["id"]),
        email=row["email"],
        role=row["role"],
        full_name=row["full_name"],
        organization=row["organization"],
        created_at=row["created_at"],
    )


def _key_out(row: asyncpg.Record) -> ApiKeyOut:
    return ApiKeyOut(
        id=str(row["id"]),
        prefix=row["prefix"],
        name=row["name"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def client_out(row: asyncpg.Record) -> ClientOut:
    return ClientOut(
        id=str(row["id"]),
        user_id=str(row["user_id"]),
        org_name=row["org_name"],
        default_region=row["default_region"],
        latitude=_float(row["latitude"]),
        longitude=_float(row["longitude"]),
        budget_monthly_usd=_float(row["budget_monthly_usd"]),
        current_spend_usd=float(row["current_spend_usd"]),
        prefer_local=row["prefer_local"],
        max_latency_ms=_float(row["max_latency_ms"]),
        min_reliability=_float(row["min_reliability"]),
        created_at=row["created_at"],
        current_spend_pusd=int(row["current_spend_pusd"]),
    )


# ---------------------------------------------------------------------------------------------
# Helpers for the other routes


async def owned_client(
    pool: asyncpg.Pool, principal: Principal, client_id: str, *, field: str = "client_id"
) -> asyncpg.Record:
    """The client row if it belongs to the caller (admins: any client), else 403 naming `field`.

    Unknown and foreign ids are answered alike, so ids of other tenants cannot be probed.
    """
    row = await accounts.client(pool, client_id)
    if row is None or (str(row["user_id"]) != principal.user_id and not principal.is_admin):
        raise Forbidden("client_id is not one of your clients", field=field)
    return row


async def first_client(pool: asyncpg.Pool, principal: Principal) -> asyncpg.Record | None:
    """The caller's oldest client profile (their default), if any."""
    return await accounts.first_client(pool, principal.user_id)


async def client_ids_of(pool: asyncpg.Pool, principal: Principal) -> list[str]:
    return await accounts.client_ids(pool, principal.user_id)


# ---------------------------------------------------------------------------------------------
# Auth


async def signup(call: Call) -> Reply:
    body: SignupRequest = call.body
    state = call.state
    await state.limiter.hit("signup_ip", _client_address(call))
    email = body.email.strip()
    password_hash = await hash_password(body.password)
    key, prefix, key_hash = new_api_key()
    created_rows = await accounts.create_user(
        state.pool,
        email=email,
        password_hash=password_hash,
        role=body.role,
        full_name=body.full_name,
        organization=body.organization,
        key_prefix=prefix,
        key_hash=key_hash,
        key_name="default",
    )
    if created_rows is None:
        raise EmailTaken("an account with this email exists", field="email")
    user, key_row = created_rows
    created = ApiKeyCreated(
        id=str(key_row["id"]),
        prefix=key_row["prefix"],
        name=key_row["name"],
        key=key,
        created_at=key_row["created_at"],
    )
    return Reply(SignupResponse(user=user_out(user), api_key=created))


async def check_login(call: Call, email: str, password: str) -> asyncpg.Record:
    """The user row (id, role) for an email and password, under the sign-in limits (per client
    address, failures per account), the login stamped; else Unauthorized or RateLimited. Shared
    by the token route and the web app's sign-in (`gateway.web.session`)."""
    state = call.state
    email = email.strip().lower()
    await state.limiter.hit("token_ip", _client_address(call))
    await state.limiter.check("login_failures", email)
    row = await accounts.user_for_login(state.pool, email)
    ok, rehash = await verify_password(row["password_hash"] if row else None, password)
    if not ok or row is None:
        await state.limiter.hit("login_failures", email)
        raise Unauthorized("wrong email or password", code="invalid_credentials")
    await state.limiter.reset("login_failures", email)
    new_hash = await hash_password(password) if rehash else None
    await accounts.record_login(state.pool, str(row["id"]), new_hash)
    return row


async def token(call: Call) -> TokenResponse:
    body: TokenRequest = call.body
    row = await check_login(call, body.email, body.password)
    access_token, ttl_s = call.state.auth.issue_token(str(row["id"]), row["role"])
    return TokenResponse(access_token=access_token, token_type="bearer", expires_in=ttl_s)


async def me(call: Call) -> MeResponse:
    row = await accounts.user(call.state.pool, call.user.user_id)
    if row is None:
        raise Unauthorized("this account no longer exists", code="invalid_token")
    return MeResponse(user=user_out(row), via=call.user.via)


def _client_address(call: Call) -> str:
    client = call.request.client
    return client.host if client is not None else "unknown"


# ---------------------------------------------------------------------------------------------
# API keys


async def create_api_key(call: Call) -> Reply:
    body: ApiKeyCreateRequest = call.body
    state = call.state
    await state.limiter.hit("api_key_create", call.user.user_id)
    key, prefix, key_hash = new_api_key()
    row = await accounts.add_api_key(
        state.pool, call.user.user_id, prefix=prefix, key_hash=key_hash, name=body.name
    )
    fields: dict[str, Any] = {
        "id": str(row["id"]),
        "prefix": row["prefix"],
        "name": row["name"],
        "created_at": row["created_at"],
    }
    # The stored copy (for Idempotency-Key replays) never holds the key.
    return Reply(ApiKeyCreated(key=key, **fields), stored=ApiKeyCreated(key=None, **fields))


async def list_api_keys(call: Call) -> ApiKeyList:
    rows = await accounts.api_keys(call.state.pool, call.user.user_id)
    return ApiKeyList(api_keys=[_key_out(r) for r in rows])


async def revoke_api_key(call: Call) -> ApiKeyOut:
    row = await accounts.revoke_api_key(call.state.pool, call.path["key_id"], call.user.user_id)
    if row is None:
        raise NotFound("no such API key", field="key_id")
    call.state.auth.forget_key(row["key_hash"])
    return _key_out(row)


# ---------------------------------------------------------------------------------------------
# Clients


async def create_client(call: Call) -> ClientOut:
    body: ClientCreateRequest = call.body
    if (body.latitude is None) != (body.longitude is None):
        raise ValidationFailed(
            "give latitude and longitude together",
            field="longitude" if body.longitude is None else "latitude",
        )
    row = await accounts.add_client(
        call.state.pool,
        call.user.user_id,
        org_name=body.org_name,
        default_region=body.default_region,
        latitude=body.latitude,
        longitude=body.longitude,
        budget_monthly_usd=body.budget_monthly_usd,
        prefer_local=body.prefer_local,
        max_latency_ms=body.max_latency_ms,
        min_reliability=body.min_reliability,
    )
    return client_out(row)


async def list_clients(call: Call) -> ClientList:
    rows = await accounts.clients(call.state.pool, call.user.user_id)
    return ClientList(clients=[client_out(r) for r in rows])


async def get_client(call: Call) -> ClientOut:
    row = await accounts.client(call.state.pool, call.path["client_id"])
    if row is None or (str(row["user_id"]) != call.user.user_id and not call.user.is_admin):
        raise NotFound("no such client", field="client_id")
    return client_out(row)


OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/auth/signup",
        signup,
        name="signup",
        summary="Create an account; returns the user and a first API key (shown once)",
        tag="accounts",
        body=SignupRequest,
        response=SignupResponse,
        status=201,
        auth=False,
        errors=(409, 429),
    ),
    Operation(
        "POST",
        "/api/auth/token",
        token,
        name="token",
        summary="Exchange email and password for a JWT (HS256)",
        tag="accounts",
        body=TokenRequest,
        response=TokenResponse,
        auth=False,
        errors=(401, 429),
    ),
    Operation(
        "GET",
        "/api/auth/me",
        me,
        name="me",
        summary="The authenticated user",
        tag="accounts",
        response=MeResponse,
    ),
    Operation(
        "POST",
        "/api/auth/api-keys",
        create_api_key,
        name="create_api_key",
        links={
            "RevokeKey": Link("revoke_api_key", {"key_id": "$response.body#/id"}),
        },
        summary="Create an API key (shown once; only its hash is kept)",
        tag="accounts",
        body=ApiKeyCreateRequest,
        response=ApiKeyCreated,
        status=201,
        idempotent=True,
        errors=(429,),
    ),
    Operation(
        "GET",
        "/api/auth/api-keys",
        list_api_keys,
        name="list_api_keys",
        summary="The caller's API keys (prefixes only)",
        tag="accounts",
        response=ApiKeyList,
    ),
    Operation(
        "DELETE",
        "/api/auth/api-keys/{key_id}",
        revoke_api_key,
        name="revoke_api_key",
        summary="Revoke one of the caller's API keys",
        tag="accounts",
        response=ApiKeyOut,
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/clients",
        create_client,
        name="create_client",
        links={
            "GetClient": Link("get_client", {"client_id": "$response.body#/id"}),
            "Spending": Link("client_spending", {"client_id": "$response.body#/id"}),
            "Contracts": Link("list_contracts", {"client_id": "$response.body#/id"}),
            "Bids": Link("list_bids", {"client_id": "$response.body#/id"}),
            "RequestMatches": Link("request_matches", body={"client_id": "$response.body#/id"}),
            "PlaceBid": Link("place_bid", body={"client_id": "$response.body#/id"}),
            "Balance": Link("client_balance", {"client_id": "$response.body#/id"}),
            "Credit": Link("admin_credit", {"client_id": "$response.body#/id"}),
            "Clawback": Link("admin_clawback", {"client_id": "$response.body#/id"}),
            "CreditLine": Link("admin_credit_line", {"client_id": "$response.body#/id"}),
            "Invoice": Link("client_invoice", {"client_id": "$response.body#/id"}),
        },
        summary="Create a renter profile (the spec's clients table)",
        tag="clients",
        body=ClientCreateRequest,
        response=ClientOut,
        status=201,
        roles=RENTERS,
        idempotent=True,
    ),
    Operation(
        "GET",
        "/api/clients",
        list_clients,
        name="list_clients",
        links={
            "GetClient": Link("get_client", {"client_id": "$response.body#/clients/0/id"}),
            "RequestMatches": Link(
                "request_matches", body={"client_id": "$response.body#/clients/0/id"}
            ),
            "PlaceBid": Link("place_bid", body={"client_id": "$response.body#/clients/0/id"}),
        },
        summary="The caller's renter profiles",
        tag="clients",
        response=ClientList,
    ),
    Operation(
        "GET",
        "/api/clients/{client_id}",
        get_client,
        name="get_client",
        links={
            "RequestMatches": Link("request_matches", body={"client_id": "$response.body#/id"}),
            "PlaceBid": Link("place_bid", body={"client_id": "$response.body#/id"}),
        },
        summary="One renter profile (its user and admins only)",
        tag="clients",
        response=ClientOut,
        errors=(404,),
    ),
]
