"""Liveness and readiness probes (no authentication).

`/healthz`: the process serves requests. `/readyz`: it can do its work, i.e. Redis answers a PING
and Postgres a `SELECT 1`, each within a second; otherwise 503 with which one failed.
"""

from __future__ import annotations

import asyncio
import logging

import persistence
from gateway.operations import Call, Operation, Reply
from gateway.schemas import HealthOut, ReadyOut

__all__ = ["OPERATIONS"]

log = logging.getLogger("mnemo.gateway")
_PROBE_TIMEOUT_S = 1.0


async def healthz(call: Call) -> HealthOut:
    return HealthOut(status="ok")


async def readyz(call: Call) -> Reply:
    state = call.state

    async def redis_ok() -> bool:
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                return bool(await state.redis.ping())
        except Exception as exc:
            log.warning("readiness: Redis: %s", exc)
            return False

    async def postgres_ok() -> bool:
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                return await persistence.ping(state.pool)
        except Exception as exc:
            log.warning("readiness: Postgres: %s", exc)
            return False

    redis_up, postgres_up = await asyncio.gather(redis_ok(), postgres_ok())
    ready = redis_up and postgres_up
    return Reply(
        ReadyOut(status="ready" if ready else "unavailable", redis=redis_up, postgres=postgres_up),
        status=200 if ready else 503,
    )


OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/healthz",
        healthz,
        name="healthz",
        summary="Liveness: the process serves requests",
        tag="health",
        response=HealthOut,
        auth=False,
    ),
    Operation(
        "GET",
        "/readyz",
        readyz,
        name="readyz",
        summary="Readiness: Redis and Postgres reachable",
        tag="health",
        response=ReadyOut,
        auth=False,
        other_responses={503: ReadyOut},
    ),
]
