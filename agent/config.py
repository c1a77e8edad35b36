"""The node agent's configuration file (`node_config.json`) and its environment overrides.

The file holds the spec's fields (`api_url`, `api_key`, `node_type`, `name`, `region`, `latitude`,
`longitude`, `price_per_gb_sec`, `bandwidth_mbps`, `base_latency_ms`, `idle_schedule`,
`heartbeat_interval`) plus what the owner keeps back (`max_ram_gb`, `max_vram_gb`: the most Mnemo
may lease in total; unset means "whatever is free"), an optional IANA `timezone` for the idle
schedule, free-form string `metadata`, and the `node_id` the exchange assigned.

Delivery (the lease servers, `agent.lease_server`): `lease_listen` (the address they bind,
default `0.0.0.0`), `lease_advertise_host` (what renters dial; default: this machine's address
on the route to the exchange; behind NAT set the public address and forward `lease_ports`),
`lease_ports` (the TCP port range they take ports from, default `17000-17999`),
`lease_tls_cert` / `lease_tls_key` (PEM files: every lease served over TLS), `lease_dir` (where
their private directories go; default a fresh temporary directory).

Where it lives: `--config PATH`, else `$MNEMO_AGENT_CONFIG`, else
`$XDG_CONFIG_HOME/mnemo/node_config.json` (`~/.config/mnemo/...`) — never the working directory.

Overrides: every field can be set by `MNEMO_AGENT_<FIELD>` (e.g. `MNEMO_AGENT_API_KEY`,
`MNEMO_AGENT_MAX_RAM_GB=16`); an empty variable is ignored. Overrides are never written back:
`save_node_id` rewrites only the `node_id` key of the file as it is on disk.

Every problem surfaces as one `ConfigError` whose `str` names the file or variable and the field.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from agent.schedule import IdleSchedule, ScheduleError

__all__ = [
    "ENV_PREFIX",
    "AgentConfig",
    "ConfigError",
    "default_config_path",
    "load_config",
    "parse_port_range",
    "save_config",
    "save_node_id",
]

ENV_PREFIX = "MNEMO_AGENT_"

NodeType = Literal["datacenter", "edge_cluster", "mist_node"]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
_Region = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,49}$")]
_HOST = re.compile(r"[A-Za-z0-9.:_-]{1,253}\Z")


class ConfigError(Exception):
    """A configuration problem; `str()` is one line: where (file or variable) and what."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(source, problem)
        self.source = source
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.source}: {self.problem}"


class AgentConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One node's configuration, validated on construction (decode/convert)."""

    api_url: str
    api_key: Annotated[str, msgspec.Meta(min_length=1)]
    name: _Name
    region: _Region
    latitude: Annotated[float, msgspec.Meta(ge=-90, le=90)]
    longitude: Annotated[float, msgspec.Meta(ge=-180, le=180)]
    price_per_gb_sec: Annotated[float, msgspec.Meta(gt=0, le=1)]
    """Ask price in USD per GB-second (the spec's example: 0.0000008)."""
    node_type: NodeType = "mist_node"
    bandwidth_mbps: Annotated[int, msgspec.Meta(gt=0)] = 1000
    base_latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    idle_schedule: str = "always"
    timezone: str | None = None
    """IANA zone the idle schedule is read in; unset: the machine's local time."""
    heartbeat_interval: Annotated[float, msgspec.Meta(ge=5, le=3600)] = 60.0
    max_ram_gb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """The most RAM Mnemo may lease from this machine in total; unset: whatever is free."""
    max_vram_gb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """The most VRAM Mnemo may lease from this machine in total; unset: whatever is free."""
    metadata: dict[str, str] = {}
    node_id: str | None = None
    lease_listen: Annotated[str, msgspec.Meta(min_length=1)] = "0.0.0.0"
    """The address lease servers bind (`0.0.0.0`: every IPv4 interface, `::` for IPv6)."""
    lease_advertise_host: str | None = None
    """The host renters dial to reach a lease (a public IP or DNS name behind NAT); unset: the
    address of this machine on its route to the exchange."""
    lease_ports: str = "17000-17999"
    """The TCP ports lease servers take (one per lease); forward them when behind NAT."""
    lease_tls_cert: str | None = None
    """PEM certificate (chain) for TLS on every lease (with `lease_tls_key`)."""
    lease_tls_key: str | None = None
    lease_dir: str | None = None
    """Where lease servers' private directories go (unset: a fresh temporary directory)."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"api_url: expected an http(s):// URL, got {self.api_url!r}")
        try:
            IdleSchedule.parse(self.idle_schedule)
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        if self.timezone is not None:
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"timezone: unknown zone {self.timezone!r}") from None
        try:
            _ = self.lease_port_range
        except ValueError as exc:
            raise ValueError(f"lease_ports: {exc}") from None
        if (self.lease_tls_cert is None) != (self.lease_tls_key is None):
            raise ValueError("lease_tls_cert: lease_tls_cert and lease_tls_key come together")
        for name in ("lease_listen", "lease_advertise_host"):
            value = getattr(self, name)
            if value is not None and not _HOST.match(value):
                raise ValueError(f"{name}: expected a host name or an IP address, got {value!r}")

    def __repr__(self) -> str:
        shown = []
        for name in self.__struct_fields__:
            value: Any = getattr(self, name)
            if name == "api_key" and value:
                value = value[:4] + "***"
            shown.append(f"{name}={value!r}")
        return f"AgentConfig({', '.join(shown)})"

    __str__ = __repr__

    @property
    def schedule(self) -> IdleSchedule:
        return IdleSchedule.parse(self.idle_schedule)

    @property
    def zone(self) -> ZoneInfo | None:
        return ZoneInfo(self.timezone) if self.timezone else None

    @property
    def base_url(self) -> str:
        return self.api_url.rstrip("/")

    @property
    def lease_port_range(self) -> range:
        """`lease_ports` as a range (ValueError if malformed)."""
        return parse_port_range(self.lease_ports)


FIELDS: tuple[str, ...] = AgentConfig.__struct_fields__


def parse_port_range(text: str) -> range:
    """`"17000-17999"` (or one port, `"17000"`) -> range(17000, 18000); ValueError if not."""
    low_s, sep, high_s = text.strip().partition("-")
    try:
        low = int(low_s)
        high = int(high_s) if sep else low
    except ValueError:
        raise ValueError(f"expected a range like 17000-17999, got {text!r}") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"expected ports within 1-65535, the lower first, got {text!r}")
    return range(low, high + 1)


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """Where the config lives when no `--config` is given (never the working directory)."""
    env = os.environ if env is None else env
    if explicit := env.get(f"{ENV_PREFIX}CONFIG"):
        return Path(explicit).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mnemo" / "node_config.json"


def _env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in FIELDS:
        raw = env.get(f"{ENV_PREFIX}{name.upper()}")
        if raw not in (None, ""):
            found[name] = raw
    return found


def _read_raw(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file; create it with `mnemo-agent init`") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a JSON object at the top level")
    return raw


def _field_of(exc: msgspec.ValidationError) -> str | None:
    message = str(exc)
    if "- at `$." in message:
        return message.rsplit("- at `$.", 1)[1].split("`", 1)[0].split(".", 1)[0].split("[", 1)[0]
    head = message.split(":", 1)[0]
    return head if head in FIELDS else None


def build_config(
    values: Mapping[str, Any], *, source: str, env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Validate `values` (file contents) with `MNEMO_AGENT_*` overrides from `env` applied."""
    env = os.environ if env is None else env
    overrides: dict[str, Any] = dict(_env_overrides(env))
    if "metadata" in overrides:
        try:
            overrides["metadata"] = json.loads(overrides["metadata"])
        except json.JSONDecodeError:
            raise ConfigError(f"{ENV_PREFIX}METADATA", "expected a JSON object") from None
    # strict=False: environment values are strings ("16", "0.0000008") coerced to the field's type.
    try:
        config = msgspec.convert({**values, **overrides}, AgentConfig, strict=False)
    except msgspec.ValidationError as exc:
        field = _field_of(exc)
        where = f"{ENV_PREFIX}{field.upper()}" if field in overrides else source
        raise ConfigError(where, str(exc)) from None
    return config


def load_config(path: Path, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, override from the environment, and validate the config at `path`."""
    return build_config(_read_raw(path), source=str(path), env=env)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # the file holds an API key
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds: the rename is still atomic
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_config(path: Path, config: AgentConfig) -> None:
    """Write `config` to `path` atomically (0600), omitting unset optional fields."""
    raw = {k: v for k, v in msgspec.to_builtins(config).items() if v is not None}
    _write_atomic(path, json.dumps(raw, indent=2).encode() + b"\n")


def save_node_id(path: Path, node_id: str | None) -> None:
    """Record `node_id` in the file at `path` atomically, leaving every other key as on disk.

    Environment overrides are deliberately not persisted (an API key given by the environment
    stays out of the file).
    """
    raw = _read_raw(path)
    if node_id is None:
        raw.pop("node_id", None)
    else:
        raw["node_id"] = node_id
    _write_atomic(path, json.dumps(raw, indent=2).encode() + b"\n")
