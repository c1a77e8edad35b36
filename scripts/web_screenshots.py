"""Screenshots of the web app for the README, taken by Debian's chromium against a running
exchange (with a demo fleet: `scripts/up`, or `mnemo up --fleet N`).

    python scripts/web_screenshots.py --url http://127.0.0.1:8000 [--out docs/web]

Signs up a renter and a provider through the API, then drives the pages as they would: signs
in on the sign-in page, creates the renter profile (credited 25 USD by `mnemo credit`, so set
`MNEMO_REDIS_URL` and `MNEMO_DATABASE_URL` to the servers `mnemo up` prints), asks for matches
and takes one, places a bid, registers a node, and saves one PNG per page (`market.png`,
`renter.png`, `provider.png`, `analytics.png`) and of the money sections (`renter-money.png`:
balance, a contract with its lease, the invoice; `provider-money.png`: statement, payouts,
standing and stake). Needs `playwright` (the dev extra) and a `chromium` on PATH; it never
downloads a browser.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

PASSWORD = "correct horse battery staple"


async def _signup(context: Any, base: str, role: str) -> str:
    email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
    r = await context.request.post(
        f"{base}/api/auth/signup", data={"email": email, "password": PASSWORD, "role": role}
    )
    assert r.ok, await r.text()
    return email


async def _sign_in(page: Any, base: str, email: str, then: str) -> None:
    await page.goto(f"{base}/signin?next={then}")
    await page.get_by_label("Email").first.fill(email)
    await page.get_by_label("Password", exact=True).fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{base}{then}")


async def shoot(base: str, out: Path) -> None:
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("web_screenshots: no chromium on PATH (apt-get install chromium)")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        viewport: Any = {"width": 1200, "height": 820}

        context = await browser.new_context(viewport=viewport)
        page = await context.new_page()
        # The region of the latest fill, so the candles and trades have something to show.
        r = await context.request.get(f"{base}/api/market/trades?limit=1")
        trades = (await r.json())["trades"]
        await page.goto(f"{base}/#{trades[0]['region']}" if trades else f"{base}/")
        await page.wait_for_selector("#order-book tbody tr")
        await page.wait_for_timeout(1500)
        await page.screenshot(path=out / "market.png")

        renter = await _signup(context, base, "user")
        await _sign_in(page, base, renter, "/renter")
        await page.get_by_label("Organization").fill("Ada Labs")
        await page.get_by_label("Latitude (optional)").fill("40.73")
        await page.get_by_label("Longitude (optional)").fill("-73.79")
        await page.get_by_role("button", name="Create profile").click()
        await page.wait_for_selector("#balance")
        r = await context.request.get(f"{base}/api/clients")
        client_id = (await r.json())["clients"][0]["id"]
        credit = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scripts.cli", "credit", client_id, "25",
            "--reason", "screenshots",
        )  # fmt: skip
        if await credit.wait() != 0:
            sys.exit("web_screenshots: mnemo credit failed (MNEMO_REDIS_URL, MNEMO_DATABASE_URL)")
        await page.reload()
        await page.get_by_role("button", name="Find matches").click()
        await page.locator("#matches button").first.click()
        await page.wait_for_selector("#contracts tr.contract")
        await page.get_by_role("button", name="Place bid").click()
        await page.wait_for_selector("#bid-list tr.bid-row")
        await page.get_by_role("button", name="Find matches").click()
        await page.wait_for_selector("#matches tbody tr")
        await page.wait_for_timeout(1000)
        await page.locator("#request").scroll_into_view_if_needed()
        await page.evaluate("() => document.getElementById('request').scrollIntoView()")
        await page.screenshot(path=out / "renter.png")
        # A contract taken, then one settled: the balance, a lease, the invoice.
        settle = page.locator("#contracts tr.contract").first.get_by_role("button", name="Settle")
        await page.locator("#matches button").first.click()
        await settle.click()
        await page.wait_for_timeout(5000)
        await page.locator("#invoices").get_by_role("button", name="Refresh").click()
        await page.wait_for_selector("#invoice-contracts")
        await page.screenshot(path=out / "renter-money.png", full_page=True)
        await context.close()

        context = await browser.new_context(viewport=viewport)
        page = await context.new_page()
        provider = await _signup(context, base, "provider")
        await _sign_in(page, base, provider, "/provider")
        await page.get_by_label("Name").fill("Alice_RTX4090")
        await page.get_by_label("Region").fill("us-east-2")
        await page.get_by_label("Latitude").fill("40.7282")
        await page.get_by_label("Longitude").fill("-73.7949")
        await page.get_by_label("Total RAM (GB)").fill("64")
        await page.get_by_label("Total VRAM (GB)").fill("24")
        await page.get_by_label("GPU model (optional)").fill("RTX 4090")
        await page.get_by_role("button", name="Register").click()
        await page.wait_for_selector("#agent-command")
        await page.wait_for_selector("#node-list tbody tr")
        await page.wait_for_timeout(1000)
        await page.screenshot(path=out / "provider.png")
        await page.wait_for_selector("#trust #standing")
        await page.evaluate("() => document.getElementById('payouts').scrollIntoView()")
        await page.screenshot(path=out / "provider-money.png")

        await page.goto(f"{base}/analytics")
        await page.wait_for_selector("#cluster-table tbody tr")
        await page.wait_for_timeout(1500)
        await page.screenshot(path=out / "analytics.png")
        await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs/web"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(shoot(args.url.rstrip("/"), args.out))


if __name__ == "__main__":
    main()
