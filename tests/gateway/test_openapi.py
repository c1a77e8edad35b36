"""The OpenAPI document, and schemathesis against it: no server errors, no schema violations;
the `/docs` page, served whole by the gateway.

schemathesis loads `/openapi.json` from the app in process (its ASGI transport runs the app's
lifespan in its own event-loop thread) and, for every operation, sends generated valid and invalid
requests as an admin (who passes every role check). Every response must be a non-5xx whose
status, content type, headers and body conform to the document; invalid requests must be refused.
Examples per operation and mode: `MNEMO_SCHEMATHESIS_EXAMPLES` (default 10).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.formats import unregister_string_format

from engine.keys import Keys
from engine.settings import Settings
from gateway.app import create_app
from gateway.operations import ApiRoute

from .conftest import Gateway, create_client, make_settings, register_node, running, signup
from .test_ws import serving

EXAMPLES = int(os.environ.get("MNEMO_SCHEMATHESIS_EXAMPLES", "10"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def settings(
    redis_url: str,
    db_url: str,
    keys: Keys,
    localstripe: str,
    connect_fake: str,
) -> Settings:
    """With Stripe configured (localstripe and the Connect fake, as in tests/payments/), so
    that the payment routes answer as they do in production, not 503 `payments_misconfigured`."""
    return make_settings(
        redis_url,
        db_url,
        keys,
        stripe_secret_key="sk_test_openapi_" + "x" * 24,
        stripe_webhook_secret="whsec_openapi_" + "y" * 24,
        stripe_api_base=localstripe,
        stripe_connect_api_base=connect_fake,
        stripe_checkout_api_base=connect_fake,
        # No agent runs here: a settle of a delivered lease waits out the close timeout for the
        # node's closed report, which must stay within schemathesis' 10 s per request.
        lease_close_timeout_ms=500,
    )


async def test_document_covers_every_operation(gw: Gateway) -> None:
    """Every REST operation is in the document with its parameters, body and statuses."""
    doc = (await gw.client.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    for route in gw.app.routes:
        if not isinstance(route, ApiRoute):
            continue
        op = route.operation
        entry = doc["paths"][op.path][op.method.lower()]
        assert entry["operationId"] == op.name
        assert str(op.status) in entry["responses"]
        if op.body is not None:
            ref = entry["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[-1] in doc["components"]["schemas"]
        if op.auth:
            assert "401" in entry["responses"] and "security" not in entry
        else:
            assert entry["security"] == []
    register = doc["components"]["schemas"]["NodeRegisterRequest"]
    assert register["additionalProperties"] is False
    assert register["properties"]["latitude"] == {
        "type": "number",
        "minimum": -90.0,
        "maximum": 90.0,
        "description": "Degrees north.",
    }


class _PageLinks(HTMLParser):
    """What a page makes the browser load: ("script" | "stylesheet" | "icon", URL), and any
    script written into the page itself."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str]] = []
        self.inline_scripts = 0
        self.handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.handlers += [k for k in found if k.startswith("on")]
        if tag == "script":
            self._in_script = True
            if "src" in found:
                self.loads.append(("script", found["src"]))
        elif tag == "link" and found.get("rel") in ("stylesheet", "icon"):
            self.loads.append((found["rel"], found["href"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


_CONTENT_TYPES = {
    "script": {"text/javascript", "application/javascript"},
    "stylesheet": {"text/css"},
    "icon": {"image/png"},
}


async def test_docs_page_loads_only_from_this_origin(gw: Gateway) -> None:
    """/docs and every file it loads answer from the gateway, without credentials: no CDN, no
    other origin, no inline script, under a policy that says so."""
    page = await gw.client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = [d.strip() for d in page.headers["content-security-policy"].split(";")]
    assert "default-src 'self'" in policy
    assert not any(d.startswith(("script-src", "style-src")) for d in policy)
    assert "unsafe" not in page.headers["content-security-policy"]
    assert re.search(r"(?i)https?:|//[a-z0-9]", page.text) is None, page.text

    links = _PageLinks()
    links.feed(page.text)
    assert links.inline_scripts == 0 and links.handlers == []
    assert {kind for kind, _ in links.loads} == {"script", "stylesheet", "icon"}
    largest: dict[str, int] = {}
    for kind, url in links.loads:
        assert url.startswith("/") and not url.startswith("//"), url
        r = await gw.client.get(url)
        assert r.status_code == 200, url
        assert r.headers["content-type"].split(";")[0] in _CONTENT_TYPES[kind], url
        assert len(r.content) > 100, url
        largest[kind] = max(largest.get(kind, 0), len(r.content))
    # Swagger UI itself, not an error page that happens to say 200
    assert largest["script"] > 500_000 and largest["stylesheet"] > 50_000

    bundle, start = (url for kind, url in links.loads if kind == "script")
    assert "SwaggerUIBundle" in (await gw.client.get(bundle)).text
    start_script = (await gw.client.get(start)).text
    assert '"/openapi.json"' in start_script and "validatorUrl: null" in start_script
    assert (await gw.client.get("/openapi.json")).status_code == 200

    # The page's plumbing is no part of the API's document.
    paths = (await gw.client.get("/openapi.json")).json()["paths"]
    assert "/docs" in paths
    assert not [p for p in paths if p.startswith("/docs/")]


_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-headless-shell")


@pytest.mark.skipif(_CHROMIUM is None, reason="no chromium or chromium-headless-shell on PATH")
async def test_docs_render_in_chromium(settings: Settings, keys: Keys, tmp_path: Path) -> None:
    """Headless Chromium, held to the page's own policy, renders every operation of the document
    from the gateway alone."""
    assert _CHROMIUM is not None
    async with serving(settings, keys) as live:
        url = str(live.gw.client.base_url.join("/docs"))
        operations = sum(
            len(methods)
            for methods in (await live.gw.client.get("/openapi.json")).json()["paths"].values()
        )
        browser = await asyncio.create_subprocess_exec(
            _CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path}",
            "--enable-logging=stderr",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(browser.communicate(), 120)
        finally:
            if browser.returncode is None:
                browser.kill()
                await browser.wait()
    dom, log = out.decode(), err.decode()
    assert "Content Security Policy" not in log, log
    shown = re.findall(r'class="opblock-summary-path"[^>]*data-path="([^"]+)"', dom)
    assert len(shown) == operations, (len(shown), operations, log[-3000:])
    assert "/api/nodes/register" in shown


@pytest.fixture
async def admin_key(settings: Settings) -> str:
    """An admin's API key, and a little market (a node, a client) for the generated calls to find."""
    async with running(settings) as gw:
        admin = await signup(gw, "provider")
        await gw.state["pool"].execute(
            "UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(admin.user_id)
        )
        await register_node(gw, admin)
        await create_client(gw, admin)
        ADMIN_LOGIN[settings.key_prefix] = (admin.email, admin.password)
        return admin.key


ADMIN_LOGIN: dict[str, tuple[str, str]] = {}


@pytest.fixture
async def admin_token(settings: Settings, admin_key: str) -> str:
    """A JWT of the same admin: it outlives the revocation of any API key (the stateful phase
    may revoke the admin's own key, listed by `GET /api/auth/api-keys`)."""
    email, password = ADMIN_LOGIN[settings.key_prefix]
    async with running(settings) as gw:
        r = await gw.client.post("/api/auth/token", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])


# Times at the calendar's edges (year 1 and 9999, the widest offsets, the epoch), and any other
# time Hypothesis draws: the two 500s of the analytics routes were at these edges.
_EDGE_TIMES = st.sampled_from(
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-23:59",
        "9999-12-31T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:00:00Z",
    ]
)
_ANY_TIME = st.datetimes(
    timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=14))])
).map(lambda t: t.isoformat())


@pytest.fixture
def schema(settings: Settings, admin_key: str) -> Iterator[schemathesis.BaseSchema]:
    schemathesis.openapi.format("date-time", _EDGE_TIMES | _ANY_TIME)
    loaded = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))
    try:
        yield loaded
    finally:
        schemathesis_asgi.shutdown_lifespans()
        unregister_string_format("date-time")


@pytest.mark.parametrize(
    "mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
)
def test_schemathesis(
    schema: schemathesis.BaseSchema, admin_key: str, mode: schemathesis.GenerationMode
) -> None:
    """Generated requests for every operation: zero server errors, zero schema violations."""
    headers = {"X-API-Key": admin_key}
    checks = CHECKS + (
        [negative_data_rejection] if mode is schemathesis.GenerationMode.NEGATIVE else []
    )
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        inputs = (operation.path_parameters, operation.query, operation.headers, operation.body)
        if mode is schemathesis.GenerationMode.NEGATIVE and not any(len(x) for x in inputs):
            continue  # nothing to make invalid

        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers, checks=checks)

        try:
            run()
        except Exception as exc:
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:2000]}")
    assert operations >= 25
    assert failures == [], "\n\n".join(failures)


def _takes_ids(op: dict) -> list[str]:
    """The id-like inputs of an operation: path parameters, and body fields naming objects."""
    names = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
    return names


async def test_links_connect_creators_to_every_operation_that_takes_an_id(gw: Gateway) -> None:
    """Every operation with an id in its path is the target of a link from an operation that
    produces such ids, and every link names a real operation and real parameters."""
    doc = (await gw.client.get("/openapi.json")).json()
    ops = {
        op["operationId"]: op
        for methods in doc["paths"].values()
        for op in methods.values()
        if "operationId" in op
    }
    targets: dict[str, set[str]] = {}
    for op in ops.values():
        for response in op["responses"].values():
            for name, link in response.get("links", {}).items():
                target = ops.get(link["operationId"])
                assert target is not None, (op["operationId"], name)
                params = {p["name"] for p in target.get("parameters", [])}
                assert set(link.get("parameters", {})) <= params, (op["operationId"], name)
                if "requestBody" in link:
                    body = target["requestBody"]["content"]["application/json"]["schema"]
                    component = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
                    assert set(link["requestBody"]) <= set(component["properties"]), name
                covered = {*link.get("parameters", {}), *link.get("requestBody", {})}
                targets.setdefault(link["operationId"], set()).update(covered)
    for op_id, op in ops.items():
        for name in _takes_ids(op):
            if op_id.startswith(("healthz", "readyz")):
                continue
            assert name in targets.get(op_id, set()), f"{op_id} takes {name}: no link feeds it"
    # The two ids a contract needs reach it together from a request for matches.
    assert targets["create_contract"] >= {"client_id", "node_id"}


STATEFUL_STEPS = int(os.environ.get("MNEMO_SCHEMATHESIS_STATEFUL_EXAMPLES", "25"))
STATEFUL_ROUNDS = 40
"""Rounds of the state machine at most; the test stops as soon as every id is reached (a
contract's ids come from the walk's own clients and nodes: most runs need under 5)."""
STATEFUL_BUDGET_S = 600
"""The walk makes no call after this many seconds, so that a miss fails with what it missed
rather than at the test's timeout (a round takes 5-60 s on 2 shared cores)."""


class _OutOfTime(Exception):
    """The walk's time is up: the round ends at its next call."""


ID_OPERATIONS = (
    "DELETE /api/auth/api-keys/{key_id}",
    "GET /api/clients/{client_id}",
    "GET /api/analytics/client/{client_id}/spending",
    "GET /api/nodes/{node_id}",
    "PUT /api/nodes/{node_id}",
    "DELETE /api/nodes/{node_id}",
    "POST /api/nodes/{node_id}/heartbeat",
    "GET /api/analytics/node/{node_id}/earnings",
    "GET /api/clusters/{region}/nodes",
    "GET /api/clusters/{region}/stats",
    "GET /api/book/{region}",
    "GET /api/contracts/{contract_id}",
    "POST /api/contracts/{contract_id}/extend",
    "POST /api/contracts/{contract_id}/settle",
    "GET /api/bids/{bid_id}",
    "DELETE /api/bids/{bid_id}",
)
"""Every operation that takes an id, each to be reached with a real one."""


_NODES = ("POST /api/nodes/register", "PUT /api/nodes/{node_id}")
_LEASES = ("POST /api/contracts/create", "POST /api/bids", "POST /api/marketplace/request")


def _sane(case: schemathesis.Case) -> None:
    """Keep drawn leases and time ranges within the rules no schema can state (a lease's value
    of at most 1,000,000 USD: size x term x price; a term within the node's; a distance needs a
    location the profile may lack; a range of whole buckets), and requests for matches free of
    filters that would leave nothing to match: so that chains reach their contracts and bids."""
    body, label = case.body, case.operation.label
    if label in ID_OPERATIONS and isinstance(case.query, dict):
        # A drawn time range is mostly refused (start after end, over 366 days or 2,000 buckets;
        # the stateless test covers those): the default range, the last day, takes every bucket.
        for name in ("start", "end"):
            case.query.pop(name, None)
    if label in _NODES and isinstance(body, dict):
        # Leases up to 4 GB x 1 h at these prices are worth under 10 USD: a node needs no stake
        # for them (engine.trust), and the walk's nodes have none.
        if isinstance(body.get("price_per_gb_sec"), int | float):
            body["price_per_gb_sec"] = min(body["price_per_gb_sec"], 0.0001)
        return
    if label == "POST /api/contracts/{contract_id}/settle" and isinstance(body, dict):
        # egress worth under the 1,000,000 USD a contract may bill at any drawn price
        if isinstance(body.get("actual_egress_gb"), int | float):
            body["actual_egress_gb"] = min(body["actual_egress_gb"], 1.0)
        return
    if label == "POST /api/contracts/{contract_id}/extend" and isinstance(body, dict):
        # within the node's terms and under the stake-free 10 USD with the lease itself
        if isinstance(body.get("additional_duration_sec"), int | float):
            body["additional_duration_sec"] = min(max(int(body["additional_duration_sec"]), 1), 600)
        return
    if label not in _LEASES or not isinstance(body, dict):
        return
    for name in ("ram_gb", "vram_gb"):
        if isinstance(body.get(name), int | float):
            body[name] = min(int(body[name]), 4)
    if body.get("ram_gb", 1) + body.get("vram_gb", 0) == 0:
        body["ram_gb"] = 1
    if isinstance(body.get("duration_sec"), int | float):
        body["duration_sec"] = min(max(int(body["duration_sec"]), 60), 3600)
    for name in ("max_distance_km", "min_fill_gb"):
        body.pop(name, None)
    if label == "POST /api/contracts/create":
        body.pop("max_price_per_gb_sec", None)  # the node's own price, whatever it is
    if label == "POST /api/marketplace/request":
        for name in ("region", "node_type", "min_uptime_score"):
            body.pop(name, None)
        body["max_price_per_gb_sec"] = 0.001


@pytest.mark.timeout(900)  # up to 40 rounds of the walk on a slow, shared CI machine
def test_schemathesis_stateful(schema: schemathesis.BaseSchema, admin_token: str) -> None:
    """Schemathesis' stateful phase follows the links (create a client, register a node, take a
    contract, extend and settle it, place and cancel a bid...): zero server errors, zero schema
    violations, and every operation that takes an id is reached with a real one (a 2xx)."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    reached: dict[str, set[int]] = {}
    # Valid inputs only: the stateless test sends the invalid ones.
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])
    base = schema.as_state_machine()
    credit = schema["/api/admin/accounts/{client_id}/credit"]["POST"]
    known: dict[str, list[str]] = {"client_id": [], "node_id": []}

    began = time.monotonic()

    class Workflow(base):  # type: ignore[misc, valid-type]
        def before_call(self, case: schemathesis.Case) -> None:
            if time.monotonic() - began > STATEFUL_BUDGET_S:
                raise _OutOfTime
            # Credentials the generator may have drawn (the security scheme's header) give way.
            case.headers = {**(case.headers or {}), **headers}
            if "Idempotency-Key" in case.headers:
                # A drawn key repeats across unrelated calls ("0", "a"), which the server rightly
                # refuses 409 `idempotency_key_reused` (tests/gateway/test_idempotency.py): each
                # call of the walk is a new operation, so each gets a key of its own.
                case.headers["Idempotency-Key"] = uuid.uuid4().hex
            _sane(case)
            if case.operation.label in _LEASES and isinstance(case.body, dict):
                # Links fill a contract's client and node one at a time, the other drawn: a real
                # pair needs a chain of three links that a whole CI run could miss (40 rounds,
                # all three suites), and a bid's client one of two. A drawn id that names nothing
                # gives way to one this walk made.
                for name, made in known.items():
                    if made and name in case.body and case.body[name] not in made:
                        case.body[name] = made[-1]

        def after_call(self, response: object, case: schemathesis.Case) -> None:
            super().after_call(response, case)
            status = response.status_code  # type: ignore[attr-defined]
            reached.setdefault(case.operation.label, set()).add(status)
            if case.operation.label == "POST /api/nodes/register" and status == 200:
                known["node_id"].append(response.json()["node_id"])  # type: ignore[attr-defined]
            if case.operation.label == "POST /api/clients" and status == 201:
                # Contracts are paid for (issue 14): an operator funds each new renter, so the
                # chains past it reach their contracts rather than 402.
                client_id = response.json()["id"]  # type: ignore[attr-defined]
                funded = credit.Case(
                    path_parameters={"client_id": client_id},
                    headers=headers,
                    body={"amount_usd": 1_000_000, "reason": "stateful walk", "key": client_id},
                    media_type="application/json",
                ).call()
                assert funded.status_code == 200, funded.text
                known["client_id"].append(client_id)

        def validate_response(
            self, response: object, case: schemathesis.Case, **kwargs: object
        ) -> None:
            # The stateless test's checks (values carried between steps need not be drawn from
            # each parameter's own schema, so "valid data accepted" does not apply here).
            case.validate_response(response, checks=CHECKS)  # type: ignore[arg-type]

    settings = hypothesis.settings(
        max_examples=STATEFUL_STEPS,
        stateful_step_count=20,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.generate],
    )

    def unreached() -> list[str]:
        return [
            label
            for label in ID_OPERATIONS
            if not any(200 <= s < 300 for s in reached.get(label, ()))
        ]

    for round_ in range(STATEFUL_ROUNDS):
        try:
            Workflow.run(settings=settings)
        except hypothesis.errors.Flaky:
            # The server's state is not Hypothesis': a replayed prefix may meet other ids. As
            # schemathesis' own runner does, take it as the end of a round, not a failure.
            pass
        except _OutOfTime:
            break
        finally:
            elapsed = time.monotonic() - began
            print(f"round {round_}: {elapsed:.0f} s, unreached {unreached()}")  # shown on failure
        if not unreached():
            break
    assert set(ID_OPERATIONS) <= set(reached), sorted(set(ID_OPERATIONS) - set(reached))
    sources = ("POST /api/bids", "POST /api/contracts/create", "POST /api/nodes/register")
    assert unreached() == [], {
        label: sorted(reached.get(label, ())) for label in (*unreached(), *sources)
    }
