"""The OpenAPI document, and schemathesis against it: no server errors, no schema violations.

schemathesis loads `/openapi.json` from the app in process (its ASGI transport runs the app's
lifespan in its own event-loop thread) and, for every operation, sends generated valid and invalid
requests as an admin (who passes every role check). Every response must be a non-5xx whose
status, content type, headers and body conform to the document; invalid requests must be refused.
Examples per operation and mode: `MNEMO_SCHEMATHESIS_EXAMPLES` (default 10).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.settings import Settings
from gateway.app import create_app
from gateway.operations import ApiRoute

from .conftest import Gateway, create_client, register_node, running, signup

EXAMPLES = int(os.environ.get("MNEMO_SCHEMATHESIS_EXAMPLES", "10"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


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
        return admin.key


@pytest.fixture
def schema(settings: Settings, admin_key: str) -> Iterator[schemathesis.BaseSchema]:
    loaded = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))
    try:
        yield loaded
    finally:
        schemathesis_asgi.shutdown_lifespans()


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
