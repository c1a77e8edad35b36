"""The MNEMO_STRIPE_* settings: read, checked with one-line errors naming the variable, and
secrets masked wherever settings are printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.settings import ConfigError, Settings

KEY = "sk_test_" + "k" * 30
HOOK = "whsec_" + "h" * 30


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {"MNEMO_DATA_DIR": str(tmp_path / "data")}
    env.update({f"MNEMO_{k.upper()}": v for k, v in values.items()})
    return env


def test_stripe_settings_are_read_and_masked(tmp_path: Path) -> None:
    """Keys and bases come from MNEMO_STRIPE_*; the key and signing secret never print."""
    s = Settings.from_env(
        _env(
            tmp_path,
            stripe_secret_key=KEY,
            stripe_webhook_secret=HOOK,
            stripe_api_base="http://127.0.0.1:8420/",
            stripe_connect_api_base="https://connect.internal",
            stripe_checkout_api_base="https://checkout.internal/",
        )
    )
    assert (s.stripe_secret_key, s.stripe_webhook_secret) == (KEY, HOOK)
    assert s.stripe_api_base == "http://127.0.0.1:8420"
    assert s.stripe_connect_api_base == "https://connect.internal"
    assert s.stripe_checkout_api_base == "https://checkout.internal"
    for text in (repr(s), str(s)):
        assert KEY not in text and HOOK not in text
    default = Settings.from_env(_env(tmp_path))
    assert default.stripe_secret_key is None and default.stripe_webhook_secret is None
    assert default.stripe_api_base == "https://api.stripe.com"
    assert default.stripe_connect_api_base is None
    assert default.stripe_checkout_api_base is None


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("stripe_secret_key", "pk_test_publishable", "secret key"),
        ("stripe_webhook_secret", "secret", "whsec_"),
        ("stripe_api_base", "ftp://stripe", "http(s)"),
        ("stripe_connect_api_base", "not a url", "http(s)"),
        ("stripe_checkout_api_base", "mailto:x", "http(s)"),
    ],
)
def test_malformed_stripe_setting_names_the_variable(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    """A publishable key where the secret one goes, a bad secret or URL: one line naming it."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(_env(tmp_path, **{variable: value}))
    assert caught.value.variable == f"MNEMO_{variable.upper()}"
    assert says in str(caught.value) and value not in str(caught.value).split(":", 1)[0]
