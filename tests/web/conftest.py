"""Browser tests of the web app: Debian's chromium driven by Playwright for Python against a
real exchange (the gateway under uvicorn on a loopback port, the engine, the journal; real
Redis and Postgres), seeded with a few nodes in three regions.

Chromium is Debian's (`executable_path`), never one `playwright install` downloads.
`scripts/test` installs it when it can (root on Debian); without it, or without the
`playwright` package, every test here is skipped for the one reason `SKIP_REASON` gives, which
the test run's summary also prints. `MNEMO_TEST_SCREENSHOTS=<folder>` keeps a PNG of each page the
tests visit (`Watched.shoot`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from engine.keys import Keys
from tests.gateway.conftest import (
    BOSTON,
    LONDON,
    NYC,
    Gateway,
    eventually,
    make_settings,
    register_node,
    signup,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    async_playwright = None  # type: ignore[assignment]

SKIP_REASON: str | None = None
if async_playwright is None:
    SKIP_REASON = (
        "browser tests skipped: the playwright package is missing (pip install -e '.[dev]')"
    )
elif CHROMIUM is None:
    SKIP_REASON = (
        "browser tests skipped: no chromium on PATH (as root on Debian, scripts/test installs "
        "it: apt-get install -y chromium)"
    )

MUMBAI = (19.076, 72.8777)
REGIONS = {"us-east-2": NYC, "eu-west-1": LONDON, "ap-south-1": MUMBAI}
WAIT_MS = 15_000


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SKIP_REASON is not None:
        terminalreporter.write_line(SKIP_REASON, yellow=True, bold=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SKIP_REASON is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@dataclass
class Chain:
    """A fake Solana cluster the exchange takes SOL top-ups on (`payer`: a funded wallet)."""

    cluster: Any
    payer: Any


@pytest.fixture
async def chain(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Chain, Any] | None]:
    """None; with `@pytest.mark.parametrize("chain", ["solana"], indirect=True)` a fake Solana
    cluster (tests/payments/solchain.py) served on loopback, and the exchange's crypto settings
    for it (SOL at a fixed 150 USD, final once `confirmed`)."""
    if getattr(request, "param", None) != "solana":
        yield None
        return
    from engine.settings import CryptoSettings, FinalityTier
    from tests.payments.solchain import FakeCluster, serving

    cluster = FakeCluster()
    payer = cluster.funded()
    async with serving(cluster) as url:
        crypto = CryptoSettings(
            sol_rpc_url=url,
            sol_genesis_hash=cluster.genesis_hash,
            sol_recipient=str(cluster.funded().pubkey()),
            sol_finality=(FinalityTier(None, "confirmed"),),
            fixed_rates=(("SOL", "150"),),
            recheck_interval_s=0.1,
        )
        yield Chain(cluster, payer), crypto


@pytest.fixture
def cards(request: pytest.FixtureRequest) -> dict[str, Any]:
    """No settings; with `@pytest.mark.parametrize("cards", ["stripe"], indirect=True)` the
    exchange's Stripe settings: localstripe, and the fake of what it lacks (Checkout's hosted
    page among it: tests/payments/connect_fake.py)."""
    if getattr(request, "param", None) != "stripe":
        return {}
    from tests.payments.stripe_doubles import STRIPE_KEY, WEBHOOK_SECRET

    fake = request.getfixturevalue("connect_fake")
    return {
        "stripe_secret_key": STRIPE_KEY,
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_api_base": request.getfixturevalue("localstripe"),
        "stripe_connect_api_base": fake,
        "stripe_checkout_api_base": fake,
    }


@dataclass
class Exchange:
    """A running exchange: its base URL, an API client on it, the seeded nodes by region, and
    the Solana cluster it takes payments on (when the test asked for one)."""

    url: str
    gw: Gateway
    nodes: dict[str, str]
    provider: Any
    chain: Chain | None = None


@pytest.fixture
async def exchange(
    redis_url: str,
    db_url: str,
    keys: Keys,
    chain: tuple[Chain, Any] | None,
    cards: dict[str, Any],
) -> AsyncIterator[Exchange]:
    from engine.process import run_engine
    from persistence.journal.worker import run_journal
    from tests.gateway.test_ws import serving

    extra = {} if chain is None else {"crypto": chain[1]}
    extra.update(cards)
    settings = make_settings(redis_url, db_url, keys, **extra)
    async with serving(settings, keys) as live:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(run_engine(settings, stop=stop)),
            asyncio.create_task(run_journal(settings, consumer="web-tests", stop=stop)),
        ]
        try:
            provider = await signup(live.gw, "provider")
            nodes = {}
            for i, (region, (lat, lng)) in enumerate(REGIONS.items()):
                nodes[region] = await register_node(
                    live.gw,
                    provider,
                    name=f"seed-{region}",
                    region=region,
                    latitude=lat,
                    longitude=lng,
                    total_ram_gb=64 + 32 * i,
                    price_per_gb_sec=(0.0000008, 0.0000007, 0.0000009)[i],
                )
            url = str(live.gw.client.base_url).rstrip("/")

            async def journaled() -> bool:
                r = await live.gw.client.get("/api/clusters")
                return {c["region"] for c in r.json()["clusters"]} == set(REGIONS)

            await eventually(journaled, timeout_s=20)
            await _engine_serving(live.ws_url.replace("/ws", "/ws/public"))
            yield Exchange(
                url=url,
                gw=live.gw,
                nodes=nodes,
                provider=provider,
                chain=None if chain is None else chain[0],
            )
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def _engine_serving(public_ws_url: str) -> None:
    """Wait until the engine serves every region (its `market` summary of each arrives): a
    contract made before it took a region's snapshot would be in the snapshot, not among the
    events it announces (a slow machine takes seconds to start it)."""
    waiting = set(REGIONS)
    async with asyncio.timeout(60), connect(public_ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "channels": ["market"]}))
        while waiting:
            message = json.loads(await ws.recv())
            for m in message.get("messages", [message]):
                if m.get("type") == "event" and m.get("channel") == "market":
                    waiting.discard(m["data"]["region"])


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None and CHROMIUM is not None
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Watched:
    """A page whose console errors, page errors and requests are recorded."""

    page: Page
    origin: str
    errors: list[str] = field(default_factory=list)
    offsite: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        """No console error (CSP violations are console errors), no uncaught exception, and no
        request that left the origin."""
        assert self.errors == [], self.errors
        assert self.offsite == [], self.offsite

    async def shoot(self, name: str) -> None:
        folder = os.environ.get("MNEMO_TEST_SCREENSHOTS")
        if folder:
            await asyncio.to_thread(Path(folder).mkdir, parents=True, exist_ok=True)
            await self.page.screenshot(path=Path(folder) / f"{name}.png", full_page=True)


@pytest.fixture
async def watched(browser: Browser, exchange: Exchange) -> AsyncIterator[Watched]:
    context = await browser.new_context(
        base_url=exchange.url, viewport={"width": 1280, "height": 900}
    )
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    host = exchange.url.split("//", 1)[1]
    w = Watched(page=page, origin=exchange.url)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            w.errors.append(f"console: {message.text} at {message.location}")

    def on_url(url: str) -> None:
        scheme, _, rest = url.partition("://")
        if not (scheme in ("http", "ws") and rest.split("/", 1)[0] == host) and scheme not in (
            "data",
            "blob",
        ):
            w.offsite.append(url)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: w.errors.append(f"page error: {exc}"))
    page.on("request", lambda request: on_url(request.url))
    page.on("websocket", lambda ws: on_url(ws.url))
    try:
        yield w
    finally:
        await context.close()


__all__ = ["BOSTON", "REGIONS", "WAIT_MS", "Chain", "Exchange", "Watched"]
