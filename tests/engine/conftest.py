"""The engine's tests run the scripts in their test mode (`engine.market.CHECK_DECLARED_KEYS`):
a script that touches a key it was not given in KEYS, or a call whose KEYS span two slots (but
the global `dir` and `regions`), fails the test."""

from __future__ import annotations

import pytest

import engine.market


@pytest.fixture(autouse=True)
def _declared_keys_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.market, "CHECK_DECLARED_KEYS", True)
