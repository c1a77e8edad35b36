"""Authentication: who is calling, from an API key or a JWT. Public for the WebSocket handler.

Credentials, in the order they are looked at:
1. `Authorization: Bearer <jwt>` (a value starting with `mnm_` is taken as an API key),
2. `X-API-Key: <key>`,
3. WebSockets only (browsers cannot set headers there): `?token=<jwt>` or `?api_key=<key>`.
   Plain HTTP ignores query credentials, which would end up in access logs.
4. The web app's session cookie (`mnemo_session`, set by `POST /api/web/login`), accepted only
   where a cross-site page cannot use it: a GET or HEAD; any other method only with the
   session's CSRF token in `X-CSRF-Token` (an HMAC of the session token under the JWT secret,
   which the page reads from the login answer or `GET /api/web/session`, same origin only);
   a WebSocket only when its `Origin` is this host. Any credential in a header wins over the
   cookie, so Bearer and API-key clients are unaffected.

Sessions are opaque 256-bit tokens; Postgres keeps only their SHA-256 (`persistence.sessions`).
A session lasts `SESSION_TTL_S` from sign-in and ends at sign-out; like an API key, a session
found in Postgres is cached in process for `key_cache_ttl_s`, so a sign-out takes at most that
long to reach the other workers.

JWTs are HS256 (PyJWT) with `sub`, `role`, `iat`, `exp`, `iss`, `aud`, `jti`; the accepted
algorithm, issuer and audience are fixed server-side, never read from the token. A token's role is
the role at issue time (a role change takes effect on the next token).

A verified token is remembered in process (by its exact text, bounded) so that a client's next
requests skip the signature check; its expiry is checked on every use.

API keys are `mnm_` + 43 url-safe characters (256 random bits). Only their SHA-256 (hex) is stored,
with a short prefix so the owner can tell keys apart. A key found in Postgres is cached in process
for `key_cache_ttl_s` (5 s): a revocation is immediate in the worker that served it and takes at
most that long in the others. Unknown keys are never cached.

Passwords are hashed with Argon2id at OWASP's parameters (m=19 MiB, t=2, p=1), in a worker thread so
the event loop never waits on it; a login for an unknown email still spends one verification so
its timing does not reveal which emails exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import uuid
from typing import Literal

import argon2
import asyncpg
import jwt
import msgspec
from starlette.requests import HTTPConnection

from engine.settings import Settings
from gateway.errors import Forbidden, Unauthorized
from persistence import accounts, sessions

__all__ = [
    "CSRF_HEADER",
    "ROLES",
    "SESSION_COOKIE",
    "SESSION_TTL_S",
    "Authenticator",
    "Principal",
    "Role",
    "Unauthorized",
    "authenticate",
    "hash_api_key",
    "new_api_key",
]

Role = Literal["user", "provider", "admin"]
ROLES: frozenset[str] = frozenset({"user", "provider", "admin"})
API_KEY_PREFIX = "mnm_"
_JWT_ALGORITHM = "HS256"
SESSION_COOKIE = "mnemo_session"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 12 * 3600
"""How long a web session lasts from sign-in (it is not extended by use)."""
_SAFE_METHODS = frozenset({"GET", "HEAD"})


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """An authenticated caller.

    `via` says which credential was used; `expires_ms` is the JWT's or the web session's expiry
    (Unix ms) or None for an API key (a WebSocket authenticated by either must close when it
    passes).
    """

    user_id: str
    role: Role
    via: Literal["jwt", "api_key", "session"]
    expires_ms: int | None = None
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def new_api_key() -> tuple[str, str, str]:
    """A fresh API key as (key, prefix, sha256 hex). The key itself is shown once, never stored."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key[:12], hash_api_key(key)


def hash_api_key(key: str) -> str:
    """SHA-256 hex of a key (keys carry 256 random bits, so a fast hash is the right one)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


_HASHER = argon2.PasswordHasher(
    time_cost=2, memory_cost=19_456, parallelism=1, hash_len=32, salt_len=16, type=argon2.Type.ID
)
# Verified against when the email is unknown, so both paths cost one Argon2 verification.
_DUMMY_HASH = _HASHER.hash("mnemo-timing-equaliser")


async def hash_password(password: str) -> str:
    """Argon2id hash (PHC string) of `password`, computed off the event loop."""
    return await asyncio.to_thread(_HASHER.hash, password)


async def verify_password(password_hash: str | None, password: str) -> tuple[bool, bool]:
    """(matches, needs_rehash). A None hash (unknown user) costs the same and never matches."""

    def check() -> tuple[bool, bool]:
        try:
            _HASHER.verify(password_hash or _DUMMY_HASH, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False, False
        if password_hash is None:
            return False, False
        return True, _HASHER.check_needs_rehash(password_hash)

    return await asyncio.to_thread(check)


class Authenticator:
    """Issues and checks credentials for one app (built in the lifespan, kept in its state)."""

    __slots__ = ("_cache", "_cache_max", "_pool", "_settings", "_tokens", "key_cache_ttl_s")

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        key_cache_ttl_s: float = 5.0,
        key_cache_max: int = 10_000,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self.key_cache_ttl_s = key_cache_ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._cache_max = key_cache_max
        # Tokens already verified (signature, issuer, audience, claims), by their exact text:
        # a hit needs the very same token, and expiry is still checked on every use.
        self._tokens: dict[str, Principal] = {}

    # -- JWT ---------------------------------------------------------------------------------

    def issue_token(self, user_id: str, role: str, *, now_s: int | None = None) -> tuple[str, int]:
        """A signed access token for the user, and its lifetime in seconds."""
        now_s = int(time.time()) if now_s is None else now_s
        ttl_s = self._settings.jwt_ttl_s
        claims = {
            "sub": user_id,
            "role": role,
            "iat": now_s,
            "exp": now_s + ttl_s,
            "iss": self._settings.jwt_issuer,
            "aud": self._settings.jwt_audience,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._settings.jwt_secret, algorithm=_JWT_ALGORITHM), ttl_s

    def decode_token(self, token: str) -> Principal:
        """The principal a JWT names, or Unauthorized (`token_expired` / `invalid_token`)."""
        known = self._tokens.get(token)
        if known is not None:
            assert known.expires_ms is not None
            if known.expires_ms > time.time_ns() // 1_000_000:
                return known
            del self._tokens[token]
            raise Unauthorized("token expired", code="token_expired")
        principal = self._verify_token(token)
        if len(self._tokens) >= self._cache_max:
            self._tokens.clear()
        self._tokens[token] = principal
        return principal

    def _verify_token(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._settings.jwt_secret,
                algorithms=[_JWT_ALGORITHM],
                audience=self._settings.jwt_audience,
                issuer=self._settings.jwt_issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired", code="token_expired") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token", code="invalid_token") from None
        sub, role, exp = claims.get("sub"), claims.get("role"), claims.get("exp")
        if not isinstance(sub, str) or role not in ROLES or not isinstance(exp, int):
            raise Unauthorized("invalid token", code="invalid_token")
        return Principal(user_id=sub, role=role, via="jwt", expires_ms=exp * 1000)

    # -- API keys ----------------------------------------------------------------------------

    async def principal_for_key(self, key: str) -> Principal:
        """The owner of an API key, or Unauthorized (`invalid_api_key`) if unknown or revoked."""
        if not key.startswith(API_KEY_PREFIX) or len(key) > 128:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        digest = hash_api_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        # Authenticates and stamps last use in one statement, at most once per cache period.
        row = await accounts.use_api_key(self._pool, digest)
        if row is None:
            self._cache.pop(digest, None)
            raise Unauthorized("invalid API key", code="invalid_api_key")
        principal = Principal(
            user_id=str(row["user_id"]), role=row["role"], via="api_key", key_id=str(row["id"])
        )
        if len(self._cache) >= self._cache_max:
            self._cache.clear()
        self._cache[digest] = (principal, now + self.key_cache_ttl_s)
        return principal

    def forget_key(self, key_hash: str) -> None:
        """Drop a key (or a session, by its token's hash) from this process's cache."""
        self._cache.pop(key_hash, None)

    # -- web sessions ------------------------------------------------------------------------

    async def new_session(self, user_id: str) -> tuple[str, int]:
        """A fresh session of the user: (token for the cookie, expiry in Unix ms)."""
        token = secrets.token_urlsafe(32)
        row = await sessions.create(self._pool, user_id, hash_api_key(token), SESSION_TTL_S)
        return token, int(row["expires_at"].timestamp() * 1000)

    async def end_session(self, token: str) -> None:
        """Sign a session out (here at once, in other workers within `key_cache_ttl_s`)."""
        digest = hash_api_key(token)
        self._cache.pop(digest, None)
        await sessions.delete(self._pool, digest)

    def csrf_token(self, session_token: str) -> str:
        """The CSRF token of a session: HMAC-SHA256 of its token under the JWT secret, so it
        needs no storage and cannot be derived without both."""
        return hmac.new(
            self._settings.jwt_secret.encode(), b"csrf:" + session_token.encode(), hashlib.sha256
        ).hexdigest()

    async def principal_for_session(self, token: str) -> Principal:
        """The user of a session token, or Unauthorized (`invalid_session`)."""
        if len(token) > 128:
            raise Unauthorized("invalid or expired session", code="invalid_session")
        digest = hash_api_key(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        row = await sessions.find(self._pool, digest)
        if row is None:
            self._cache.pop(digest, None)
            raise Unauthorized("invalid or expired session", code="invalid_session")
        principal = Principal(
            user_id=str(row["user_id"]),
            role=row["role"],
            via="session",
            expires_ms=int(row["expires_at"].timestamp() * 1000),
        )
        if len(self._cache) >= self._cache_max:
            self._cache.clear()
        self._cache[digest] = (principal, now + self.key_cache_ttl_s)
        return principal

    def _check_session_use(self, conn: HTTPConnection, token: str) -> None:
        """Refuse a session cookie where another site could have made the browser send it."""
        if conn.scope["type"] == "websocket":
            # Browsers send cookies on cross-origin WebSocket handshakes and no CORS applies:
            # the Origin header is the only defence (cross-site WebSocket hijacking).
            host = conn.headers.get("host")
            scheme = "https" if conn.url.scheme == "wss" else "http"
            if host is None or conn.headers.get("origin") != f"{scheme}://{host}":
                raise Unauthorized(
                    "a session cookie is accepted only from this site's pages", code="bad_origin"
                )
            return
        if conn.scope.get("method", "GET") in _SAFE_METHODS:
            return
        sent = conn.headers.get(CSRF_HEADER)
        if sent is None or not hmac.compare_digest(sent, self.csrf_token(token)):
            raise Forbidden(
                f"a request authenticated by the session cookie needs its CSRF token in "
                f"{CSRF_HEADER}",
                code="csrf_failed",
                field="X-CSRF-Token",
            )

    # -- requests ----------------------------------------------------------------------------

    async def authenticate(self, conn: HTTPConnection) -> Principal:
        """The caller of an HTTP request or WebSocket, or Unauthorized."""
        headers = conn.headers
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value:
                raise Unauthorized("Authorization must be `Bearer <token>`", code="invalid_token")
            if value.startswith(API_KEY_PREFIX):
                return await self.principal_for_key(value)
            return self.decode_token(value)
        api_key = headers.get("x-api-key")
        if api_key is not None:
            return await self.principal_for_key(api_key.strip())
        if conn.scope["type"] == "websocket":
            params = conn.query_params
            if (token := params.get("token")) is not None:
                return self.decode_token(token)
            if (api_key := params.get("api_key")) is not None:
                return await self.principal_for_key(api_key)
        session = conn.cookies.get(SESSION_COOKIE)
        if session is not None:
            self._check_session_use(conn, session)
            return await self.principal_for_session(session)
        raise Unauthorized("authentication required: X-API-Key or Authorization: Bearer")


async def authenticate(conn: HTTPConnection) -> Principal:
    """The caller of `conn` (a Request or a WebSocket of the Mnemo app), or raise Unauthorized.

    Reads `Authorization: Bearer`, `X-API-Key`, for WebSockets also `?token=` / `?api_key=`,
    then the web session cookie (with its CSRF token or same-origin check).
    Uses the app's Authenticator from the lifespan state (`conn.state.auth`).
    """
    authenticator: Authenticator = conn.state.auth
    return await authenticator.authenticate(conn)
