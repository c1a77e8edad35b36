"""Per-account limits: WebSockets per account, writes per second, channels per socket; each
refusal a 429 (or an error on the socket) and a count in `/metrics`. The real app under uvicorn
over real Redis and Postgres, with low limits set through the settings."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from engine.keys import Keys
from engine.settings import Settings
from gateway.errors import RateLimited
from gateway.ratelimit import WRITES, Rate, RateLimiter
from gateway.routes import OPERATIONS
from tests.gateway.conftest import (
    Actor,
    Gateway,
    assert_error,
    create_client,
    eventually,
    make_settings,
    market_event,
    market_message,
    signup,
    trade_message,
)
from tests.gateway.test_ws import Live, recv, request, serving, subscribe

SOCKETS = 2
CHANNELS = 3
BURST = 3
RATE_PER_S = 0.5  # slow enough that no write is earned back while a test runs
METRICS_TOKEN = "limits-scrape-" + "m" * 24


@pytest.fixture
def settings(redis_url: str, db_url: str, keys: Keys) -> Settings:
    return make_settings(
        redis_url,
        db_url,
        keys,
        ws_connections_per_account=SOCKETS,
        ws_channels_per_socket=CHANNELS,
        write_rate_per_s=RATE_PER_S,
        write_burst=BURST,
        metrics_token=METRICS_TOKEN,
    )


@pytest.fixture
async def live(settings: Settings, keys: Keys) -> AsyncIterator[Live]:
    async with serving(settings, keys) as server:
        yield server


async def refusals(client: httpx.AsyncClient, limit: str) -> float:
    """`mnemo_rate_limited_total{limit=...}` as `/metrics` shows it (0 before the first)."""
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200, r.text
    found = re.search(rf'^mnemo_rate_limited_total\{{limit="{limit}"\}} (\S+)$', r.text, re.M)
    return float(found.group(1)) if found else 0.0


def _bid(client_id: str) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "region": "us-east-2",
        "ram_gb": 8,
        "vram_gb": 4,
        "duration_sec": 600,
        "max_price_per_gb_sec": 0.000001,
    }


# ---------------------------------------------------------------------------------------------
# WebSocket connections per account


async def test_sockets_past_the_account_limit_get_429_and_other_accounts_still_connect(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    """An account's extra socket is refused with HTTP 429 + Retry-After and the error body (and
    no server error logged); another account connects meanwhile; closing one socket frees a
    slot."""
    alice, bob = await signup(live.gw, "user"), await signup(live.gw, "user")
    held = [await live.socket(alice) for _ in range(SOCKETS)]
    server_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate
    server_log.addHandler(caplog.handler)
    try:
        with pytest.raises(InvalidStatus) as info:
            await live.socket(alice)
        await asyncio.sleep(0.05)  # the server logs once the endpoint has returned
    finally:
        server_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    response = info.value.response
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    body = json.loads(response.body)
    assert body["error"]["code"] == "rate_limited"
    assert str(SOCKETS) in body["error"]["message"]

    other = await live.socket(bob)
    assert (await request(other, {"op": "ping"}))["type"] == "pong"
    for ws in held:  # the refused handshake cost alice nothing
        assert (await request(ws, {"op": "ping"}))["type"] == "pong"

    await held.pop().close()

    async def reconnect() -> Any:
        try:
            return await live.socket(alice)
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            return None

    # The slot is given back once the server has seen the close: poll briefly.
    again = await eventually(reconnect)
    assert (await request(again, {"op": "ping"}))["type"] == "pong"
    assert await refusals(live.gw.client, "ws_connections") >= 1
    for ws in (*held, again, other):
        await ws.close()


async def test_connection_slots_are_shared_by_gateways_and_free_themselves_after_a_crash(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Two gateways' limiters count one account's sockets together; the slots of a gateway
    that stops renewing them (it crashed) expire, while renewed ones are kept."""
    first = RateLimiter(redis, keys, connections=1, connection_ttl_s=0.4)
    second = RateLimiter(redis, keys, connections=1, connection_ttl_s=0.4)
    slot = await first.open_connection("acct")
    with pytest.raises(RateLimited, match="at most 1 open WebSocket"):
        await second.open_connection("acct")
    assert await second.open_connection("someone-else")

    # Renewed past its ttl, the slot stays taken.
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        await first.renew_connections()
        await asyncio.sleep(0.1)
    with pytest.raises(RateLimited, match="at most 1 open WebSocket"):
        await second.open_connection("acct")

    # Renewed no more (the first gateway died without closing): free within the ttl.
    await asyncio.sleep(0.5)
    taken = await second.open_connection("acct")
    await second.close_connection("acct", taken)
    # A late renewal of a slot already given back does not bring it back.
    await first.renew_connections()
    await first.close_connection("acct", slot)
    again = await second.open_connection("acct")
    await second.close_connection("acct", again)


# ---------------------------------------------------------------------------------------------
# writes per second per account


def test_order_contract_rfq_and_registration_routes_count_as_writes() -> None:
    """The routes under the per-account write limit (reads and heartbeats are not)."""
    limited = {(op.method, op.path) for op in OPERATIONS if op.limit == WRITES}
    assert limited == {
        ("POST", "/api/bids"),
        ("DELETE", "/api/bids/{bid_id}"),
        ("POST", "/api/contracts/create"),
        ("POST", "/api/contracts/{contract_id}/extend"),
        ("POST", "/api/contracts/{contract_id}/settle"),
        ("POST", "/api/marketplace/request"),
        ("POST", "/api/nodes/register"),
        ("POST", "/api/nodes/register/batch"),
    }


async def test_a_burst_of_writes_past_the_limit_gets_429_and_other_accounts_are_served(
    gw: Gateway,
) -> None:
    """An account's writes past its burst are refused (429, Retry-After, rate_limited) on every
    write route alike, while another account's bids go through."""
    api = gw.client
    flood, calm = await signup(gw, "user"), await signup(gw, "user")
    flood_client, calm_client = await create_client(gw, flood), await create_client(gw, calm)
    replies = await asyncio.gather(
        *(
            api.post("/api/bids", json=_bid(flood_client), headers=flood.headers)
            for _ in range(BURST + 5)
        )
    )
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [201] * BURST + [429] * 5, statuses
    refused = next(r for r in replies if r.status_code == 429)
    assert_error(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1

    # The budget is the account's, over all write routes; reads are not counted.
    bid_id = next(r for r in replies if r.status_code == 201).json()["bid_id"]
    assert_error(await api.delete(f"/api/bids/{bid_id}", headers=flood.headers), 429)
    rfq = {"ram_gb": 8, "vram_gb": 0, "duration_sec": 60, "max_price_per_gb_sec": 0.00001}
    assert_error(await api.post("/api/marketplace/request", json=rfq, headers=flood.headers), 429)
    r = await api.get(f"/api/bids/{bid_id}", headers=flood.headers)
    assert r.status_code == 200, r.text

    for _ in range(BURST):
        r = await api.post("/api/bids", json=_bid(calm_client), headers=calm.headers)
        assert r.status_code == 201, r.text
    assert await refusals(api, "writes") == 7


async def test_the_write_rate_refills_after_retry_after(redis: aioredis.Redis, keys: Keys) -> None:
    """A refused account may write again once the wait it was told has passed."""
    limiter = RateLimiter(redis, keys, {WRITES: Rate(per_s=20, burst=2)})
    await limiter.hit(WRITES, "acct")
    await limiter.hit(WRITES, "acct")
    with pytest.raises(RateLimited, match="too many requests") as info:
        await limiter.hit(WRITES, "acct")
    assert info.value.retry_after_s == 1
    await asyncio.sleep(0.06)  # one interval (50 ms) later, one more write is earned
    await limiter.hit(WRITES, "acct")
    with pytest.raises(RateLimited, match="too many requests"):
        await limiter.hit(WRITES, "acct")


async def test_a_limit_raised_past_the_clock_still_serves(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """The benchmarks' raised write limit (a billion a second) lets every write through."""
    limiter = RateLimiter(redis, keys, {WRITES: Rate(per_s=1e9, burst=10**9)})
    for _ in range(50):
        await limiter.hit(WRITES, "acct")


# ---------------------------------------------------------------------------------------------
# channels per socket


async def test_a_subscribe_past_the_channel_limit_is_refused_and_the_socket_keeps_working(
    live: Live, redis: aioredis.Redis
) -> None:
    """A subscribe that would take a socket past its channel limit adds nothing and gets an
    error naming the limit; the socket stays open, keeps its channels and can still subscribe
    up to the limit."""
    user: Actor = await signup(live.gw, "user")
    ws = await live.socket(user)
    assert (await subscribe(ws, "market", "quotes:us-east-2"))["type"] == "subscribed"
    reply = await subscribe(ws, "trades:us-east-2", "quotes:eu-west-1")
    assert reply["type"] == "error", reply
    assert reply["error"]["code"] == "too_many_channels"
    assert f"at most {CHANNELS} channels" in reply["error"]["message"]

    # trades:us-east-2 was not added: an event there does not arrive, one on market does.
    await redis.publish(live.keys.trades_channel("us-east-2"), trade_message("us-east-2"))
    await redis.publish(live.keys.market_channel, market_message(1))
    assert await recv(ws) == market_event(1)
    assert (await request(ws, {"op": "ping", "ref": 1})) == {"type": "pong", "ref": 1}
    assert await subscribe(ws, "trades:us-east-2", "market") == {
        "type": "subscribed",
        "channels": ["trades:us-east-2", "market"],
    }
    assert (await subscribe(ws, "quotes:eu-west-1"))["error"]["code"] == "too_many_channels"
    assert await refusals(live.gw.client, "subscriptions") == 2
    await ws.close()
