"""The Starlette application: `create_app(settings)`, and `app_from_env` for uvicorn.

    uvicorn --factory gateway.app:app_from_env --loop uvloop --http httptools

Resources live in the lifespan (no module globals, nothing connects at import): it opens the
Redis client and the asyncpg pool (retrying only while the servers come up), loads the market's
scripts, starts the `MarketView` (snapshot, then tailing the region streams) and the WebSocket
services, and hands everything to requests through the typed lifespan state (`AppState`,
read as `request.state.<name>`). On shutdown it releases them in reverse order.

Routes: the REST operations of `gateway.routes`, `/metrics`, `/openapi.json`, `/docs` (with its
assets), the clusters/analytics routes of `gateway.analytics`, `/ws` and `/ws/public` of
`gateway.ws`, and the web app of `gateway.web` (its pages at `/`, its files, browser sign-in).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypedDict, TypeVar

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

from engine.connection import open_redis
from engine.keys import Keys
from engine.market import Market
from engine.settings import ConfigError, Settings
from engine.view import MarketView
from gateway import analytics, ws
from gateway.auth import Authenticator
from gateway.errors import ERROR_HANDLERS
from gateway.idempotency import IdempotencyStore
from gateway.metrics import Metrics, MetricsMiddleware
from gateway.openapi import OpenApiEndpoints
from gateway.operations import route
from gateway.payments import invoices, stripe_api, stripe_connect, stripe_payouts
from gateway.payments.stripe_cards import CardPayments
from gateway.payments.stripe_rail import StripeRail
from gateway.ratelimit import RateLimiter, rules_for
from gateway.routes import OPERATIONS
from gateway.routes.marketplace import ClientProfiles
from gateway.routes.nodes import OwnerIndex
from gateway.web import pages as web_pages
from gateway.web import session as web_session
from persistence.journal.lag import journal_lag
from persistence.journal.status import rejected_counts

__all__ = ["AppState", "app_from_env", "create_app"]

log = logging.getLogger("mnemo.gateway")

_T = TypeVar("_T")
_CONNECT_ATTEMPTS = 10
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.CannotConnectNowError,
    RedisConnectionError,
    RedisTimeoutError,
)


class AppState(TypedDict):
    """The lifespan state, available on every request and WebSocket as `conn.state.<key>`."""

    settings: Settings
    keys: Keys
    redis: aioredis.Redis
    pool: asyncpg.Pool
    market: Market
    view: MarketView
    owners: OwnerIndex
    profiles: ClientProfiles
    auth: Authenticator
    limiter: RateLimiter
    idempotency: IdempotencyStore
    metrics: Metrics
    ws: Any
    """`gateway.ws.WsServices` (under `gateway.ws.STATE_KEY`)."""
    crypto: Any
    """`gateway.payments.crypto.CryptoRail` when a chain is configured, else None."""
    cards: CardPayments | None
    """Card payments through Stripe; None without `MNEMO_STRIPE_SECRET_KEY`."""


async def _with_retry(what: str, connect: Callable[[], Awaitable[_T]]) -> _T:
    """Retry `connect` while the server is coming up (narrow errors, logged countdown), then raise."""
    for attempt in range(1, _CONNECT_ATTEMPTS + 1):
        try:
            return await connect()
        except _CONNECT_ERRORS as exc:
            if attempt == _CONNECT_ATTEMPTS:
                raise
            delay = min(0.25 * 2 ** (attempt - 1), 5.0)
            log.warning(
                "%s not reachable (%s); retry %d/%d in %.2f s",
                what,
                exc,
                attempt,
                _CONNECT_ATTEMPTS - 1,
                delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


REDIS_CONNECTIONS = 128
"""Redis connections a gateway process opens at most; further commands wait for one."""
REDIS_WAIT_S = 10.0
"""How long a command waits for a free connection before it fails."""


def create_app(settings: Settings) -> Starlette:
    """The Mnemo gateway for `settings` (which must name Redis and Postgres and a JWT secret)."""
    if not settings.redis_url:
        raise ConfigError(
            "MNEMO_REDIS_URL", "the gateway needs a Redis URL (start the embedded servers first)"
        )
    if not settings.database_url:
        raise ConfigError(
            "MNEMO_DATABASE_URL",
            "the gateway needs a Postgres URL (start the embedded servers first)",
        )
    if len(settings.jwt_secret) < 32:
        raise ConfigError("MNEMO_JWT_SECRET", "must be at least 32 characters")
    redis_url, database_url = settings.redis_url, settings.database_url
    metrics = Metrics(settings.metrics_token)
    openapi = OpenApiEndpoints(
        title="Mnemo API",
        version="0.1.0",
        description="An exchange for idle RAM and VRAM, rented by the GB-second.",
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AppState]:
        keys = Keys(settings.key_prefix)
        # A burst of more concurrent commands than the pool's connections (a thousand sockets
        # closing at once, a spike of requests) waits for a free one: redis-py's default pool
        # refuses the excess at once ("Too many connections"), which became 500s and leaked
        # WebSocket slots until they expired.
        redis = open_redis(redis_url, max_connections=REDIS_CONNECTIONS, timeout_s=REDIS_WAIT_S)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(redis.aclose)
            await _with_retry("Redis", redis.ping)
            pool = await _with_retry(
                "Postgres",
                lambda: asyncpg.create_pool(database_url, min_size=1, max_size=10),
            )
            assert pool is not None
            stack.push_async_callback(pool.close)
            market = Market(
                redis,
                keys,
                missed_heartbeats_offline=settings.missed_heartbeats_offline,
                ack_replicas=settings.redis_ack_replicas,
                platform_fee_bps=settings.platform_fee_bps,
                max_open_contracts=settings.max_open_contracts,
                max_open_bids=settings.max_open_bids,
            )
            await market.load_scripts()
            view = MarketView(redis, keys)
            await view.start()
            stack.push_async_callback(view.stop)
            owners = OwnerIndex()
            owners.warm(view)
            services = await stack.enter_async_context(
                ws.ws_services(redis, market, keys, settings)
            )
            limiter = RateLimiter(
                redis,
                keys,
                rules_for(settings),
                connections=settings.ws_connections_per_account,
                on_refused=lambda limit: metrics.rate_limited.labels(limit).inc(),
            )
            slots = asyncio.create_task(limiter.keep_connections_alive(), name="ws-slots")
            stack.push_async_callback(_cancel, slots)
            idempotency = IdempotencyStore(pool, settings.jwt_secret)
            sweeper = asyncio.create_task(idempotency.sweep_forever(), name="idempotency-sweep")
            stack.push_async_callback(_cancel, sweeper)
            crypto = await _crypto_rail(stack, settings, pool, market)
            cards = None
            if settings.stripe_secret_key:
                rail = StripeRail(settings)
                stack.push_async_callback(rail.aclose)
                cards = CardPayments(pool, rail, market)
            metrics.on_scrape(lambda m: _view_gauges(m, view))
            metrics.on_scrape_async(lambda m: _journal_gauges(m, redis, keys, pool))
            # The market view holds every node as long-lived objects; a full collection that
            # rescans them costs ~40 ms per 100k nodes, a latency spike for every request in
            # flight. Freeze what start-up built into the permanent generation.
            gc.collect()
            gc.freeze()
            stack.callback(gc.unfreeze)
            state: AppState = {
                "settings": settings,
                "keys": keys,
                "redis": redis,
                "pool": pool,
                "market": market,
                "view": view,
                "owners": owners,
                "profiles": ClientProfiles(),
                "auth": Authenticator(pool, settings),
                "limiter": limiter,
                "idempotency": idempotency,
                "metrics": metrics,
                "ws": services,
                "crypto": crypto,
                "cards": cards,
            }
            yield state

    routes: list[BaseRoute] = [route(op) for op in OPERATIONS]
    routes += [
        Route("/metrics", metrics.endpoint, methods=["GET"], name="metrics"),
        *openapi.routes(),
    ]
    routes += analytics.routes
    routes += [route(op) for op in web_session.OPERATIONS]
    if settings.crypto is not None:
        from gateway.payments import crypto_api

        routes += [route(op) for op in crypto_api.OPERATIONS]
    routes += stripe_api.routes
    routes += stripe_connect.routes
    routes += invoices.routes
    routes += stripe_payouts.routes
    routes += ws.ws_routes
    routes += web_pages.routes()
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=ERROR_HANDLERS,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
    )


async def _crypto_rail(
    stack: contextlib.AsyncExitStack, settings: Settings, pool: asyncpg.Pool, market: Market
) -> Any:
    """The crypto rail and its re-check loop (payments awaiting finality), when configured."""
    if settings.crypto is None:
        return None
    from gateway.payments.crypto import open_rail

    rail = await stack.enter_async_context(open_rail(pool, settings.crypto, market.credit))
    task = asyncio.create_task(rail.run_rechecks(), name="crypto-rechecks")
    stack.push_async_callback(_cancel, task)
    return rail


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _view_gauges(metrics: Metrics, view: MarketView) -> None:
    for book in view.books():
        metrics.view_nodes.labels(book.region).set(len(book))


async def _journal_gauges(
    metrics: Metrics, redis: aioredis.Redis, keys: Keys, pool: asyncpg.Pool
) -> None:
    rejected = await rejected_counts(pool)
    metrics.journal_rejected.clear()
    for name, count in rejected.items():
        metrics.journal_rejected.labels(name or "(not an event)").set(count)
    lag = await journal_lag(redis, keys)
    for region in lag.regions:
        metrics.journal_pending.labels(region.region).set(region.pending)
        metrics.journal_undelivered.labels(region.region).set(region.undelivered)
        metrics.journal_oldest_age.labels(region.region).set(region.oldest_unacked_age_s)


def app_from_env() -> Starlette:
    """uvicorn factory: `Settings.from_env()`, then `create_app`."""
    return create_app(Settings.from_env())
