"""The gateway's one error shape, and the one place that maps failures to HTTP status codes.

Every error leaves the API as `{"error": {"code": str, "message": str, "field"?: str}}` (the
`ErrorBody` of `gateway.protocol`, whose `ErrorDetail` the WebSocket's errors carry too) with a
4xx (or, for a bug or a lost dependency, a 5xx that never carries internals). `code` is stable
and machine-readable; `field` names the offending input (a dotted path into the body or a query
parameter) when there is one.

Sources of errors and where they map:
- `engine.errors.MarketError` subclasses, raised by the market (`NotFound` 404, `Conflict`,
  `CapacityTaken`, `Unavailable` 409, `InvalidRequest` 422, `PaymentRequired` 402 with the
  shortfall in the body, `TooManyOpen` 429),
- `ApiError` subclasses raised by the gateway itself (auth 401/403, validation 422, body size 413,
  rate limits 429 with `Retry-After`, idempotency conflicts 409),
- msgspec decoding/validation errors of bodies and query strings (400/422),
- Starlette's `HTTPException` (unknown path 404, wrong method 405),
- a lost store (Redis or PostgreSQL unreachable, its connection dropped or timed out, the Redis
  pool exhausted past its timeout, a cluster's fail-over that outlasted the market's wait, a
  change a replica did not confirm): 503 `unavailable` with `Retry-After`, logged once per
  request as a warning; the request may be retried (nothing was changed, or its idempotency key
  makes the retry safe: a change's outcome may be unknown, so retry it with the same
  `Idempotency-Key`),
- anything else: 500 `internal_error`, logged with its traceback, message generic.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import asyncpg
import msgspec
from redis.exceptions import ClusterDownError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from engine.errors import (
    CapacityTaken,
    Conflict,
    InvalidRequest,
    MarketError,
    NotFound,
    PaymentRequired,
    TooManyOpen,
    Unavailable,
)
from gateway.protocol import ErrorBody, ErrorDetail

__all__ = [
    "ERROR_HANDLERS",
    "ApiError",
    "BadRequest",
    "Forbidden",
    "IdempotencyConflict",
    "PayloadTooLarge",
    "RateLimited",
    "Unauthorized",
    "UnsupportedMediaType",
    "ValidationFailed",
    "client_error_response",
    "error_body",
    "error_response",
    "from_msgspec",
    "named_as",
]

log = logging.getLogger("mnemo.gateway")


_encode = msgspec.json.Encoder().encode


class ApiError(Exception):
    """An error the gateway reports to the caller. Subclasses fix `code` and `status`."""

    code = "bad_request"
    status = 400

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def __str__(self) -> str:
        return f"{self.message} ({self.field})" if self.field else self.message


class BadRequest(ApiError):
    """The request cannot be read at all (malformed JSON, wrong encoding)."""

    code = "malformed_request"
    status = 400


class Unauthorized(ApiError):
    """No credentials, or credentials that are unknown, expired or revoked."""

    code = "unauthorized"
    status = 401

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": 'Bearer realm="mnemo"'})


class Forbidden(ApiError):
    """Authenticated, but this principal may not do this (role or object ownership)."""

    code = "forbidden"
    status = 403


class ValidationFailed(ApiError):
    """Well-formed input that breaks a rule (type, bound, unknown field, coordinate...)."""

    code = "validation_error"
    status = 422


class PayloadTooLarge(ApiError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(ApiError):
    code = "unsupported_media_type"
    status = 415


class IdempotencyConflict(ApiError):
    """An `Idempotency-Key` reused with another body, or still in flight."""

    code = "idempotency_conflict"
    status = 409


class RateLimited(ApiError):
    """Too many requests; `retry_after_s` goes into the `Retry-After` header (whole seconds, >= 1)."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        seconds = max(1, int(-(-retry_after_s // 1)))
        super().__init__(message, code=code, headers={"Retry-After": str(seconds)})
        self.retry_after_s = seconds


# The one table from market errors to HTTP (subclasses first: the first isinstance match wins).
_MARKET_STATUS: tuple[tuple[type[MarketError], int], ...] = (
    (PaymentRequired, 402),
    (TooManyOpen, 429),
    (InvalidRequest, 422),
    (NotFound, 404),
    (CapacityTaken, 409),
    (Unavailable, 409),
    (Conflict, 409),
)


def market_status(exc: MarketError) -> int:
    """HTTP status of a market refusal."""
    for cls, status in _MARKET_STATUS:
        if isinstance(exc, cls):
            return status
    return exc.status if 400 <= exc.status < 500 else 400


def error_body(
    code: str, message: str, field: str | None = None, shortfall_pusd: int | None = None
) -> bytes:
    """The JSON bytes of one error (a 402 says its shortfall)."""
    return _encode(
        ErrorBody(
            ErrorDetail(
                code=code,
                message=message,
                field=field,
                shortfall_usd=None if shortfall_pusd is None else shortfall_pusd / 10**12,
                shortfall_pusd=shortfall_pusd,
            )
        )
    )


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    shortfall_pusd: int | None = None,
) -> Response:
    """A JSON error response in the one shape."""
    return Response(
        error_body(code, message, field, shortfall_pusd),
        status_code=status,
        headers=dict(headers or {}),
        media_type="application/json",
    )


_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]*)`")
_MISSING = re.compile(r"missing required field `(?P<name>[^`]*)`")


def from_msgspec(exc: msgspec.DecodeError, *, where: str = "body") -> ApiError:
    """Turn a msgspec decode/validation error into a 400/422 naming the field.

    msgspec reports `Expected `int` >= 0 - at `$.items[0].ram_gb``; the field becomes
    `items[0].ram_gb`. Unknown and missing fields are named from the message.
    """
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return BadRequest(f"malformed JSON {where}: {text}", field=None)
    field: str | None = None
    message = text
    if m := _PATH.search(text):
        message = text[: m.start()]
        field = m.group("path").lstrip(".") or None
    if m := _UNKNOWN.search(text):
        name = m.group("name")
        field = f"{field}.{name}" if field else name
    elif m := _MISSING.search(text):
        name = m.group("name")
        field = f"{field}.{name}" if field else name
    return ValidationFailed(message, field=field)


def client_error_response(exc: Exception) -> Response | None:
    """The response for a client error (gateway, market or decoding), or None for anything else."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
    if isinstance(exc, PaymentRequired):
        return error_response(
            402, exc.code, exc.message, exc.field, shortfall_pusd=exc.shortfall_pusd
        )
    if isinstance(exc, MarketError):
        return error_response(market_status(exc), exc.code, exc.message, exc.field)
    if isinstance(exc, msgspec.DecodeError):
        api = from_msgspec(exc)
        return error_response(api.status, api.code, api.message, api.field)
    return None


async def _client_error(request: Request, exc: Exception) -> Response:
    response = client_error_response(exc)
    assert response is not None
    return response


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), None, exc.headers)


STORE_LOST: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    ConnectionError,
    ClusterDownError,
)
"""What a request raises when Redis or PostgreSQL cannot be reached (a network error is an
`OSError`: `ConnectionError` covers refused and reset; Redis' own classes wrap the rest)."""

RETRY_AFTER_S = 1
"""The `Retry-After` of a 503: the gateway's clients reconnect within about this long."""


async def _store_lost(request: Request, exc: Exception) -> Response:
    log.warning(
        "%s %s: a store is unreachable (%s: %s)",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
    )
    return error_response(
        503,
        "unavailable",
        "the exchange cannot reach its store right now; retry shortly",
        None,
        {"Retry-After": str(RETRY_AFTER_S)},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    # ServerErrorMiddleware calls this and then re-raises, so the server logs the traceback too;
    # the caller gets no internals.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


ERROR_HANDLERS: dict[Any, Any] = {
    ApiError: _client_error,
    MarketError: _client_error,
    msgspec.DecodeError: _client_error,
    HTTPException: _http_exception,
    **dict.fromkeys(STORE_LOST, _store_lost),
    Exception: _unexpected,
}
"""Starlette `exception_handlers` for `create_app`."""


@contextlib.contextmanager
def named_as(**api_names: str) -> Iterator[None]:
    """Market refusals raised inside name the request's fields as this API does (the market
    names its own: `duration_s` for the body's `duration_sec`)."""
    try:
        yield
    except MarketError as exc:
        if exc.field in api_names:
            exc.field = api_names[exc.field]
        raise
