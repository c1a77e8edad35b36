"""Shared fixtures: real Redis and Postgres, isolated per test, cleaned up after.

Servers: `MNEMO_TEST_REDIS_URL` / `MNEMO_TEST_DATABASE_URL` when set, otherwise embedded Valkey
and PostgreSQL started once per session under a temporary folder (see `scripts.embedded`).
`MNEMO_TEST_REDIS_CLUSTER=1` (or `valkey`, or `redis`: the machine's `redis-server`) makes Redis
a local cluster of 3 primaries instead (`scripts.cluster`, ports 44000-44999): every test that
touches Redis then runs on a cluster (`redis_url` is its `redis+cluster://` URL, the `redis`
fixture a `RedisCluster`).

Isolation: each test gets its own Redis key prefix (`keys` fixture; everything it writes is
deleted afterwards) and its own Postgres database cloned from a migrated template.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine.connection import is_cluster, open_redis, primaries, pubsub_node
from engine.keys import Keys

# The Stripe doubles (localstripe, the Connect fake) and the gateway served over HTTP.
pytest_plugins = ["tests.payments.stripe_doubles"]


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"random seed: {_SEED} (set MNEMO_TEST_SEED to reproduce)"]


_SEED = int(os.environ.get("MNEMO_TEST_SEED", random.randrange(1 << 30)))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(_SEED)


@pytest.fixture(autouse=True)
def _ctrl_c_as_found() -> Iterator[None]:
    """Each test leaves Ctrl-C's handler as it found it. A uvicorn server installs its own while
    it serves and puts back what it found when it stops, so two servers of one test stopped in
    the order they started leave the first one's handler behind: a later Ctrl-C (the
    supervisor's test sends one) would then only tell that long-stopped server to exit."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)


CLUSTER = os.environ.get("MNEMO_TEST_REDIS_CLUSTER", "").strip().lower()
"""Non-empty: the session's Redis is a local 3-primary cluster (see the module's docstring)."""


def _cluster_binary() -> str | None:
    if CLUSTER == "redis":
        found = shutil.which("redis-server")
        if found is None:
            pytest.exit("MNEMO_TEST_REDIS_CLUSTER=redis, but no redis-server on the PATH", 2)
        return found
    return None  # the embedded Valkey's


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(redis_url, database_url) for the whole session."""
    redis_url = os.environ.get("MNEMO_TEST_REDIS_URL")
    database_url = os.environ.get("MNEMO_TEST_DATABASE_URL")
    with contextlib.ExitStack() as stack:
        if CLUSTER:
            from scripts.cluster import LocalCluster

            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mnemo-rc-")))
            cluster = stack.enter_context(LocalCluster(folder, masters=3, binary=_cluster_binary()))
            redis_url = cluster.url
        yield from _servers(redis_url, database_url)


def _servers(redis_url: str | None, database_url: str | None) -> Iterator[tuple[str, str]]:
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
    client = open_redis(redis_url)
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
    for node in await primaries(redis):  # every primary's keys (one: a single server)
        try:
            batch: list[bytes] = []
            async for key in node.scan_iter(match=f"{prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await redis.unlink(*batch)
                    batch.clear()
            if batch:
                await redis.unlink(*batch)
        finally:
            if node is not redis:
                await node.aclose()


async def publish_all(redis: aioredis.Redis, channel: str, payloads: Iterable[bytes]) -> None:
    """PUBLISH each payload on `channel`, in order, pipelined (a cluster's pipelines refuse
    PUBLISH: there, through one node, which reaches subscribers on every node)."""
    node = aioredis.Redis(**pubsub_node(redis)) if is_cluster(redis) else redis
    try:
        async with node.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.publish(channel, payload)
            await pipe.execute()
    finally:
        if node is not redis:
            await node.aclose()


def node_client(redis_url: str, **kwargs: Any) -> aioredis.Redis:
    """A plain client of the server, or of one node of a cluster (to subscribe: classic pub/sub
    reaches subscribers on every node)."""
    client = open_redis(redis_url)
    if not is_cluster(client):
        return aioredis.from_url(redis_url, **kwargs)
    return aioredis.Redis(**{**pubsub_node(client), **kwargs})


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
