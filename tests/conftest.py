"""Shared fixtures: real Redis and Postgres, isolated per test, cleaned up after.

Servers: `MNEMO_TEST_REDIS_URL` / `MNEMO_TEST_DATABASE_URL` when set, otherwise embedded Valkey
and PostgreSQL started once per session under a temporary folder (see `scripts.embedded`).

Isolation: each test gets its own Redis key prefix (`keys` fixture; everything it writes is
deleted afterwards) and its own Postgres database cloned from a migrated template.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine.keys import Keys


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"random seed: {_SEED} (set MNEMO_TEST_SEED to reproduce)"]


_SEED = int(os.environ.get("MNEMO_TEST_SEED", random.randrange(1 << 30)))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(_SEED)


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(redis_url, database_url) for the whole session."""
    redis_url = os.environ.get("MNEMO_TEST_REDIS_URL")
    database_url = os.environ.get("MNEMO_TEST_DATABASE_URL")
    if redis_url and database_url:
        yield redis_url, database_url
        return
    from scripts.embedded import EmbeddedServers

    with tempfile.TemporaryDirectory(prefix="mnemo-test-") as tmp:
        with EmbeddedServers(
            Path(tmp), want_redis=not redis_url, want_postgres=not database_url
        ) as emb:
            yield redis_url or emb.redis_url, database_url or emb.database_url


@pytest.fixture(scope="session")
def redis_url(servers: tuple[str, str]) -> str:
    return servers[0]


@pytest.fixture(scope="session")
def database_url(servers: tuple[str, str]) -> str:
    return servers[1]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def keys(redis: aioredis.Redis) -> AsyncIterator[Keys]:
    """A key space of this test's own; every key under it is deleted afterwards."""
    k = Keys(f"t{uuid.uuid4().hex[:12]}:")
    try:
        yield k
    finally:
        await asyncio.shield(_delete_prefix(redis, k.prefix))


async def _delete_prefix(redis: aioredis.Redis, prefix: str) -> None:
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
async def pg_template(database_url: str) -> AsyncIterator[str]:
    """A migrated template database for this session; dropped at the end."""
    from persistence.migrations import migrate

    name = f"mnemo_tpl_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await migrate(_with_database(database_url, name))
    try:
        yield name
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def db_url(database_url: str, pg_template: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database of this test's own (dropped afterwards)."""
    name = f"mnemo_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    finally:
        await admin.close()
    try:
        yield _with_database(database_url, name)
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await asyncio.shield(admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            await admin.close()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    assert p is not None
    try:
        yield p
    finally:
        await p.close()
