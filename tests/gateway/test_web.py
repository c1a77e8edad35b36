"""The web app's server side: pages and files under the CSP, browser sign-in with the session
cookie and its CSRF token, the public socket, public market data (tests/web drives the pages
in a real browser)."""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from engine.keys import Keys
from engine.settings import Settings
from gateway.web import pages
from gateway.web.vendor import INSTALL_COMMAND, load_lock, missing

from .conftest import (
    Actor,
    Gateway,
    _WithState,
    assert_error,
    create_client,
    eventually,
    register_node,
    signup,
)
from .test_ws import WAIT_S, request, serving, subscribe

PAGE_PATHS = [p.path for p in pages.PAGES]


def browser(gw: Gateway, base_url: str = "http://testserver") -> httpx.AsyncClient:
    """A client of its own (its own cookie jar), like a browser on the app."""
    transport = httpx.ASGITransport(app=_WithState(gw.app, gw.state))
    return httpx.AsyncClient(transport=transport, base_url=base_url)


async def sign_in(client: httpx.AsyncClient, actor: Actor) -> str:
    """Sign `client` in as `actor`; the session's CSRF token."""
    r = await client.post("/api/web/login", json={"email": actor.email, "password": actor.password})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["signed_in"] is True and body["user"]["id"] == actor.user_id
    token: str = body["csrf_token"]
    return token


# ---------------------------------------------------------------------------------------------
# pages and files


def _assert_hardened(response: httpx.Response) -> None:
    for name, value in pages.SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name)


async def test_every_page_and_file_comes_with_the_csp(gw: Gateway) -> None:
    """Pages and files carry the CSP (self only: no inline script, no other origin) and the
    hardening headers; the HTML has no inline script or style and names no other origin."""
    csp = pages.CSP
    assert "script-src 'self';" in csp and "unsafe" not in csp and "http" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    for path in PAGE_PATHS:
        r = await gw.client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("text/html")
        _assert_hardened(r)
        page = r.text
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page) == [], path
        assert "style=" not in page and "<style" not in page, path
        assert re.findall(r"""(?:src|href)="(?!/|#)""", page) == [], path
        assert '<main id="main"' in page and 'class="skip" href="#main"' in page
    files = ["/static/app/main.js", "/static/app/style.css"]
    files += [f"/static/vendor/{target}" for p in load_lock() for target in p.files.values()]
    for path in files:
        r = await gw.client.get(path)
        assert r.status_code == 200, path
        _assert_hardened(r)
    r = await gw.client.get("/static/app/no-such-file.js")
    assert r.status_code == 404
    _assert_hardened(r)


async def test_big_files_go_compressed(gw: Gateway) -> None:
    """Libraries are sent gzip-compressed to a browser that accepts it."""
    path = "/static/vendor/lightweight-charts/lightweight-charts.standalone.production.mjs"
    r = await gw.client.get(path, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.num_bytes_downloaded < len(r.content) / 2


async def test_missing_libraries_are_reported_not_404(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the installed libraries every page answers 503 with the install command, their
    files 503 saying the same, and the gateway logs an error: never a silent 404."""
    assert missing(tmp_path)
    with caplog.at_level(logging.ERROR, logger="mnemo.gateway.web"):
        app = Starlette(routes=pages.routes(vendor_dir=tmp_path))
    assert any(INSTALL_COMMAND in r.getMessage() for r in caplog.records)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for path in PAGE_PATHS:
            r = await client.get(path)
            assert r.status_code == 503 and INSTALL_COMMAND in r.text, path
            _assert_hardened(r)
        r = await client.get("/static/vendor/leaflet/leaflet.js")
        assert r.status_code == 503 and INSTALL_COMMAND in r.text
        r = await client.get("/static/app/main.js")
        assert r.status_code == 200


# ---------------------------------------------------------------------------------------------
# sign-in


async def test_sign_in_sets_an_httponly_strict_cookie(gw: Gateway) -> None:
    """Sign-in sets the session cookie HttpOnly, SameSite=Strict, Path=/ (Secure over HTTPS)
    and answers the CSRF token; the session then says who is signed in."""
    renter = await signup(gw, "user")
    async with browser(gw) as client:
        r = await client.post(
            "/api/web/login", json={"email": renter.email.upper(), "password": renter.password}
        )
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"]
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "path", "max-age"} <= attributes and "secure" not in attributes
        assert "SameSite=Strict" in cookie and "Path=/" in cookie
        csrf = r.json()["csrf_token"]
        r = await client.get("/api/web/session")
        assert r.json()["signed_in"] and r.json()["csrf_token"] == csrf
        assert r.json()["user"]["email"] == renter.email
        r = await client.get("/api/auth/me")
        assert r.status_code == 200 and r.json()["via"] == "session"
    async with browser(gw, "https://testserver") as client:
        r = await client.post(
            "/api/web/login", json={"email": renter.email, "password": renter.password}
        )
        assert "; Secure" in r.headers["set-cookie"]


async def test_sign_in_refusals(gw: Gateway) -> None:
    """A wrong password is 401; a body that is not JSON (a cross-site form) 415; a request from
    another origin 403; none of them sets a cookie."""
    renter = await signup(gw, "user")
    async with browser(gw) as client:
        r = await client.post("/api/web/login", json={"email": renter.email, "password": "x" * 9})
        assert_error(r, 401, code="invalid_credentials")
        r = await client.post(
            "/api/web/login",
            content=f'{{"email": "{renter.email}", "password": "{renter.password}"}}',
            headers={"Content-Type": "text/plain"},
        )
        assert_error(r, 415)
        r = await client.post(
            "/api/web/login",
            content=f'{{"email": "{renter.email}", "password": "{renter.password}"}}',
        )
        assert_error(r, 415, field="Content-Type")
        r = await client.post(
            "/api/web/login",
            json={"email": renter.email, "password": renter.password},
            headers={"Origin": "http://evil.example"},
        )
        assert_error(r, 403, code="bad_origin")
        assert not client.cookies
        r = await client.get("/api/web/session")
        assert r.json() == {
            "signed_in": False,
            "user": None,
            "csrf_token": None,
            "expires_ms": None,
            "payments": {"cards": False, "crypto": []},  # no payment rail configured here
        }


async def test_cookie_changes_need_the_csrf_token(gw: Gateway) -> None:
    """A change made with the session cookie alone (what a cross-site page can make a browser
    send) is refused 403 before anything happens; with the session's token it is served;
    reads need no token."""
    renter = await signup(gw, "user")
    async with browser(gw) as client:
        csrf = await sign_in(client, renter)
        body = {"org_name": "cookie co"}
        r = await client.post("/api/clients", json=body)
        assert_error(r, 403, code="csrf_failed", field="X-CSRF-Token")
        r = await client.post("/api/clients", json=body, headers={"X-CSRF-Token": "0" * 64})
        assert_error(r, 403, code="csrf_failed")
        other = await signup(gw, "user")
        async with browser(gw) as elsewhere:
            other_csrf = await sign_in(elsewhere, other)
        r = await client.post("/api/clients", json=body, headers={"X-CSRF-Token": other_csrf})
        assert_error(r, 403, code="csrf_failed")
        r = await client.get("/api/clients")
        assert r.status_code == 200 and r.json()["clients"] == []
        r = await client.post("/api/clients", json=body, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201, r.text
        r = await client.get("/api/clients")
        assert [c["org_name"] for c in r.json()["clients"]] == ["cookie co"]
        r = await client.post("/api/auth/api-keys", json={}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201
        r = await client.delete(f"/api/auth/api-keys/{r.json()['id']}")
        assert_error(r, 403, code="csrf_failed")


async def test_sign_out_ends_the_session(gw: Gateway) -> None:
    """Sign-out needs the token too; afterwards the cookie authenticates nothing."""
    renter = await signup(gw, "user")
    async with browser(gw) as client:
        csrf = await sign_in(client, renter)
        cookie = client.cookies["mnemo_session"]
        r = await client.post("/api/web/logout")
        assert_error(r, 403, code="csrf_failed")
        r = await client.post("/api/web/logout", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json()["signed_in"] is False
        assert "Max-Age=0" in r.headers["set-cookie"]
    r = await gw.client.get("/api/auth/me", headers={"Cookie": f"mnemo_session={cookie}"})
    assert_error(r, 401, code="invalid_session")


async def test_header_credentials_win_over_the_cookie(gw: Gateway) -> None:
    """An API key or a JWT in a header is used as before, whatever cookie comes along."""
    renter, other = await signup(gw, "user"), await signup(gw, "user")
    async with browser(gw) as client:
        await sign_in(client, other)
        r = await client.post("/api/clients", json={"org_name": "keyed"}, headers=renter.headers)
        assert r.status_code == 201, r.text
        assert r.json()["user_id"] == renter.user_id
        r = await client.get("/api/auth/me", headers=renter.headers)
        assert r.json()["via"] == "api_key" and r.json()["user"]["id"] == renter.user_id


# ---------------------------------------------------------------------------------------------
# public market data


async def test_market_data_is_public(gw: Gateway, journal: None) -> None:
    """The market page's data needs no credentials: book, clusters and their nodes, supply,
    candles and recent trades (a fill shows in the trades and the candles)."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    client_id = await create_client(gw, renter)
    node_id = await register_node(gw, provider)
    r = await gw.client.post(
        "/api/contracts/create",
        json={
            "client_id": client_id,
            "node_id": node_id,
            "ram_gb": 8,
            "vram_gb": 2,
            "duration_sec": 600,
        },
        headers=renter.headers,
    )
    assert r.status_code == 201, r.text
    contract = r.json()

    async def traded() -> dict[str, object] | None:
        r = await gw.client.get("/api/market/trades", params={"region": "us-east-2"})
        assert r.status_code == 200, r.text
        return next(
            (t for t in r.json()["trades"] if t["contract_id"] == contract["contract_id"]), None
        )

    trade = await eventually(traded, timeout_s=20)
    assert trade == {
        "contract_id": contract["contract_id"],
        "node_id": node_id,
        "region": "us-east-2",
        "ram_gb": 8,
        "vram_gb": 2,
        "duration_sec": 600,
        "price_per_gb_sec": 8e-7,
        "price_pusd": 800_000,
        "ts_ms": contract["start_ms"],
    }
    r = await gw.client.get(
        "/api/analytics/market/pricing", params={"region": "us-east-2", "bucket": "1m"}
    )
    assert r.status_code == 200
    [candle] = r.json()["candles"]
    assert candle["close_pusd"] == 800_000 and candle["volume_gb_s"] == 10 * 600
    for path in ("/api/book/us-east-2", "/api/clusters", "/api/clusters/us-east-2/nodes",
                 "/api/clusters/us-east-2/stats", "/api/analytics/market/supply"):  # fmt: skip
        r = await gw.client.get(path)
        assert r.status_code == 200, (path, r.text)
    r = await gw.client.get("/api/market/trades", params={"limit": 0})
    assert_error(r, 422, field="limit")


# ---------------------------------------------------------------------------------------------
# WebSockets: the public socket, and the cookie on /ws


async def test_public_socket_serves_market_channels_only(settings: Settings, keys: Keys) -> None:
    """/ws/public needs no credentials and serves quotes, trades and market; a private channel
    or a heartbeat is refused on it (the socket stays open)."""
    async with serving(settings, keys) as live:
        url = live.ws_url + "/public"
        ws = await connect(url, open_timeout=WAIT_S)
        reply = await subscribe(ws, "quotes:us-east-2", "trades:us-east-2", "market")
        assert reply == {
            "type": "subscribed",
            "channels": ["quotes:us-east-2", "trades:us-east-2", "market"],
        }
        for channel in ("fills", "bids", "contracts", f"node:{uuid.uuid4().hex}"):
            reply = await subscribe(ws, channel)
            assert reply["type"] == "error" and reply["error"]["code"] == "forbidden", reply
        beat = {"node_id": uuid.uuid4().hex, "available_ram_gb": 1, "available_vram_gb": 0}
        reply = await request(ws, {"op": "heartbeat", "beats": [beat], "ref": 3})
        assert reply["error"]["code"] == "forbidden" and reply["ref"] == 3
        assert await request(ws, {"op": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
        await ws.close()


async def test_session_cookie_opens_ws_from_this_origin_only(
    settings: Settings, keys: Keys
) -> None:
    """The session cookie authenticates /ws when the handshake comes from this origin; from
    another origin (cross-site WebSocket hijacking) or none it is refused."""
    async with serving(settings, keys) as live:
        renter = await signup(live.gw, "user")
        r = await live.gw.client.post(
            "/api/web/login", json={"email": renter.email, "password": renter.password}
        )
        cookie = {"Cookie": f"mnemo_session={r.cookies['mnemo_session']}"}
        host = live.ws_url.split("/")[2]
        for origin in ("http://evil.example", f"https://{host}", None):
            with pytest.raises(InvalidStatus) as info:
                await connect(
                    live.ws_url, additional_headers=cookie, origin=origin, open_timeout=WAIT_S
                )  # type: ignore[arg-type]
            assert info.value.response.status_code == 403, origin
        ws = await connect(
            live.ws_url,
            additional_headers=cookie,
            origin=f"http://{host}",
            open_timeout=WAIT_S,  # type: ignore[arg-type]
        )
        assert (await subscribe(ws, "fills", "bids"))["type"] == "subscribed"
        await ws.close()
