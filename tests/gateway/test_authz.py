"""Authorization walk: every route of the app x {owner, other tenant, anonymous, expired JWT,
revoked key} -> the expected status.

The routes are listed from the app's router, and the test fails on a route that is not in
`TABLE` (or a table entry that is no longer a route): adding an endpoint means saying here who
may call it. "owner" is the owner of the objects the call names (a provider for nodes, a renter
for clients, contracts and bids); "other" is another tenant with the same role, so role checks
pass and only object-level checks can refuse; the expired JWT and the revoked key are the
owner's own credentials.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from starlette.routing import Mount, Route, WebSocketRoute

from .conftest import (
    JWT_SECRET,
    Actor,
    Gateway,
    assert_error,
    create_client,
    register_node,
    signup,
)

Built = tuple[str, Any]


@dataclass
class World:
    gw: Gateway
    provider: Actor
    provider2: Actor
    renter: Actor
    renter2: Actor
    client_id: str
    stale: dict[str, dict[str, str]]
    """Per owner ("provider"/"renter"): {"expired": headers, "revoked": headers}."""

    async def node(self) -> str:
        return await register_node(self.gw, self.provider, name=f"n-{uuid.uuid4().hex[:6]}")

    async def contract(self) -> str:
        node_id = await self.node()
        r = await self.gw.client.post(
            "/api/contracts/create",
            json={
                "client_id": self.client_id,
                "node_id": node_id,
                "ram_gb": 4,
                "vram_gb": 2,
                "duration_sec": 600,
            },
            headers=self.renter.headers,
        )
        assert r.status_code == 201, r.text
        return r.json()["contract_id"]

    async def bid(self) -> str:
        r = await self.gw.client.post(
            "/api/bids", json=self.bid_body(), headers=self.renter.headers
        )
        assert r.status_code == 201, r.text
        return r.json()["bid_id"]

    def bid_body(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "region": "zz-bids",
            "ram_gb": 4,
            "vram_gb": 0,
            "duration_sec": 600,
            "max_price_per_gb_sec": 0.0000001,
        }

    async def key(self) -> str:
        r = await self.gw.client.post("/api/auth/api-keys", json={}, headers=self.renter.headers)
        assert r.status_code == 201, r.text
        return r.json()["id"]


def _const(path: str, body: Any = None) -> Callable[[World], Awaitable[Built]]:
    async def build(world: World) -> Built:
        return path, body

    return build


@dataclass(frozen=True)
class Rule:
    owner: str
    """Whose objects the call names: "provider" or "renter"."""
    owner_status: int
    other_status: int
    build: Callable[[World], Awaitable[Built]]
    public: bool = False
    """No credentials needed: every caller gets `owner_status`."""


async def _signup_body(world: World) -> Built:
    return "/api/auth/signup", {
        "email": f"walk-{uuid.uuid4().hex[:8]}@example.com",
        "password": "12345678",
    }


async def _token_body(world: World) -> Built:
    return "/api/auth/token", {"email": world.renter.email, "password": world.renter.password}


async def _revoke(world: World) -> Built:
    return f"/api/auth/api-keys/{await world.key()}", None


async def _heartbeat(world: World) -> Built:
    return f"/api/nodes/{await world.node()}/heartbeat", {
        "available_ram_gb": 8,
        "available_vram_gb": 4,
    }


async def _node_path(world: World) -> Built:
    return f"/api/nodes/{await world.node()}", None


async def _node_put(world: World) -> Built:
    return f"/api/nodes/{await world.node()}", {"name": "renamed"}


async def _request(world: World) -> Built:
    return "/api/marketplace/request", {
        "ram_gb": 1,
        "vram_gb": 0,
        "max_price_per_gb_sec": 0.00001,
        "client_id": world.client_id,
    }


async def _contract_create(world: World) -> Built:
    return "/api/contracts/create", {
        "client_id": world.client_id,
        "node_id": await world.node(),
        "ram_gb": 2,
        "vram_gb": 1,
        "duration_sec": 600,
    }


async def _contract(world: World) -> Built:
    return f"/api/contracts/{await world.contract()}", None


async def _settle(world: World) -> Built:
    return f"/api/contracts/{await world.contract()}/settle", {"actual_egress_gb": 0.5}


async def _extend(world: World) -> Built:
    return f"/api/contracts/{await world.contract()}/extend", {"additional_duration_sec": 60}


async def _bid_create(world: World) -> Built:
    return "/api/bids", world.bid_body()


async def _bid(world: World) -> Built:
    return f"/api/bids/{await world.bid()}", None


async def _client(world: World) -> Built:
    return f"/api/clients/{world.client_id}", None


async def _node_earnings(world: World) -> Built:
    return f"/api/analytics/node/{await world.node()}/earnings", None


async def _client_spending(world: World) -> Built:
    return f"/api/analytics/client/{world.client_id}/spending", None


P, R = "provider", "renter"
_WALK_NODE = {  # the node both registration routes register
    "node_type": "edge_cluster",
    "name": "walk",
    "region": "us-east-2",
    "latitude": 1.0,
    "longitude": 2.0,
    "total_ram_gb": 8,
    "total_vram_gb": 0,
    "price_per_gb_sec": 0.000001,
}

TABLE: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): Rule(R, 200, 200, _const("/healthz"), public=True),
    ("GET", "/readyz"): Rule(R, 200, 200, _const("/readyz"), public=True),
    # Admins and the metrics token only (tests/gateway/test_validation.py): tenants get 403.
    ("GET", "/metrics"): Rule(R, 403, 403, _const("/metrics")),
    ("GET", "/openapi.json"): Rule(R, 200, 200, _const("/openapi.json"), public=True),
    ("GET", "/docs"): Rule(R, 200, 200, _const("/docs"), public=True),
    ("GET", "/docs/swagger-init.js"): Rule(
        R, 200, 200, _const("/docs/swagger-init.js"), public=True
    ),
    ("POST", "/api/auth/signup"): Rule(R, 201, 201, _signup_body, public=True),
    ("POST", "/api/auth/token"): Rule(R, 200, 200, _token_body, public=True),
    ("GET", "/api/auth/me"): Rule(R, 200, 200, _const("/api/auth/me")),
    ("POST", "/api/auth/api-keys"): Rule(R, 201, 201, _const("/api/auth/api-keys", {"name": "k"})),
    ("GET", "/api/auth/api-keys"): Rule(R, 200, 200, _const("/api/auth/api-keys")),
    ("DELETE", "/api/auth/api-keys/{key_id}"): Rule(R, 200, 404, _revoke),
    ("POST", "/api/clients"): Rule(R, 201, 201, _const("/api/clients", {"org_name": "walkers"})),
    ("GET", "/api/clients"): Rule(R, 200, 200, _const("/api/clients")),
    ("GET", "/api/clients/{client_id}"): Rule(R, 200, 404, _client),
    ("POST", "/api/nodes/register"): Rule(P, 200, 200, _const("/api/nodes/register", _WALK_NODE)),
    ("POST", "/api/nodes/register/batch"): Rule(
        P, 201, 201, _const("/api/nodes/register/batch", {"nodes": [_WALK_NODE]})
    ),
    ("POST", "/api/nodes/{node_id}/heartbeat"): Rule(P, 200, 403, _heartbeat),
    ("GET", "/api/nodes"): Rule(P, 200, 200, _const("/api/nodes")),
    ("GET", "/api/nodes/{node_id}"): Rule(P, 200, 200, _node_path),
    ("PUT", "/api/nodes/{node_id}"): Rule(P, 200, 403, _node_put),
    ("DELETE", "/api/nodes/{node_id}"): Rule(P, 200, 403, _node_path),
    ("GET", "/api/marketplace"): Rule(R, 200, 200, _const("/api/marketplace")),
    ("POST", "/api/marketplace/request"): Rule(R, 200, 403, _request),
    ("POST", "/api/contracts/create"): Rule(R, 201, 403, _contract_create),
    ("GET", "/api/contracts"): Rule(R, 200, 200, _const("/api/contracts")),
    ("GET", "/api/contracts/{contract_id}"): Rule(R, 200, 404, _contract),
    ("POST", "/api/contracts/{contract_id}/settle"): Rule(R, 200, 404, _settle),
    ("POST", "/api/contracts/{contract_id}/extend"): Rule(R, 200, 404, _extend),
    ("POST", "/api/bids"): Rule(R, 201, 403, _bid_create),
    ("GET", "/api/bids"): Rule(R, 200, 200, _const("/api/bids")),
    ("GET", "/api/bids/{bid_id}"): Rule(R, 200, 404, _bid),
    ("DELETE", "/api/bids/{bid_id}"): Rule(R, 200, 404, _bid),
    ("GET", "/api/book/{region}"): Rule(R, 200, 200, _const("/api/book/us-east-2")),
    # Clusters and analytics (gateway/analytics.py): public aggregates to any principal; a
    # node's earnings to its owner (403 otherwise), a client's spending to its user (404).
    ("GET", "/api/clusters"): Rule(R, 200, 200, _const("/api/clusters")),
    ("GET", "/api/clusters/{region}/nodes"): Rule(
        R, 200, 200, _const("/api/clusters/us-east-2/nodes")
    ),
    ("GET", "/api/clusters/{region}/stats"): Rule(
        R, 200, 200, _const("/api/clusters/us-east-2/stats")
    ),
    ("GET", "/api/analytics/node/{node_id}/earnings"): Rule(P, 200, 403, _node_earnings),
    ("GET", "/api/analytics/client/{client_id}/spending"): Rule(R, 200, 404, _client_spending),
    ("GET", "/api/analytics/market/supply"): Rule(
        R, 200, 200, _const("/api/analytics/market/supply")
    ),
    ("GET", "/api/analytics/market/pricing"): Rule(
        R, 200, 200, _const("/api/analytics/market/pricing")
    ),
}

WEBSOCKET_ROUTES = {
    "/ws": "tests/gateway/test_ws*.py walk the socket's authentication and channels"
}
MOUNTS = {
    "/docs/assets": "Swagger UI's static files, public like /docs "
    "(tests/gateway/test_openapi.py loads each one the page names)"
}


def app_routes(gw: Gateway) -> tuple[set[tuple[str, str]], set[str]]:
    http: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    for route in gw.app.routes:
        if isinstance(route, WebSocketRoute):
            sockets.add(route.path)
        elif isinstance(route, Mount):
            assert route.path in MOUNTS, f"unexpected mount {route.path}: add it to the walk"
        elif isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    http.add((method, route.path))
        else:
            raise AssertionError(f"unexpected route type {route!r}: add it to the walk")
    return http, sockets


async def _world(gw: Gateway) -> World:
    provider, provider2 = await signup(gw, "provider"), await signup(gw, "provider")
    renter, renter2 = await signup(gw, "user"), await signup(gw, "user")
    client_id = await create_client(gw, renter)
    await create_client(gw, renter2)
    stale: dict[str, dict[str, str]] = {}
    now = int(time.time())
    for name, actor in ((P, provider), (R, renter)):
        expired = jwt.encode(
            {
                "sub": actor.user_id,
                "role": actor.role,
                "iat": now - 7200,
                "exp": now - 3600,
                "iss": gw.settings.jwt_issuer,
                "aud": gw.settings.jwt_audience,
            },
            JWT_SECRET,
            algorithm="HS256",
        )
        r = await gw.client.post(
            "/api/auth/api-keys", json={"name": "doomed"}, headers=actor.headers
        )
        doomed = r.json()
        r = await gw.client.delete(f"/api/auth/api-keys/{doomed['id']}", headers=actor.headers)
        assert r.status_code == 200
        stale[name] = {
            "expired": {"Authorization": f"Bearer {expired}"},
            "revoked": {"X-API-Key": doomed["key"]},
        }
    return World(gw, provider, provider2, renter, renter2, client_id, stale)


async def test_every_route_is_in_the_table(gw: Gateway) -> None:
    """A new route fails this test until the table says who may call it."""
    http, sockets = app_routes(gw)
    assert sorted(http - set(TABLE)) == [], "routes missing from the authorization table"
    assert sorted(set(TABLE) - http) == [], "table entries that are no longer routes"
    assert sockets == set(WEBSOCKET_ROUTES)


async def test_authorization_walk(gw: Gateway) -> None:
    """Every route x {anonymous, expired JWT, revoked key, other tenant, owner} -> expected status."""
    world = await _world(gw)
    http, _ = app_routes(gw)
    failures: list[str] = []
    for method, path in sorted(http & set(TABLE)):
        rule = TABLE[(method, path)]
        owner = world.provider if rule.owner == P else world.renter
        other = world.provider2 if rule.owner == P else world.renter2
        callers: list[tuple[str, dict[str, str], int]] = [
            ("anonymous", {}, 401),
            ("expired JWT", world.stale[rule.owner]["expired"], 401),
            ("revoked key", world.stale[rule.owner]["revoked"], 401),
            ("other tenant", other.headers, rule.other_status),
            ("owner", owner.headers, rule.owner_status),
        ]
        for who, headers, expected in callers:
            if rule.public:
                expected = rule.owner_status
            url, body = await rule.build(world)
            r = await gw.client.request(method, url, json=body, headers=headers)
            if r.status_code != expected:
                failures.append(
                    f"{method} {path} as {who}: {r.status_code} (expected {expected}): {r.text[:200]}"
                )
            elif r.status_code >= 400:
                assert_error(r, expected)
    assert failures == [], "\n".join(failures)


async def test_roles(gw: Gateway) -> None:
    """Providers cannot rent and renters cannot list nodes: 403 before anything happens."""
    api = gw.client
    renter, provider = await signup(gw, "user"), await signup(gw, "provider")
    client_id = await create_client(gw, renter)
    node_id = await register_node(gw, provider)
    r = await api.post(
        "/api/nodes/register", json={"node_type": "mist_node"}, headers=renter.headers
    )
    assert_error(r, 403)
    r = await api.post(
        f"/api/nodes/{node_id}/heartbeat",
        json={"available_ram_gb": 1, "available_vram_gb": 1},
        headers=renter.headers,
    )
    assert_error(r, 403)
    r = await api.post(
        "/api/contracts/create",
        json={"client_id": client_id, "node_id": node_id, "ram_gb": 1, "vram_gb": 0},
        headers=provider.headers,
    )
    assert_error(r, 403)
    r = await api.post("/api/bids", json={"client_id": client_id}, headers=provider.headers)
    assert_error(r, 403)
    r = await api.get("/api/contracts", params={"client_id": client_id}, headers=provider.headers)
    assert_error(r, 403, field="client_id")
    r = await api.get("/api/contracts", params={"node_id": node_id}, headers=renter.headers)
    assert_error(r, 403, field="node_id")
