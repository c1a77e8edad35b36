"""Accounts and credentials: sign-up, tokens, API keys, clients, and what is stored."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid

import asyncpg
import jwt

from gateway.auth import hash_api_key

from .conftest import JWT_SECRET, Gateway, assert_error, bearer, signup


def _hs512(claims: dict, secret: str) -> str:
    """A token signed with the right secret but another algorithm (PyJWT refuses short HS512 keys)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = (
        b64(json.dumps({"alg": "HS512", "typ": "JWT"}).encode())
        + "."
        + b64(json.dumps(claims).encode())
    )
    return head + "." + b64(hmac.new(secret.encode(), head.encode(), hashlib.sha512).digest())


async def test_signup_token_and_me(gw: Gateway) -> None:
    """Sign-up returns the user and a key; both the key and a JWT authenticate; emails are unique."""
    api = gw.client
    user = await signup(gw, "provider", email="Ada@Example.com")
    r = await api.get("/api/auth/me", headers=user.headers)
    assert (
        r.status_code == 200
        and r.json()["user"]["role"] == "provider"
        and r.json()["via"] == "api_key"
    )
    headers = await bearer(gw, user)
    r = await api.get("/api/auth/me", headers=headers)
    assert (
        r.status_code == 200 and r.json()["via"] == "jwt" and r.json()["user"]["id"] == user.user_id
    )
    # The key also works as a Bearer credential.
    r = await api.get("/api/auth/me", headers={"Authorization": f"Bearer {user.key}"})
    assert r.status_code == 200
    r = await api.post(
        "/api/auth/signup", json={"email": "ada@example.COM", "password": "another password"}
    )
    assert_error(r, 409, "email_taken", "email")
    r = await api.post(
        "/api/auth/token", json={"email": "ada@example.com", "password": "wrong password!"}
    )
    assert_error(r, 401, "invalid_credentials")
    r = await api.post(
        "/api/auth/token", json={"email": "nobody@example.com", "password": "whatever123"}
    )
    assert_error(r, 401, "invalid_credentials")
    r = await api.post(
        "/api/auth/signup",
        json={"email": "x@example.com", "password": "long enough", "role": "admin"},
    )
    assert_error(r, 422, field="role")


async def test_token_claims_and_rejected_tokens(gw: Gateway) -> None:
    """The JWT carries exp/iat/iss/aud; expired, foreign, unsigned or tampered tokens are 401."""
    api = gw.client
    user = await signup(gw)
    token = (await bearer(gw, user))["Authorization"].split()[1]
    claims = jwt.decode(
        token, JWT_SECRET, algorithms=["HS256"], audience="mnemo-api", issuer="mnemo"
    )
    assert claims["sub"] == user.user_id and claims["role"] == "user"
    assert claims["exp"] - claims["iat"] == gw.settings.jwt_ttl_s

    now = int(time.time())
    base = {
        "sub": user.user_id,
        "role": "user",
        "iat": now - 100,
        "exp": now + 100,
        "iss": "mnemo",
        "aud": "mnemo-api",
    }
    cases = {
        "token_expired": jwt.encode({**base, "exp": now - 10}, JWT_SECRET, algorithm="HS256"),
        "wrong secret": jwt.encode(base, "another-secret-" + "y" * 40, algorithm="HS256"),
        "wrong audience": jwt.encode({**base, "aud": "other"}, JWT_SECRET, algorithm="HS256"),
        "wrong issuer": jwt.encode({**base, "iss": "other"}, JWT_SECRET, algorithm="HS256"),
        "no exp": jwt.encode(
            {k: v for k, v in base.items() if k != "exp"}, JWT_SECRET, algorithm="HS256"
        ),
        "unknown role": jwt.encode({**base, "role": "root"}, JWT_SECRET, algorithm="HS256"),
        "alg none": jwt.encode(base, None, algorithm="none"),
        "HS512": _hs512(base, JWT_SECRET),
        "tampered": token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
        "garbage": "not.a.token",
    }
    for name, bad in cases.items():
        r = await api.get("/api/auth/me", headers={"Authorization": f"Bearer {bad}"})
        error = assert_error(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer"), name
        if name == "token_expired":
            assert error["code"] == "token_expired"
    for headers in (
        {},
        {"Authorization": "Basic Zm9vOmJhcg=="},
        {"X-API-Key": "mnm_unknown"},
        {"X-API-Key": ""},
    ):
        assert_error(await api.get("/api/auth/me", headers=headers), 401)


async def test_api_keys_are_hashed_listed_by_prefix_and_revocable(gw: Gateway) -> None:
    """Keys are stored as SHA-256 only, listed by prefix, and a revoked key stops working at once."""
    api = gw.client
    user = await signup(gw)
    other = await signup(gw)
    r = await api.post("/api/auth/api-keys", json={"name": "bot"}, headers=user.headers)
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("mnm_") and key.startswith(created["prefix"])
    r = await api.get("/api/auth/api-keys", headers={"X-API-Key": key})
    listed = r.json()["api_keys"]
    assert [k["prefix"] for k in listed] == [user.key[:12], created["prefix"]]
    assert all("key" not in k for k in listed)

    conn = await asyncpg.connect(gw.settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT key_hash, prefix FROM api_keys WHERE user_id = $1", uuid.UUID(user.user_id)
        )
        password_hash = await conn.fetchval(
            "SELECT password_hash FROM users WHERE id = $1", uuid.UUID(user.user_id)
        )
    finally:
        await conn.close()
    assert {r["key_hash"] for r in rows} == {hash_api_key(user.key), hash_api_key(key)}
    assert password_hash.startswith("$argon2id$") and user.password not in password_hash

    r = await api.delete(f"/api/auth/api-keys/{created['id']}", headers=other.headers)
    assert_error(r, 404)
    r = await api.delete(f"/api/auth/api-keys/{created['id']}", headers=user.headers)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert_error(await api.get("/api/auth/me", headers={"X-API-Key": key}), 401, "invalid_api_key")
    assert (await api.get("/api/auth/me", headers=user.headers)).status_code == 200


async def test_clients_belong_to_their_user(gw: Gateway) -> None:
    """A renter profile is created by a renter, visible to them only; providers cannot create one."""
    api = gw.client
    renter = await signup(gw, "user")
    other = await signup(gw, "user")
    provider = await signup(gw, "provider")
    body = {
        "org_name": "Acme AI",
        "default_region": "us-east-2",
        "latitude": 40.7,
        "longitude": -73.9,
        "budget_monthly_usd": 1500,
        "max_latency_ms": 5,
        "min_reliability": 95,
    }
    r = await api.post("/api/clients", json=body, headers=renter.headers)
    assert r.status_code == 201, r.text
    client = r.json()
    assert client["user_id"] == renter.user_id and client["budget_monthly_usd"] == 1500.0
    assert client["current_spend_usd"] == 0.0 and client["prefer_local"] is True
    assert (await api.get(f"/api/clients/{client['id']}", headers=renter.headers)).json() == client
    assert_error(await api.get(f"/api/clients/{client['id']}", headers=other.headers), 404)
    assert_error(await api.post("/api/clients", json=body, headers=provider.headers), 403)
    assert (await api.get("/api/clients", headers=other.headers)).json() == {"clients": []}
    r = await api.post(
        "/api/clients", json={"org_name": "x", "latitude": 10.0}, headers=renter.headers
    )
    assert_error(r, 422, field="longitude")


async def test_login_failures_are_rate_limited(gw: Gateway) -> None:
    """Ten wrong passwords for one account lock its logins for a while (429 with Retry-After)."""
    api = gw.client
    user = await signup(gw)
    for _ in range(10):
        r = await api.post(
            "/api/auth/token", json={"email": user.email, "password": "wrong password"}
        )
        assert_error(r, 401)
    r = await api.post("/api/auth/token", json={"email": user.email, "password": user.password})
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1


async def test_a_remembered_token_still_expires(gw: Gateway) -> None:
    """A verified JWT is remembered, but a later use after its expiry is refused all the same."""
    auth = gw.state["auth"]
    user = await signup(gw)
    now = int(time.time())
    token, _ = auth.issue_token(user.user_id, "user", now_s=now - gw.settings.jwt_ttl_s + 2)
    headers = {"Authorization": f"Bearer {token}"}
    assert (await gw.client.get("/api/auth/me", headers=headers)).status_code == 200
    await asyncio.sleep(max(0.0, now + 2 - time.time()) + 0.05)
    assert_error(await gw.client.get("/api/auth/me", headers=headers), 401, "token_expired")
