"""Registering a simulated fleet with the gateway.

`POST /api/nodes/register/batch` with 1,000 nodes a request, a few requests in flight, an
`Idempotency-Key` per batch (a retry after a lost reply registers nothing twice); one
`POST /api/nodes/register` per node (`concurrency` in flight) against a gateway without the batch
route. Only transient failures are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec

from agent.client import ApiError, Backoff, Gateway, GatewayUnavailable, retrying
from agent.population import VirtualNode

__all__ = ["BATCHES_IN_FLIGHT", "REGISTER_BATCH", "register_fleet"]

# One logger for the whole simulator, whichever of its modules speaks (as before the split).
log = logging.getLogger("mnemo.agent.fleet")


REGISTER_BATCH = 1000
"""Nodes per batch registration (the gateway's maximum)."""
BATCHES_IN_FLIGHT = 4
"""Batch registrations in flight: enough to keep the gateway's workers and Redis busy."""
_REGISTER = "/api/nodes/register"
_REGISTER_BATCH = "/api/nodes/register/batch"

Post = Callable[[str, Any, str | None], Awaitable[Any]]
"""POSTs a JSON body to an API path (with an optional idempotency key); the decoded answer."""


def _httpx_post(gateway: Gateway) -> Post:
    async def post(path: str, body: Any, key: str | None) -> Any:
        return await gateway.request("POST", path, body=body, idempotency_key=key)

    return post


@contextlib.asynccontextmanager
async def _aiohttp_post(gateway: Gateway, concurrency: int) -> AsyncIterator[Post | None]:
    """A bulk poster on aiohttp when it is installed (None otherwise).

    httpx costs about 1-2 ms of client CPU per request here (its pool polls every idle
    connection per request), aiohttp about 0.1 ms: for a fleet of 100k nodes that is the
    difference between minutes and seconds of the simulator's own time. The single-node agent
    sends a request a minute and keeps httpx.
    """
    try:
        import aiohttp
    except ImportError:
        yield None
        return
    headers = {"Content-Type": "application/json", "User-Agent": "mnemo-agent-fleet/0.1"}
    if gateway.api_key:
        headers["X-API-Key"] = gateway.api_key
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=60)
    encode = msgspec.json.encode
    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout
    ) as session:

        async def post(path: str, body: Any, key: str | None) -> Any:
            extra = {"Idempotency-Key": key} if key else None
            url = f"{gateway.api_url}{path}"
            try:
                async with session.post(url, data=encode(body), headers=extra) as response:
                    raw = await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise GatewayUnavailable(f"POST {path}: {type(exc).__name__}: {exc}") from exc
            if status in (502, 503, 504):
                raise GatewayUnavailable(f"POST {path}: HTTP {status}")
            if status >= 400:
                try:
                    error = msgspec.json.decode(raw).get("error", {})
                except (msgspec.DecodeError, AttributeError):
                    error = {}
                raise ApiError(
                    status,
                    str(error.get("code", "http_error")),
                    str(error.get("message", raw[:200])),
                    error.get("field"),
                    float(retry_after) if retry_after and retry_after.isdigit() else None,
                )
            return msgspec.json.decode(raw)

        yield post


async def register_fleet(
    gateway: Gateway,
    nodes: Sequence[VirtualNode],
    *,
    concurrency: int = 32,
    batch: int = REGISTER_BATCH,
    batches_in_flight: int = BATCHES_IN_FLIGHT,
    stop: asyncio.Event | None = None,
    progress: Callable[[int, float], None] | None = None,
    idempotent: bool = True,
    delivers: bool = False,
) -> list[str]:
    """Register every node; their ids, in order.

    By batches (`POST /api/nodes/register/batch`, `batch` nodes each, `batches_in_flight` at a
    time); a gateway without that route (404 on the first batch: an older gateway) gets one
    request per node instead, `concurrency` in flight, as does `batch=1`. Uses aiohttp when
    installed (much cheaper per request), else the gateway's httpx client. Transient failures
    (connection lost, 502/503/504, 429) are retried with backoff; any other refusal raises
    `ApiError`. `idempotent` sends an `Idempotency-Key` per request (per batch, or per node) so
    that a retry after a lost reply cannot register anything twice (the gateway keeps the keys
    in Postgres: one row per request, which costs single registrations much throughput).
    `delivers` registers the nodes as serving their RAM leases (the fleet's delivery).
    """

    def body_of(i: int) -> dict[str, Any]:
        body = nodes[i].registration_body()
        if delivers:
            body["delivers"] = True
        return body

    ids: list[str | None] = [None] * len(nodes)
    key_prefix = f"fleet-{uuid.uuid4().hex}" if idempotent else None
    registered = 0
    started = time.perf_counter()

    def done(count: int) -> None:
        nonlocal registered
        before, registered = registered, registered + count
        if progress is not None and registered // 10_000 > before // 10_000:
            progress(registered, time.perf_counter() - started)

    async def in_parallel(workers: int, work: Callable[[int], Awaitable[None]], items: int) -> None:
        cursor = iter(range(items))

        async def worker() -> None:
            for item in cursor:
                if stop is not None and stop.is_set():
                    return
                await work(item)

        tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(workers, items)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async with _aiohttp_post(gateway, max(concurrency, batches_in_flight)) as fast:
        post = fast or _httpx_post(gateway)

        async def one(i: int) -> None:
            key = f"{key_prefix}-{i}" if key_prefix else None
            body = body_of(i)
            answer = await retrying(
                "registering a virtual node",
                lambda: post(_REGISTER, body, key),
                backoff=Backoff(0.2, 10.0),
                stop=stop,
            )
            ids[i] = str(answer["node_id"])
            done(1)

        async def many(k: int) -> None:
            span = range(k * batch, min(len(nodes), (k + 1) * batch))
            key = f"{key_prefix}-b{k}" if key_prefix else None
            body = {"nodes": [body_of(i) for i in span]}
            answer = await retrying(
                "registering a batch of virtual nodes",
                lambda: post(_REGISTER_BATCH, body, key),
                backoff=Backoff(0.2, 10.0),
                stop=stop,
            )
            got = answer["node_ids"]
            if len(got) != len(span):
                raise ValueError(f"the gateway answered {len(got)} ids for {len(span)} nodes")
            for i, node_id in zip(span, got, strict=True):
                ids[i] = str(node_id)
            done(len(span))

        batches = -(-len(nodes) // batch) if batch > 1 else 0
        if batches:
            try:
                # The first batch alone: it tells whether the gateway has batch registration.
                await many(0)
            except ApiError as exc:
                if exc.status not in (404, 405):
                    raise
                log.info("the gateway has no batch registration; registering node by node")
                batches = 0
            else:
                await in_parallel(batches_in_flight, lambda k: many(k + 1), batches - 1)
        if not batches:
            todo = [i for i, node_id in enumerate(ids) if node_id is None]
            await in_parallel(concurrency, lambda j: one(todo[j]), len(todo))
    if any(i is None for i in ids):
        raise asyncio.CancelledError("registration stopped")
    return [i for i in ids if i is not None]
