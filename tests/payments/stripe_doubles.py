"""Fixtures for the card, payout and invoice tests (a plugin of `tests/conftest.py`, so the
OpenAPI tests can configure Stripe too): the outside networks' doubles, each a separate process
started here, and a gateway served over real HTTP so that they can reach it.

- `localstripe`: the `localstripe` package (PyPI, GPL: installed, run as its own process, never
  imported), a stateful fake of Stripe's API: PaymentMethods, PaymentIntents, refunds, and
  signed webhooks once `/_config/webhooks/{id}` names where to send them.
- `connect_fake`: `tests/payments/connect_fake.py` (accounts, account links, transfers; and
  Checkout Sessions with their hosted payment page, which pays on localstripe), since
  localstripe has neither Connect nor Checkout.
- `stripe_settings`: Settings pointing the gateway at both, with a webhook signing secret.
- `served`: the real app under uvicorn on a free loopback port (webhooks arrive over HTTP), with
  an httpx client on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import stripe
import uvicorn

from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.settings import Settings
from gateway.app import create_app
from tests.gateway.conftest import Actor, make_settings

STRIPE_KEY = "sk_test_mnemo_" + "x" * 24
WEBHOOK_SECRET = "whsec_mnemo_test_" + "y" * 24
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after 30 s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def _process(args: list[str], port: int, name: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix=f"mnemo-{name}-") as tmp:
        log = Path(tmp) / "log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            _wait_listening(port, proc, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def localstripe() -> Iterator[str]:
    """Base URL of a localstripe process for the session (fresh state: `--from-scratch`)."""
    port = free_port()
    args = [sys.executable, "-m", "localstripe", "--port", str(port), "--from-scratch"]
    with _process(args, port, "localstripe") as url:
        yield url


@pytest.fixture
def connect_fake(localstripe: str) -> Iterator[str]:
    """Base URL of a fresh fake of Connect and Checkout (its state and recorded calls are this
    test's); its hosted payment page pays on `localstripe`."""
    port = free_port()
    args = [sys.executable, "-m", "tests.payments.connect_fake", str(port), localstripe]
    with _process(args, port, "connect") as url:
        yield url


@pytest.fixture
def stripe_settings(
    redis_url: str, db_url: str, keys: Keys, localstripe: str, connect_fake: str
) -> Settings:
    return make_settings(
        redis_url,
        db_url,
        keys,
        stripe_secret_key=STRIPE_KEY,
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_api_base=localstripe,
        stripe_connect_api_base=connect_fake,
        stripe_checkout_api_base=connect_fake,
    )


@pytest.fixture
async def customer(stripe_settings: Settings) -> AsyncIterator[stripe.StripeClient]:
    """A Stripe client of the tests' own on localstripe: the customer's browser (Stripe.js) and
    the operator's dashboard."""
    assert stripe_settings.stripe_secret_key is not None
    http = stripe.HTTPXClient()
    try:
        yield stripe.StripeClient(
            stripe_settings.stripe_secret_key,
            base_addresses={"api": stripe_settings.stripe_api_base},
            http_client=http,
            max_network_retries=0,
        )
    finally:
        await http.close_async()


async def card(client: stripe.StripeClient, number: str = "4242424242424242") -> str:
    """A PaymentMethod id for a test card, as Stripe.js would make it in the browser."""
    pm = await client.v1.payment_methods.create_async(
        params={
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    return str(pm.id)


@dataclass
class Served:
    """The gateway on a real port, an httpx client on it, and its settings."""

    url: str
    client: httpx.AsyncClient
    settings: Settings


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Served]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield Served(url, client, settings)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


@pytest.fixture
async def served(stripe_settings: Settings) -> AsyncIterator[Served]:
    async with serving(stripe_settings) as s:
        yield s


async def register_webhook(localstripe_url: str, target: str, **extra: Any) -> None:
    """Have localstripe sign and send its events to `target` (one endpoint: the tests run one
    at a time, each replacing the last one's)."""
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{localstripe_url}/_config/webhooks/mnemo",
            data={"url": target, "secret": WEBHOOK_SECRET, **extra},
        )
        r.raise_for_status()


def signed(payload: bytes, *, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    """A `Stripe-Signature` header for `payload`, as Stripe computes it (HMAC-SHA256 of
    `t.payload` keyed by the endpoint's secret)."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


@pytest.fixture
async def stripe_journal(stripe_settings: Settings) -> AsyncIterator[None]:
    """The journal worker (event streams -> history and ledger in Postgres) beside the gateway."""
    from persistence.journal.worker import run_journal

    stop = asyncio.Event()
    task = asyncio.create_task(run_journal(stripe_settings, consumer="payments-test", stop=stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


WEBHOOK = "/api/payments/webhook"


@pytest.fixture
async def stripe_market(redis: aioredis.Redis, keys: Keys) -> Market:
    m = Market(redis, keys)
    await m.load_scripts()
    return m


async def funding(market: Market, client_id: str) -> int:
    return (await market.wallet(FUNDING, client_id, int(time.time() * 1000))).avail_pusd


async def pay(
    served: Served, actor: Actor, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    headers = dict(actor.headers)
    headers["Idempotency-Key"] = key or uuid.uuid4().hex
    return await served.client.post("/api/payments/create", json=body, headers=headers)


async def top_up(
    served: Served, actor: Actor, client_id: str, pm: str, usd: float, key: str | None = None
) -> dict[str, Any]:
    r = await pay(
        served, actor, {"client_id": client_id, "amount_usd": usd, "stripe_token": pm}, key
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body
