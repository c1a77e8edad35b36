"""Delivery end to end: a real gateway (uvicorn), the engine, the journal, and real Valkey lease
servers started by a node's agent (`tests.gateway.lease_driver`, over the agent's REST routes).

The renter rents RAM, gets its URL from `/access`, uses it, settles; the node is paid for the
time it delivered and the egress it measured; the capacity comes back only after the server
stopped; a node that never delivers costs the renter nothing; a node that dies moves the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError

from agent.client import GatewaySocket
from agent.digest import lease_digest_async
from engine import core
from engine.keys import Keys
from engine.settings import Settings
from gateway.leases import lease_password
from gateway.protocol import LeaseNotice, MarketSummary, PublicEvent
from persistence.journal.worker import run_journal
from tests.agent.test_agent_gateway import Exchange, _free_port, eventually
from tests.gateway.lease_driver import LeaseDriver

MB = 10**6
REGION = "us-east-2"


@pytest.fixture
async def exchange(
    redis_url: str, db_url: str, keys: Keys, tmp_path: Path
) -> AsyncIterator[Exchange]:
    settings = Settings(
        redis_url=redis_url,
        database_url=db_url,
        key_prefix=keys.prefix,
        jwt_secret="delivery-tests-" + "x" * 40,
        data_dir=tmp_path / "data",
        port=_free_port(),
        heartbeat_interval_s=1.0,
        heartbeat_min_interval_s=0.2,
        lease_ready_timeout_ms=1_500,
        lease_close_timeout_ms=3_000,
    )
    ex = Exchange(settings)
    await ex.start()
    await ex.start_engine()
    stop = asyncio.Event()
    journal = asyncio.create_task(run_journal(settings, consumer="delivery-test", stop=stop))
    try:
        yield ex
    finally:
        stop.set()
        await asyncio.wait_for(journal, 30)
        await ex.stop_engine()
        await ex.stop()


@dataclass
class User:
    key: str
    user_id: str
    client_id: str | None
    http: httpx.AsyncClient


@pytest.fixture
async def users(exchange: Exchange) -> AsyncIterator[Any]:
    made: list[User] = []

    async def make(role: str) -> User:
        http = httpx.AsyncClient(base_url=exchange.url, timeout=30)
        r = await http.post(
            "/api/auth/signup",
            json={
                "email": f"{role}-{uuid.uuid4().hex[:10]}@example.com",
                "password": "correct horse battery staple",
                "role": role,
            },
        )
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]["key"]
        user_id = r.json()["user"]["id"]
        http.headers["X-API-Key"] = key
        client_id = None
        if role == "user":
            r = await http.post("/api/clients", json={"org_name": "lab"})
            assert r.status_code == 201, r.text
            client_id = r.json()["id"]
            await exchange.fund(client_id)  # contracts are paid for (issue 14)
        user = User(key, user_id, client_id, http)
        made.append(user)
        return user

    try:
        yield make
    finally:
        for user in made:
            await user.http.aclose()


async def _node(provider: User, *, delivers: bool = True, ram_gb: int = 4, **terms: Any) -> str:
    body = {
        "node_type": "mist_node",
        "name": "lease-host",
        "region": REGION,
        "latitude": 40.73,
        "longitude": -73.79,
        "total_ram_gb": ram_gb,
        "total_vram_gb": 0,
        "price_per_gb_sec": 0.000001,
        "egress_price_per_gb": 0.05,
        "delivers": delivers,
        **terms,
    }
    r = await provider.http.post("/api/nodes/register", json=body)
    assert r.status_code == 200, r.text
    node_id: str = r.json()["node_id"]
    await _engine_serving(str(provider.http.base_url).rstrip("/"), provider)
    return node_id


async def _engine_serving(url: str, user: User) -> None:
    """Wait until the engine serves the region (its `market` summary arrives): it notifies and
    watches deadlines only from then on."""
    seen = asyncio.Event()

    def on_event(channel: str, event: PublicEvent) -> None:
        if isinstance(event, MarketSummary) and event.region == REGION:
            seen.set()

    ws = await GatewaySocket.open(url, user.key, on_event=on_event)
    try:
        await ws.subscribe(["market"])
        await asyncio.wait_for(seen.wait(), 30)
    finally:
        await ws.close()


@contextlib.asynccontextmanager
async def driving(
    exchange: Exchange, provider: User, node_id: str, tmp_path: Path, **options: Any
) -> AsyncIterator[LeaseDriver]:
    workdir = tmp_path / f"node-{node_id[-8:]}"  # minted ids of one region share their head
    workdir.mkdir()
    driver = LeaseDriver(exchange.url, provider.key, node_id, workdir, **options)
    driver.start()
    try:
        yield driver
    finally:
        await driver.stop()


async def _rent(exchange: Exchange, renter: User, node_id: str, **overrides: Any) -> str:
    body = {
        "client_id": renter.client_id,
        "node_id": node_id,
        "ram_gb": 1,
        "vram_gb": 0,
        "duration_sec": 600,
        **overrides,
    }
    r = await renter.http.post("/api/contracts/create", json=body)
    assert r.status_code == 201, r.text
    cid: str = r.json()["contract_id"]
    return cid


async def _access(renter: User, contract_id: str, state: str = "ready") -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def check() -> bool:
        r = await renter.http.get(f"/api/contracts/{contract_id}/access")
        assert r.status_code == 200, r.text
        found.update(r.json())
        return bool(found["state"] == state)

    await eventually(check, f"lease {contract_id} {state}", timeout_s=20)
    return found


async def _contract(user: User, contract_id: str) -> dict[str, Any]:
    r = await user.http.get(f"/api/contracts/{contract_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def _write_and_read(url: str, megabytes: int) -> None:
    """SET `megabytes` values of 1 MB through the lease and GET them back."""
    client = aioredis.from_url(url)
    try:
        blob = bytes(range(256)) * (MB // 256) + b"x" * (MB % 256)
        pipe = client.pipeline(transaction=False)
        for i in range(megabytes):
            pipe.set(f"block:{i}", blob[i % 256 :] + blob[: i % 256])
        assert all(await pipe.execute())
        pipe = client.pipeline(transaction=False)
        for i in range(megabytes):
            pipe.get(f"block:{i}")
        values = await pipe.execute()
        assert all(v == blob[i % 256 :] + blob[: i % 256] for i, v in enumerate(values))
    finally:
        await client.aclose()


async def test_a_delivered_lease_from_reserve_to_settlement(
    exchange: Exchange, users: Any, tmp_path: Path
) -> None:
    """Reserve -> ready -> the renter stores and reads back 100 MB through the URL of /access;
    other credentials and none are refused; settle -> the server is gone, the capacity comes
    back only after, the billed egress is the node's measurement and the digest the renter's."""
    provider, renter, other = await users("provider"), await users("user"), await users("user")
    node_id = await _node(provider)
    hold = asyncio.Event()
    async with driving(exchange, provider, node_id, tmp_path, hold_report=hold) as driver:
        cid = await _rent(exchange, renter, node_id)
        other_cid = await _rent(exchange, other, node_id)
        access = await _access(renter, cid)
        assert access["delivered"] is True and access["kind"] == "ram"
        assert access["url"].startswith("redis://lease-")
        assert access["expires_ms"] == (await _contract(renter, cid))["end_ms"]

        # Only the renter sees it; other people's credentials and none open nothing.
        r = await other.http.get(f"/api/contracts/{cid}/access")
        assert r.status_code == 404
        r = await provider.http.get(f"/api/contracts/{cid}/access")
        assert r.status_code == 404
        other_access = await _access(other, other_cid)
        host, port = access["host"], access["port"]
        with pytest.raises(AuthenticationError):
            await aioredis.Redis(
                host=host,
                port=port,
                username=other_access["username"],
                password=other_access["password"],
            ).ping()
        anonymous = aioredis.Redis(host=host, port=port)
        with pytest.raises((AuthenticationError, ResponseError)):
            await anonymous.set("k", "v")
        await anonymous.aclose()

        await _write_and_read(access["url"], 100)
        renter_client = aioredis.from_url(access["url"])
        digest = await lease_digest_async(renter_client)
        await renter_client.aclose()

        # Settle: the close is ordered; while the node has not reported, the capacity stays
        # reserved (the server is stopped before the report).
        settling = asyncio.create_task(renter.http.post(f"/api/contracts/{cid}/settle", json={}))
        await eventually(lambda: cid in driver.reports, "the node closed the lease")
        node = (await provider.http.get(f"/api/nodes/{node_id}")).json()
        assert node["reserved_ram_gb"] == 2  # both leases, the closing one included
        # and the server refuses connections already (it stopped before the node reported)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=1).close()
        hold.set()
        r = await settling
        assert r.status_code == 200, r.text
        settled = r.json()
        node = (await provider.http.get(f"/api/nodes/{node_id}")).json()
        assert node["reserved_ram_gb"] == 1

    report = driver.reports[cid]
    assert settled["status"] == "completed"
    assert settled["lease_state"] == "closed"
    assert settled["lease_digest"] == report["digest"] == digest
    assert settled["egress_bytes"] >= report["egress_bytes"] > 100 * MB  # what the GETs read
    assert abs(settled["egress_gb"] * 1e9 - report["egress_bytes"]) <= 0.01 * report["egress_bytes"]
    assert settled["total_cost_pusd"] == core.contract_cost_pusd(
        ram_gb=1,
        vram_gb=0,
        used_s=settled["used_sec"],
        price_pusd=settled["price_pusd"],
        egress_mgb=round(settled["egress_gb"] * 1000),
        egress_price_pusd=settled["egress_price_pusd"],
    )
    # billed from the ready report, not from the reserve
    assert settled["ready_ms"] >= settled["start_ms"]
    assert settled["used_sec"] <= -(-(settled["completed_ms"] - settled["ready_ms"]) // 1000)


async def test_a_node_that_never_delivers_costs_nothing_and_keeps_its_capacity(
    exchange: Exchange, users: Any
) -> None:
    """A node that never reports ready: past the readiness bound the lease fails (no other node
    delivers), the renter is charged nothing and the node's capacity is free again."""
    provider, renter = await users("provider"), await users("user")
    node_id = await _node(provider)
    cid = await _rent(exchange, renter, node_id)
    pending = await _access(renter, cid, "pending")
    assert pending["url"] is None and pending["delivered"] is True
    await _access(renter, cid, "failed")
    contract = await _contract(renter, cid)
    assert contract["status"] == "failed"
    assert contract["total_cost_pusd"] == 0 and contract["used_sec"] == 0
    node = (await provider.http.get(f"/api/nodes/{node_id}")).json()
    assert node["reserved_ram_gb"] == 0 and node["available_ram_gb"] == 4


async def test_a_lease_not_ready_in_time_moves_to_a_node_that_delivers(
    exchange: Exchange, users: Any, tmp_path: Path
) -> None:
    """The lease fails over from a silent node to one whose agent serves it; the renter hears
    `lease_moved` on `leases` with the new endpoint and pays only from that ready report."""
    provider, renter = await users("provider"), await users("user")
    silent = await _node(provider, price_per_gb_sec=0.0000005)  # cheaper: chosen first
    serving = await _node(provider)
    notices: list[LeaseNotice] = []

    def on_event(channel: str, event: PublicEvent) -> None:
        if isinstance(event, LeaseNotice):
            notices.append(event)

    ws = await GatewaySocket.open(exchange.url, renter.key, on_event=on_event)
    try:
        await ws.subscribe(["leases"])
        async with driving(exchange, provider, serving, tmp_path):
            # The silent node is alive (it beats: starting the other agent can outlast its
            # offline deadline) but no agent of its own ever serves the lease.
            r = await provider.http.post(
                f"/api/nodes/{silent}/heartbeat",
                json={"available_ram_gb": 4, "available_vram_gb": 0},
            )
            assert r.status_code == 200, r.text
            cid = await _rent(exchange, renter, silent, max_price_per_gb_sec=0.00001)
            await eventually(
                lambda: any(n.notice == "lease_moved" for n in notices), "lease_moved", 20
            )
            moved = next(n for n in notices if n.notice == "lease_moved")
            assert moved.lease.node_id == serving and moved.lease.state == "ready"
            old = await _contract(renter, cid)
            assert old["status"] == "failed_over" and old["total_cost_pusd"] == 0
            access = await _access(renter, old["successor_id"])
            assert (access["host"], access["port"]) == (moved.lease.host, moved.lease.port)
            await _write_and_read(access["url"], 2)
    finally:
        await ws.close()


async def test_killing_the_agent_moves_the_lease_and_stops_the_charges(
    exchange: Exchange, users: Any, tmp_path: Path
) -> None:
    """kill -9 of the agent mid-lease: its node goes offline, the lease fails over to a node
    that delivers, the renter is told the new endpoint on /ws and can use it, and the old
    contract is charged up to the dead node's last heartbeat only."""
    provider, renter = await users("provider"), await users("user")
    first = await _node(provider, price_per_gb_sec=0.0000005)
    second = await _node(provider)
    notices: list[LeaseNotice] = []
    ws = await GatewaySocket.open(
        exchange.url,
        renter.key,
        on_event=lambda ch, ev: notices.append(ev) if isinstance(ev, LeaseNotice) else None,
    )
    try:
        await ws.subscribe(["leases"])
        async with (
            driving(exchange, provider, first, tmp_path) as dying,
            driving(exchange, provider, second, tmp_path),
        ):
            cid = await _rent(exchange, renter, first, max_price_per_gb_sec=0.00001)
            access = await _access(renter, cid)
            await _write_and_read(access["url"], 2)
            await dying.kill()
            killed_ms = time.time() * 1000
            await eventually(
                lambda: any(n.notice == "lease_moved" for n in notices), "lease_moved", 30
            )
            old = await _contract(renter, cid)
            assert old["status"] == "failed_over"
            node = (await provider.http.get(f"/api/nodes/{first}")).json()
            assert node["status"] == "offline"
            # charged from ready to the last heartbeat (at most a beat before the kill)
            last_beat = node["last_heartbeat_ms"]
            assert last_beat <= killed_ms
            # (nothing when its last beat came before the ready report: a loaded machine)
            assert old["used_sec"] == max(0, -(-(last_beat - old["ready_ms"]) // 1000))
            new = await _access(renter, old["successor_id"])
            moved = next(n for n in notices if n.notice == "lease_moved")
            assert (new["host"], new["port"]) == (moved.lease.host, moved.lease.port)
            assert new["password"] != access["password"]
            await _write_and_read(new["url"], 2)
    finally:
        await ws.close()


async def test_leases_on_a_node_that_does_not_deliver_are_reserved_as_before(
    exchange: Exchange, users: Any
) -> None:
    """A node registered without `delivers` (the spec's agent): its RAM contract is reserved,
    not delivered, bills from the reserve and settles at once with the renter's egress."""
    provider, renter = await users("provider"), await users("user")
    node_id = await _node(provider, delivers=False)
    cid = await _rent(exchange, renter, node_id)
    r = await renter.http.get(f"/api/contracts/{cid}/access")
    assert r.status_code == 200
    access = r.json()
    assert access["delivered"] is False and access["url"] is None
    assert access["password"] is None and access["state"] == "ready"
    r = await renter.http.post(f"/api/contracts/{cid}/settle", json={"actual_egress_gb": 2.5})
    assert r.status_code == 200, r.text
    settled = r.json()
    assert settled["status"] == "completed" and settled["egress_gb"] == 2.5
    assert settled["delivered"] is False and settled["lease_state"] is None


async def test_the_lease_secret_is_never_stored_published_or_logged(
    exchange: Exchange,
    users: Any,
    tmp_path: Path,
    redis: aioredis.Redis,
    keys: Keys,
    db_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a lease's whole life, its password is in no Postgres text column of any table, no
    event of the region's stream, no pub/sub message and no log line of the gateway."""
    caplog.set_level(logging.DEBUG)
    provider, renter = await users("provider"), await users("user")
    node_id = await _node(provider)
    published: list[bytes] = []
    pubsub = redis.pubsub()
    await pubsub.psubscribe(f"{keys.prefix}*")

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                published.append(message["data"])

    listener = asyncio.create_task(listen())
    try:
        async with driving(exchange, provider, node_id, tmp_path):
            cid = await _rent(exchange, renter, node_id)
            access = await _access(renter, cid)
            await _write_and_read(access["url"], 1)
            r = await renter.http.post(f"/api/contracts/{cid}/settle", json={})
            assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await pubsub.aclose()
    password = access["password"]
    assert password == lease_password(exchange.settings.lease_secret, cid, node_id)
    secret = password.encode()

    conn = await asyncpg.connect(db_url)
    try:

        async def journaled() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT lease_state = 'closed' FROM contracts WHERE id = $1", uuid.UUID(cid)
                )
            )

        await eventually(journaled, "the journal recorded the settlement", 20)
        columns = await conn.fetch(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND data_type IN ('text', 'character varying', "
            "'json', 'jsonb', 'bytea')"
        )
        assert columns
        for col in columns:
            found = await conn.fetchval(
                f'SELECT count(*) FROM "{col["table_name"]}" '
                f'WHERE position($1 in "{col["column_name"]}"::text) > 0',
                password,
            )
            assert found == 0, f"{col['table_name']}.{col['column_name']} holds the secret"
    finally:
        await conn.close()
    events = await redis.xrange(keys.events(REGION))
    assert events and not any(secret in v for _, fields in events for v in fields.values())
    assert published and not any(secret in m for m in published)
    assert not any(password in r.getMessage() for r in caplog.records)
