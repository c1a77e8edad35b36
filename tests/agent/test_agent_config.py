"""The agent's config file: validation with clear errors, env overrides, atomic node_id write-back."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.config import (
    ConfigError,
    default_config_path,
    load_config,
    save_config,
    save_node_id,
)

SPEC_CONFIG = {
    "api_url": "https://api.mnemo.io",
    "api_key": "your_api_key_here",
    "node_type": "mist_node",
    "name": "Alice_RTX4090",
    "region": "us-east-2",
    "latitude": 40.7282,
    "longitude": -73.7949,
    "price_per_gb_sec": 0.0000008,
    "bandwidth_mbps": 980,
    "base_latency_ms": 0.8,
    "idle_schedule": "9am-5pm, 11pm-7am",
    "heartbeat_interval": 60,
}


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_spec_config_file_loads(tmp_path: Path) -> None:
    """The spec's node_config.json is a valid config as it stands."""
    cfg = load_config(_write(tmp_path / "c.json", SPEC_CONFIG), env={})
    assert cfg.name == "Alice_RTX4090"
    assert cfg.heartbeat_interval == 60.0
    assert cfg.max_ram_gb is None and cfg.node_id is None
    assert cfg.schedule.is_idle(10 * 60)
    assert "your***" in repr(cfg) and "your_api_key_here" not in repr(cfg)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"price_per_gb_sec": -1}, "price_per_gb_sec"),
        ({"latitude": 123}, "latitude"),
        ({"node_type": "mainframe"}, "node_type"),
        ({"api_url": "ftp://x"}, "api_url"),
        ({"idle_schedule": "9am-9am"}, "idle_schedule"),
        ({"heartbeat_interval": 1}, "heartbeat_interval"),
        ({"max_ram_gb": -4}, "max_ram_gb"),
        ({"lease_ports": "18000-17000"}, "lease_ports"),
        ({"lease_ports": "17000-99999"}, "lease_ports"),
        ({"lease_ports": "many"}, "lease_ports"),
        ({"lease_tls_cert": "/etc/cert.pem"}, "lease_tls_cert"),
        ({"lease_listen": "0.0.0.0 evil"}, "lease_listen"),
        ({"lease_advertise_host": "a/b"}, "lease_advertise_host"),
        ({"region": "US East"}, "region"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_values_are_named(tmp_path: Path, change: dict, fragment: str) -> None:
    """Each invalid value yields a ConfigError naming the file and the field."""
    path = _write(tmp_path / "c.json", SPEC_CONFIG | change)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_field_and_bad_json(tmp_path: Path) -> None:
    """A missing required field, malformed JSON and a missing file each give a one-line error."""
    missing = {k: v for k, v in SPEC_CONFIG.items() if k != "api_key"}
    with pytest.raises(ConfigError, match="api_key"):
        load_config(_write(tmp_path / "a.json", missing), env={})
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "b.json", env={})
    with pytest.raises(ConfigError, match="mnemo-agent init"):
        load_config(tmp_path / "nope.json", env={})


def test_env_overrides_win_and_are_coerced(tmp_path: Path) -> None:
    """MNEMO_AGENT_* variables override the file, strings coerced to the field's type."""
    path = _write(tmp_path / "c.json", SPEC_CONFIG)
    env = {
        "MNEMO_AGENT_API_KEY": "from-env",
        "MNEMO_AGENT_MAX_RAM_GB": "16",
        "MNEMO_AGENT_HEARTBEAT_INTERVAL": "30",
        "MNEMO_AGENT_METADATA": '{"cooling": "water"}',
        "MNEMO_AGENT_NAME": "",  # empty: ignored
    }
    cfg = load_config(path, env=env)
    assert cfg.api_key == "from-env"
    assert cfg.max_ram_gb == 16
    assert cfg.heartbeat_interval == 30.0
    assert cfg.metadata == {"cooling": "water"}
    assert cfg.name == "Alice_RTX4090"


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    """A malformed override is reported against the variable, not the file."""
    path = _write(tmp_path / "c.json", SPEC_CONFIG)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"MNEMO_AGENT_MAX_VRAM_GB": "lots"})
    assert info.value.source == "MNEMO_AGENT_MAX_VRAM_GB"


def test_node_id_written_back_to_the_same_file_atomically(tmp_path: Path) -> None:
    """save_node_id rewrites the file in place (0600), keeps its keys, never persists env values."""
    path = _write(tmp_path / "node.json", SPEC_CONFIG)
    cwd_before = set(os.listdir(Path.cwd()))
    save_node_id(path, "n" * 32)
    raw = json.loads(path.read_text())
    assert raw == SPEC_CONFIG | {"node_id": "n" * 32}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["node.json"]  # no temp file left
    assert set(os.listdir(Path.cwd())) == cwd_before  # nothing written to the working directory
    cfg = load_config(path, env={"MNEMO_AGENT_API_KEY": "secret-from-env"})
    assert cfg.node_id == "n" * 32
    save_node_id(path, "m" * 32)
    assert "secret-from-env" not in path.read_text()


def test_save_config_round_trips(tmp_path: Path) -> None:
    """save_config writes a file load_config reads back equal, creating the folder."""
    cfg = load_config(_write(tmp_path / "c.json", SPEC_CONFIG | {"max_vram_gb": 8}), env={})
    target = tmp_path / "deep" / "dir" / "node_config.json"
    save_config(target, cfg)
    assert load_config(target, env={}) == cfg
    assert "timezone" not in json.loads(target.read_text())  # unset optionals omitted


def test_default_path_is_never_the_working_directory(tmp_path: Path) -> None:
    """Without --config the file lives under XDG_CONFIG_HOME (or ~/.config), or where the env says."""
    assert default_config_path({"XDG_CONFIG_HOME": str(tmp_path)}) == (
        tmp_path / "mnemo" / "node_config.json"
    )
    assert (
        default_config_path({"MNEMO_AGENT_CONFIG": str(tmp_path / "x.json")}) == tmp_path / "x.json"
    )
    assert default_config_path({}).parent.parent == Path.home() / ".config"


def test_init_writes_a_valid_config_from_flags(tmp_path: Path) -> None:
    """`mnemo-agent init` with flags writes a file `run` can load; missing flags exit 2."""
    from agent.cli import main

    path = tmp_path / "cfg" / "node.json"
    common = ["--config", str(path), "init", "--no-input"]
    assert main([*common, "--api-url", "http://127.0.0.1:8000", "--api-key", "k"]) == 2
    assert not path.exists()
    flags = [
        "--api-url", "http://127.0.0.1:8000", "--api-key", "mk_test", "--name", "Bob_3090",
        "--region", "us-west-1", "--lat", "37.77", "--lng", "-122.42", "--price", "0.0000009",
        "--max-vram-gb", "12", "--idle-schedule", "11pm-7am", "--timezone", "America/Los_Angeles",
    ]  # fmt: skip
    assert main([*common, *flags]) == 0
    cfg = load_config(path, env={})
    assert (cfg.name, cfg.region, cfg.max_vram_gb, cfg.node_type) == (
        "Bob_3090",
        "us-west-1",
        12,
        "mist_node",
    )
    assert cfg.schedule.is_idle(0) and not cfg.schedule.is_idle(12 * 60)
    assert main([*common, *flags]) == 2  # exists: --force needed
    assert main([*common, *flags, "--force", "--price", "-1"]) == 2  # invalid: file untouched
    assert load_config(path, env={}).price_per_gb_sec == pytest.approx(0.0000009)


def test_lease_settings_default_and_parse(tmp_path: Path) -> None:
    """Delivery's keys default to every interface and ports 17000-17999; a range parses."""
    cfg = load_config(_write(tmp_path / "c.json", SPEC_CONFIG), env={})
    assert (cfg.lease_listen, cfg.lease_advertise_host) == ("0.0.0.0", None)
    assert cfg.lease_port_range == range(17000, 18000)
    cfg = load_config(
        _write(tmp_path / "d.json", SPEC_CONFIG | {"lease_ports": "42000"}),
        env={"MNEMO_AGENT_LEASE_ADVERTISE_HOST": "node7.example.net"},
    )
    assert cfg.lease_port_range == range(42000, 42001)
    assert cfg.lease_advertise_host == "node7.example.net"
