"""Browser sign-in: a session in an HttpOnly cookie, and the CSRF token that goes with it.

    POST /api/web/login    {"email", "password"} -> WebSession, and the cookie
    GET  /api/web/session  -> WebSession (signed in or not; never 401)
    POST /api/web/logout   -> WebSession (signed out), and the cookie cleared

The cookie (`mnemo_session`) is HttpOnly (no script reads it), `SameSite=Strict`, `Path=/`,
`Secure` when the request came over HTTPS (uvicorn takes the scheme from a trusted proxy's
`X-Forwarded-Proto`), and lives as long as the session (`gateway.auth.SESSION_TTL_S`). What the
cookie may do is `gateway.auth`'s rule: reads, and any other method only with the session's
`csrf_token` (from these answers) in `X-CSRF-Token`; WebSockets only from this origin.

Sign-in counts against the same limits as `POST /api/auth/token` (per client address, failed
attempts per account) and must come as `application/json` from this origin (when the browser
says where it comes from): a cross-site page can send neither without CORS, which the gateway
never grants, so no other site can sign a visitor in to an account of its choosing.
"""

from __future__ import annotations

import msgspec

from gateway.auth import SESSION_COOKIE, SESSION_TTL_S, Authenticator
from gateway.errors import Forbidden, Unauthorized, UnsupportedMediaType
from gateway.operations import Call, Operation, Reply
from gateway.routes.accounts import check_login, user_out
from gateway.schemas import Email, Password, UserOut
from persistence import accounts

__all__ = ["OPERATIONS", "WebLoginRequest", "WebSession"]


class WebLoginRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: Email
    password: Password


class WebCryptoAsset(msgspec.Struct, kw_only=True):
    blockchain: str
    asset: str


class WebPayments(msgspec.Struct, kw_only=True):
    """How money can come in here, so that the pages offer only what works: `cards` (Stripe is
    configured: card top-ups on Stripe Checkout, payouts through Connect) and the `crypto`
    assets taken (`POST /api/payments/crypto/requests`)."""

    cards: bool = False
    crypto: list[WebCryptoAsset] = msgspec.field(default_factory=list)


class WebSession(msgspec.Struct, kw_only=True):
    """Whether this browser is signed in; if so who, until when, and the CSRF token to send
    as `X-CSRF-Token` with every request that changes something; and which payment rails the
    exchange offers (`payments`)."""

    signed_in: bool
    user: UserOut | None = None
    csrf_token: str | None = None
    expires_ms: int | None = None
    payments: WebPayments = msgspec.field(default_factory=WebPayments)


def _payments(call: Call) -> WebPayments:
    crypto = call.state.crypto
    return WebPayments(
        cards=call.state.cards is not None,
        crypto=[]
        if crypto is None
        else [WebCryptoAsset(blockchain=a.blockchain, asset=a.symbol) for a in crypto.assets()],
    )


def _signed_out(call: Call) -> WebSession:
    return WebSession(signed_in=False, payments=_payments(call))


def _cookie(call: Call, value: str, max_age_s: int) -> dict[str, str]:
    parts = [
        f"{SESSION_COOKIE}={value}",
        "Path=/",
        f"Max-Age={max_age_s}",
        "HttpOnly",
        "SameSite=Strict",
    ]
    if call.request.url.scheme == "https":
        parts.append("Secure")
    return {"Set-Cookie": "; ".join(parts)}


def _cleared(call: Call) -> dict[str, str]:
    return _cookie(call, "", 0)


def _from_this_origin(call: Call) -> bool:
    origin = call.request.headers.get("origin")
    if origin is None:
        return True  # not a browser, or one that does not say: nothing to check
    host = call.request.headers.get("host")
    return host is not None and origin == f"{call.request.url.scheme}://{host}"


async def login(call: Call) -> Reply:
    body: WebLoginRequest = call.body
    media = call.request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType("sign in with an application/json body", field="Content-Type")
    if not _from_this_origin(call):
        raise Forbidden("sign in from this site's own pages", code="bad_origin", field="Origin")
    row = await check_login(call, body.email, body.password)
    auth: Authenticator = call.state.auth
    old = call.request.cookies.get(SESSION_COOKIE)
    if old is not None:
        await auth.end_session(old)
    token, expires_ms = await auth.new_session(str(row["id"]))
    user = await accounts.user(call.state.pool, str(row["id"]))
    assert user is not None
    session = WebSession(
        signed_in=True,
        user=user_out(user),
        csrf_token=auth.csrf_token(token),
        expires_ms=expires_ms,
        payments=_payments(call),
    )
    return Reply(session, headers=_cookie(call, token, SESSION_TTL_S))


async def current(call: Call) -> Reply:
    token = call.request.cookies.get(SESSION_COOKIE)
    if token is None:
        return Reply(_signed_out(call))
    auth: Authenticator = call.state.auth
    try:
        principal = await auth.principal_for_session(token)
    except Unauthorized:
        return Reply(_signed_out(call), headers=_cleared(call))
    user = await accounts.user(call.state.pool, principal.user_id)
    if user is None:
        return Reply(_signed_out(call), headers=_cleared(call))
    session = WebSession(
        signed_in=True,
        user=user_out(user),
        csrf_token=auth.csrf_token(token),
        expires_ms=principal.expires_ms,
        payments=_payments(call),
    )
    return Reply(session)


async def logout(call: Call) -> Reply:
    token = call.request.cookies.get(SESSION_COOKIE)
    if call.user.via == "session" and token is not None:
        await call.state.auth.end_session(token)
    return Reply(_signed_out(call), headers=_cleared(call))


OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/web/login",
        login,
        name="web_login",
        summary="Sign a browser in: sets the HttpOnly session cookie; answers the CSRF token",
        tag="web",
        body=WebLoginRequest,
        response=WebSession,
        auth=False,
        errors=(401, 403, 429),
    ),
    Operation(
        "GET",
        "/api/web/session",
        current,
        name="web_session",
        summary="Whether this browser's session cookie is signed in (and its CSRF token)",
        tag="web",
        response=WebSession,
        auth=False,
    ),
    Operation(
        "POST",
        "/api/web/logout",
        logout,
        name="web_logout",
        summary="Sign this browser out (the cookie needs its X-CSRF-Token, as every change)",
        tag="web",
        response=WebSession,
        errors=(403,),
    ),
]
