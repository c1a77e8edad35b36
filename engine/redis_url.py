"""The URL that names Redis: one server (redis-py's schemes) or a cluster (`redis+cluster://`,
`rediss+cluster://`; see `engine.connection`). Parsing needs no Redis client, so that the
settings (and the `mnemo` command beside an agent-only install) read it without redis-py."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["CLUSTER_SCHEMES", "ClusterUrl", "is_cluster_url", "parse_cluster_url"]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


class ClusterUrl:
    """A parsed cluster URL: the seed nodes and the credentials."""

    __slots__ = ("nodes", "password", "ssl", "username")

    def __init__(
        self,
        nodes: list[tuple[str, int]],
        username: str | None,
        password: str | None,
        ssl: bool,
    ) -> None:
        self.nodes = nodes
        self.username = username
        self.password = password
        self.ssl = ssl


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """The seed nodes and credentials of a `redis+cluster://` URL; ValueError (its message
    naming what is wrong) for anything malformed."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL (expected {' or '.join(CLUSTER_SCHEMES)}://)")
    if parts.path not in ("", "/"):
        raise ValueError("a cluster has no databases: leave the path (/db) out")
    if parts.query and any(k for k, _ in parse_qsl(parts.query)):
        raise ValueError("a cluster URL takes no options")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = []
    for seed in hosts.split(","):
        host, colon, port = seed.strip().rpartition(":")
        if not colon or not host:
            raise ValueError(f"seed {seed!r} is not host:port")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"seed {seed!r} has a malformed port")
        nodes.append((host.strip("[]"), int(port)))
    return ClusterUrl(nodes, username, password, parts.scheme == "rediss+cluster")
