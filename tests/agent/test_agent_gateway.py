"""The node agent against a real gateway (uvicorn on a loopback port) over real Redis/Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvicorn

from agent.client import Gateway, GatewaySocket
from agent.config import AgentConfig, save_config
from agent.detect import GpuProbe, MachineReading
from agent.fleet import drive_fleet, run_fleet
from agent.population import make_fleet
from agent.registration import register_fleet
from agent.runner import NodeAgent
from agent.shards import FleetStats
from agent.simulation import Fleet
from engine.keys import Keys
from engine.notify import Notifier
from engine.settings import Settings
from engine.types import TrustEntry, TrustUpdated
from gateway.protocol import MarketSummary, PublicEvent
from scripts.renter_bot import RenterBot
from tests.agent.test_agent_detect import FakeNVML, _gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str, timeout_s: float = 30.0
) -> None:
    """Poll `check` until it holds (a generous bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


class Exchange:
    """A gateway served by uvicorn in this event loop (restartable), plus an optional engine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self.wrap: Callable[[Any], Any] = lambda app: app
        """Applied to the app at each start (a test's stand-in for a proxy or an older gateway)."""
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._engine: asyncio.Task[None] | None = None
        self._engine_stop = asyncio.Event()

    async def start(self) -> None:
        from gateway.app import create_app

        config = uvicorn.Config(
            self.wrap(create_app(self.settings)),
            host="127.0.0.1",
            port=self.settings.port,
            log_level="warning",
            lifespan="on",
        )
        server = uvicorn.Server(config)
        # The test process's Ctrl-C stays its own (uvicorn takes it while it serves).
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._server = server
        self._task = asyncio.create_task(server.serve())
        await eventually(lambda: server.started, "the gateway started")

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None

    async def start_engine(self) -> None:
        from engine.process import run_engine

        self._engine_stop.clear()
        self._engine = asyncio.create_task(run_engine(self.settings, stop=self._engine_stop))

    async def fund(self, client_id: str, usd: int = 1000) -> None:
        """An operator's credit to a renter (`mnemo credit`'s code): contracts need money."""
        from scripts.money import credit_command

        status = await credit_command(
            self.settings, client_id, usd * 10**12, reason="test", out=io.StringIO()
        )
        assert status == 0

    async def stop_engine(self) -> None:
        if self._engine is not None:
            self._engine_stop.set()
            await self._engine
            self._engine = None


@pytest.fixture
async def exchange(
    redis_url: str, db_url: str, keys: Keys, tmp_path: Path
) -> AsyncIterator[Exchange]:
    settings = Settings(
        redis_url=redis_url,
        database_url=db_url,
        key_prefix=keys.prefix,
        jwt_secret="agent-tests-" + "x" * 40,
        data_dir=tmp_path / "data",
        port=_free_port(),
        heartbeat_interval_s=1.0,
        heartbeat_min_interval_s=0.2,
    )
    ex = Exchange(settings)
    await ex.start()
    try:
        yield ex
    finally:
        await ex.stop_engine()
        await ex.stop()


Account = Callable[[str], Awaitable[Gateway]]


@pytest.fixture
async def account(exchange: Exchange) -> AsyncIterator[Account]:
    """Sign up a new account of a role; its REST client is closed after the test."""
    made: list[Gateway] = []

    async def make(role: str) -> Gateway:
        gateway = Gateway(exchange.url)
        made.append(gateway)
        email = f"{role}-{uuid.uuid4().hex[:10]}@example.com"
        await gateway.signup(email, "pw-" + uuid.uuid4().hex, role=role)
        return gateway

    try:
        yield make
    finally:
        for gateway in made:
            await gateway.aclose()


def _config(url: str, api_key: str, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "api_url": url,
        "api_key": api_key,
        "name": "Alice_RTX4090",
        "region": "us-east-2",
        "latitude": 40.7282,
        "longitude": -73.7949,
        "price_per_gb_sec": 0.0000008,
        "max_ram_gb": 4,
        # Below the file's 5 s floor on purpose: the test gateway allows 0.2 s.
        "heartbeat_interval": 0.5,
        # Lease servers (if a test makes a RAM contract): loopback, the agent tests' ports.
        "lease_listen": "127.0.0.1",
        "lease_advertise_host": "127.0.0.1",
        "lease_ports": "42000-42899",
    }
    values.update(overrides)
    return AgentConfig(**values)


def _probe() -> GpuProbe:
    # One 24 GiB card with 20 GiB free, steady, so capacity is predictable.
    return GpuProbe.open(FakeNVML([_gpu("NVIDIA GeForce RTX 4090", 24, 20, util=5, temp=50)]))


def _steady(gpus: GpuProbe) -> MachineReading:
    # 64 GB of RAM with 48 free, whatever else this shared test machine is doing.
    return MachineReading(total_ram_gb=64, free_ram_gb=48, cpu_usage_pct=12.5, gpu=gpus.read())


def _agent(config: AgentConfig, path: Path | None = None) -> NodeAgent:
    return NodeAgent(config, path, gpus=_probe(), sample=_steady)


async def _engine_serving(exchange: Exchange, who: Gateway, region: str) -> None:
    """Wait until the engine serves `region` (its `market` summaries arrive): notices of what
    happens before that are not sent (the engine starts from a snapshot)."""
    seen = asyncio.Event()

    def on_event(channel: str, event: PublicEvent) -> None:
        if isinstance(event, MarketSummary) and event.region == region:
            seen.set()

    socket = await GatewaySocket.open(exchange.url, who.api_key or "", on_event=on_event)
    try:
        await socket.subscribe(["market"])
        await asyncio.wait_for(seen.wait(), 30)
    finally:
        await socket.close()


class _Running:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(agent.run(self.stop))

    async def finish(self) -> None:
        self.stop.set()
        await self.task


@contextlib.asynccontextmanager
async def running(agent: NodeAgent) -> AsyncIterator[_Running]:
    run = _Running(agent)
    try:
        yield run
    finally:
        if not run.task.done():
            await run.finish()


async def test_agent_registers_heartbeats_and_records_node_id(
    exchange: Exchange, account: Account, tmp_path: Path
) -> None:
    """A fresh agent registers, writes node_id to its own config file, heartbeats over the
    socket, and the node's capacity follows what it reports."""
    provider = await account("provider")
    path = tmp_path / "conf" / "node_config.json"
    save_config(path, _config(exchange.url, provider.api_key or ""))
    agent = _agent(_config(exchange.url, provider.api_key or ""), path)
    async with running(agent) as run:
        await eventually(lambda: agent.beats_sent >= 2, "two heartbeats")
        await eventually(lambda: agent.connected.is_set(), "the socket is up")
        node_id = json.loads(path.read_text())["node_id"]
        assert node_id == agent.node_id
        node = await provider.get_node(node_id)
        assert node["status"] == "active"
        assert node["total_vram_gb"] == 24
        assert node["metadata"]["gpu_model"] == "GeForce RTX 4090"
        # max_ram_gb 4 caps RAM; VRAM is the 20 GiB the card has free.
        assert (node["offered_ram_gb"], node["offered_vram_gb"]) == (4, 20)
        assert (node["available_ram_gb"], node["available_vram_gb"]) == (4, 20)
        await run.finish()
    node = await provider.get_node(node_id)
    assert node["status"] == "maintenance"


async def test_restarted_agent_resumes_its_node(
    exchange: Exchange, account: Account, tmp_path: Path
) -> None:
    """An agent restarted with the saved node_id resumes that node (no second registration)
    and brings it back from maintenance."""
    provider = await account("provider")
    path = tmp_path / "node_config.json"
    save_config(path, _config(exchange.url, provider.api_key or ""))
    first = _agent(_config(exchange.url, provider.api_key or ""), path)
    async with running(first):
        await eventually(lambda: first.beats_sent >= 1, "a heartbeat")
    node_id = first.node_id
    assert node_id is not None
    assert (await provider.get_node(node_id))["status"] == "maintenance"
    config = _config(
        exchange.url, provider.api_key or "", node_id=node_id, price_per_gb_sec=0.000001
    )
    second = _agent(config, path)
    async with running(second):
        await eventually(lambda: second.beats_sent >= 1, "a heartbeat after restart")
        node = await provider.get_node(node_id)
        assert node["status"] == "active"
        assert node["price_per_gb_sec"] == pytest.approx(0.000001)
    listed = await provider.request("GET", "/api/nodes", params={"mine": "true"})
    assert [n["node_id"] for n in listed["nodes"]] == [node_id]


async def test_agent_survives_a_gateway_restart(
    exchange: Exchange, account: Account, tmp_path: Path
) -> None:
    """With the gateway gone the agent backs off; when it returns the agent reconnects and its
    heartbeats bring the node back to active."""
    provider = await account("provider")
    agent = _agent(_config(exchange.url, provider.api_key or ""), None)
    async with running(agent):
        await eventually(lambda: agent.connected.is_set() and agent.beats_sent >= 1, "connected")
        await exchange.stop()
        await eventually(lambda: not agent.connected.is_set(), "the socket noticed")
        before = agent.beats_sent
        await asyncio.sleep(1.0)  # a few failed beats while the gateway is away
        assert agent.beats_sent == before
        await exchange.start()
        await eventually(lambda: agent.beats_sent > before + 1, "heartbeats resumed", 60)
        await eventually(lambda: agent.connected.is_set(), "the socket reconnected", 60)
        assert agent.node_id is not None
        node = await provider.get_node(agent.node_id)
        assert node["status"] == "active"


async def test_contract_notices_keep_capacity_consistent_with_the_engine(
    exchange: Exchange, account: Account, tmp_path: Path
) -> None:
    """A contract on the node reaches the agent as a notice; the agent stops offering the leased
    memory, and the engine's reserved + available == offered <= the owner's limit holds."""
    await exchange.start_engine()
    provider = await account("provider")
    renter = await account("user")
    agent = _agent(_config(exchange.url, provider.api_key or ""), None)
    async with running(agent):
        await eventually(lambda: agent.connected.is_set() and agent.beats_sent >= 1, "connected")
        node_id = agent.node_id
        assert node_id is not None
        await _engine_serving(exchange, renter, "us-east-2")
        client = await renter.request("POST", "/api/clients", body={"org_name": "Renter"})
        await exchange.fund(client["id"])
        contract = await renter.request(
            "POST",
            "/api/contracts/create",
            body={
                "client_id": client["id"],
                "node_id": node_id,
                "ram_gb": 2,
                "vram_gb": 8,
                "duration_sec": 600,
            },
        )
        cid = contract["contract_id"]
        await eventually(lambda: cid in agent.leases, "the contract_started notice")
        assert ("contract_started", cid) in [(n, c.contract_id) for n, c in agent.notices]
        assert (agent.leases.leased_ram_gb, agent.leases.leased_vram_gb) == (2, 8)
        beats = agent.beats_sent
        await eventually(lambda: agent.beats_sent >= beats + 2, "heartbeats after the lease")
        beat = agent.make_beat()
        assert (beat.available_ram_gb, beat.available_vram_gb) == (2, 12)
        node = await provider.get_node(node_id)
        assert (node["reserved_ram_gb"], node["reserved_vram_gb"]) == (2, 8)
        assert (node["available_ram_gb"], node["available_vram_gb"]) == (2, 12)
        assert (node["offered_ram_gb"], node["offered_vram_gb"]) == (4, 20)
        for kind in ("ram", "vram"):
            assert (
                node[f"reserved_{kind}_gb"] + node[f"available_{kind}_gb"]
                == node[f"offered_{kind}_gb"]
            )
            assert node[f"offered_{kind}_gb"] <= node[f"total_{kind}_gb"]
        # The renter ends it early: the agent hears of it and offers the memory again.
        await renter.request("POST", f"/api/contracts/{cid}/settle", body={})
        await eventually(lambda: cid not in agent.leases, "the contract_ended notice")
        assert "contract_ended" in [n for n, _ in agent.notices]
        beats = agent.beats_sent
        await eventually(lambda: agent.beats_sent >= beats + 2, "heartbeats after the end")
        node = await provider.get_node(node_id)
        assert (node["reserved_ram_gb"], node["offered_ram_gb"], node["available_ram_gb"]) == (
            0,
            4,
            4,
        )


async def test_agent_logs_its_nodes_standing(
    exchange: Exchange,
    account: Account,
    redis: aioredis.Redis,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A warning about the node's uptime reaches the agent on `node:<id>` beside the contract
    notices, and the provider reads it in the agent's log with the time the suspension is due;
    the agent goes on serving."""
    provider = await account("provider")
    agent = _agent(_config(exchange.url, provider.api_key or ""), None)
    async with running(agent):
        await eventually(lambda: agent.connected.is_set() and agent.beats_sent >= 1, "connected")
        node_id = agent.node_id
        assert node_id is not None
        region = (await provider.get_node(node_id))["region"]
        due_ms = int(time.time() * 1000) + 86_400_000
        entry = TrustEntry(
            node_id=node_id, uptime_score=55.5, uptime_windows=200, suspend_at_ms=due_ms,
            notice="warned",
        )  # fmt: skip
        event = TrustUpdated(
            event_id="1-0", region=region, ts_ms=due_ms - 86_400_000, entries=[entry]
        )
        with caplog.at_level(logging.INFO, logger="mnemo.agent"):
            for channel, message in Notifier(keys, region).on_event(event):
                await redis.publish(channel, message)
            warned = lambda: [  # noqa: E731
                r
                for r in caplog.records
                if r.levelno == logging.WARNING and "is warned" in r.getMessage()
            ]
            await eventually(lambda: bool(warned()), "the warning in the agent's log")
        text = warned()[0].getMessage()
        assert node_id in text and "uptime 55.5 over 200 h" in text
        assert datetime.fromtimestamp(due_ms / 1000).isoformat(timespec="seconds") in text
        beats = agent.beats_sent
        await eventually(lambda: agent.beats_sent > beats, "heartbeats after the warning")
        assert agent.notices == []  # a standing is not a contract


async def test_fleet_registers_and_beats_within_the_rate_limit(
    exchange: Exchange, account: Account
) -> None:
    """A small simulated fleet registers over one account and heartbeats over one socket; no
    beat is refused as too soon and every node is live at the exchange."""
    provider = await account("provider")
    nodes = make_fleet(40, seed=7)
    ids = await register_fleet(provider, nodes, concurrency=8)
    assert len(set(ids)) == 40
    fleet = Fleet(nodes, ids, seed=7, churn=False)
    stats = FleetStats()
    stop = asyncio.Event()
    task = asyncio.create_task(
        drive_fleet(
            fleet,
            api_url=exchange.url,
            api_key=provider.api_key or "",
            stop=stop,
            interval_s=1.0,
            min_gap_s=0.5,
            tick_s=0.1,
            stats=stats,
        )
    )
    try:
        await eventually(lambda: stats.outcomes["ok"] >= 80, "two rounds of beats", 60)
    finally:
        stop.set()
        await task
    assert stats.outcomes["too_soon"] == 0
    assert set(stats.outcomes) == {"ok"}
    assert stats.notices == {} and stats.reconnects == 0
    listed = await provider.request("GET", "/api/nodes", params={"mine": "true", "limit": 100})
    assert listed["total_count"] == 40
    assert all(n["last_heartbeat_ms"] > 0 for n in listed["nodes"])
    assert {n["region"] for n in listed["nodes"]} >= {"us-east-2"}


class _Watch:
    """ASGI middleware that records the POSTs' paths and can answer some of them itself: as a
    gateway without batch registration (404), or as a proxy that loses the reply (503) of the
    first batch after the gateway handled it."""

    def __init__(self, app: Any, *, batch_route: bool = True, lose_first_batch: bool = False):
        self.app = app
        self.batch_route = batch_route
        self.lose_first_batch = lose_first_batch
        self.posts: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        self.posts.append(path)
        if path != "/api/nodes/register/batch":
            return await self.app(scope, receive, send)
        if not self.batch_route:
            return await _answer(send, 404, b'{"error":{"code":"not_found","message":"Not Found"}}')
        if self.lose_first_batch and self.posts.count(path) == 1:

            async def lost(message: Any) -> None:
                pass

            await self.app(scope, receive, lost)
            return await _answer(send, 503, b"")
        return await self.app(scope, receive, send)


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _own_node_ids(owner: Gateway) -> set[str]:
    listed = await owner.request("GET", "/api/nodes", params={"mine": "true", "limit": 500})
    return {n["node_id"] for n in listed["nodes"]}


async def _watched(exchange: Exchange, **kw: Any) -> _Watch:
    """Restart the exchange's gateway behind a `_Watch`; the watch."""
    await exchange.stop()
    watches: list[_Watch] = []

    def wrap(app: Any) -> _Watch:
        watches.append(_Watch(app, **kw))
        return watches[-1]

    exchange.wrap = wrap
    await exchange.start()
    return watches[0]


async def _all_listed(owner: Gateway, ids: list[str]) -> None:
    async def check() -> bool:
        return await _own_node_ids(owner) == set(ids)

    await eventually(check, "every node in its owner's listing")


async def test_fleet_registers_by_batches_and_a_lost_reply_registers_nothing_twice(
    exchange: Exchange, account: Account
) -> None:
    """The simulator registers through the batch route, an idempotency key per batch: the
    retry of a batch whose reply was lost gets the first answer, so every node exists once."""
    watch = await _watched(exchange, lose_first_batch=True)
    provider = await account("provider")
    nodes = make_fleet(45, seed=3)
    ids = await register_fleet(provider, nodes, batch=20)
    assert len(set(ids)) == 45
    await _all_listed(provider, ids)
    for i in (0, 21, 44):
        node = await provider.get_node(ids[i])
        assert (node["name"], node["region"]) == (nodes[i].name, nodes[i].region)
    assert watch.posts.count("/api/nodes/register/batch") == 3 + 1  # one batch sent twice
    assert "/api/nodes/register" not in watch.posts
    # The client's own batch call.
    more = await provider.register_nodes([n.registration_body() for n in nodes[:2]])
    assert len(set(more)) == 2 and not set(more) & set(ids)


async def test_fleet_registers_node_by_node_on_a_gateway_without_batches(
    exchange: Exchange, account: Account
) -> None:
    """Against an older gateway (404 on the batch route) the simulator falls back to one
    registration per node, and every node is registered once."""
    watch = await _watched(exchange, batch_route=False)
    provider = await account("provider")
    nodes = make_fleet(12, seed=4)
    ids = await register_fleet(provider, nodes, batch=5, concurrency=3)
    assert len(set(ids)) == 12
    await _all_listed(provider, ids)
    assert watch.posts.count("/api/nodes/register/batch") == 1
    assert watch.posts.count("/api/nodes/register") == 12


async def test_simulate_signs_up_registers_and_resumes_from_its_state(
    exchange: Exchange, tmp_path: Path
) -> None:
    """`--simulate N` signs up its own provider, registers N nodes and beats them; restarted
    with the same state file it resumes the same nodes instead of registering new ones."""
    state = tmp_path / "fleet.json"

    async def run_until(condition: Callable[[Gateway], Awaitable[bool]]) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_fleet(
                exchange.url,
                12,
                stop=stop,
                seed=5,
                interval_s=1.0,
                min_gap_s=0.5,
                churn=False,
                reprice_per_beat=0.0,
                state_path=state,
            )
        )
        try:
            await eventually(lambda: state.exists() or task.done(), "the fleet registered")
            key = json.loads(state.read_text())["api_key"]
            async with Gateway(exchange.url, key) as owner:
                await eventually(lambda: condition(owner), "the fleet is live", 60)
        finally:
            stop.set()
            await task

    seen: dict[str, int] = {}

    async def all_beating(owner: Gateway) -> bool:
        listed = await owner.request("GET", "/api/nodes", params={"mine": "true"})
        seen.update({n["node_id"]: n["last_heartbeat_ms"] for n in listed["nodes"]})
        return listed["total_count"] == 12 and all(n["last_heartbeat_ms"] for n in listed["nodes"])

    await run_until(all_beating)
    first = dict(seen)

    async def beating_again(owner: Gateway) -> bool:
        listed = await owner.request("GET", "/api/nodes", params={"mine": "true"})
        assert listed["total_count"] == 12  # resumed, not registered anew
        return all(n["last_heartbeat_ms"] > first[n["node_id"]] for n in listed["nodes"])

    await run_until(beating_again)


async def test_renter_bot_takes_contracts_on_a_simulated_fleet(
    exchange: Exchange, account: Account
) -> None:
    """The demo renter bot, against a small fleet and the engine, takes contracts (RFQ) and
    places bids, so a newcomer sees fills."""
    await exchange.start_engine()
    provider = await account("provider")
    nodes = make_fleet(20, seed=11, regions=["us-east-2"])
    ids = await register_fleet(provider, nodes, concurrency=4)
    fleet = Fleet(nodes, ids, seed=11, churn=False)
    stop = asyncio.Event()
    driver = asyncio.create_task(
        drive_fleet(
            fleet,
            api_url=exchange.url,
            api_key=provider.api_key or "",
            stop=stop,
            interval_s=1.0,
            min_gap_s=0.5,
            tick_s=0.1,
        )
    )
    renter = await account("user")
    client = await renter.request("POST", "/api/clients", body={"org_name": "Bot"})
    await exchange.fund(client["id"])  # the bot uses its account's first client
    bot = RenterBot(
        renter, rng=random.Random(3), rate_per_min=600, budget_usd=1000, regions=["us-east-2"]
    )
    bot_task = asyncio.create_task(bot.run(stop))
    try:
        await eventually(
            lambda: bot.counts.get("contracts", 0) >= 2 and bot.counts.get("bids", 0) >= 1,
            "the bot took contracts and placed a bid",
            60,
        )
        listed = await renter.request("GET", "/api/contracts")
        assert listed["total_count"] >= 2
        assert all(c["node_id"] in set(ids) for c in listed["contracts"])
    finally:
        stop.set()
        await asyncio.gather(driver, bot_task)


class _NoSocketAgent(NodeAgent):
    """An agent whose WebSocket never comes up (a proxy that blocks upgrades, say)."""

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        await stop.wait()


async def test_heartbeats_fall_back_to_http_without_a_socket(
    exchange: Exchange, account: Account
) -> None:
    """Without a WebSocket the agent heartbeats over `POST /api/nodes/{id}/heartbeat` and learns
    the exchange's view of its capacity from the replies."""
    provider = await account("provider")
    agent = _NoSocketAgent(
        _config(exchange.url, provider.api_key or ""), None, gpus=_probe(), sample=_steady
    )
    async with running(agent):
        await eventually(lambda: agent.beats_sent >= 2, "heartbeats over HTTP")
        assert not agent.connected.is_set()
        reply = agent.last_reply
        assert reply is not None and reply["status"] == "ok"
        assert (reply["offered_ram_gb"], reply["offered_vram_gb"]) == (4, 20)
        assert agent.server_min_interval_s == pytest.approx(0.2)


async def test_cli_run_registers_and_sigterm_sets_maintenance(
    exchange: Exchange, account: Account, tmp_path: Path
) -> None:
    """`mnemo-agent run` in its own process registers (node_id written to its config file) and
    on SIGTERM marks the node as in maintenance and exits 0; `status --json` then shows it."""
    provider = await account("provider")
    path = tmp_path / "node_config.json"
    save_config(path, _config(exchange.url, provider.api_key or "", heartbeat_interval=5.0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMO_AGENT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        "--config",
        str(path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await eventually(lambda: "node_id" in json.loads(path.read_text()), "registered", 60)
        node_id = json.loads(path.read_text())["node_id"]
        await eventually(
            lambda: _last_heartbeat(provider, node_id), "the first heartbeat arrived", 60
        )
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode()
    assert (await provider.get_node(node_id))["status"] == "maintenance"
    status = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "status",
        "--json",
        "--config",
        str(path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    shown, _ = await asyncio.wait_for(status.communicate(), 60)
    assert status.returncode == 0
    report = json.loads(shown)
    assert report["node"]["node_id"] == node_id and report["node"]["status"] == "maintenance"
    assert report["config"]["api_key"].endswith("***")


async def _last_heartbeat(who: Gateway, node_id: str) -> bool:
    return bool((await who.get_node(node_id))["last_heartbeat_ms"])


def _ctrl_c_as_at_a_terminal() -> None:
    """In the child before it runs: Ctrl-C as a shell at a terminal gives it. A test run started
    in the background by a non-interactive shell ignores SIGINT, and an ignored signal stays
    ignored across exec: the spec's agent would then never see its Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


async def test_the_specs_own_agent_registers_and_heartbeats(
    exchange: Exchange, account: Account, tmp_path: Path
) -> None:
    """The spec's `node_agent.py`, unchanged (requests, `X-API-Key`, its payload, its config
    file), registers its machine and sends a heartbeat that the exchange accepts."""
    provider = await account("provider")
    config = {
        "api_url": exchange.url,
        "api_key": provider.api_key,
        "node_type": "mist_node",
        "name": "Alice_RTX4090",
        "region": "us-east-2",
        "latitude": 40.7282,
        "longitude": -73.7949,
        "price_per_gb_sec": 0.0000008,
        "bandwidth_mbps": 980,
        "base_latency_ms": 0.8,
        "idle_schedule": "9am-5pm, 11pm-7am",
        "heartbeat_interval": 60,
    }
    (tmp_path / "node_config.json").write_text(json.dumps(config))
    script = Path(__file__).with_name("spec_node_agent.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        str(script),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not any(line.startswith(("✓ Heartbeat sent", "✗")) for line in lines):
                line = (await proc.stdout.readline()).decode()
                assert line, f"the spec's agent exited: {lines}"
                lines.append(line)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)  # its Ctrl-C path
        try:
            async with asyncio.timeout(30):
                rest, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            rest, _ = await proc.communicate()
            lines.append("(Ctrl-C did not stop it in 30 s: killed)\n")
        lines.append(rest.decode())
    output = "".join(lines)
    assert "✓ Node registered: " in output and "✓ Heartbeat sent" in output, output
    saved = json.loads((tmp_path / "node_config.json").read_text())
    node = await provider.request("GET", f"/api/nodes/{saved['node_id']}")
    assert node["name"] == "Alice_RTX4090" and node["price_per_gb_sec"] == 0.0000008
    assert node["metadata"]["idle_schedule"] == "9am-5pm, 11pm-7am"
    assert node["last_heartbeat_ms"] > 0 and node["status"] == "active"
