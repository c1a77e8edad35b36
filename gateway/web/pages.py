"""The web app's pages and files, and the headers every one of them is sent with.

Each page is one HTML shell (navigation, a `<main>` the page's script fills, the libraries it
needs) served from a path of its own; the script (`static/app/<page>.js`, ES modules, no build
step) reads the API with the browser's session and listens on `/ws`. Files: `/static/app/`
(this package's `static/app`, committed) and `/static/vendor/` (the pinned npm libraries that
`scripts/webdeps.py` installs, see `gateway.web.vendor`). While the libraries are missing, every
page answers 503 with the command that installs them, `/static/vendor/` answers 503 saying the
same, and the gateway logs it: never a silent 404.

Every response here carries `SECURITY_HEADERS`: a Content-Security-Policy allowing scripts,
styles, images, fonts and connections from this origin only (no inline script or style
element, no eval, no third-party origin, no framing), and the usual hardening headers.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.web.vendor import INSTALL_COMMAND, VENDOR_DIR, missing

__all__ = ["CSP", "PAGES", "SECURITY_HEADERS", "Page", "routes"]

log = logging.getLogger("mnemo.gateway.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
"""`connect-src 'self'` covers this origin's ws:/wss: (CSP Level 3); `data:` images are the
charts' own canvases exported by the libraries, never a network request."""

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


@dataclass(frozen=True)
class Page:
    path: str
    name: str
    """The page's script, `static/app/<name>.js` (run by `main.js`)."""
    title: str
    styles: tuple[str, ...] = ()
    scripts: tuple[str, ...] = ()
    """Classic scripts (the libraries that define a global), loaded deferred before the app."""
    modules: tuple[str, ...] = ()
    """ES modules the page's script imports besides the common ones: fetched early
    (`modulepreload`) instead of one import after another."""
    nav: bool = True


_MAP = (
    ("vendor/leaflet/leaflet.css",),
    ("vendor/leaflet/leaflet.js", "vendor/topojson-client/topojson-client.min.js"),
)
_PLOT = (("vendor/uplot/uPlot.min.css",), ("vendor/uplot/uPlot.iife.min.js",))

_COMMON_MODULES = (
    "app/api.js",
    "app/ui.js",
    "vendor/htm/preact-standalone.module.js",
    "app/components.js",
)
_CHARTS = ("app/charts.js",)

PAGES: tuple[Page, ...] = (
    Page(
        "/",
        "market",
        "Market",
        styles=_MAP[0],
        scripts=_MAP[1],
        modules=("vendor/lightweight-charts/lightweight-charts.standalone.production.mjs",),
    ),
    Page("/renter", "renter", "Renter"),
    Page("/provider", "provider", "Provider", styles=_PLOT[0], scripts=_PLOT[1], modules=_CHARTS),
    Page(
        "/analytics", "analytics", "Analytics", styles=_PLOT[0], scripts=_PLOT[1], modules=_CHARTS
    ),
    Page("/signin", "signin", "Sign in", nav=False),
)


def _shell(page: Page, main: str) -> str:
    current = ' aria-current="page"'
    links = "\n".join(
        f'<li><a href="{p.path}"{current if p is page else ""}>{html.escape(p.title)}</a></li>'
        for p in PAGES
        if p.nav
    )
    styles = "\n".join(f'<link rel="stylesheet" href="/static/{s}">' for s in page.styles)
    scripts = "\n".join(f'<script src="/static/{s}" defer></script>' for s in page.scripts)
    modules = (*_COMMON_MODULES, f"app/{page.name}.js", *page.modules)
    preload = "\n".join(f'<link rel="modulepreload" href="/static/{m}">' for m in modules)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(page.title)} · Mnemo</title>
<link rel="icon" href="/static/app/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/app/style.css">
{styles}
{scripts}
{preload}
<script type="module" src="/static/app/main.js"></script>
</head>
<body data-page="{page.name}">
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<a class="brand" href="/">Mnemo</a>
<nav aria-label="Main"><ul>
{links}
</ul></nav>
<div id="account" class="account" aria-live="polite"></div>
</header>
<main id="main" tabindex="-1">
{main}
</main>
</body>
</html>
"""


def _missing_main(absent: list[str]) -> str:
    items = "".join(f"<li><code>{html.escape(a)}</code></li>" for a in absent)
    return (
        "<h1>The web app's libraries are not installed</h1>"
        "<p>The gateway serves the pinned front-end libraries from "
        "<code>gateway/web/vendor/</code>, which the set-up fills from the npm registry "
        "(<code>scripts/up</code> and <code>scripts/test</code> do it on start). Install them "
        f"with</p><pre><code>{html.escape(INSTALL_COMMAND)}</code></pre>"
        '<p>then reload this page. The API (<a href="/docs">/docs</a>) works without them.</p>'
        f"<details><summary>Missing files</summary><ul>{items}</ul></details>"
    )


class _Vendor:
    """Whether the libraries are installed: checked until they are, then remembered."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ok = False

    def absent(self) -> list[str]:
        if self._ok:
            return []
        found = missing(self.directory)
        if found:
            log.error(
                "the web app's libraries are not installed (%d files missing, e.g. %s): run %s",
                len(found),
                found[0],
                INSTALL_COMMAND,
            )
        self._ok = not found
        return found


class _Headers:
    """ASGI wrapper adding `SECURITY_HEADERS` (and `Cache-Control: no-cache`: revalidate, so
    an upgrade is seen at once) to every response of the app it wraps."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                headers.setdefault("Cache-Control", "no-cache")
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        except HTTPException as exc:  # StaticFiles' 404 and 405: answered here, headers and all
            response = PlainTextResponse(str(exc.detail), exc.status_code, headers=exc.headers)
            await response(scope, receive, with_headers)


class _VendorFiles:
    def __init__(self, vendor: _Vendor) -> None:
        self._vendor = vendor
        self._files = StaticFiles(directory=vendor.directory, check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._vendor.absent():
            response = PlainTextResponse(
                f"the web app's libraries are not installed: run {INSTALL_COMMAND}", 503
            )
            await response(scope, receive, send)
            return
        await self._files(scope, receive, send)


def routes(vendor_dir: Path = VENDOR_DIR) -> list[BaseRoute]:
    """The pages and the two file mounts, for `gateway.app` (libraries from `vendor_dir`)."""
    vendor = _Vendor(vendor_dir)
    vendor.absent()  # logs at start-up when they are missing

    def endpoint(page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            absent = vendor.absent()
            if absent:
                body = _shell(page, _missing_main(absent))
                return HTMLResponse(body, 503, headers=SECURITY_HEADERS)
            body = _shell(page, '<p class="loading">Loading…</p>')
            return HTMLResponse(body, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

        serve.__name__ = f"page_{page.name}"
        return serve

    found: list[BaseRoute] = [
        Route(p.path, endpoint(p), methods=["GET"], name=f"page_{p.name}", include_in_schema=False)
        for p in PAGES
    ]
    found += [
        Mount(
            "/static/app",
            app=_Headers(GZipMiddleware(StaticFiles(directory=STATIC_DIR / "app"))),
            name="web_app",
        ),
        Mount(
            "/static/vendor",
            app=_Headers(GZipMiddleware(_VendorFiles(vendor))),
            name="web_vendor",
        ),
    ]
    return found
