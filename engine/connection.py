"""Redis connections: one server, or a Redis (or Valkey) Cluster, named by one URL.

`MNEMO_REDIS_URL` names a single server as redis-py does (`redis://host:port/db`,
`rediss://...`, `unix://...`) and a cluster with our own scheme, which lists the seed nodes the
client asks for the cluster's layout (any one that answers will do; the rest are found)::

    redis+cluster://[user:password@]host:port[,host:port...]
    rediss+cluster://...           the same over TLS

A cluster has no databases (no `/db`). `open_redis(url)` returns redis-py's asyncio `Redis`
for a server and its `RedisCluster` for a cluster; the rest of the code calls the commands both
offer and asks `is_cluster()` where they differ:

- A multi-key command (one XREAD over several streams, an MGET) must name keys of one slot on a
  cluster: the callers read per region (all of a region's keys share its hash tag).
- `engine.market` sends its script calls itself (packed by hiredis, routed by the slot of each
  call's first key, redirections and NOSCRIPT handled there); everything else goes through
  redis-py's command path, which routes and follows MOVED/ASK on its own.
- Streams: `read_streams()` reads several streams (XREAD, or XREADGROUP for a consumer group)
  in one command on a server and one command per slot on a cluster.
- Pub/sub: `PUBLISH` on any node of a cluster reaches subscribers on every node (the bus
  broadcasts it), so the gateway's hub subscribes on one node (`pubsub_node`), the engine
  publishes on any.

`primaries(client)` lists a client per primary (one client for a single server): for what
must visit every node (SCAN over the key space, the embedded test fixtures' clean-up).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.exceptions import MaxConnectionsError

from engine.redis_url import CLUSTER_SCHEMES, ClusterUrl, is_cluster_url, parse_cluster_url

__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterUrl",
    "WaitingCluster",
    "is_cluster",
    "is_cluster_url",
    "open_redis",
    "parse_cluster_url",
    "primaries",
    "pubsub_node",
    "read_streams",
]


def open_redis(
    url: str,
    *,
    max_connections: int = 1024,
    timeout_s: float | None = None,
    decode_responses: bool = False,
) -> aioredis.Redis:
    """A client for the server or cluster `url` names (see the module's docstring).

    A single server gets a blocking pool of `max_connections` (past the cap a command waits up
    to `timeout_s` for a free connection); a cluster client gets `max_connections` per node.
    The cluster client (`WaitingCluster`) is typed as `Redis`: it offers the same command
    methods."""
    if is_cluster_url(url):
        parsed = parse_cluster_url(url)
        client = WaitingCluster(
            timeout_s=timeout_s,
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
            username=parsed.username,
            password=parsed.password,
            ssl=parsed.ssl,
            decode_responses=decode_responses,
            max_connections=max_connections,
        )
        return cast(aioredis.Redis, client)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=decode_responses,
        max_connections=max_connections,
        timeout=timeout_s,
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


class WaitingCluster(RedisCluster):
    """A `RedisCluster` whose commands, pipelines and `engine.market` calls wait for a free
    connection (`gate`: at most `max_connections` at once, which bounds each node's too) the way
    a single server's blocking pool makes them wait: redis-py's cluster client refuses the
    command past its per-node cap at once (`MaxConnectionsError`), so a burst of requests would
    become errors. `timeout_s` bounds the wait (None: no bound)."""

    def __init__(self, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Semaphore(kwargs.get("max_connections", 2**31))
        self.gate_timeout_s = timeout_s

    async def waiting(self) -> None:
        """Take one of the gate's places (release it with `self.gate.release()`)."""
        if self.gate_timeout_s is None:
            await self.gate.acquire()
            return
        try:
            async with asyncio.timeout(self.gate_timeout_s):
                await self.gate.acquire()
        except TimeoutError:
            raise MaxConnectionsError(
                f"no free Redis connection within {self.gate_timeout_s:g} s"
            ) from None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.waiting()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self.gate.release()

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]


class _WaitingPipeline(ClusterPipeline):
    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        cluster = cast(WaitingCluster, self.cluster_client)
        await cluster.waiting()
        try:
            return await super().execute(*args, **kwargs)
        finally:
            cluster.gate.release()


def is_cluster(client: Any) -> bool:
    """True when `client` is a `RedisCluster` (a cluster URL's client)."""
    return isinstance(client, RedisCluster)


async def primaries(client: aioredis.Redis) -> list[aioredis.Redis]:
    """One client per primary of a cluster (each closed by the caller), or `[client]`."""
    if not is_cluster(client):
        return [client]
    cluster = cast(RedisCluster, client)
    await cluster.initialize()
    kwargs = _node_kwargs(cluster)
    return [
        aioredis.Redis(host=node.host, port=int(node.port), **kwargs)
        for node in cluster.get_primaries()
    ]


def pubsub_node(client: aioredis.Redis, attempt: int = 0) -> dict[str, Any]:
    """Connection arguments (`aioredis.Redis(**them)`) of a cluster node to subscribe on:
    classic pub/sub reaches subscribers on every node of a cluster. The nodes the client knows
    of (primaries first), in turn: `attempt` k picks the k-th, so a caller whose node went away
    tries the next."""
    cluster = cast(RedisCluster, client)
    known = cluster.get_nodes() or list(cluster.nodes_manager.startup_nodes.values())
    nodes = sorted(known, key=lambda n: (n.server_type != "primary", n.name))
    node = nodes[attempt % len(nodes)]
    return {"host": node.host, "port": int(node.port), **_node_kwargs(cluster)}


def _node_kwargs(cluster: RedisCluster) -> dict[str, Any]:
    kwargs = cluster.get_connection_kwargs()
    return {
        k: kwargs[k]
        for k in ("username", "password", "decode_responses", "ssl")
        if k in kwargs and kwargs[k] is not None
    }


_POLL_FIRST_S = 0.002
_POLL_MAX_S = 0.05


async def read_streams(
    client: aioredis.Redis,
    streams: Mapping[Any, Any],
    *,
    count: int | None = None,
    block_ms: int | None = None,
    group: str | None = None,
    consumer: str | None = None,
) -> list[tuple[Any, list[Any]]]:
    """(stream, entries) pairs read from `streams` (key -> last id read, or `>` / `0` for a
    group) with XREAD, or XREADGROUP when `group` is given; `block_ms` as the commands'
    BLOCK (None: return at once). The client's response callbacks apply (a reader that set
    `engine.log.as_sent` gets the raw entries).

    On a server, one command. On a cluster a command may name keys of one slot only, so each
    slot's streams are read by a command of their own, concurrently; when none has anything
    and `block_ms` is set, the reads are repeated at growing intervals (2 ms to 50 ms) until
    the time is up, never with BLOCK: a blocking read left waiting on one slot would hold up
    the others, and cancelling it could lose a group's delivery. `count` applies per command.
    """
    from engine.log import stream_entries

    if not streams:
        return []

    async def read(part: Mapping[Any, Any], block: int | None) -> Any:
        if group is not None:
            assert consumer is not None
            return await client.xreadgroup(group, consumer, dict(part), count=count, block=block)
        return await client.xread(dict(part), count=count, block=block)

    if not is_cluster(client):
        return stream_entries(await read(streams, block_ms))
    cluster = cast(RedisCluster, client)
    by_slot: dict[int, dict[Any, Any]] = {}
    for key, last in streams.items():
        by_slot.setdefault(cluster.keyslot(key), {})[key] = last
    parts = list(by_slot.values())
    deadline = None if block_ms is None else time.monotonic() + block_ms / 1000
    pause = _POLL_FIRST_S
    while True:
        replies = await asyncio.gather(*(read(part, None) for part in parts))
        out = [pair for reply in replies for pair in stream_entries(reply) if pair[1]]
        if out or deadline is None:
            return out
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_MAX_S)
