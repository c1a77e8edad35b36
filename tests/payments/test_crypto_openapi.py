"""schemathesis against the crypto operations (a gateway with Solana configured): generated
valid and invalid requests get no server error and answers that conform to the document."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import negative_data_rejection
from solders.keypair import Keypair

from engine.keys import Keys
from engine.settings import CryptoSettings, Settings
from gateway.app import create_app
from tests.gateway.conftest import create_client, make_settings, running, signup
from tests.gateway.test_openapi import CHECKS, EXAMPLES
from tests.payments.solchain import FakeCluster, rpc_app


@pytest.fixture
def cluster_url() -> Iterator[tuple[FakeCluster, str]]:
    """The cluster double served from a thread of its own (schemathesis drives the app from
    another thread, while this test's event loop is idle)."""
    cluster = FakeCluster()
    server = uvicorn.Server(
        uvicorn.Config(
            rpc_app(cluster), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield cluster, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
async def crypto_settings(
    redis_url: str, db_url: str, keys: Keys, cluster_url: tuple[FakeCluster, str]
) -> tuple[Settings, str]:
    """Settings with Solana on, and an admin's key (a client, a SOL rate, a request exist)."""
    cluster, url = cluster_url
    crypto = CryptoSettings(
        sol_rpc_url=url,
        sol_genesis_hash=cluster.genesis_hash,
        sol_recipient=str(Keypair().pubkey()),
        sol_usdc_mint=str(Keypair().pubkey()),
    )
    settings = make_settings(redis_url, db_url, keys, crypto=crypto)
    async with running(settings) as gw:
        admin = await signup(gw)
        await gw.state["pool"].execute(
            "UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(admin.user_id)
        )
        client_id = await create_client(gw, admin)
        r = await gw.client.put(
            "/api/payments/crypto/rates/SOL", json={"usd_per_unit": "150"}, headers=admin.headers
        )
        assert r.status_code == 200, r.text
        r = await gw.client.post(
            "/api/payments/crypto/requests",
            json={"client_id": client_id, "blockchain": "solana", "asset": "SOL", "amount_usd": 5},
            headers=admin.headers,
        )
        assert r.status_code == 201, r.text
    return settings, admin.key


@pytest.mark.parametrize(
    "mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
)
def test_crypto_operations_hold_their_schema(
    crypto_settings: tuple[Settings, str], mode: schemathesis.GenerationMode
) -> None:
    """Every crypto operation, generated inputs: zero server errors, zero schema violations."""
    settings, key = crypto_settings
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings)).include(
        path_regex="^/api/payments/crypto"
    )
    checks = CHECKS + (
        [negative_data_rejection] if mode is schemathesis.GenerationMode.NEGATIVE else []
    )
    failures: list[str] = []
    operations = 0
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1

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
                case.call_and_validate(headers={"X-API-Key": key}, checks=checks)

            try:
                run()
            except Exception as exc:
                failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:2000]}")
    finally:
        schemathesis_asgi.shutdown_lifespans()
    assert operations == 6
    assert failures == [], "\n\n".join(failures)
