"""Configuration: one frozen object read from the environment (and an optional `.env`).

Every process (gateway, engine, journal, the `mnemo` CLI) builds one `Settings` at start-up with
`Settings.from_env()`. A missing or malformed value raises `ConfigError`, whose `str` is one line
naming the variable; the CLI prints it and exits non-zero, never a traceback deep inside a driver.

`redis_url` / `database_url` left unset mean "use the embedded servers" (see `scripts.embedded`).
"""

from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

__all__ = ["ConfigError", "Settings", "mask_url"]


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


_SECRET_FIELDS = frozenset({"jwt_secret", "metrics_token"})
_URL_FIELDS = frozenset({"redis_url", "database_url"})
_MIN_METRICS_TOKEN = 24
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_REGION = re.compile(r"^[A-Za-z0-9_.-]+$")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """All of Mnemo's configuration. Build with `from_env()`; tests build it directly."""

    redis_url: str | None = None
    database_url: str | None = None
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
        ):
            raw = get(name)
            if raw is not None:
                values[name] = _parse_int(f"MNEMO_{name.upper()}", raw)
                if name != "port" and values[name] < 1:
                    raise ConfigError(f"MNEMO_{name.upper()}", f"must be at least 1, got {raw!r}")
        if (raw := get("log_level")) is not None:
            if raw.upper() not in _LOG_LEVELS:
                raise ConfigError(
                    "MNEMO_LOG_LEVEL", f"expected one of {', '.join(_LOG_LEVELS)}, got {raw!r}"
                )
            values["log_level"] = raw.upper()
        for name in ("heartbeat_interval_s", "heartbeat_min_interval_s", "write_rate_per_s"):
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
        secret = get("jwt_secret")
        if secret is not None and len(secret) < 32:
            raise ConfigError("MNEMO_JWT_SECRET", "must be at least 32 characters")
        values["jwt_secret"] = secret or _local_secret(data_dir)
        return cls(**values)


def _check_url(variable: str, raw: str, kind: str) -> str:
    parts = urlsplit(raw)
    schemes = {"redis_url": ("redis", "rediss", "unix"), "database_url": ("postgres", "postgresql")}
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
