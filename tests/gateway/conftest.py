"""Fixtures for the gateway's HTTP tests: the real app over real Redis and Postgres.

`gw` runs the app's lifespan (Redis client, asyncpg pool, Market, MarketView, WebSocket
services) and serves it in process through httpx's ASGI transport, handing the lifespan state to
each request the way uvicorn does. Users are signed up through the API itself (`signup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from engine.keys import Keys
from engine.market import Market
from engine.notify import TradeNote, encode_message, market_summary
from engine.settings import Settings
from gateway.app import create_app

JWT_SECRET = "test-secret-" + "x" * 40
T = TypeVar("T")

NYC = (40.7282, -73.7949)
BOSTON = (42.3601, -71.0589)
LONDON = (51.5074, -0.1278)


def make_settings(redis_url: str, db_url: str, keys: Keys, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "database_url": db_url,
        "key_prefix": keys.prefix,
        "jwt_secret": JWT_SECRET,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(redis_url: str, db_url: str, keys: Keys) -> Settings:
    return make_settings(redis_url, db_url, keys)


class _WithState:
    """Gives every request a shallow copy of the lifespan state, as uvicorn does."""

    def __init__(self, app: Starlette, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = dict(self.state)
        await self.app(scope, receive, send)


@dataclass
class Gateway:
    """The running app, an httpx client on it, and its lifespan state."""

    app: Starlette
    client: httpx.AsyncClient
    state: dict[str, Any]
    settings: Settings


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Gateway]:
    """The app for `settings`, lifespan started, with an httpx client (lifespan ends on exit)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:
        state = dict(state or {})
        transport = httpx.ASGITransport(app=_WithState(app, state))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Gateway(app, client, state, settings)


@pytest.fixture
async def gw(settings: Settings) -> AsyncIterator[Gateway]:
    async with running(settings) as gateway:
        yield gateway


@pytest.fixture
async def journal(settings: Settings) -> AsyncIterator[None]:
    """The journal worker (event streams -> Postgres history) running beside the app."""
    from persistence.journal.worker import run_journal

    stop = asyncio.Event()
    task = asyncio.create_task(run_journal(settings, consumer="gateway-test", stop=stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def listed(gw: Gateway, actor: Actor, params: dict[str, Any], count: int) -> dict[str, Any]:
    """`GET /api/nodes` once the journal has caught up to `count` matching nodes."""

    async def check() -> dict[str, Any] | None:
        r = await gw.client.get("/api/nodes", params=params, headers=actor.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        return page if page["total_count"] >= count else None

    return await eventually(check, timeout_s=20)


@dataclass
class Actor:
    """A signed-up user and their first API key."""

    email: str
    password: str
    role: str
    user_id: str
    key: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}


async def signup(gw: Gateway, role: str = "user", *, email: str | None = None) -> Actor:
    email = email or f"{role}-{uuid.uuid4().hex[:10]}@example.com"
    password = "correct horse battery staple"
    r = await gw.client.post(
        "/api/auth/signup", json={"email": email, "password": password, "role": role}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    return Actor(
        email=email,
        password=password,
        role=role,
        user_id=body["user"]["id"],
        key=body["api_key"]["key"],
        key_id=body["api_key"]["id"],
    )


async def bearer(gw: Gateway, actor: Actor) -> dict[str, str]:
    r = await gw.client.post(
        "/api/auth/token", json={"email": actor.email, "password": actor.password}
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def node_body(**overrides: Any) -> dict[str, Any]:
    """The spec's registration example (a mist node in Queens), with overrides."""
    body: dict[str, Any] = {
        "node_type": "mist_node",
        "name": "Alice_RTX4090",
        "region": "us-east-2",
        "latitude": NYC[0],
        "longitude": NYC[1],
        "total_ram_gb": 64,
        "total_vram_gb": 24,
        "bandwidth_mbps": 980,
        "base_latency_ms": 0.8,
        "price_per_gb_sec": 0.0000008,
        "metadata": {
            "gpu_model": "RTX 4090",
            "idle_schedule": "9am-5pm, 11pm-7am",
            "cooling": "air",
        },
    }
    body.update(overrides)
    return body


async def register_node(gw: Gateway, provider: Actor, **overrides: Any) -> str:
    r = await gw.client.post(
        "/api/nodes/register", json=node_body(**overrides), headers=provider.headers
    )
    assert r.status_code == 200, r.text
    return r.json()["node_id"]


async def create_client(
    gw: Gateway,
    renter: Actor,
    location: tuple[float, float] | None = BOSTON,
    *,
    fund_usd: int | None = 1000,
) -> str:
    """A renter profile of `renter`, funded with `fund_usd` (an operator's credit: issue 14, a
    contract or bid needs its cost covered; None: unfunded)."""
    body: dict[str, Any] = {"org_name": f"org of {renter.email}"}
    if location is not None:
        body["latitude"], body["longitude"] = location
    r = await gw.client.post("/api/clients", json=body, headers=renter.headers)
    assert r.status_code == 201, r.text
    client_id: str = r.json()["id"]
    if fund_usd:
        await fund(gw, client_id, fund_usd)
    return client_id


async def fund(gw: Gateway, client_id: str, usd: int) -> None:
    """Credit a renter's balance as an operator would (the market's `credit` primitive; one
    credit moves at most a million USD)."""
    while usd > 0:
        result = await gw.state["market"].credit(
            client_id,
            min(usd, 1_000_000) * 10**12,
            key=f"test-fund:{uuid.uuid4().hex}",
            rail="operator",
            reason="test fixture",
            now_ms=time.time_ns() // 1_000_000,
        )
        assert result.applied
        usd -= 1_000_000


async def give_stake(market: Market, node_id: str, owner_id: str, usd: float) -> None:
    """Give a node `usd` of stake (engine.trust: a lease needs 10 % of the node's lease value
    beyond 10 USD staked), as if its provider had locked that much of its earnings; the ledger's
    side of a lock (earnings into `stake_transit`) is `tests/persistence/test_stake.py`'s."""
    changed = await market.lock_stake(
        node_id, owner_id, round(usd * 10**12), f"test-stake:{uuid.uuid4().hex}",
        time.time_ns() // 1_000_000,
    )  # fmt: skip
    assert changed is not None


async def eventually(check: Callable[[], Awaitable[T | None]], *, timeout_s: float = 5.0) -> T:
    """Poll `check` until it returns something truthy (the market view trails Redis by ms)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


async def in_view(gw: Gateway, actor: Actor, node_id: str) -> dict[str, Any]:
    """Wait until the marketplace (the process's market view) lists `node_id`; its row."""

    async def check() -> dict[str, Any] | None:
        r = await gw.client.get("/api/marketplace", params={"limit": 500}, headers=actor.headers)
        assert r.status_code == 200, r.text
        return next((o for o in r.json()["offers"] if o["node_id"] == node_id), None)

    return await eventually(check)


def assert_error(
    response: httpx.Response, status: int, code: str | None = None, field: str | None = None
) -> dict[str, Any]:
    """The response is an error of the one JSON shape with this status (and code / field)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str), body
    assert set(error) <= {"code", "message", "field", "shortfall_usd", "shortfall_pusd"}, body
    if code is not None:
        assert error["code"] == code, body
    if field is not None:
        assert error.get("field") == field, body
    return error


# ---------------------------------------------------------------------------------------------
# What the engine publishes for /ws (its internal notes), and what a socket receives for them


def market_message(n: int, pad: int = 0) -> bytes:
    """A `market` note as the engine publishes it (`engine.notify`), numbered `n` (its `nodes`)
    and `pad` bytes longer (its region's name), for tests of the fan-out's order and sizes."""
    return encode_message("market", market_summary("r" + "x" * pad, n, 0, 0, None))


def market_event(n: int, pad: int = 0) -> dict[str, Any]:
    """The frame a socket subscribed to `market` receives for `market_message(n, pad)`."""
    data = {
        "region": "r" + "x" * pad,
        "nodes": n,
        "available_ram_gb": 0,
        "available_vram_gb": 0,
        "best_ask_per_gb_sec": None,
        "best_ask_pusd": None,
    }
    return {"type": "event", "channel": "market", "data": data}


def numbered(frame: dict[str, Any]) -> int:
    """The number of a `market_message` as its frame arrived."""
    n: int = frame["data"]["nodes"]
    return n


def trade_message(region: str, contract_id: str = "c1") -> bytes:
    """A `trades:<region>` note as the engine publishes it."""
    trade = TradeNote(
        contract_id=contract_id,
        node_id="n1",
        region=region,
        price_pusd=700_000,
        ram_gb=8,
        vram_gb=4,
        duration_s=600,
        ts_ms=1_700_000_000_000,
    )
    return encode_message(f"trades:{region}", trade)
