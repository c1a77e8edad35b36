"""The engine's tests run the scripts in their test mode (`engine.market.CHECK_DECLARED_KEYS`):
a script that touches a key it was not given in KEYS, or a call whose KEYS span two slots, fails
the test."""

from __future__ import annotations

import pytest

import engine.keys
import engine.market


@pytest.fixture(autouse=True)
def _declared_keys_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.market, "CHECK_DECLARED_KEYS", True)


async def fund(
    market: engine.market.Market,
    client_id: str,
    region: str = "us-east-2",
    *,
    usd: int = 1_000_000,
    pusd: int | None = None,
    now_ms: int = 1_700_000_000_000,
) -> None:
    """Give renter `client_id` `usd` (or `pusd`) to spend in `region`: an operator credit to its
    funding wallet, moved to the region's wallet (issue 14: a contract or bid needs its hold
    covered)."""
    amount = usd * 10**12 if pusd is None else pusd
    await market.credit(
        client_id, amount, key=f"test-fund:{client_id}:{region}", rail="operator", now_ms=now_ms
    )
    await market.transfer(
        client_id,
        from_slot=engine.keys.FUNDING,
        to_slot=region,
        amount_pusd=amount,
        allow_pusd=amount,
        now_ms=now_ms,
    )
