"""Provider payouts against the Connect fake: one transfer per provider and day whatever
fails, with the ledger moving exactly what Stripe transferred.

Earnings are set up as ledger movements dated inside the period (the end-to-end test earns
them through a real settlement; here the day must be over, so they are dated yesterday)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from engine.settings import Settings
from gateway.payments import stripe_payouts
from gateway.payments.stripe_rail import StripeRail
from persistence import ledger
from tests.gateway.conftest import Actor, eventually, signup
from tests.payments.stripe_doubles import REPO, Served

PUSD = 10**12
CENT = PUSD // 100
YESTERDAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


async def onboarded(served: Served, *, complete: bool = True) -> tuple[Actor, str]:
    provider = await signup(served, "provider")  # type: ignore[arg-type]
    r = await served.client.post(
        "/api/payments/connect/onboard",
        json={"return_url": "https://app.example/ok", "refresh_url": "https://app.example/re"},
        headers=provider.headers,
    )
    assert r.status_code == 200, r.text
    if complete:
        async with httpx.AsyncClient() as browser:
            assert (await browser.get(r.json()["onboarding_url"])).status_code == 303
    return provider, r.json()["account_id"]


async def earn(pool: asyncpg.Pool, user_id: str, amount_pusd: int, at: dt.datetime) -> None:
    await ledger.post_movement(
        pool,
        f"test:earning:{uuid.uuid4().hex}",
        "adjustment",
        [(ledger.rail("operator"), -amount_pusd), (ledger.provider(user_id), amount_pusd)],
        ts_ms=int(at.timestamp() * 1000),
        reason="earnings for the test",
    )


def noon(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC)


async def fake(connect_fake: str, **faults: Any) -> list[dict[str, Any]]:
    """Set the fake's faults (if any); its recorded POSTs to /v1/transfers."""
    async with httpx.AsyncClient() as c:
        if faults:
            (await c.post(f"{connect_fake}/_test/faults", json=faults)).raise_for_status()
        calls = (await c.get(f"{connect_fake}/_test/calls")).json()
    return [x for x in calls if (x["method"], x["path"]) == ("POST", "/v1/transfers")]


async def payout_movements(pool: asyncpg.Pool, user_id: str) -> list[int]:
    rows = await pool.fetch(
        """
        SELECT e.amount_pusd FROM ledger_entries e JOIN ledger_movements m ON m.key = e.movement
        WHERE e.account = $1 AND m.cause = 'payout' ORDER BY m.ts
        """,
        ledger.provider(user_id).name,
    )
    return [int(r["amount_pusd"]) for r in rows]


def run_cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "MNEMO_DATABASE_URL": settings.database_url or "",
        "MNEMO_REDIS_URL": settings.redis_url or "",
        "MNEMO_JWT_SECRET": "x" * 40,
        "MNEMO_STRIPE_SECRET_KEY": settings.stripe_secret_key or "",
        "MNEMO_STRIPE_API_BASE": settings.stripe_api_base,
        "MNEMO_STRIPE_CONNECT_API_BASE": settings.stripe_connect_api_base or "",
    }
    code = "import sys; from scripts.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def finished(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = await asyncio.to_thread(proc.communicate, timeout=120)
    return proc.returncode, out


async def test_a_crash_after_stripe_answered_never_pays_twice(
    served: Served, connect_fake: str, pool: asyncpg.Pool, stripe_settings: Settings
) -> None:
    """`mnemo payouts run` killed (-9) after Stripe made the transfer and before our write:
    the next run finishes it with the same key, and Stripe's one transfer is recorded once."""
    provider, account = await onboarded(served)
    await earn(pool, provider.user_id, 12_345_678_901_234, noon(YESTERDAY))
    await fake(connect_fake, hang="/v1/transfers")
    proc = run_cli(stripe_settings, "payouts", "run", "--period", YESTERDAY.isoformat())
    try:

        async def transferred() -> list[dict[str, Any]] | None:
            made = [c for c in await fake(connect_fake) if c.get("created")]
            return made or None

        [made] = await eventually(transferred, timeout_s=60)
    finally:
        proc.kill()
        await asyncio.to_thread(proc.communicate)
    row = await pool.fetchrow("SELECT * FROM provider_payouts")
    assert (row["status"], row["stripe_transfer_id"], row["amount_cents"]) == (
        "pending",
        None,
        1234,
    )
    assert await payout_movements(pool, provider.user_id) == []

    await fake(connect_fake, hang=None)
    code, out = await finished(
        run_cli(stripe_settings, "payouts", "run", "--period", YESTERDAY.isoformat())
    )
    assert code == 0, out
    assert f"paid    {provider.user_id}: 12.34 USD, transfer {made['created']}" in out
    posts = await fake(connect_fake)
    assert [(c["idempotency_key"], c["replayed"]) for c in posts] == [
        (made["idempotency_key"], False),
        (made["idempotency_key"], True),
    ]
    assert posts[0]["params"]["destination"] == account
    row = await pool.fetchrow("SELECT * FROM provider_payouts")
    assert (row["status"], row["stripe_transfer_id"]) == ("paid", made["created"])
    assert await payout_movements(pool, provider.user_id) == [-1234 * CENT]

    code, out = await finished(
        run_cli(stripe_settings, "payouts", "run", "--period", YESTERDAY.isoformat())
    )
    assert code == 0 and "paid already" in out, out
    assert len(await fake(connect_fake)) == 2


async def test_a_lost_answer_is_retried_with_the_same_key(
    served: Served, connect_fake: str, pool: asyncpg.Pool, stripe_settings: Settings
) -> None:
    """Stripe makes the transfer but its answer is lost: the SDK's retry carries the same
    idempotency key and gets the same transfer."""
    provider, _ = await onboarded(served)
    await earn(pool, provider.user_id, 5 * PUSD, noon(YESTERDAY))
    await fake(connect_fake, hang="/v1/transfers", times=1)
    rail = StripeRail(stripe_settings, timeout_s=1.0, max_network_retries=2)
    try:
        report = await stripe_payouts.pay_providers(pool, rail, YESTERDAY)
    finally:
        await rail.aclose()
    assert list(report.paid) == [provider.user_id], report.lines()
    posts = await fake(connect_fake)
    assert len({c["idempotency_key"] for c in posts}) == 1
    assert [c["replayed"] for c in posts] == [False, True]
    assert await payout_movements(pool, provider.user_id) == [-5 * PUSD]


async def test_a_refused_transfer_is_tried_again_as_a_new_attempt(
    served: Served, connect_fake: str, pool: asyncpg.Pool, stripe_settings: Settings
) -> None:
    """A transfer Stripe refuses moves no money and is retried by the next run with a new key
    (Stripe would replay the refusal for the old one)."""
    provider, _ = await onboarded(served)
    await earn(pool, provider.user_id, 3 * PUSD, noon(YESTERDAY))
    rail = StripeRail(stripe_settings)
    try:
        await fake(connect_fake, refuse="/v1/transfers")
        refused = await stripe_payouts.pay_providers(pool, rail, YESTERDAY)
        assert "refused" in refused.failed[provider.user_id], refused.lines()
        assert await payout_movements(pool, provider.user_id) == []
        await fake(connect_fake, refuse=None)
        report = await stripe_payouts.pay_providers(pool, rail, YESTERDAY)
    finally:
        await rail.aclose()
    assert list(report.paid) == [provider.user_id], report.lines()
    keys = [c["idempotency_key"] for c in await fake(connect_fake)]
    assert len(keys) == 2 and keys[0].endswith("-1") and keys[1].endswith("-2")
    assert await payout_movements(pool, provider.user_id) == [-3 * PUSD]


async def test_who_is_paid_and_how_much(
    served: Served, connect_fake: str, pool: asyncpg.Pool, stripe_settings: Settings
) -> None:
    """Only earnings before the period's end, in whole cents, to onboarded providers; the
    fraction of a cent waits; an open period is refused."""
    paid, _ = await onboarded(served)
    waiting, _ = await onboarded(served, complete=False)
    idle, _ = await onboarded(served)
    today = dt.datetime.now(dt.UTC).date()
    await earn(pool, paid.user_id, 2 * PUSD + CENT // 2, noon(YESTERDAY))
    await earn(pool, paid.user_id, 7 * PUSD, dt.datetime.now(dt.UTC))  # today's: not yet
    await earn(pool, waiting.user_id, 4 * PUSD, noon(YESTERDAY))
    rail = StripeRail(stripe_settings)
    try:
        report = await stripe_payouts.pay_providers(pool, rail, YESTERDAY)
        with pytest.raises(Exception, match="has not ended"):
            await stripe_payouts.pay_providers(pool, rail, today)
    finally:
        await rail.aclose()
    assert set(report.paid) == {paid.user_id}
    assert "2.00 USD" in report.paid[paid.user_id]
    assert "onboarding" in report.skipped[waiting.user_id]
    assert report.skipped[idle.user_id] == "nothing due"
    [post] = await fake(connect_fake)
    assert post["params"]["amount"] == "200"
    assert post["params"]["transfer_group"] == f"mnemo-payouts-{YESTERDAY.isoformat()}"
    r = await served.client.get(
        "/api/payments/statement",
        params={"start": YESTERDAY.isoformat()},
        headers=paid.headers,
    )
    st = r.json()
    assert st["payouts_pusd"] == 2 * PUSD
    assert st["balance_pusd"] == 7 * PUSD + CENT // 2


async def test_the_commands_need_stripe(stripe_settings: Settings) -> None:
    """Without MNEMO_STRIPE_SECRET_KEY the commands stop at once with one line naming it; a
    malformed period is refused by the parser."""
    bare = Settings(
        redis_url=stripe_settings.redis_url,
        database_url=stripe_settings.database_url,
        stripe_api_base=stripe_settings.stripe_api_base,
    )
    for args in (("payouts", "run"), ("payments", "reconcile")):
        code, out = await finished(run_cli(bare, *args))
        assert code == 2, out
        assert out.strip().splitlines()[-1].startswith("mnemo: error: MNEMO_STRIPE_SECRET_KEY")
    code, out = await finished(run_cli(stripe_settings, "payouts", "run", "--period", "2026-02-30"))
    assert code == 2 and "YYYY-MM-DD" in out, out


async def test_reconcile_command_finds_nothing_on_a_clean_book(
    stripe_settings: Settings,
) -> None:
    """`mnemo payments reconcile` on a book with nothing in it: exit 0, nothing to say."""
    code, out = await finished(run_cli(stripe_settings, "payments", "reconcile", "--days", "1"))
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "all in agreement"
