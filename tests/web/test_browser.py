"""The web app in a real browser (Debian's chromium) against a real exchange: the public page
live, a renter's and a provider's work through the pages, keyboard-only use, the CSP and the
session cookie as a browser enforces them."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from solders.pubkey import Pubkey

from gateway.web.pages import CSP
from tests.gateway.conftest import create_client, eventually, register_node, signup
from tests.gateway.lease_driver import LeaseDriver

from .conftest import REGIONS, Exchange, Watched

PASSWORD = "correct horse battery staple"


def period() -> str:
    """This month (UTC), as invoices name it."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m")


async def _take(exchange: Exchange, renter: Any, client_id: str, node_id: str) -> dict[str, Any]:
    r = await exchange.gw.client.post(
        "/api/contracts/create",
        json={
            "client_id": client_id,
            "node_id": node_id,
            "ram_gb": 8,
            "vram_gb": 0,
            "duration_sec": 900,
        },
        headers=renter.headers,
    )
    assert r.status_code == 201, r.text
    contract: dict[str, Any] = r.json()
    return contract


async def _sign_in(w: Watched, actor: Any, then: str) -> None:
    page = w.page
    await page.goto(f"/signin?next={then}")
    await page.get_by_label("Email").first.fill(actor.email)
    await page.get_by_label("Password", exact=True).fill(actor.password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"**{then}")


async def test_public_page_shows_the_market_and_a_fill_arrives_live(
    exchange: Exchange, watched: Watched
) -> None:
    """Signed out: every region is on the map and in the table, the book shows the asks; a
    contract made through the API appears among the trades, in a candle and in the 24 h
    volume without a reload. The page came with the CSP, logged no error and asked nothing of
    any other origin."""
    page = watched.page
    response = await page.goto("/#us-east-2")
    assert response is not None and response.headers["content-security-policy"] == CSP
    await page.locator("#cluster-map").wait_for()
    await page.wait_for_function(
        "regions => regions.every(r => document.getElementById('cluster-map')"
        ".dataset.regions.split(' ').includes(r))",
        arg=list(REGIONS),
    )
    rows = page.locator("table[aria-label=Regions] tbody tr")
    assert sorted(await rows.locator("th").all_inner_texts()) == sorted(REGIONS)
    await page.locator("#order-book tr.ask td.num").first.wait_for()
    assert "$0.000000800" in await page.locator("#order-book").inner_text()
    assert await page.locator("#fills-24h").inner_text() == "0"
    await page.wait_for_function(
        "() => document.querySelector('.badge').textContent.includes('live')"
    )

    renter = await signup(exchange.gw, "user")
    client_id = await create_client(exchange.gw, renter)
    contract = await _take(exchange, renter, client_id, exchange.nodes["us-east-2"])
    row = page.locator(f"#recent-trades tr[data-contract='{contract['contract_id']}']")
    await row.wait_for()
    assert "$0.000000800" in await row.inner_text() and "8 + 0 GB" in await row.inner_text()
    await page.wait_for_function("() => document.getElementById('candles').dataset.candles === '1'")
    assert await page.locator("#fills-24h").inner_text() == "1"
    assert await page.locator("#volume-24h").inner_text() == f"{8 * 900:,} GB·s"
    # The book shows the node's ask shrunk by the lease (64 GB RAM + 24 VRAM - 8 leased).
    await page.wait_for_function(
        "() => document.getElementById('order-book').innerText.includes('80 GB')"
    )
    await watched.shoot("market")
    watched.assert_clean()


async def test_renter_bids_takes_a_match_settles_and_finds_it_on_the_invoice(
    exchange: Exchange, watched: Watched
) -> None:
    """A renter signs in on the page, sees the balance, browses with a filter, places a bid and
    cancels it, asks for matches, takes the best, sees the contract live (and its cost held
    from the balance), settles it and finds it on the month's invoice and its printable page;
    the session cookie is not readable by script and a change without the CSRF token is
    refused."""
    page = watched.page
    renter = await signup(exchange.gw, "user")
    client_id = await create_client(exchange.gw, renter)  # an operator credited 1,000 USD
    await _sign_in(watched, renter, "/renter")
    assert "mnemo_session" not in await page.evaluate("document.cookie")
    assert await page.locator("#balance-available").inner_text() == "$1000.00"
    assert await page.locator("#balance-held").inner_text() == "$0.000000"
    assert "operator credits your balance" in await page.locator("#topup").inner_text()

    browse = page.locator("#browse")
    await browse.get_by_label("Region").select_option("eu-west-1")
    await browse.get_by_role("button", name="Search").click()
    await page.wait_for_function(
        "() => { const rows = [...document.querySelectorAll('#offers tbody tr')];"
        " return rows.length === 1 && rows[0].innerText.includes('eu-west-1'); }"
    )

    bids = page.locator("#bids")
    await bids.get_by_label("Region").select_option("ap-south-1")
    await bids.get_by_label("Price cap (USD/GB·s)").fill("0.0000001")
    await bids.get_by_role("button", name="Place bid").click()
    bid_row = page.locator("#bid-list tr.bid-row").first
    await bid_row.get_by_text("open").wait_for()
    await bid_row.get_by_role("button", name=re.compile("Cancel bid")).click()
    await bid_row.get_by_text("cancelled").wait_for()

    request = page.locator("#request")
    await request.get_by_label("RAM (GB)", exact=True).fill("16")
    await request.get_by_role("button", name="Find matches").click()
    matches = page.locator("#matches tbody tr")
    await matches.first.wait_for()
    # The renter is in Boston: New York scores best, London next; Mumbai is beyond the spec's
    # default 10,000 km.
    texts = await matches.all_inner_texts()
    assert ["us-east-2" in texts[0], "eu-west-1" in texts[1], len(texts)] == [True, True, 2]
    await matches.first.get_by_role("button", name=re.compile("^Take")).click()
    contract_row = page.locator("#contracts tr.contract").first
    await contract_row.get_by_text("active").wait_for()
    contract_id = await contract_row.get_attribute("data-contract")
    # The contract's whole cost is held (16 GB x 3,600 s x $0.0000008 = $0.046080).
    await page.wait_for_function(
        "() => document.getElementById('balance-held').innerText === '$0.0461'"
    )
    assert await page.locator("#balance-available").inner_text() == "$999.95"
    remaining = await contract_row.locator(".remaining").inner_text()
    await page.wait_for_function(
        "was => document.querySelector('#contracts tr.contract .remaining').innerText !== was",
        arg=remaining,
    )
    await watched.shoot("renter")
    await contract_row.get_by_role("button", name=re.compile("^Settle")).click()
    await contract_row.get_by_text("completed").wait_for()
    cost = await contract_row.locator(".accrued").inner_text()
    assert cost != "$0.000000"
    await page.wait_for_function(
        "() => document.getElementById('balance-held').innerText === '$0.000000'"
    )

    # The settled contract is on this month's invoice once the journal has written it.
    invoices = page.locator("#invoices")
    line = invoices.locator(f"#invoice-contracts tr[data-contract='{contract_id}']")

    async def invoiced() -> bool:
        await invoices.get_by_role("button", name="Refresh").click()
        return await line.count() == 1

    await eventually(invoiced, timeout_s=20)
    assert cost in await line.inner_text()
    assert await page.locator("#invoice-charges").inner_text() == cost
    printable = await invoices.get_by_role("link", name="printable invoice").get_attribute("href")
    watched.assert_clean()

    # (The browser logs the refusals below as failed loads: checked clean before them.)
    refused = await page.evaluate(
        """async () => (await fetch('/api/bids', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: '{}'})).status"""
    )
    assert refused == 403
    accepted = await page.evaluate(
        """async () => {
            const s = await (await fetch('/api/web/session')).json();
            return (await fetch('/api/bids', {method: 'POST', body: '{}', headers:
                {'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf_token}})).status;
        }"""
    )
    assert accepted == 422  # past authentication, refused only for its empty body

    assert printable == f"/api/payments/invoice/{client_id}?period={period()}&format=html"
    await page.goto(printable)
    assert contract_id is not None and contract_id in await page.locator("body").inner_text()


async def test_provider_registers_a_node_and_sees_its_earnings(
    exchange: Exchange, watched: Watched
) -> None:
    """A provider registers a node on the page, gets the agent's command with the node's id
    and a fresh API key, sees the node listed live, and its earnings once a lease settles."""
    page = watched.page
    provider = await signup(exchange.gw, "provider")
    await _sign_in(watched, provider, "/provider")
    form = page.locator("#register")
    await form.get_by_label("Name").fill("Alice_RTX4090")
    await form.get_by_label("Region").fill("us-east-2")
    await form.get_by_label("Latitude").fill("40.7282")
    await form.get_by_label("Longitude").fill("-73.7949")
    await form.get_by_label("Total RAM (GB)").fill("64")
    await form.get_by_label("Total VRAM (GB)").fill("24")
    await form.get_by_label("GPU model (optional)").fill("RTX 4090")
    await form.get_by_role("button", name="Register").click()
    command = page.locator("#agent-command pre")
    await command.wait_for()
    node_id = re.search(r"MNEMO_AGENT_NODE_ID=([0-9a-f]{32})", await command.inner_text())
    assert node_id is not None
    row = page.locator(f"#node-list tr[data-node='{node_id[1]}']")
    assert "active" in await row.inner_text() and "64 / 0 / 64 GB" in await row.inner_text()
    await page.get_by_role("button", name="Create an API key for this agent").click()
    await page.wait_for_function(
        "() => document.querySelector('#agent-command pre').innerText.includes('mnm_')"
    )

    renter = await signup(exchange.gw, "user")
    client_id = await create_client(exchange.gw, renter)
    contract = await _take(exchange, renter, client_id, node_id[1])
    await row.get_by_text("56 / 8 / 64 GB").wait_for()  # the lease, live (node:<id> notice)
    r = await exchange.gw.client.post(
        f"/api/contracts/{contract['contract_id']}/settle", json={}, headers=renter.headers
    )
    assert r.status_code == 200, r.text
    cost = r.json()["total_cost_usd"]
    assert cost > 0

    async def earned() -> bool:
        await page.reload()
        total = page.locator("#earned-total")
        await total.wait_for()
        return await total.inner_text() != "$0.000000"

    await eventually(earned, timeout_s=20)
    await page.locator("#earnings-chart canvas").wait_for()
    # The statement: what the renter paid for the node, and the earnings (net of the 10 %
    # fee) owed until a payout, which waits for Stripe here.
    await page.locator(f"#statement-nodes tr[data-node='{node_id[1]}']").wait_for()
    owed = await page.locator("#owed").inner_text()
    assert owed != "$0.000000" and owed == await page.locator("#statement-earned").inner_text()
    assert "No payout in this period" in await page.locator("#payout-list").inner_text()
    assert "Stripe is not configured" in await page.locator("#payout-account").inner_text()

    # The node's standing and stake (part of the earnings was held back into it): lock more
    # of the earnings as its stake, release it again.
    r = await exchange.gw.client.get(f"/api/nodes/{node_id[1]}", headers=provider.headers)
    stake_pusd = r.json()["stake_pusd"]
    trust = page.locator("#trust")
    assert await trust.locator("#reputation").inner_text() == "100"
    assert await trust.locator("#node-standing").inner_text() == "good"
    assert await trust.locator("#stake-locked").inner_text() == f"${stake_pusd / 1e12:.6f}"
    await trust.get_by_label("Lock (USD)").fill("0.000002")
    await trust.get_by_role("button", name="Lock stake").click()
    await trust.get_by_text("$0.000002 locked.").wait_for()
    locked = f"${(stake_pusd + 2_000_000) / 1e12:.6f}"
    assert await trust.locator("#stake-locked").inner_text() == locked
    await trust.get_by_label("Release (USD)").fill("0.000002")
    await trust.get_by_role("button", name="Release stake").click()
    await trust.get_by_text("$0.000002 released.").wait_for()
    assert await trust.locator("#stake-locked").inner_text() == f"${stake_pusd / 1e12:.6f}"
    assert await _unlabelled(page) == []
    await watched.shoot("provider")
    watched.assert_clean()


async def test_a_delivered_lease_shows_its_access_details(
    exchange: Exchange, watched: Watched, tmp_path: Path
) -> None:
    """A renter's contract on a node whose agent delivers: under the contract the page shows
    the lease pending, then ready with its endpoint as soon as the agent reports it (the
    `leases` channel, no reload), and a connection URL that really opens the rented memory;
    settled, the lease is closed and its details go."""
    page = watched.page
    provider = await signup(exchange.gw, "provider")
    node_id = await register_node(
        exchange.gw, provider, name="lease-host", region="us-east-2", delivers=True
    )
    renter = await signup(exchange.gw, "user")
    client_id = await create_client(exchange.gw, renter)
    await _sign_in(watched, renter, "/renter")
    await page.get_by_text("No contracts yet.").wait_for()
    await page.wait_for_function(
        "() => document.querySelector('.badge').textContent.includes('live')"
    )
    contract = await _take(exchange, renter, client_id, node_id)
    row = page.locator(f"#contracts tr[data-contract='{contract['contract_id']}']")
    await row.locator("[data-lease-state=pending]").wait_for()

    driver = LeaseDriver(exchange.url, provider.key, node_id, tmp_path)
    driver.start()
    try:
        lease = row.locator("[data-lease-state=ready]")
        await lease.wait_for()
        port = driver.servers[contract["contract_id"]].port
        assert await lease.locator(".endpoint").inner_text() == f"127.0.0.1:{port}"
        await lease.get_by_role("button", name="Show connection URL").click()
        url = await lease.get_by_label("URL (holds the password)").input_value()
        assert url.startswith("redis://lease-") and url.endswith(f"@127.0.0.1:{port}")
        memory = aioredis.from_url(url)
        try:
            assert await memory.set("hello", "world") and await memory.get("hello") == b"world"
        finally:
            await memory.aclose()
        assert await _unlabelled(page) == []
        await watched.shoot("renter-lease")
        await row.get_by_role("button", name=re.compile("^Settle")).click()
        await row.get_by_text("completed").wait_for()
        assert await row.locator(".lease").count() == 0
        assert contract["contract_id"] in driver.reports  # the agent closed and reported it
    finally:
        await driver.stop()
    watched.assert_clean()


async def _unlabelled(page: Any) -> list[str]:
    """The page's controls that have no label, no aria-label and no text."""
    found: list[str] = await page.evaluate(
        """[...document.querySelectorAll('input, select, button')].filter(el =>
            !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
            && !el.textContent.trim()).map(el => el.outerHTML)"""
    )
    return found


async def _tab_until(page: Any, predicate: str, limit: int = 60) -> bool:
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await page.evaluate(predicate):
            return True
    return False


async def test_keyboard_alone_reaches_the_main_controls(
    exchange: Exchange, watched: Watched
) -> None:
    """With the keyboard only: skip to the content, reach the navigation and the region
    picker on the market page, sign in, and ask for matches; every control is labelled."""
    page = watched.page
    await page.goto("/")
    await page.locator("#order-book tr.ask").first.wait_for()
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.className") == "skip"
    await page.keyboard.press("Enter")
    assert await page.evaluate("document.activeElement.id") == "main"
    await page.goto("/")
    await page.locator("#order-book tr.ask").first.wait_for()
    assert await _tab_until(page, "document.activeElement.textContent === 'Analytics'")
    assert await _tab_until(page, "document.activeElement.id === 'region-select'")
    await page.keyboard.press("ArrowDown")  # a select changes with the arrow keys
    assert await _tab_until(page, "document.activeElement.getAttribute('aria-pressed') !== null")
    await page.keyboard.press("Enter")
    await page.wait_for_function("() => location.hash.length > 1")

    renter = await signup(exchange.gw, "user")
    await create_client(exchange.gw, renter)
    await page.goto("/signin?next=/renter")
    assert await _tab_until(page, "document.activeElement.type === 'email'")
    await page.keyboard.type(renter.email)
    await page.keyboard.press("Tab")
    await page.keyboard.type(renter.password)
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/renter")
    await page.locator("#request").wait_for()
    assert await _unlabelled(page) == []
    assert await _tab_until(page, "document.activeElement.textContent === 'Find matches'", 120)
    await page.keyboard.press("Enter")
    await page.locator("#matches tbody tr").first.wait_for()
    watched.assert_clean()


async def test_analytics_page_draws_from_the_history(exchange: Exchange, watched: Watched) -> None:
    """The analytics page (public) lists every cluster and draws price and demand once there
    are fills."""
    renter = await signup(exchange.gw, "user")
    client_id = await create_client(exchange.gw, renter)
    await _take(exchange, renter, client_id, exchange.nodes["eu-west-1"])
    page = watched.page

    async def drawn() -> bool:
        await page.goto("/analytics")
        await page.locator("#cluster-table tbody tr").first.wait_for()
        return await page.locator("#price-chart").count() == 1

    await eventually(drawn, timeout_s=20)
    regions = await page.locator("#cluster-table tbody th").all_inner_texts()
    assert sorted(regions) == sorted(REGIONS)
    await page.locator("#demand-chart canvas").wait_for()
    await watched.shoot("analytics")
    watched.assert_clean()


async def _unfunded_renter_signed_in(exchange: Exchange, watched: Watched) -> None:
    """A new renter with a profile and no money, on its page."""
    renter = await signup(exchange.gw, "user")
    await create_client(exchange.gw, renter, fund_usd=None)
    await _sign_in(watched, renter, "/renter")
    assert await watched.page.locator("#balance-available").inner_text() == "$0.000000"


@pytest.mark.parametrize("chain", ["solana"], indirect=True)
async def test_renter_tops_up_with_sol(exchange: Exchange, watched: Watched) -> None:
    """On an exchange that takes SOL: the renter asks to top up 30 USD, is told to send 0.2
    SOL (at 150 USD) to the exchange's wallet with a reference, pays it from a wallet, reports
    the transaction and sees it credited and the balance grown by 30 USD, without a reload."""
    assert exchange.chain is not None
    page = watched.page
    await _unfunded_renter_signed_in(exchange, watched)
    topup = page.locator("#topup")
    await topup.get_by_label("Pay with").select_option(label="SOL (solana)")
    await topup.get_by_label("Amount (USD)").fill("30")
    await topup.get_by_role("button", name="Get payment details").click()
    request = page.locator("#pay-request")
    await request.wait_for()
    assert (
        "Send exactly 0.2 SOL ($30.00 at 150 USD per SOL) on solana to"
        in await request.inner_text()
    )
    pay_to = await request.locator("code.pay-to").inner_text()
    reference = await request.locator("code.reference").inner_text()
    link = await request.get_by_role("link", name="SOL payment link").get_attribute("href")
    assert link == f"solana:{pay_to}?amount=0.2&reference={reference}&label=Mnemo"

    cluster, payer = exchange.chain.cluster, exchange.chain.payer
    signature = cluster.pay_sol(payer, Pubkey.from_string(pay_to), 2 * 10**8, reference)
    cluster.settle(signature, "confirmed")
    await request.get_by_label("Transaction hash (or signature)").fill(signature)
    await request.get_by_role("button", name="I have paid").click()
    await request.get_by_text("Payment credited: $30.00 added to your balance.").wait_for()
    await page.wait_for_function(
        "() => document.getElementById('balance-available').innerText === '$30.00'"
    )
    watched.assert_clean()


@pytest.mark.parametrize("cards", ["stripe"], indirect=True)
async def test_renter_tops_up_by_card_on_stripes_page(exchange: Exchange, watched: Watched) -> None:
    """On an exchange that takes cards: the renter asks to top up 30 USD by card, pays on
    Stripe's own page (this app loads nothing of Stripe's and never sees the card), comes back
    to the app and sees the payment succeeded and the balance grown by 30 USD."""
    page = watched.page
    await _unfunded_renter_signed_in(exchange, watched)
    card = page.locator("#card-topup")
    await card.get_by_label("Card amount (USD)").fill("30")
    await card.get_by_role("button", name="Pay by card").click()
    await page.wait_for_url(re.compile(r"/checkout/pay/cs_test_"))
    assert await page.get_by_role("heading").inner_text() == "Pay 30.00 USD"
    await page.get_by_label("Card number").fill("4242 4242 4242 4242")
    await page.get_by_role("button", name="Pay").click()
    await page.get_by_text("Card payment succeeded: $30.00 added to your balance.").wait_for()
    await page.wait_for_function(
        "() => document.getElementById('balance-available').innerText === '$30.00'"
    )
    assert page.url == f"{exchange.url}/renter#balance"  # the payment's id read and dropped
    await watched.shoot("renter-card-topup")
    # Off the origin: only Stripe's page itself (navigated to, then its form), nothing the app
    # loaded.
    assert watched.offsite and all("/checkout/pay/cs_test_" in u for u in watched.offsite)
    assert watched.errors == [], watched.errors
