"""The web app's public page against a running exchange with a fleet, in Debian's chromium.

    python -m bench.load_web --url http://127.0.0.1:8000 [--runs 5] [--fills-per-s 100]
                             [--seconds 10] [--region us-east-2]

Targets (issue 16): first meaningful paint of the public page on loopback with 1,000 nodes
<= 1 s; JavaScript shipped <= 300 KB compressed; fill-to-screen latency p99 <= 500 ms at 100
fills/s. Against `mnemo up --fleet 1000` (with `MNEMO_WRITE_RATE_PER_S` raised to at least
`--fills-per-s`). One renter account with `--renters` profiles (30) makes the fills, a few a
second from each profile's wallet, as a market's many renters would: one wallet's contracts
made at once race for its region wallet's money (the gateway moves what the wallet lacks, then
retries once), and past that a few are refused 402 with money in the funding wallet.
Contracts are paid for (issue 14): each profile is credited `--credit-usd` by `mnemo credit`,
which needs `MNEMO_REDIS_URL` and `MNEMO_DATABASE_URL` set to the servers `mnemo up` prints.

1. Paint: `--runs` fresh browser contexts (empty cache) open `/#<region>`; the time from
   navigation start until the region's order book shows its asks and the map has drawn every
   region (what a visitor came for), read from the page's own clock. Median and max.
2. Bytes: the compressed size of every script the page loaded (Resource Timing's
   `encodedBodySize`, the body as sent, gzip'd by the gateway), and of everything it loaded.
3. Fill to screen: with the page open, the renters take 1 GB for a minute on the region's
   nodes (RFQ, then create) at `--fills-per-s` in total for `--seconds`; a MutationObserver in
   the page stamps each trade row as it appears; latency = that stamp - the contract's
   `start_ms` (one machine, one clock). The page lists the 30 newest trades and applies a
   frame's worth at once, so when more than 30 arrive within one frame the older ones are
   never drawn as rows (they still count in the candles and the volume): reported as
   `unshown`, not in the latencies.
   Beside the page, a plain WebSocket client on `/ws/public` stamps each trade as it arrives:
   the part of the latency that is the exchange's (engine, pub/sub, gateway), not the page's.

Output: a human summary and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
import uuid
from typing import Any

import httpx

PASSWORD = "correct horse battery staple"
_OBSERVE = """() => {
  window.__seen = {};
  new MutationObserver((records) => {
    const now = performance.timeOrigin + performance.now();
    for (const r of records) for (const n of r.addedNodes) {
      if (n.dataset && n.dataset.contract && !(n.dataset.contract in window.__seen)) {
        window.__seen[n.dataset.contract] = now;
      }
    }
  }).observe(document.getElementById('recent-trades'), {childList: true, subtree: true});
}"""


async def _paint(browser: Any, url: str, region: str) -> tuple[float, int, int]:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{url}/#{region}")
    await page.wait_for_function(
        "() => document.querySelector('#order-book tr.ask td.num') && "
        "document.getElementById('cluster-map').dataset.regions.length > 0"
    )
    painted = await page.evaluate("() => performance.now()")
    sizes = await page.evaluate(
        "() => performance.getEntriesByType('resource').map(e => [e.name, e.encodedBodySize])"
    )
    await context.close()
    scripts = sum(size for name, size in sizes if name.endswith((".js", ".mjs")))
    total = sum(size for _, size in sizes)
    return painted, scripts, total


async def _renter(
    api: httpx.AsyncClient, profiles: int, credit_usd: float
) -> tuple[dict[str, str], list[str]]:
    """One renter account with `profiles` renter profiles (clients), each with a wallet of
    its own credited `credit_usd`."""
    email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
    r = await api.post("/api/auth/signup", json={"email": email, "password": PASSWORD})
    r.raise_for_status()
    headers = {"X-API-Key": r.json()["api_key"]["key"]}
    clients = []
    for n in range(profiles):
        r = await api.post("/api/clients", json={"org_name": f"bench {n}"}, headers=headers)
        r.raise_for_status()
        clients.append(r.json()["id"])
        credit = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scripts.cli", "credit", clients[-1], str(credit_usd),
            "--reason", "bench/load_web", stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        if await credit.wait() != 0:
            raise SystemExit("mnemo credit failed: set MNEMO_REDIS_URL and MNEMO_DATABASE_URL")
    return headers, clients


async def _fills(
    url: str, region: str, rate: float, seconds: float, credit_usd: float, renters_n: int
) -> list[dict[str, Any]]:
    made: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as api:
        headers, clients = await _renter(api, renters_n, credit_usd)
        r = await api.get("/api/marketplace", params={"region": region, "limit": 200},
                          headers=headers)  # fmt: skip
        nodes = [o["node_id"] for o in r.json()["offers"] if o["available_ram_gb"] >= 4]
        assert nodes, f"no node in {region} with free RAM"
        start = time.monotonic()
        tasks = []
        i = 0
        while (due := i / rate) < seconds:
            await asyncio.sleep(max(0.0, start + due - time.monotonic()))
            client_id = clients[i % renters_n]
            body = {"client_id": client_id, "node_id": nodes[i % len(nodes)], "ram_gb": 1,
                    "vram_gb": 0, "duration_sec": 60, "max_price_per_gb_sec": 0.001}  # fmt: skip
            tasks.append(
                asyncio.create_task(api.post("/api/contracts/create", json=body, headers=headers))
            )
            i += 1
        refused: dict[str, int] = {}
        for response in await asyncio.gather(*tasks):
            if response.status_code == 201:
                made.append(response.json())
            else:
                code = f"{response.status_code} {response.json()['error']['code']}"
                refused[code] = refused.get(code, 0) + 1
        if refused:
            print(f"refused contracts: {refused}", file=sys.stderr)
    return made


async def _socket(url: str, region: str, seen: dict[str, float], ready: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    async with connect(url.replace("http", "ws", 1) + "/ws/public?batch=1") as ws:
        await ws.send(json.dumps({"op": "subscribe", "channels": [f"trades:{region}"]}))
        await ws.recv()
        ready.set()
        async for frame in ws:
            now = time.time() * 1000
            message = json.loads(frame)
            for m in message["messages"] if message["type"] == "batch" else [message]:
                if m["type"] == "event":
                    seen.setdefault(m["data"]["contract_id"], now)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--region", default="us-east-2")
    parser.add_argument("--fills-per-s", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--credit-usd", type=float, default=10.0)
    parser.add_argument("--renters", type=int, default=30)
    args = parser.parse_args()
    url = args.url.rstrip("/")
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        paints = [await _paint(browser, url, args.region) for _ in range(args.runs)]
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"{url}/#{args.region}")
        await page.locator("#recent-trades").wait_for()
        await page.wait_for_function("() => document.querySelector('.badge.live')")
        await page.evaluate(_OBSERVE)
        socket_seen: dict[str, float] = {}
        ready = asyncio.Event()
        listener = asyncio.create_task(_socket(url, args.region, socket_seen, ready))
        await ready.wait()
        made = await _fills(
            url, args.region, args.fills_per_s, args.seconds, args.credit_usd, args.renters
        )
        await asyncio.sleep(2)
        listener.cancel()
        seen: dict[str, float] = await page.evaluate("() => window.__seen")
        await browser.close()
    latencies = sorted(
        seen[c["contract_id"]] - c["start_ms"] for c in made if c["contract_id"] in seen
    )
    unshown = len(made) - len(latencies)
    wire = sorted(
        socket_seen[c["contract_id"]] - c["start_ms"]
        for c in made
        if c["contract_id"] in socket_seen
    )
    ms = [p[0] for p in paints]

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))]
            if latencies
            else float("nan")
        )

    result = {
        "paint_ms_median": statistics.median(ms),
        "paint_ms_max": max(ms),
        "script_bytes": paints[-1][1],
        "all_bytes": paints[-1][2],
        "fills": len(made),
        "fills_per_s": len(made) / args.seconds,
        "shown": len(latencies),
        "unshown": unshown,
        "latency_ms_p50": pct(0.5),
        "latency_ms_p99": pct(0.99),
        "latency_ms_max": latencies[-1] if latencies else float("nan"),
        "socket_ms_p50": wire[len(wire) // 2] if wire else float("nan"),
        "socket_ms_p99": wire[min(len(wire) - 1, int(0.99 * len(wire)))] if wire else float("nan"),
    }
    print(
        f"first meaningful paint: median {result['paint_ms_median']:.0f} ms, max {result['paint_ms_max']:.0f} ms ({args.runs} runs)"
    )
    print(
        f"scripts {result['script_bytes'] / 1024:.0f} KiB compressed, everything {result['all_bytes'] / 1024:.0f} KiB"
    )
    print(f"fills {len(made)} ({result['fills_per_s']:.0f}/s), rows drawn {len(latencies)}, unshown {unshown}; "
          f"fill to screen p50 {result['latency_ms_p50']:.0f} ms, p99 {result['latency_ms_p99']:.0f} ms, max {result['latency_ms_max']:.0f} ms")  # fmt: skip
    print(f"the same fills on a plain /ws/public socket: p50 {result['socket_ms_p50']:.0f} ms, "
          f"p99 {result['socket_ms_p99']:.0f} ms")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
