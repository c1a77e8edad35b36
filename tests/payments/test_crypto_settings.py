"""The crypto rails' settings: read from MNEMO_* variables, refused with the variable named."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.settings import ConfigError, FinalityTier, Settings
from gateway.payments.chains.transfers import finality_rule
from gateway.payments.crypto import base_units
from tests.payments.ethchain import xpub

SECRET = "s3cr3t-" + "x" * 40
GENESIS = "5eykt4UsFv8P8NJdTREpY1vzqKqZKvdpKuc147dw2N9d"
WALLET = "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM"
USDC = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {"MNEMO_DATA_DIR": str(tmp_path), "MNEMO_JWT_SECRET": SECRET}
    env.update({f"MNEMO_{k.upper()}": v for k, v in values.items()})
    return env


def test_off_unless_a_chain_is_configured(tmp_path: Path) -> None:
    """No RPC URL: no crypto rail (and its routes are not served)."""
    assert Settings.from_env(_env(tmp_path)).crypto is None


def test_both_chains_are_read(tmp_path: Path) -> None:
    """Every crypto variable reaches the settings, tiers and fixed rates parsed exactly."""
    s = Settings.from_env(
        _env(
            tmp_path,
            eth_rpc_url="https://eth.example/rpc",
            eth_chain_id="1",
            eth_xpub=xpub(),
            eth_token_address="0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
            eth_finality="100:3, 1000.50:12, *:finalized",
            sol_rpc_url="http://127.0.0.1:8899",
            sol_genesis_hash=GENESIS,
            sol_recipient=WALLET,
            sol_usdc_mint=USDC,
            sol_finality="100:confirmed,*:finalized",
            rate_usdt_usd="1.0001",
            rate_max_age_s="120",
            crypto_request_ttl_s="900",
        )
    ).crypto
    assert s is not None and s.eth_enabled and s.sol_enabled
    assert s.eth_finality == (
        FinalityTier(100 * 10**12, "3"),
        FinalityTier(1000_500_000_000_000, "12"),
        FinalityTier(None, "finalized"),
    )
    assert finality_rule(s.eth_finality, 100 * 10**12) == "3"
    assert finality_rule(s.eth_finality, 100 * 10**12 + 1) == "12"
    assert finality_rule(s.eth_finality, 10**18) == "finalized"
    assert dict(s.fixed_rates) == {"USDC": "1", "USDT": "1.0001"}
    assert (s.rate_max_age_s, s.request_ttl_s, s.sol_usdc_mint) == (120, 900, USDC)


def test_rpc_keys_are_masked(tmp_path: Path) -> None:
    """An RPC URL's path and query (where providers put API keys) never reach a log."""
    url = "https://user:pw@eth-mainnet.example/v2/SECRETKEY?token=SECRET2"
    s = Settings.from_env(_env(tmp_path, eth_rpc_url=url, eth_chain_id="1", eth_xpub=xpub()))
    assert s.crypto is not None and s.crypto.eth_rpc_url == url
    assert "SECRET" not in repr(s) and "pw" not in str(s)
    assert "https://eth-mainnet.example/***" in repr(s)


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"eth_rpc_url": "https://x", "eth_xpub": "xpubX"}, "MNEMO_ETH_CHAIN_ID"),
        ({"eth_rpc_url": "https://x", "eth_chain_id": "1"}, "MNEMO_ETH_XPUB"),
        ({"eth_rpc_url": "ftp://x", "eth_chain_id": "1", "eth_xpub": "xpubX"}, "MNEMO_ETH_RPC_URL"),
        (
            {
                "eth_rpc_url": "https://x",
                "eth_chain_id": "1",
                "eth_xpub": "xpubX",
                "eth_finality": "*:3,100:5",
            },
            "MNEMO_ETH_FINALITY",
        ),
        (
            {
                "eth_rpc_url": "https://x",
                "eth_chain_id": "1",
                "eth_xpub": "xpubX",
                "eth_finality": "confirmed",
            },
            "MNEMO_ETH_FINALITY",
        ),
        (
            {
                "eth_rpc_url": "https://x",
                "eth_chain_id": "1",
                "eth_xpub": "xpubX",
                "eth_token_address": "0x12",
            },
            "MNEMO_ETH_TOKEN_ADDRESS",
        ),
        ({"sol_rpc_url": "http://x", "sol_genesis_hash": GENESIS}, "MNEMO_SOL_RECIPIENT"),
        (
            {"sol_rpc_url": "http://x", "sol_genesis_hash": "0OIl", "sol_recipient": WALLET},
            "MNEMO_SOL_GENESIS_HASH",
        ),
        (
            {
                "sol_rpc_url": "http://x",
                "sol_genesis_hash": GENESIS,
                "sol_recipient": WALLET,
                "rate_eth_usd": "-3",
            },
            "MNEMO_RATE_ETH_USD",
        ),
    ],
)
def test_bad_values_name_their_variable(
    tmp_path: Path, values: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(_env(tmp_path, **values))
    assert caught.value.variable == variable


def test_amounts_convert_with_integers_rounding_up() -> None:
    """USD to base units is exact integer arithmetic, rounded up by at most one unit."""
    from decimal import Decimal

    assert base_units(50 * 10**12, Decimal("2000"), 18) == 25 * 10**15
    assert base_units(10**12, Decimal("3"), 18) == 333_333_333_333_333_334
    assert base_units(12_500_000_000_000, Decimal("1"), 6) == 12_500_000
    assert base_units(1, Decimal("150"), 9) == 1
