"""API operations: every REST route declared once, with its types, for dispatch and for OpenAPI.

An `Operation` names its method and path, the Structs of its query string, body and response,
whether it needs a principal and which roles, and whether it honours `Idempotency-Key`. `route()`
turns it into a Starlette route whose endpoint, in this order:
1. authenticates (401) and checks the role (403), then counts the call against the account's
   `limit` if the operation names one (429 with `Retry-After`; even a call that fails later
   counts, so malformed floods are paced too),
2. checks path parameters against their types (a malformed id names nothing: 404),
3. decodes the query string and the body into their Structs (400/413/415/422, field named),
4. runs the handler (under the idempotency store for creating POSTs with the header),
5. encodes the handler's Struct as JSON with the operation's status.
The OpenAPI document (`gateway.openapi`) is generated from the same Operations, so what is
documented is what is enforced.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.errors import NotFound
from gateway.auth import Principal, authenticate
from gateway.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
    client_error_response,
    from_msgspec,
)
from gateway.idempotency import Produced, check_key
from gateway.schemas import JSON_ENCODER, Id, Region

__all__ = ["ApiRoute", "Call", "Link", "Operation", "Reply", "route"]

_CANONICAL = msgspec.json.Encoder(order="sorted")


class Reply:
    """A handler's answer when it needs more than "the Struct, with the operation's status"."""

    __slots__ = ("body", "headers", "status", "stored")

    def __init__(
        self,
        body: Any,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        stored: Any = None,
    ) -> None:
        self.body = body
        self.status = status
        self.headers = dict(headers or {})
        self.stored = stored
        """What an idempotency record keeps instead of `body` (a copy without secrets)."""


class Call:
    """One request as a handler sees it: the principal, the decoded inputs, the app's services."""

    __slots__ = ("body", "path", "principal", "query", "request")

    def __init__(
        self,
        request: Request,
        principal: Principal | None,
        path: dict[str, Any],
        query: Any,
        body: Any,
    ) -> None:
        self.request = request
        self.principal = principal
        self.path = path
        self.query = query
        self.body = body

    @property
    def user(self) -> Principal:
        """The principal of an authenticated operation."""
        assert self.principal is not None, "operation declared auth=False"
        return self.principal

    @property
    def state(self) -> Any:
        """The lifespan state (see `gateway.app.AppState`)."""
        return self.request.state

    @staticmethod
    def now_ms() -> int:
        return time.time_ns() // 1_000_000


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Link:
    """An OpenAPI link from an operation's success to the operation its answer feeds: which
    parameters (by name: path, query) and body fields take which runtime expression
    (`$response.body#/node_id`, `$request.body#/client_id`). Clients and schemathesis' stateful
    phase follow them from the operations that create objects to those that use their ids."""

    operation: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    """One REST operation (see the module docstring)."""

    method: str
    path: str
    handler: Handler
    name: str
    summary: str
    tag: str
    response: Any = None
    status: int = 200
    body: Any = None
    query: Any = None
    auth: bool = True
    roles: frozenset[str] | None = None
    """Roles allowed; None: any authenticated principal."""
    idempotent: bool = False
    description: str = ""
    errors: tuple[int, ...] = ()
    """Statuses this operation can answer besides the common ones (documented in OpenAPI)."""
    path_types: dict[str, Any] = field(default_factory=dict)
    other_responses: dict[int, Any] = field(default_factory=dict)
    """Statuses answered with a body other than the error shape (status -> Struct)."""
    max_body_bytes: int | None = None
    """The largest body this operation reads; None: the settings' `max_body_bytes`."""
    links: Mapping[str, Link] = field(default_factory=dict)
    other_media: tuple[str, ...] = ()
    """Other media types the success response may come in (a text body, e.g. `text/html`)."""
    """OpenAPI links of its success response, by name."""
    limit: str | None = None
    """A `gateway.ratelimit` rule counted per account on every call (e.g. "writes")."""

    def path_type(self, name: str) -> Any:
        """The type of a path parameter: declared, else Region for `region`, else Id."""
        if name in self.path_types:
            return self.path_types[name]
        return Region if name == "region" else Id


class ApiRoute(Route):
    """A Starlette route that carries its Operation (for OpenAPI and the authorization tests)."""

    def __init__(
        self, operation: Operation, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> None:
        super().__init__(
            operation.path, endpoint=endpoint, methods=[operation.method], name=operation.name
        )
        self.operation = operation


def route(op: Operation) -> ApiRoute:
    """The Starlette route serving `op`."""
    path_types = {name: op.path_type(name) for name in _path_names(op.path)}
    body_decoder = msgspec.json.Decoder(op.body) if op.body is not None else None
    all_optional = op.body is not None and _all_optional(op.body)

    async def endpoint(request: Request) -> Response:
        principal: Principal | None = None
        if op.auth:
            principal = await authenticate(request)
            if op.roles is not None and principal.role not in op.roles:
                allowed = " or ".join(sorted(op.roles))
                raise Forbidden(f"this needs the role {allowed}")
            if op.limit is not None:
                await request.state.limiter.hit(op.limit, principal.user_id)
        path: dict[str, Any] = {}
        for name, path_type in path_types.items():
            path[name] = _path_value(path_type, request.path_params[name], name)
        query = _decode_query(request, op.query) if op.query is not None else None
        body = None
        if body_decoder is not None:
            raw = await _read_body(
                request, op.max_body_bytes or request.state.settings.max_body_bytes
            )
            if not raw.strip() and all_optional:
                raw = b"{}"
            try:
                body = body_decoder.decode(raw)
            except msgspec.ValidationError as exc:
                body = _with_whole_floats(raw, op.body, exc)
            except msgspec.DecodeError as exc:
                raise from_msgspec(exc) from None
        call = Call(request, principal, path, query, body)
        if op.idempotent and principal is not None:
            raw_key = request.headers.get("idempotency-key")
            if raw_key is not None:
                key = check_key(raw_key)
                store = request.state.idempotency
                fingerprint = store.fingerprint(
                    op.method, request.url.path, _CANONICAL.encode(body)
                )
                return await store.run(
                    principal.user_id, key, fingerprint, lambda: _produce_stored(op, call)
                )
        return _render(op, await op.handler(call))

    endpoint.__name__ = op.name
    endpoint.__doc__ = op.summary
    return ApiRoute(op, endpoint)


def _render(op: Operation, result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, Reply):
        return Response(
            JSON_ENCODER.encode(result.body),
            status_code=result.status or op.status,
            headers=result.headers,
            media_type="application/json",
        )
    return Response(
        JSON_ENCODER.encode(result), status_code=op.status, media_type="application/json"
    )


async def _produce_stored(op: Operation, call: Call) -> Produced:
    try:
        result = await op.handler(call)
    except Exception as exc:
        response = client_error_response(exc)
        if response is None:
            raise
        return Produced(response, bytes(response.body))
    response = _render(op, result)
    if isinstance(result, Reply) and result.stored is not None:
        return Produced(response, JSON_ENCODER.encode(result.stored))
    return Produced(response, bytes(response.body))


def _path_names(path: str) -> list[str]:
    names = []
    for part in path.split("{")[1:]:
        names.append(part.split("}", 1)[0].split(":", 1)[0])
    return names


def _path_value(path_type: Any, raw: str, name: str) -> Any:
    try:
        return msgspec.convert(raw, path_type)
    except msgspec.ValidationError:
        raise NotFound(f"no such {name.removesuffix('_id')}", field=name) from None


def _all_optional(struct_type: Any) -> bool:
    info = msgspec.inspect.type_info(struct_type)
    assert isinstance(info, msgspec.inspect.StructType)
    return all(not f.required for f in info.fields)


def _with_whole_floats(raw: bytes, body_type: Any, exc: msgspec.ValidationError) -> Any:
    """The body decoded again with every number of JSON value integral (`4.0`, `1e3`) taken as
    the integer it is: JSON Schema's `integer` (the OpenAPI document's) admits them, msgspec's
    strict decoding does not. Only integral floats change (never strings: `"4"` stays refused),
    and only when the strict decoding failed on a float, so the common body is decoded once."""
    if "got `float`" not in str(exc):
        raise from_msgspec(exc) from None
    try:
        return msgspec.convert(_whole(msgspec.json.decode(raw)), body_type)
    except msgspec.ValidationError as again:
        raise from_msgspec(again) from None


def _whole(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


def _decode_query(request: Request, query_type: Any) -> Any:
    params = request.query_params
    values: dict[str, Any] = {}
    for name in params:
        found = params.getlist(name)
        if len(found) > 1:
            raise ValidationFailed(f"query parameter {name!r} given more than once", field=name)
        values[name] = found[0]
    try:
        query = msgspec.convert(values, query_type, strict=False)
    except msgspec.ValidationError as exc:
        raise from_msgspec(exc, where="query") from None
    # Lax conversion reads the text "null" as None, i.e. as if the parameter were absent; a
    # parameter that is present must have a value of its type.
    for name in values:
        if getattr(query, name, ...) is None:
            raise ValidationFailed(f"{name!r} needs a value", field=name)
    return query


async def _read_body(request: Request, limit: int) -> bytes:
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType("send the body as application/json", field="Content-Type")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("malformed Content-Length", field="Content-Length") from None
        if size > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes", field="Content-Length")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
