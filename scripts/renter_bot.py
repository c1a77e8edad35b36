"""A small demo renter: takes memory now and then, so a newcomer sees a market with fills.

    python -m scripts.renter_bot --api http://127.0.0.1:8000 [--api-key KEY] [--rate 6]
                                 [--max-open-bids 5] [--max-active 10] [--budget-usd 5]
                                 [--duration S] [--seed N]

Without `--api-key` (or `MNEMO_API_KEY`) it signs up a renter account of its own and creates a
client profile near a metro. Contracts and bids hold their cost from the client's balance (issue
14): `mnemo up` gives the bot an account whose balance an operator's credit tops up to 100 USD
at each start (scripts/money.py); a refusal for money (402) is counted and logged like any other. Then, `--rate` times a minute on average (exponential gaps), it does
one of:
- RFQ: `POST /api/marketplace/request` for a small lease near its location, then
  `POST /api/contracts/create` on the best match (the spec's flow);
- a limit bid: `POST /api/bids` around the region's best ask (some cross at once and fill, some
  rest in the book until capacity frees or they expire a few minutes later);
- now and then, extend an active contract or settle one early.
Its fills, bid updates and contract endings are logged from its WebSocket (`fills`, `bids`,
`contracts`).

Bounded and polite: leases are short (2-15 min) and small, open bids and active contracts are
capped, the estimated spend stops new orders at `--budget-usd`, every creating POST carries an
`Idempotency-Key` (a retry never orders twice), 429s wait for `Retry-After`, and an unreachable
gateway is retried with capped backoff. `--duration` stops it after that many seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec

from agent.client import ApiError, Backoff, Gateway, GatewaySocket, GatewayUnavailable, retrying
from agent.metros import METROS, Metro
from gateway.protocol import PUSD_PER_USD, BidNotice, ContractNotice, ContractOut, PublicEvent

__all__ = ["RenterBot", "main"]

log = logging.getLogger("mnemo.renter_bot")


class RenterBot:
    """One renter account placing RFQ contracts and limit bids; see the module docstring."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        rng: random.Random,
        rate_per_min: float = 6.0,
        max_open_bids: int = 5,
        max_active: int = 10,
        budget_usd: float = 5.0,
        regions: Sequence[str] | None = None,
    ) -> None:
        self.gateway = gateway
        self.rng = rng
        self.rate_per_min = rate_per_min
        self.max_open_bids = max_open_bids
        self.max_active = max_active
        self.budget_usd = budget_usd
        self.metros = [m for m in METROS if regions is None or m.region in regions]
        if not self.metros:
            raise ValueError(f"no metros in regions {list(regions or [])}")
        self.home: Metro = rng.choice(self.metros)
        self.client_id: str | None = None
        self.spent_usd = 0.0
        """Estimated: the full cost of every contract taken (an upper bound of what is charged)."""
        self.open_bids: dict[str, dict[str, Any]] = {}
        self.active: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # -- set-up ------------------------------------------------------------------------------

    async def setup(self, stop: asyncio.Event) -> None:
        """Sign up (when the gateway client has no key) and create or reuse a client profile."""
        if self.gateway.api_key is None:
            email = f"renter-{uuid.uuid4().hex[:12]}@example.com"
            await retrying(
                "signing up the renter",
                lambda: self.gateway.signup(
                    email, uuid.uuid4().hex, role="user", organization="Demo renter"
                ),
                stop=stop,
            )
            log.info("signed up renter %s", email)
        existing = await retrying(
            "listing clients", lambda: self.gateway.request("GET", "/api/clients"), stop=stop
        )
        if existing.get("clients"):
            client = existing["clients"][0]
        else:
            body = {
                "org_name": f"Demo renter near {self.home.name}",
                "default_region": self.home.region,
                "latitude": self.home.lat,
                "longitude": self.home.lng,
                "prefer_local": True,
            }
            key = f"client-{uuid.uuid4().hex}"
            client = await retrying(
                "creating the client profile",
                lambda: self.gateway.request(
                    "POST", "/api/clients", body=body, idempotency_key=key
                ),
                stop=stop,
            )
        self.client_id = client["id"]
        log.info("renter client %s near %s (%s)", self.client_id, self.home.name, self.home.region)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Act until `stop`: one action per exponential gap of mean 60/rate seconds."""
        await self.setup(stop)
        watcher = asyncio.create_task(self._watch(stop), name="renter-ws")
        backoff = Backoff(1.0, 60.0)
        try:
            while not stop.is_set():
                gap = self.rng.expovariate(self.rate_per_min / 60.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(gap, 120.0))
                if stop.is_set():
                    break
                try:
                    await self.act()
                    backoff.reset()
                except GatewayUnavailable as exc:
                    delay = backoff.next_delay()
                    log.warning("gateway unavailable (%s); pausing %.1f s", exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                except ApiError as exc:
                    if exc.status == 429:
                        self._count("rate_limited")
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), exc.retry_after_s or 5.0)
                    else:
                        self._count(f"refused_{exc.code}")
                        log.info("refused: %s", exc)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            log.info("renter bot stopped: %s; estimated spend $%.6f", self.counts, self.spent_usd)

    async def act(self) -> None:
        """One action, chosen by what the bot holds now."""
        await self._refresh()
        roll = self.rng.random()
        if self.active and roll < 0.1:
            await self._extend_or_settle()
        elif self.spent_usd >= self.budget_usd:
            self._count("over_budget")
            if self.counts["over_budget"] == 1:
                log.info("budget of $%.2f reached: no new orders", self.budget_usd)
        elif roll < 0.55 and len(self.active) < self.max_active:
            await self._rfq()
        elif len(self.open_bids) < self.max_open_bids:
            await self._bid()

    async def _refresh(self) -> None:
        """Forget contracts that ended and bids that are no longer open."""
        now_ms = time.time() * 1000
        for contract_id, c in list(self.active.items()):
            if c["end_ms"] <= now_ms:
                del self.active[contract_id]
        for bid_id in list(self.open_bids):
            try:
                bid = await self.gateway.request("GET", f"/api/bids/{bid_id}")
            except ApiError as exc:
                if exc.status == 404:
                    # the `bids` watcher may have dropped it meanwhile (it ran during the await)
                    self.open_bids.pop(bid_id, None)
                    continue
                raise
            if bid["status"] != "open":
                self.open_bids.pop(bid_id, None)

    def _where(self) -> tuple[Metro, float, float]:
        # Mostly at home, sometimes shopping in another metro.
        metro = self.home if self.rng.random() < 0.6 else self.rng.choice(self.metros)
        lat = metro.lat + self.rng.gauss(0, 0.05)
        lng = metro.lng + self.rng.gauss(0, 0.05)
        return metro, round(lat, 6), round(lng, 6)

    def _size(self) -> tuple[int, int]:
        kind = self.rng.random()
        if kind < 0.5:
            return self.rng.choice((2, 4, 8, 16)), 0
        if kind < 0.85:
            return self.rng.choice((0, 4, 8)), self.rng.choice((4, 8, 12))
        return self.rng.choice((16, 32)), self.rng.choice((16, 24))

    async def _best_ask(self, region: str) -> float | None:
        book = await self.gateway.request("GET", f"/api/book/{region}")
        return book.get("best_ask_per_gb_sec")

    async def _rfq(self) -> None:
        metro, lat, lng = self._where()
        ram, vram = self._size()
        duration = self.rng.randrange(120, 900)
        ask = await self._best_ask(metro.region)
        cap = (ask or 1.5e-6) * self.rng.uniform(1.05, 1.6)
        request = {
            "ram_gb": ram,
            "vram_gb": vram,
            "duration_sec": duration,
            "max_price_per_gb_sec": round(cap, 12),
            "client_lat": lat,
            "client_lng": lng,
            "prefer_local": True,
            "limit": 5,
        }
        answer = await self.gateway.request("POST", "/api/marketplace/request", body=request)
        matches = answer.get("matches") or []
        self._count("rfq")
        for match in matches[:3]:  # the best first; fall through when someone else took it
            body = {
                "client_id": self.client_id,
                "node_id": match["node_id"],
                "ram_gb": ram,
                "vram_gb": vram,
                "duration_sec": duration,
                "max_price_per_gb_sec": round(cap, 12),
            }
            try:
                contract = await self.gateway.request(
                    "POST",
                    "/api/contracts/create",
                    body=body,
                    idempotency_key=f"rfq-{uuid.uuid4().hex}",
                )
            except ApiError as exc:
                if exc.status == 409:
                    self._count("lost_race")
                    continue
                raise
            self._took(contract, match.get("node_name", "?"), match.get("distance_km"))
            return
        self._count("rfq_unfilled")

    def _took(self, contract: dict[str, Any], node_name: str, distance_km: float | None) -> None:
        self.active[contract["contract_id"]] = contract
        cost = (contract["ram_gb"] + contract["vram_gb"]) * contract["duration_sec"]
        cost *= contract["price_per_gb_sec"]
        self.spent_usd += cost
        self._count("contracts")
        where = f", {distance_km:.1f} km away" if distance_km is not None else ""
        log.info(
            "took %d GB RAM + %d GB VRAM for %d s on %s%s at $%.3g/GB-s (contract %s)",
            contract["ram_gb"],
            contract["vram_gb"],
            contract["duration_sec"],
            node_name,
            where,
            contract["price_per_gb_sec"],
            contract["contract_id"],
        )

    async def _bid(self) -> None:
        metro, lat, lng = self._where()
        ask = await self._best_ask(metro.region)
        if ask is None:
            self._count("no_supply")
            return
        ram, vram = self._size()
        body = {
            "client_id": self.client_id,
            "region": metro.region,
            "ram_gb": ram,
            "vram_gb": vram,
            "duration_sec": self.rng.randrange(120, 900),
            # Some at or above the best ask (fill at once), some below (rest in the book).
            "max_price_per_gb_sec": round(ask * self.rng.uniform(0.85, 1.25), 12),
            "client_lat": lat,
            "client_lng": lng,
            "allow_split": self.rng.random() < 0.3,
            "expires_in_sec": self.rng.randrange(120, 600),
        }
        if body["allow_split"]:
            body["min_fill_gb"] = max(1, (ram + vram) // 4)
        bid = await self.gateway.request(
            "POST", "/api/bids", body=body, idempotency_key=f"bid-{uuid.uuid4().hex}"
        )
        self._count("bids")
        if bid["status"] == "open":
            self.open_bids[bid["bid_id"]] = bid
        log.info(
            "bid %d GB RAM + %d GB VRAM in %s at <= $%.3g/GB-s (%s)",
            ram,
            vram,
            metro.region,
            body["max_price_per_gb_sec"],
            bid["status"],
        )

    async def _extend_or_settle(self) -> None:
        contract_id = self.rng.choice(list(self.active))
        if self.rng.random() < 0.5:
            extra = self.rng.randrange(60, 300)
            contract = await self.gateway.request(
                "POST",
                f"/api/contracts/{contract_id}/extend",
                body={"additional_duration_sec": extra},
                idempotency_key=f"extend-{uuid.uuid4().hex}",
            )
            self.active[contract_id] = contract
            self.spent_usd += (
                (contract["ram_gb"] + contract["vram_gb"]) * extra * contract["price_per_gb_sec"]
            )
            self._count("extended")
            log.info("extended %s by %d s", contract_id, extra)
        else:
            contract = await self.gateway.request(
                "POST",
                f"/api/contracts/{contract_id}/settle",
                body={"actual_egress_gb": round(self.rng.uniform(0, 2), 3)},
                idempotency_key=f"settle-{uuid.uuid4().hex}",
            )
            self.active.pop(contract_id, None)
            self._count("settled")
            log.info("settled %s early: $%.6f", contract_id, contract["total_cost_usd"])

    async def _watch(self, stop: asyncio.Event) -> None:
        """Log fills, bid updates and contract endings as they stream in."""
        backoff = Backoff(1.0, 60.0)
        key = self.gateway.api_key
        assert key is not None
        while not stop.is_set():
            socket: GatewaySocket | None = None
            try:
                socket = await GatewaySocket.open(
                    self.gateway.api_url, key, on_event=self._on_event
                )
                await socket.subscribe(["fills", "bids", "contracts"])
                backoff.reset()
                stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
                waiting: set[asyncio.Future[Any]] = {socket.closed, stopper}
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopper.cancel()
            except (GatewayUnavailable, ApiError) as exc:
                log.debug("renter socket: %s", exc)
            finally:
                if socket is not None:
                    await socket.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff.next_delay())

    def _on_event(self, channel: str, event: PublicEvent) -> None:
        # Events come in REST's shapes (`gateway.protocol`): what is kept is what
        # `POST /api/contracts/create` answers for the bot's own RFQ contracts.
        match event:
            case ContractOut(bid_id=str(bid_id)):  # `fills`: a resting bid filled
                self._count("bid_fills")
                self.active[event.contract_id] = msgspec.to_builtins(event)
                gb_s = (event.ram_gb + event.vram_gb) * event.duration_sec
                self.spent_usd += gb_s * event.price_pusd / PUSD_PER_USD
                log.info(
                    "bid %s filled: %d GB RAM + %d GB VRAM on node %s at $%.3g/GB-s",
                    bid_id,
                    event.ram_gb,
                    event.vram_gb,
                    event.node_id,
                    event.price_per_gb_sec,
                )
            case ContractNotice(notice="contract_started", contract=successor):
                # On `contracts`, only a failover's successor starts (new fills go to `fills`).
                log.info(
                    "contract %s failed over to node %s",
                    successor.predecessor_id,
                    successor.node_id,
                )
                self.active[successor.contract_id] = msgspec.to_builtins(successor)
            case ContractNotice(notice="contract_ended" | "contract_failed_over", contract=ended):
                log.info("contract %s ended (%s)", ended.contract_id, ended.status)
                self.active.pop(ended.contract_id, None)
            case BidNotice(bid=bid) if bid.status != "open":
                self.open_bids.pop(bid.bid_id, None)
            case _:
                pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.renter_bot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--api", default=os.environ.get("MNEMO_API_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("MNEMO_API_KEY"))
    parser.add_argument("--rate", type=float, default=6.0, help="actions per minute (6)")
    parser.add_argument("--max-open-bids", type=int, default=5)
    parser.add_argument("--max-active", type=int, default=10, help="active contracts at most")
    parser.add_argument("--budget-usd", type=float, default=5.0, help="stop ordering past this")
    parser.add_argument("--regions", help="comma-separated regions to trade in (default: all)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m scripts.renter_bot`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.rate <= 0 or args.max_open_bids < 0 or args.max_active < 0 or args.budget_usd < 0:
        print("renter_bot: --rate must be > 0 and the limits >= 0", file=sys.stderr)
        return 2
    regions = [r.strip() for r in args.regions.split(",") if r.strip()] if args.regions else None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if args.duration is not None:
            loop.call_later(args.duration, stop.set)
        async with Gateway(args.api, args.api_key) as gateway:
            bot = RenterBot(
                gateway,
                rng=random.Random(args.seed),
                rate_per_min=args.rate,
                max_open_bids=args.max_open_bids,
                max_active=args.max_active,
                budget_usd=args.budget_usd,
                regions=regions,
            )
            await bot.run(stop)

    try:
        asyncio.run(run())
    except ApiError as exc:
        print(f"renter_bot: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
