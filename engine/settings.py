"""Configuration: one frozen object read from the environment (and an optional `.env`).

Every process (gateway, engine, journal, the `mnemo` CLI) builds one `Settings` at start-up with
`Settings.from_env()`. A missing or malformed value raises `ConfigError`, whose `str` is one line
naming the variable; the CLI prints it and exits non-zero, never a traceback deep inside a driver.

`redis_url` / `database_url` left unset mean "use the embedded servers" (see `scripts.embedded`).
`redis_url` names one server (`redis://`, `rediss://`, `unix://`) or a Redis (Valkey) Cluster
(`redis+cluster://host:port,host:port`, `rediss+cluster://`; see `engine.connection`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from engine.redis_url import CLUSTER_SCHEMES, is_cluster_url, parse_cluster_url

__all__ = ["ConfigError", "CryptoSettings", "FinalityTier", "Settings", "mask_url"]


class ConfigError(Exception):
    """A configuration value is missing or malformed; `str()` is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(variable, problem)
        self.variable = variable
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.variable}: {self.problem}"


def mask_url(url: str | None) -> str | None:
    """`url` with any password replaced by `***` (for logs and reprs)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


_SECRET_FIELDS = frozenset(
    {"jwt_secret", "metrics_token", "stripe_secret_key", "stripe_webhook_secret", "lease_key"}
)
_URL_FIELDS = frozenset({"redis_url", "database_url"})
_MIN_METRICS_TOKEN = 24
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_REGION = re.compile(r"^[A-Za-z0-9_.-]+$")


# ---------------------------------------------------------------------------------------------
# Crypto payment rails (read by gateway.payments; parsed by `_crypto_from_env` below)


class FinalityTier(msgspec.Struct, frozen=True):
    """Payments worth up to `max_pusd` (None: any amount) are final after `rule`: a number of
    confirmations (Ethereum), `finalized` (either chain) or `confirmed` (Solana)."""

    max_pusd: int | None
    rule: str


class CryptoSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Ethereum (`eth_*`) and Solana (`sol_*`) payment verification; a chain whose RPC URL is
    unset is off. Amounts are integers of the asset's base units; rates are exact decimals."""

    eth_rpc_url: str | None = None
    eth_chain_id: int | None = None
    eth_xpub: str | None = None
    """The extended public key (BIP-32 `xpub...`) that per-request deposit addresses derive from
    (child `i` is request number `i`); its private key never reaches the exchange."""
    eth_token_address: str | None = None
    eth_token_symbol: str = "USDC"
    eth_token_decimals: int = 6
    eth_finality: tuple[FinalityTier, ...] = (FinalityTier(None, "finalized"),)
    sol_rpc_url: str | None = None
    sol_genesis_hash: str | None = None
    sol_recipient: str | None = None
    sol_usdc_mint: str | None = None
    sol_usdc_decimals: int = 6
    sol_finality: tuple[FinalityTier, ...] = (FinalityTier(None, "finalized"),)
    fixed_rates: tuple[tuple[str, str], ...] = (("USDC", "1"),)
    """(asset, USD per whole unit) that never go stale (`MNEMO_RATE_<ASSET>_USD`)."""
    rate_max_age_s: int = 600
    """How old an operator-set rate may be before requests priced with it are refused."""
    request_ttl_s: int = 3600
    """How long a payment request's quote holds: a payment mined later is refused."""
    recheck_interval_s: float = 10.0
    """How often the gateway re-checks payments seen before finality."""

    def __repr__(self) -> str:
        # RPC providers put their API key in the URL's path or query: show only where it points.
        shown = []
        for name in self.__struct_fields__:
            value: Any = getattr(self, name)
            if name.endswith("_rpc_url") and value:
                parts = urlsplit(value)
                value = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/***"
            shown.append(f"{name}={value!r}")
        return f"CryptoSettings({', '.join(shown)})"

    __str__ = __repr__

    @property
    def eth_enabled(self) -> bool:
        return self.eth_rpc_url is not None

    @property
    def sol_enabled(self) -> bool:
        return self.sol_rpc_url is not None


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """All of Mnemo's configuration. Build with `from_env()`; tests build it directly."""

    redis_url: str | None = None
    database_url: str | None = None
    redis_ack_replicas: int = 0
    """Replicas that must confirm each market change before it is reported made (`WAIT`; 0:
    none). With replicas, 1 makes a primary's fail-over lose no reported change."""
    jwt_secret: str = ""
    data_dir: Path = Path(".mnemo")
    host: str = "127.0.0.1"
    port: int = 8000
    key_prefix: str = "mnemo:"
    heartbeat_interval_s: float = 60.0
    heartbeat_min_interval_s: float = 30.0
    missed_heartbeats_offline: int = 3
    jwt_ttl_s: int = 86_400
    jwt_issuer: str = "mnemo"
    jwt_audience: str = "mnemo-api"
    regions: tuple[str, ...] = ()
    log_level: str = "INFO"
    max_body_bytes: int = 65_536
    metrics_retention_days: int = 7
    metrics_token: str | None = None
    """A bearer token that may read `/metrics` (besides admins); None: admins only."""
    write_rate_per_s: float = 50.0
    """Sustained writes (orders, contracts, RFQs, node registrations) per account per second."""
    write_burst: int = 100
    """Writes an idle account may send at once before `write_rate_per_s` paces it."""
    ws_connections_per_account: int = 20
    """WebSockets one account may hold open at once, over every gateway process."""
    ws_channels_per_socket: int = 256
    """Channels one WebSocket may be subscribed to (the fleet simulator fills its notice sockets
    to 256)."""
    stripe_secret_key: str | None = None
    """Stripe secret key (`sk_...` or a restricted `rk_...`); None: cards and payouts are off."""
    stripe_webhook_secret: str | None = None
    """Signing secret of the Stripe webhook endpoint (`whsec_...`); None: webhooks are refused."""
    stripe_api_base: str = "https://api.stripe.com"
    """Where the Stripe API answers (tests point it at localstripe)."""
    stripe_connect_api_base: str | None = None
    """Where the Connect calls (accounts, account links, transfers) go; None: `stripe_api_base`.
    Real deployments leave it unset; the tests point it at their Connect fake (localstripe has
    no Connect)."""
    stripe_checkout_api_base: str | None = None
    """Where the Checkout Session calls go; None: `stripe_api_base`. Real deployments leave it
    unset; the tests point it at their Checkout fake (localstripe has no Checkout)."""
    platform_fee_bps: int = 1000
    """The platform's fee taken at settlement, in basis points of the cost (issue 14)."""
    max_open_contracts: int = 1000
    """Open contracts one user may hold in one region (0: no cap)."""
    max_open_bids: int = 1000
    """Resting bids one user may have in one region's book (0: no cap)."""
    transfer_repair_after_s: float = 5.0
    """How long a money transfer may sit half done before the engine's repair loop finishes it."""
    crypto: CryptoSettings | None = None
    """The crypto payment rails (`MNEMO_ETH_*`, `MNEMO_SOL_*`, `MNEMO_RATE_*`); None: off."""
    lease_key: str = ""
    """The key lease passwords are derived from (HMAC-SHA256; `gateway.leases`); empty: derived
    from `jwt_secret` under a label of its own (`lease_secret`)."""
    lease_ready_timeout_ms: int = 3_000
    """A delivered lease not reported ready this long after it was made is treated as a failed
    node: failed over, or failed, uncharged."""
    lease_close_timeout_ms: int = 10_000
    """A closing lease whose node has not reported it closed this long after the close order is
    settled with the last heartbeat's meter and no digest."""

    @property
    def lease_secret(self) -> bytes:
        """The key of the lease passwords: `lease_key`, or one derived from `jwt_secret` with a
        label of its own (so neither key reveals the other)."""
        if self.lease_key:
            return self.lease_key.encode()
        return hmac.new(self.jwt_secret.encode(), b"mnemo lease key v1", hashlib.sha256).digest()

    def __repr__(self) -> str:
        shown = []
        for name in self.__struct_fields__:
            value: Any = getattr(self, name)
            if name in _SECRET_FIELDS and value:
                value = "***"
            elif name in _URL_FIELDS:
                value = mask_url(value)
            shown.append(f"{name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    @property
    def embedded(self) -> bool:
        """True when at least one of Redis/Postgres must be started by us."""
        return self.redis_url is None or self.database_url is None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, dotenv: bool = True) -> Settings:
        """Read `MNEMO_*` variables (after loading `.env` from the working directory, if present)."""
        if env is None:
            if dotenv and Path(".env").is_file():
                _load_dotenv(Path(".env"))
            env = dict(os.environ)
        values: dict[str, Any] = {}

        def get(name: str) -> str | None:
            raw = env.get(f"MNEMO_{name.upper()}")
            return raw if raw not in (None, "") else None

        for name in ("redis_url", "database_url"):
            raw = get(name)
            if raw is not None:
                values[name] = _check_url(f"MNEMO_{name.upper()}", raw, name)
        for name in (
            "host",
            "key_prefix",
            "jwt_issuer",
            "jwt_audience",
        ):
            raw = get(name)
            if raw is not None:
                values[name] = raw
        for name in (
            "port",
            "jwt_ttl_s",
            "missed_heartbeats_offline",
            "max_body_bytes",
            "metrics_retention_days",
            "write_burst",
            "ws_connections_per_account",
            "ws_channels_per_socket",
            "redis_ack_replicas",
            "lease_ready_timeout_ms",
            "lease_close_timeout_ms",
        ):
            raw = get(name)
            if raw is not None:
                values[name] = _parse_int(f"MNEMO_{name.upper()}", raw)
                if name == "redis_ack_replicas" and values[name] < 0:
                    raise ConfigError(f"MNEMO_{name.upper()}", f"must be at least 0, got {raw!r}")
                if name not in ("port", "redis_ack_replicas") and values[name] < 1:
                    raise ConfigError(f"MNEMO_{name.upper()}", f"must be at least 1, got {raw!r}")
        for name, top in (
            ("platform_fee_bps", 10_000),
            ("max_open_contracts", 10**9),
            ("max_open_bids", 10**9),
        ):
            raw = get(name)
            if raw is not None:
                values[name] = _parse_int(f"MNEMO_{name.upper()}", raw)
                if not 0 <= values[name] <= top:
                    raise ConfigError(f"MNEMO_{name.upper()}", f"must be 0..{top}, got {raw!r}")
        if (raw := get("log_level")) is not None:
            if raw.upper() not in _LOG_LEVELS:
                raise ConfigError(
                    "MNEMO_LOG_LEVEL", f"expected one of {', '.join(_LOG_LEVELS)}, got {raw!r}"
                )
            values["log_level"] = raw.upper()
        for name in (
            "heartbeat_interval_s",
            "heartbeat_min_interval_s",
            "write_rate_per_s",
            "transfer_repair_after_s",
        ):
            raw = get(name)
            if raw is not None:
                values[name] = _parse_float(f"MNEMO_{name.upper()}", raw)
        if (raw := get("regions")) is not None:
            regions = tuple(r.strip() for r in raw.split(",") if r.strip())
            for region in regions:
                # Region names go inside Redis hash tags ("{us-east-2}") and key names.
                if not _REGION.match(region):
                    raise ConfigError(
                        "MNEMO_REGIONS",
                        f"bad region name {region!r} (letters, digits, '-', '_', '.')",
                    )
            values["regions"] = regions
        data_dir = Path(get("data_dir") or ".mnemo")
        values["data_dir"] = data_dir
        port = values.get("port", 8000)
        if not 0 < port < 65536:
            raise ConfigError("MNEMO_PORT", f"must be 1..65535, got {port}")
        if (raw := get("metrics_token")) is not None:
            if len(raw) < _MIN_METRICS_TOKEN:
                raise ConfigError(
                    "MNEMO_METRICS_TOKEN", f"must be at least {_MIN_METRICS_TOKEN} characters"
                )
            values["metrics_token"] = raw
        values.update(_stripe(get))
        if (raw := get("lease_key")) is not None:
            if len(raw) < 32:
                raise ConfigError("MNEMO_LEASE_KEY", "must be at least 32 characters")
            values["lease_key"] = raw
        secret = get("jwt_secret")
        if secret is not None and len(secret) < 32:
            raise ConfigError("MNEMO_JWT_SECRET", "must be at least 32 characters")
        values["jwt_secret"] = secret or _local_secret(data_dir)
        values["crypto"] = _crypto_from_env(env)
        return cls(**values)


_STRIPE_KEY_PREFIXES = ("sk_", "rk_")


def _stripe(get: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if (raw := get("stripe_secret_key")) is not None:
        if not raw.startswith(_STRIPE_KEY_PREFIXES):
            raise ConfigError(
                "MNEMO_STRIPE_SECRET_KEY",
                "expected a secret key (sk_...) or restricted key (rk_...)",
            )
        values["stripe_secret_key"] = raw
    if (raw := get("stripe_webhook_secret")) is not None:
        if not raw.startswith("whsec_"):
            raise ConfigError(
                "MNEMO_STRIPE_WEBHOOK_SECRET", "expected a signing secret (whsec_...)"
            )
        values["stripe_webhook_secret"] = raw
    for name in ("stripe_api_base", "stripe_connect_api_base", "stripe_checkout_api_base"):
        if (raw := get(name)) is not None:
            parts = urlsplit(raw)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"MNEMO_{name.upper()}", f"expected an http(s):// URL, got {mask_url(raw)!r}"
                )
            values[name] = raw.rstrip("/")
    return values


def _check_url(variable: str, raw: str, kind: str) -> str:
    if kind == "redis_url" and is_cluster_url(raw):
        try:
            parse_cluster_url(raw)
        except ValueError as exc:
            raise ConfigError(variable, f"{exc}: {mask_url(raw)!r}") from None
        return raw
    parts = urlsplit(raw)
    schemes = {
        "redis_url": ("redis", "rediss", "unix", *CLUSTER_SCHEMES),
        "database_url": ("postgres", "postgresql"),
    }
    if parts.scheme not in schemes[kind]:
        raise ConfigError(
            variable, f"expected a {'/'.join(schemes[kind])}:// URL, got {mask_url(raw)!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(variable, f"URL has no host: {mask_url(raw)!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(variable, f"URL has a malformed port: {mask_url(raw)!r}") from None
    return raw


def _parse_int(variable: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(variable, f"expected an integer, got {raw!r}") from None


def _parse_float(variable: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(variable, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(variable, f"must be positive, got {raw!r}")
    return value


def _local_secret(data_dir: Path) -> str:
    """A per-install JWT secret kept under the data folder, for the zero-config default."""
    path = data_dir / "jwt_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(secret)
    tmp.chmod(0o600)
    os.replace(tmp, path)
    return secret


def _load_dotenv(path: Path) -> None:
    from dotenv import load_dotenv

    load_dotenv(path, override=False)


_FINALITY_WORDS = {"eth": ("finalized",), "sol": ("finalized", "confirmed")}
_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,44}$")
_RATE = re.compile(r"^MNEMO_RATE_([A-Z0-9]{1,10})_USD$")


def _crypto_from_env(env: dict[str, str]) -> CryptoSettings | None:
    """The crypto rails' settings, or None when neither chain's RPC URL is set."""

    def get(name: str) -> str | None:
        raw = env.get(name)
        return raw.strip() if raw not in (None, "") and raw.strip() else None

    def need(name: str, why: str) -> str:
        raw = get(name)
        if raw is None:
            raise ConfigError(name, f"must be set {why}")
        return raw

    values: dict[str, Any] = {}
    if (eth := get("MNEMO_ETH_RPC_URL")) is not None:
        values["eth_rpc_url"] = _check_http("MNEMO_ETH_RPC_URL", eth)
        values["eth_chain_id"] = _parse_int(
            "MNEMO_ETH_CHAIN_ID", need("MNEMO_ETH_CHAIN_ID", "with MNEMO_ETH_RPC_URL")
        )
        if values["eth_chain_id"] < 1:
            raise ConfigError("MNEMO_ETH_CHAIN_ID", "must be a positive chain id")
        xpub = need("MNEMO_ETH_XPUB", "with MNEMO_ETH_RPC_URL (deposit addresses derive from it)")
        if not xpub.startswith("xpub"):
            raise ConfigError("MNEMO_ETH_XPUB", "expected an extended public key (xpub...)")
        values["eth_xpub"] = xpub
        if (token := get("MNEMO_ETH_TOKEN_ADDRESS")) is not None:
            if not _HEX_ADDRESS.match(token):
                raise ConfigError(
                    "MNEMO_ETH_TOKEN_ADDRESS", f"expected 0x and 40 hex digits, got {token!r}"
                )
            values["eth_token_address"] = token
        if (symbol := get("MNEMO_ETH_TOKEN_SYMBOL")) is not None:
            values["eth_token_symbol"] = _asset("MNEMO_ETH_TOKEN_SYMBOL", symbol)
        if (raw := get("MNEMO_ETH_TOKEN_DECIMALS")) is not None:
            values["eth_token_decimals"] = _decimals("MNEMO_ETH_TOKEN_DECIMALS", raw)
        if (raw := get("MNEMO_ETH_FINALITY")) is not None:
            values["eth_finality"] = _finality("MNEMO_ETH_FINALITY", raw, "eth")
    if (sol := get("MNEMO_SOL_RPC_URL")) is not None:
        values["sol_rpc_url"] = _check_http("MNEMO_SOL_RPC_URL", sol)
        why = "with MNEMO_SOL_RPC_URL"
        for name in ("sol_genesis_hash", "sol_recipient"):
            variable = f"MNEMO_{name.upper()}"
            values[name] = _base58(variable, need(variable, why))
        if (mint := get("MNEMO_SOL_USDC_MINT")) is not None:
            values["sol_usdc_mint"] = _base58("MNEMO_SOL_USDC_MINT", mint)
        if (raw := get("MNEMO_SOL_USDC_DECIMALS")) is not None:
            values["sol_usdc_decimals"] = _decimals("MNEMO_SOL_USDC_DECIMALS", raw)
        if (raw := get("MNEMO_SOL_FINALITY")) is not None:
            values["sol_finality"] = _finality("MNEMO_SOL_FINALITY", raw, "sol")
    if not values:
        return None
    rates = {"USDC": "1"}
    for variable, raw in env.items():
        if (m := _RATE.match(variable)) and raw.strip():
            rates[m.group(1)] = _rate(variable, raw.strip())
    values["fixed_rates"] = tuple(sorted(rates.items()))
    for name in ("rate_max_age_s", "request_ttl_s"):
        variable = f"MNEMO_{'CRYPTO_' if name == 'request_ttl_s' else ''}{name.upper()}"
        if (raw := get(variable)) is not None:
            values[name] = _parse_int(variable, raw)
            if values[name] < 1:
                raise ConfigError(variable, f"must be at least 1, got {raw!r}")
    if (raw := get("MNEMO_CRYPTO_RECHECK_INTERVAL_S")) is not None:
        values["recheck_interval_s"] = _parse_float("MNEMO_CRYPTO_RECHECK_INTERVAL_S", raw)
    return CryptoSettings(**values)


def _check_http(variable: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(variable, f"expected an http(s):// URL, got {mask_url(raw)!r}")
    return raw


def _base58(variable: str, raw: str) -> str:
    if not _BASE58.match(raw):
        raise ConfigError(variable, f"expected a base-58 key or hash, got {raw!r}")
    return raw


def _asset(variable: str, raw: str) -> str:
    if not re.fullmatch(r"[A-Z0-9]{1,10}", raw):
        raise ConfigError(variable, f"expected 1-10 capital letters or digits, got {raw!r}")
    return raw


def _decimals(variable: str, raw: str) -> int:
    value = _parse_int(variable, raw)
    if not 0 <= value <= 36:
        raise ConfigError(variable, f"must be 0..36, got {raw!r}")
    return value


def _rate(variable: str, raw: str) -> str:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(variable, f"expected a decimal number of USD, got {raw!r}") from None
    if not value.is_finite() or value <= 0:
        raise ConfigError(variable, f"must be a positive number of USD, got {raw!r}")
    return str(value)


def _finality(variable: str, raw: str, chain: str) -> tuple[FinalityTier, ...]:
    """`100:3,1000:12,*:finalized`: up to $100 three confirmations, up to $1,000 twelve, more:
    finalized. A lone rule (`12`, `finalized`) holds for every amount."""
    words = _FINALITY_WORDS[chain]
    tiers: list[FinalityTier] = []
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    for i, part in enumerate(parts):
        bound, _, rule = part.rpartition(":")
        last = i == len(parts) - 1
        if (bound in ("", "*")) != last:
            raise ConfigError(
                variable, "only the last tier may (and must) cover any amount (*:rule)"
            )
        if rule not in words and not (chain == "eth" and rule.isdigit() and int(rule) >= 1):
            allowed = " or ".join(
                (*words, "a number of confirmations") if chain == "eth" else words
            )
            raise ConfigError(variable, f"a tier's rule is {allowed}, got {rule!r}")
        max_pusd = None
        if not last:
            try:
                max_pusd = int(Decimal(bound) * 10**12)
            except InvalidOperation:
                raise ConfigError(
                    variable, f"a tier's bound is a USD amount, got {bound!r}"
                ) from None
            if tiers and tiers[-1].max_pusd is not None and max_pusd <= tiers[-1].max_pusd:
                raise ConfigError(variable, "tier bounds must increase")
        tiers.append(FinalityTier(max_pusd, rule))
    if not tiers:
        raise ConfigError(variable, "no tiers given")
    return tuple(tiers)
