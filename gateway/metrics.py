"""Prometheus metrics of one app: request counts and latencies per route template, `/metrics`.

Each app gets its own `CollectorRegistry` (no process-global collectors, so several apps in one
process, as in tests, never collide). Routes are labelled by their template (`/api/nodes/{node_id}`),
never by the raw path, so label cardinality stays bounded; requests that match no route share the
label `unmatched`. With several uvicorn worker processes each serves its own counters; scrape
each worker (or run one per container), as prometheus_client's multiprocess mode is not used.

`/metrics` names regions (tenants' private ones too), so it is not public: it answers a scraper
that presents `Authorization: Bearer <MNEMO_METRICS_TOKEN>` and admins (API key or JWT); anyone
else gets the API's 401/403.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import authenticate
from gateway.errors import Forbidden

__all__ = ["Metrics", "MetricsMiddleware"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The app's collectors and the `/metrics` endpoint."""

    def __init__(self, token: str | None = None) -> None:
        self._token = token.encode() if token else None
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mnemo_http_requests",
            "HTTP requests served, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mnemo_http_request_duration_seconds",
            "Time from request start to the end of the response, by method and route template.",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mnemo_http_requests_in_flight", "HTTP requests being served.", registry=self.registry
        )
        self.view_nodes = Gauge(
            "mnemo_view_nodes",
            "Nodes in this process's market view, by region.",
            ["region"],
            registry=self.registry,
        )
        self.journal_pending = Gauge(
            "mnemo_journal_pending_events",
            "Events read by a journal worker and not yet acknowledged, by region.",
            ["region"],
            registry=self.registry,
        )
        self.journal_undelivered = Gauge(
            "mnemo_journal_undelivered_events",
            "Events in the region's stream not yet read by any journal worker, by region.",
            ["region"],
            registry=self.registry,
        )
        self.journal_oldest_age = Gauge(
            "mnemo_journal_oldest_unacked_age_seconds",
            "Age of the oldest event not yet in Postgres, by region (0 when all are).",
            ["region"],
            registry=self.registry,
        )
        self.journal_rejected = Gauge(
            "mnemo_journal_rejected_events",
            "Events the journal set aside and that are not yet replayed, by region "
            "(`mnemo journal-status` lists them).",
            ["region"],
            registry=self.registry,
        )
        # By limit only: a per-account or per-region label would publish tenants' activity.
        self.rate_limited = Counter(
            "mnemo_rate_limited",
            "Requests, WebSocket connections and subscriptions refused by a limit, by limit "
            "(writes, ws_connections, subscriptions, signup_ip, token_ip, login_failures, "
            "api_key_create).",
            ["limit"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._refreshers: list[Callable[[Metrics], None]] = []
        self._async_refreshers: list[Callable[[Metrics], Awaitable[None]]] = []

    def on_scrape(self, refresh: Callable[[Metrics], None]) -> None:
        """Call `refresh(self)` before each scrape (for gauges read from live state)."""
        self._refreshers.append(refresh)

    def on_scrape_async(self, refresh: Callable[[Metrics], Awaitable[None]]) -> None:
        """Await `refresh(self)` before each scrape (for gauges read over the network)."""
        self._async_refreshers.append(refresh)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(method, route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    async def endpoint(self, request: Request) -> Response:
        """`GET /metrics`: the Prometheus text exposition (the metrics token or an admin)."""
        if not self._scraper(request):
            principal = await authenticate(request)  # 401 without valid credentials
            if not principal.is_admin:
                raise Forbidden(
                    "/metrics is for admins and the metrics token (MNEMO_METRICS_TOKEN)"
                )
        for refresh in self._refreshers:
            refresh(self)
        for refresh_async in self._async_refreshers:
            await refresh_async(self)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def _scraper(self, request: Request) -> bool:
        if self._token is None:
            return False
        scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self._token
        )


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request (cheap: no Request object is built)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - start)
