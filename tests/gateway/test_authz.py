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

from gateway.web.pages import PAGES

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

    async def lease(self, *, ready: bool = False, closing: bool = False) -> tuple[str, str]:
        """(node id, contract id) of a RAM lease on a node that delivers: pending, ready, or
        with its close ordered."""
        node_id = await register_node(
            self.gw, self.provider, name=f"d-{uuid.uuid4().hex[:6]}", delivers=True
        )
        r = await self.gw.client.post(
            "/api/contracts/create",
            json={
                "client_id": self.client_id,
                "node_id": node_id,
                "ram_gb": 2,
                "vram_gb": 0,
                "duration_sec": 600,
            },
            headers=self.renter.headers,
        )
        assert r.status_code == 201, r.text
        contract_id = r.json()["contract_id"]
        if ready or closing:
            r = await self.gw.client.post(
                f"/api/nodes/{node_id}/leases/{contract_id}/ready",
                json={"host": "127.0.0.1", "port": 43001},
                headers=self.provider.headers,
            )
            assert r.status_code == 200, r.text
        if closing:
            await self.gw.state["market"].close_lease(contract_id, int(time.time() * 1000))
        return node_id, contract_id

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


def _maintenance_body() -> dict[str, int]:
    start = int(time.time() * 1000) + 2 * 3_600_000
    return {"start_ms": start, "end_ms": start + 3_600_000}


async def _maintenance(world: World) -> Built:
    return f"/api/nodes/{await world.node()}/maintenance", _maintenance_body()


async def _maintenance_announced(world: World) -> Built:
    path = f"/api/nodes/{await world.node()}/maintenance"
    r = await world.gw.client.post(path, json=_maintenance_body(), headers=world.provider.headers)
    assert r.status_code == 200, r.text
    return path, None


async def _stake(world: World) -> Built:
    return f"/api/nodes/{await world.node()}/stake", {"amount_usd": 1.0}


async def _stake_release(world: World) -> Built:
    return f"/api/nodes/{await world.node()}/stake/release", {"amount_usd": 1.0}


async def _node_scores(world: World) -> Built:
    return f"/api/nodes/{await world.node()}/scores", None


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


async def _node_leases(world: World) -> Built:
    node_id, _ = await world.lease()
    return f"/api/nodes/{node_id}/leases", None


async def _credentials(world: World) -> Built:
    node_id, contract_id = await world.lease()
    return f"/api/nodes/{node_id}/leases/{contract_id}/credentials", None


async def _ready(world: World) -> Built:
    node_id, contract_id = await world.lease()
    return f"/api/nodes/{node_id}/leases/{contract_id}/ready", {"host": "10.0.0.5", "port": 43002}


async def _closed(world: World) -> Built:
    node_id, contract_id = await world.lease(closing=True)
    return f"/api/nodes/{node_id}/leases/{contract_id}/closed", {
        "egress_bytes": 1000,
        "peak_memory_bytes": 2000,
        "digest": "ab" * 32,
    }


async def _access(world: World) -> Built:
    _, contract_id = await world.lease(ready=True)
    return f"/api/contracts/{contract_id}/access", None


async def _bid_create(world: World) -> Built:
    return "/api/bids", world.bid_body()


async def _bid(world: World) -> Built:
    return f"/api/bids/{await world.bid()}", None


async def _client(world: World) -> Built:
    return f"/api/clients/{world.client_id}", None


async def _balance(world: World) -> Built:
    return f"/api/clients/{world.client_id}/balance", None


def _admin_money(what: str) -> Callable[[World], Awaitable[Built]]:
    async def build(world: World) -> Built:
        body: dict[str, Any] = {"amount_usd": 1.0, "reason": "walk", "key": uuid.uuid4().hex}
        if what == "credit-line":
            body = {"credit_line_usd": 10.0}
        return f"/api/admin/accounts/{world.client_id}/{what}", body

    return build


async def _node_earnings(world: World) -> Built:
    return f"/api/analytics/node/{await world.node()}/earnings", None


async def _client_spending(world: World) -> Built:
    return f"/api/analytics/client/{world.client_id}/spending", None


async def _invoice(world: World) -> Built:
    return f"/api/payments/invoice/{world.client_id}", None


async def _pay(world: World) -> Built:
    return "/api/payments/create", {
        "client_id": world.client_id,
        "amount_usd": 5.0,
        "stripe_token": "pm_walk",
    }


async def _checkout(world: World) -> Built:
    return "/api/payments/checkout", {
        "client_id": world.client_id,
        "amount_usd": 5.0,
        "return_url": "https://app.example/renter",
    }


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
    # Money: a balance to its renter (404 to others); operators' routes to admins only.
    ("GET", "/api/clients/{client_id}/balance"): Rule(R, 200, 404, _balance),
    ("GET", "/api/accounts/me/balance"): Rule(R, 200, 200, _const("/api/accounts/me/balance")),
    ("POST", "/api/admin/accounts/{client_id}/credit"): Rule(R, 403, 403, _admin_money("credit")),
    ("POST", "/api/admin/accounts/{client_id}/clawback"): Rule(
        R, 403, 403, _admin_money("clawback")
    ),
    ("PUT", "/api/admin/accounts/{client_id}/credit-line"): Rule(
        R, 403, 403, _admin_money("credit-line")
    ),
    ("POST", "/api/nodes/register"): Rule(P, 200, 200, _const("/api/nodes/register", _WALK_NODE)),
    ("POST", "/api/nodes/register/batch"): Rule(
        P, 201, 201, _const("/api/nodes/register/batch", {"nodes": [_WALK_NODE]})
    ),
    ("POST", "/api/nodes/{node_id}/heartbeat"): Rule(P, 200, 403, _heartbeat),
    ("GET", "/api/nodes"): Rule(P, 200, 200, _const("/api/nodes")),
    ("GET", "/api/nodes/{node_id}"): Rule(P, 200, 200, _node_path),
    ("PUT", "/api/nodes/{node_id}"): Rule(P, 200, 403, _node_put),
    ("DELETE", "/api/nodes/{node_id}"): Rule(P, 200, 403, _node_path),
    ("POST", "/api/nodes/{node_id}/maintenance"): Rule(P, 200, 403, _maintenance),
    ("DELETE", "/api/nodes/{node_id}/maintenance"): Rule(P, 200, 403, _maintenance_announced),
    ("GET", "/api/nodes/{node_id}/scores"): Rule(P, 200, 200, _node_scores),
    # no earnings to lock, no stake to release: refused, but only past authorization
    ("POST", "/api/nodes/{node_id}/stake"): Rule(P, 402, 403, _stake),
    ("POST", "/api/nodes/{node_id}/stake/release"): Rule(P, 409, 403, _stake_release),
    ("GET", "/api/marketplace"): Rule(R, 200, 200, _const("/api/marketplace")),
    ("POST", "/api/marketplace/request"): Rule(R, 200, 403, _request),
    ("POST", "/api/contracts/create"): Rule(R, 201, 403, _contract_create),
    ("GET", "/api/contracts"): Rule(R, 200, 200, _const("/api/contracts")),
    ("GET", "/api/contracts/{contract_id}"): Rule(R, 200, 404, _contract),
    ("POST", "/api/contracts/{contract_id}/settle"): Rule(R, 200, 404, _settle),
    ("POST", "/api/contracts/{contract_id}/extend"): Rule(R, 200, 404, _extend),
    # Delivery (gateway/routes/leases.py): the node's agent speaks as the node's owner; the
    # renter alone sees the way in (404 to anyone else: the answer holds the password).
    ("GET", "/api/nodes/{node_id}/leases"): Rule(P, 200, 403, _node_leases),
    ("GET", "/api/nodes/{node_id}/leases/{contract_id}/credentials"): Rule(
        P, 200, 403, _credentials
    ),
    ("POST", "/api/nodes/{node_id}/leases/{contract_id}/ready"): Rule(P, 200, 403, _ready),
    ("POST", "/api/nodes/{node_id}/leases/{contract_id}/closed"): Rule(P, 200, 403, _closed),
    ("GET", "/api/contracts/{contract_id}/access"): Rule(R, 200, 404, _access),
    ("POST", "/api/bids"): Rule(R, 201, 403, _bid_create),
    ("GET", "/api/bids"): Rule(R, 200, 200, _const("/api/bids")),
    ("GET", "/api/bids/{bid_id}"): Rule(R, 200, 404, _bid),
    ("DELETE", "/api/bids/{bid_id}"): Rule(R, 200, 404, _bid),
    # Market data is public (the web app's market page reads it signed out): the book, the
    # clusters, supply, candles and recent trades; a node's earnings go to its owner (403
    # otherwise), a client's spending to its user (404).
    ("GET", "/api/book/{region}"): Rule(R, 200, 200, _const("/api/book/us-east-2"), public=True),
    ("GET", "/api/clusters"): Rule(R, 200, 200, _const("/api/clusters"), public=True),
    ("GET", "/api/clusters/{region}/nodes"): Rule(
        R, 200, 200, _const("/api/clusters/us-east-2/nodes"), public=True
    ),
    ("GET", "/api/clusters/{region}/stats"): Rule(
        R, 200, 200, _const("/api/clusters/us-east-2/stats"), public=True
    ),
    ("GET", "/api/analytics/node/{node_id}/earnings"): Rule(P, 200, 403, _node_earnings),
    ("GET", "/api/analytics/client/{client_id}/spending"): Rule(R, 200, 404, _client_spending),
    ("GET", "/api/analytics/market/supply"): Rule(
        R, 200, 200, _const("/api/analytics/market/supply"), public=True
    ),
    ("GET", "/api/analytics/market/pricing"): Rule(
        R, 200, 200, _const("/api/analytics/market/pricing"), public=True
    ),
    ("GET", "/api/market/trades"): Rule(R, 200, 200, _const("/api/market/trades"), public=True),
    # The web app (gateway/web): its pages are public; sign-in answers 401 to the walk's body
    # (no such account), the session 200 to anyone; sign-out needs a principal (and, with the
    # cookie, its CSRF token: tests/gateway/test_web.py).
    **{("GET", p.path): Rule(R, 200, 200, _const(p.path), public=True) for p in PAGES},
    ("POST", "/api/web/login"): Rule(
        R,
        401,
        401,
        _const("/api/web/login", {"email": "walk@example.com", "password": "12345678"}),
        public=True,
    ),
    ("GET", "/api/web/session"): Rule(R, 200, 200, _const("/api/web/session"), public=True),
    ("POST", "/api/web/logout"): Rule(R, 200, 200, _const("/api/web/logout")),
    # Payments (gateway/payments/): the invoice to the client's user (404 otherwise), the
    # statement to the calling provider. This gateway has no Stripe key, so the card and
    # Connect routes answer 503 once the caller's rights are checked (another tenant's client:
    # 403; a payment id: 404, none exists); tests/payments/ walk them with Stripe configured.
    ("GET", "/api/payments/invoice/{client_id}"): Rule(R, 200, 404, _invoice),
    ("GET", "/api/payments/statement"): Rule(P, 200, 200, _const("/api/payments/statement")),
    ("POST", "/api/payments/create"): Rule(R, 503, 403, _pay),
    ("POST", "/api/payments/checkout"): Rule(R, 503, 403, _checkout),
    ("GET", "/api/payments/cards/{payment_id}"): Rule(
        R, 404, 404, _const(f"/api/payments/cards/{uuid.uuid4().hex}")
    ),
    ("POST", "/api/payments/refund"): Rule(
        R, 404, 404, _const("/api/payments/refund", {"payment_id": uuid.uuid4().hex})
    ),
    ("POST", "/api/payments/webhook"): Rule(
        R, 503, 503, _const("/api/payments/webhook", {}), public=True
    ),
    ("POST", "/api/payments/connect/onboard"): Rule(
        P,
        503,
        503,
        _const(
            "/api/payments/connect/onboard",
            {"return_url": "https://a.example/r", "refresh_url": "https://a.example/f"},
        ),
    ),
    ("GET", "/api/payments/connect"): Rule(P, 503, 503, _const("/api/payments/connect")),
}

WEBSOCKET_ROUTES = {
    "/ws": "tests/gateway/test_ws*.py walk the socket's authentication and channels",
    "/ws/public": "tests/gateway/test_web.py: no credentials, market channels only",
}
MOUNTS = {
    "/docs/assets": "Swagger UI's static files, public like /docs "
    "(tests/gateway/test_openapi.py loads each one the page names)",
    "/static/app": "the web app's own files, public (tests/gateway/test_web.py)",
    "/static/vendor": "the web app's libraries, public (tests/gateway/test_web.py)",
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
