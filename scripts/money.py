"""Operators' money commands (issue 14): `mnemo credit`, `mnemo clawback`, `mnemo credit-line`,
and the funding of the demo's renter bot by `mnemo up`.

A credit or clawback is one call of the market's primitive (`engine.market.Market.credit` /
`debit`, on the `operator` rail): applied once per key, written by the journal into the ledger
with its reason. The same key again changes nothing (the command says so), so a command that
failed half way can simply be run again with the key it printed.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TextIO

import asyncpg

from engine.connection import open_redis
from engine.errors import MarketError
from engine.keys import Keys
from engine.market import MAX_MOVEMENT_PUSD, Market
from engine.settings import ConfigError, Settings
from engine.types import pusd

__all__ = ["credit_command", "credit_line_command", "parse_usd", "provision_demo_renter"]

DEMO_RENTER_FILE = "demo_renter.json"
DEMO_BALANCE_USD = 100


def parse_usd(raw: str, *, allow_zero: bool = False) -> int:
    """A decimal USD amount (`12.5`) as pico-USD; ValueError with a one-line reason."""
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"expected a USD amount like 12.50, got {raw!r}") from None
    if not amount.is_finite() or amount < 0 or (amount == 0 and not allow_zero):
        raise ValueError(f"must be a positive amount of USD, got {raw!r}")
    value = pusd(amount)
    if value > MAX_MOVEMENT_PUSD:
        raise ValueError("at most 1,000,000 USD at once")
    if pusd(amount) == 0 and not allow_zero:
        raise ValueError("below one pico-USD")
    return value


def _usd(amount_pusd: int) -> str:
    text = f"{Decimal(amount_pusd).scaleb(-12):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


async def _client_row(settings: Settings, client_id: str) -> asyncpg.Record | None:
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        try:
            parsed = uuid.UUID(client_id)
        except ValueError:
            return None
        return await conn.fetchrow("SELECT * FROM clients WHERE id = $1", parsed)
    finally:
        await conn.close()


async def credit_command(
    settings: Settings,
    client_id: str,
    amount_pusd: int,
    *,
    reason: str,
    key: str | None = None,
    clawback: bool = False,
    allow_negative: bool = False,
    out: TextIO | None = None,
) -> int:
    """Credit (or claw back) a renter's balance; prints one line; 0, or 1 when refused."""
    out = out or sys.stdout
    if not reason.strip():
        raise ConfigError("--reason", "say why (it is kept in the ledger)")
    row = await _client_row(settings, client_id)
    if row is None:
        print(f"mnemo: no client {client_id}", file=sys.stderr)
        return 1
    client_id = str(row["id"])
    key = key or uuid.uuid4().hex
    assert settings.redis_url is not None
    redis = open_redis(settings.redis_url)
    market = Market(redis, Keys(settings.key_prefix))
    now_ms = time.time_ns() // 1_000_000
    try:
        if clawback:
            await market.gather(client_id, now_ms)
            result = await market.debit(
                client_id, amount_pusd, key=f"cli:{key}", rail="operator", reason=reason,
                reference="cli", now_ms=now_ms, allow_negative=allow_negative,
            )  # fmt: skip
        else:
            result = await market.credit(
                client_id, amount_pusd, key=f"cli:{key}", rail="operator", reason=reason,
                reference="cli", now_ms=now_ms,
            )  # fmt: skip
    except MarketError as e:
        print(f"mnemo: refused: {e}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    verb = "clawed back" if clawback else "credited"
    what = f"{verb} {_usd(amount_pusd)} USD" if result.applied else "already applied"
    print(
        f"{what} (key {key}); client {client_id} funding balance {_usd(result.balance_pusd)} USD "
        f"(event {result.event_id})",
        file=out,
    )
    return 0


async def credit_line_command(
    settings: Settings, client_id: str, amount_pusd: int, *, out: TextIO | None = None
) -> int:
    """Set a renter's credit line; prints one line; 0, or 1 for an unknown client."""
    out = out or sys.stdout
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        try:
            parsed = uuid.UUID(client_id)
        except ValueError:
            parsed = None
        row = (
            None
            if parsed is None
            else await conn.fetchrow(
                "UPDATE clients SET credit_line_pusd = $2 WHERE id = $1 RETURNING id",
                parsed,
                amount_pusd,
            )
        )
    finally:
        await conn.close()
    if row is None:
        print(f"mnemo: no client {client_id}", file=sys.stderr)
        return 1
    print(f"client {row['id']} credit line {_usd(amount_pusd)} USD", file=out)
    return 0


async def provision_demo_renter(settings: Settings, data_dir: Path) -> str:
    """The demo renter bot's API key: its account and client profile are made once (kept in
    `data_dir/demo_renter.json`), and its balance is topped up to `DEMO_BALANCE_USD` by an
    operator credit, the way an operator funds any renter, so `mnemo up` trades out of the box."""
    from agent.metros import METROS
    from gateway.auth import hash_password, new_api_key
    from persistence import accounts

    assert settings.database_url is not None and settings.redis_url is not None
    path = data_dir / DEMO_RENTER_FILE
    saved: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        row = await accounts.client(pool, saved["client_id"]) if saved else None
        if row is None:
            key, prefix, key_hash = new_api_key()
            created = await accounts.create_user(
                pool,
                email=f"demo-renter-{secrets.token_hex(6)}@mnemo.local",
                password_hash=await hash_password(secrets.token_urlsafe(24)),
                role="user",
                full_name="Demo renter",
                organization="Demo renter",
                key_prefix=prefix,
                key_hash=key_hash,
                key_name="demo",
            )
            assert created is not None
            metro = METROS[secrets.randbelow(len(METROS))]
            row = await accounts.add_client(
                pool,
                str(created[0]["id"]),
                org_name=f"Demo renter near {metro.name}",
                default_region=metro.region,
                latitude=metro.lat,
                longitude=metro.lng,
                budget_monthly_usd=None,
                prefer_local=True,
                max_latency_ms=None,
                min_reliability=None,
            )
            saved = {"api_key": key, "client_id": str(row["id"])}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(saved))
            tmp.chmod(0o600)
            tmp.replace(path)
    finally:
        await pool.close()
    redis = open_redis(settings.redis_url)
    market = Market(redis, Keys(settings.key_prefix))
    now_ms = time.time_ns() // 1_000_000
    try:
        wallets = await market.wallets(saved["client_id"], now_ms)
        have = sum(w.avail_pusd for w in wallets.values())
        short = DEMO_BALANCE_USD * 10**12 - have
        if short > 0:
            await market.credit(
                saved["client_id"],
                short,
                key=f"demo-topup:{now_ms}",
                rail="operator",
                reason="the demo renter's balance, topped up by mnemo up",
                now_ms=now_ms,
            )
    finally:
        await redis.aclose()
    return saved["api_key"]
