"""The OpenAPI 3.1 document, generated from the Operations' msgspec Structs, and a docs page.

Schemas come from `msgspec.json.schema_components`, i.e. from the very Structs that decode the
requests, with their bounds and patterns; query Structs become query parameters; path parameters
take their types from the Operation. Each operation lists the statuses it can answer: its success,
and the errors its shape allows (401/403 when authenticated, 404 with path parameters, 400/413/
415/422 with a body, 422 with a query string, 409 and 422 with `Idempotency-Key`, 429 with a
per-account `limit`, and its own).
Routes mounted from elsewhere (analytics) that are not Operations are listed with their path
parameters and a `default` response, so a client sees them without the gateway guessing their
shapes. WebSocket routes are not part of an OpenAPI document.

`/docs` renders the document with Swagger UI, entirely from this origin: Swagger UI's files come
from the installed swagger-ui-py package (no CDN, so the page works offline and behind a
firewall), the page's script is a file of its own, and its Content-Security-Policy allows no
inline script and no other origin.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.operations import ApiRoute, Operation
from gateway.protocol import ErrorBody

__all__ = [
    "DOCS_ASSETS",
    "DOCS_CSP",
    "DOCS_HTML",
    "OpenApiEndpoints",
    "openapi_document",
    "swagger_ui_dir",
]

_REF = "#/components/schemas/{name}"
_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")
_IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Replays the first response for a retry of the same request (24 h); "
    "a different request with the same key gets 409.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"},
}
_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    400: "Malformed request (the body is not JSON)",
    401: "Missing, unknown, expired or revoked credentials",
    402: "The renter's balance (or monthly budget) cannot cover it; `error.shortfall_usd` says "
    "by how much",
    403: "Not allowed for this role or on this object",
    404: "No such object (or not visible to the caller)",
    409: "Conflict with the object's state, a lost race, or an Idempotency-Key reused",
    413: "Body too large",
    415: "Body is not application/json",
    422: "Invalid input; `error.field` names it",
    429: "Rate limited (see Retry-After), or too many open contracts or bids (`too_many_open`)",
    503: "Not ready",
}


def openapi_document(
    routes: Sequence[BaseRoute],
    *,
    title: str = "Mnemo API",
    version: str = "0.1.0",
    description: str = "",
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` (an app's routes; Operations are documented fully)."""
    operations = [r.operation for r in routes if isinstance(r, ApiRoute)]
    others = [
        r
        for r in routes
        if isinstance(r, Route) and not isinstance(r, ApiRoute) and r.include_in_schema
    ]

    body_types: list[Any] = [ErrorBody]
    for op in operations:
        for t in (op.body, op.response, *op.other_responses.values()):
            if t is not None and t not in body_types:
                body_types.append(t)
    schemas, components = msgspec.json.schema_components(body_types, ref_template=_REF)
    schema_of = dict(zip(map(id, body_types), schemas, strict=True))
    # Rules a Struct's fields cannot state alone (two fields together, a sum), in JSON Schema.
    for t in body_types:
        extra = getattr(t, "json_schema_rules", None)
        if extra:
            components[t.__name__].update(extra)
    error_schema = schema_of[id(ErrorBody)]

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(_openapi_path(op.path), {})[op.method.lower()] = _operation(
            op, schema_of, error_schema, components
        )
    for other in others:
        for method in sorted((other.methods or {"GET"}) - {"HEAD"}):
            paths.setdefault(_openapi_path(other.path), {})[method.lower()] = _plain(other)

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
        "security": [{"ApiKey": []}, {"Bearer": []}],
    }


def _openapi_path(path: str) -> str:
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", path)


def _path_names(path: str) -> list[str]:
    return [m.group(1) for m in _PARAM.finditer(path)]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(
    op: Operation,
    schema_of: dict[int, Any],
    error_schema: dict[str, Any],
    components: dict[str, Any],
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    for name in _path_names(op.path):
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": msgspec.json.schema(op.path_type(name)),
            }
        )
    if op.query is not None:
        parameters.extend(_query_parameters(op.query, components))
    if op.idempotent:
        parameters.append(dict(_IDEMPOTENCY_HEADER))

    statuses: set[int] = set(op.errors)
    if op.auth:
        statuses |= {401, 403}
    if _path_names(op.path):
        statuses.add(404)
    if op.body is not None:
        statuses |= {400, 413, 415, 422}
    if op.query is not None:
        statuses.add(422)
    if op.idempotent:
        statuses |= {409, 422}
    if op.limit is not None:
        statuses.add(429)
    responses: dict[str, Any] = {}
    success: dict[str, Any] = {"description": _STATUS_TEXT.get(op.status, "OK")}
    if op.response is not None:
        success["content"] = _json(schema_of[id(op.response)])
    for media in op.other_media:
        success.setdefault("content", {})[media] = {"schema": {"type": "string"}}
    if op.links:
        success["links"] = {
            name: {
                "operationId": link.operation,
                **({"parameters": dict(link.parameters)} if link.parameters else {}),
                **({"requestBody": dict(link.body)} if link.body is not None else {}),
            }
            for name, link in op.links.items()
        }
    responses[str(op.status)] = success
    for status, other in op.other_responses.items():
        responses[str(status)] = {
            "description": _STATUS_TEXT.get(status, "See the schema"),
            "content": _json(schema_of[id(other)]),
        }
    for status in sorted(statuses - {op.status} - set(op.other_responses)):
        entry: dict[str, Any] = {
            "description": _STATUS_TEXT.get(status, "Error"),
            "content": _json(error_schema),
        }
        if status == 429:
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        responses[str(status)] = entry

    out: dict[str, Any] = {
        "operationId": op.name,
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": parameters,
        "responses": responses,
    }
    if op.description:
        out["description"] = op.description
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": _json(schema_of[id(op.body)])}
    if not op.auth:
        out["security"] = []
    return out


def _query_parameters(query_type: Any, components: dict[str, Any]) -> list[dict[str, Any]]:
    (ref,), local = msgspec.json.schema_components([query_type], ref_template=_REF)
    name = ref["$ref"].rsplit("/", 1)[-1]
    struct_schema = local.pop(name)
    components.update(local)
    required = set(struct_schema.get("required", ()))
    out = []
    for prop, schema in struct_schema.get("properties", {}).items():
        schema = _without_null(dict(schema))
        param: dict[str, Any] = {
            "name": prop,
            "in": "query",
            "required": prop in required,
            "schema": schema,
        }
        if "description" in schema:
            param["description"] = schema["description"]
        out.append(param)
    return out


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: drop the null branch and a null default."""
    if schema.get("default", 0) is None:
        del schema["default"]
    any_of = schema.get("anyOf")
    if any_of is not None:
        kept = [s for s in any_of if s != {"type": "null"}]
        if len(kept) == 1:
            merged = {k: v for k, v in schema.items() if k != "anyOf"}
            merged.update(kept[0])
            return merged
        schema["anyOf"] = kept
    return schema


def _plain(route: Route) -> dict[str, Any]:
    summary = (route.endpoint.__doc__ or route.name or route.path).strip().splitlines()[0]
    out: dict[str, Any] = {
        "operationId": f"{route.name}_{'_'.join(sorted(route.methods or ()))}".lower(),
        "summary": summary,
        "tags": ["other"],
        "parameters": [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in _path_names(route.path)
        ],
        "responses": {"default": {"description": "See the summary"}},
    }
    return out


DOCS_ASSETS = "/docs/assets"
"""Where Swagger UI's own files are served (same origin)."""

_DOCS_INIT = "/docs/swagger-init.js"

DOCS_HTML = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Mnemo API</title>
  <link rel="icon" type="image/png" href="{DOCS_ASSETS}/favicon-32x32.png">
  <link rel="stylesheet" href="{DOCS_ASSETS}/swagger-ui.css">
  <link rel="stylesheet" href="{DOCS_ASSETS}/index.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{DOCS_ASSETS}/swagger-ui-bundle.js"></script>
  <script src="{_DOCS_INIT}"></script>
</body>
</html>
"""

# A file rather than an inline <script>, so the page's policy can forbid inline scripts.
# validatorUrl: the default shows a badge fetched from validator.swagger.io, which is sent the
# document's URL; nothing on this page may reach another origin.
_DOCS_INIT_JS = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
});
"""

# Swagger UI's stylesheet draws its icons as data: SVGs; everything else is this origin's.
DOCS_CSP = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's distribution files, as installed by swagger-ui-py.

    Found without importing `swagger_ui` (whose own code, and its Jinja2 and PyYAML imports,
    the gateway does not use).
    """
    spec = importlib.util.find_spec("swagger_ui")
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for location in locations:
        folder = Path(location) / "static"
        if (folder / "swagger-ui-bundle.js").is_file():
            return folder
    raise RuntimeError(
        "Swagger UI's files are missing: /docs serves them from the swagger-ui-py package, "
        "part of the exchange extra (pip install '<checkout>[exchange]')"
    )


class OpenApiEndpoints:
    """`GET /openapi.json` (built once, on first request, from the app's routes) and `GET /docs`,
    with what the page loads; none of them needs credentials."""

    def __init__(self, **info: Any) -> None:
        self._info = info
        self._cached: bytes | None = None

    def routes(self) -> list[BaseRoute]:
        """The document, the page, its script, and Swagger UI's files under `DOCS_ASSETS`."""
        return [
            Route("/openapi.json", self.document, methods=["GET"], name="openapi"),
            Route("/docs", self.docs, methods=["GET"], name="docs"),
            Route(
                _DOCS_INIT,
                self.docs_script,
                methods=["GET"],
                name="docs_script",
                include_in_schema=False,
            ),
            Mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_dir()), name="docs_assets"),
        ]

    async def document(self, request: Request) -> Response:
        if self._cached is None:
            routes = request.app.routes
            self._cached = msgspec.json.encode(openapi_document(routes, **self._info))
        return Response(self._cached, media_type="application/json")

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(DOCS_HTML, headers={"Content-Security-Policy": DOCS_CSP})

    async def docs_script(self, request: Request) -> Response:
        return Response(_DOCS_INIT_JS, media_type="text/javascript")
