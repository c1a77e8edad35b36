"""Settings read from the environment: parsing, defaults, masking, and one-line errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from engine.connection import parse_cluster_url
from engine.settings import ConfigError, Settings, mask_url

SECRET = "s3cr3t-" + "x" * 40


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {"MNEMO_DATA_DIR": str(tmp_path / "data")}
    env.update({f"MNEMO_{k.upper()}": v for k, v in values.items()})
    return env


def test_defaults_mean_embedded_servers(tmp_path: Path) -> None:
    """With nothing set, the URLs are unset (embedded servers) and the defaults apply."""
    s = Settings.from_env(_env(tmp_path))
    assert s.redis_url is None and s.database_url is None
    assert s.embedded
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.data_dir == tmp_path / "data"
    assert s.regions == ()


def test_values_are_parsed(tmp_path: Path) -> None:
    """Every kind of value is read from its MNEMO_* variable."""
    s = Settings.from_env(
        _env(
            tmp_path,
            redis_url="redis://127.0.0.1:6379/3",
            database_url="postgresql://app@db.internal:5433/mnemo",
            jwt_secret=SECRET,
            host="0.0.0.0",
            port="9000",
            heartbeat_interval_s="12.5",
            missed_heartbeats_offline="4",
            regions=" us-east-2, eu-west-1 ,,",
            log_level="debug",
            write_rate_per_s="2.5",
            write_burst="7",
            ws_connections_per_account="3",
            ws_channels_per_socket="9",
        )
    )
    assert s.redis_url == "redis://127.0.0.1:6379/3"
    assert s.database_url == "postgresql://app@db.internal:5433/mnemo"
    assert not s.embedded
    assert s.jwt_secret == SECRET
    assert (s.host, s.port) == ("0.0.0.0", 9000)
    assert s.heartbeat_interval_s == 12.5
    assert s.missed_heartbeats_offline == 4
    assert s.regions == ("us-east-2", "eu-west-1")
    assert s.log_level == "DEBUG"
    assert (s.write_rate_per_s, s.write_burst) == (2.5, 7)
    assert (s.ws_connections_per_account, s.ws_channels_per_socket) == (3, 9)


def test_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    """An empty MNEMO_* variable is the same as an absent one."""
    s = Settings.from_env(_env(tmp_path, redis_url="", port=""))
    assert s.redis_url is None and s.port == 8000


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    """repr/str mask the JWT secret, the metrics token and passwords inside URLs."""
    s = Settings.from_env(
        _env(
            tmp_path,
            jwt_secret=SECRET,
            database_url="postgresql://app:pg-pass-123@db:5432/mnemo",
            redis_url="redis://:redis-pass-456@cache:6379/0",
            metrics_token="scrape-token-abcdef-0123456789",
        )
    )
    assert s.metrics_token == "scrape-token-abcdef-0123456789"
    for text in (repr(s), str(s)):
        for secret in (SECRET, "pg-pass-123", "redis-pass-456", "scrape-token-abcdef-0123456789"):
            assert secret not in text
        assert "postgresql://app:***@db:5432/mnemo" in text
        assert "redis://:***@cache:6379/0" in text
    # The values themselves are intact for the code that uses them.
    assert s.database_url == "postgresql://app:pg-pass-123@db:5432/mnemo"


def test_mask_url_leaves_password_free_urls_alone() -> None:
    """URLs without a password are shown as they are."""
    assert (
        mask_url("postgresql://postgres@127.0.0.1:5432/x")
        == "postgresql://postgres@127.0.0.1:5432/x"
    )
    assert mask_url(None) is None


def test_local_jwt_secret_is_generated_once(tmp_path: Path) -> None:
    """Without MNEMO_JWT_SECRET a secret is made under the data folder, private, and reused."""
    first = Settings.from_env(_env(tmp_path))
    second = Settings.from_env(_env(tmp_path))
    assert len(first.jwt_secret) >= 32
    assert first.jwt_secret == second.jwt_secret
    path = tmp_path / "data" / "jwt_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("port", "eighty", "expected an integer"),
        ("port", "70000", "1..65535"),
        ("port", "0", "1..65535"),
        ("redis_url", "http://127.0.0.1:6379", "redis"),
        ("redis_url", "redis://", "no host"),
        ("database_url", "mysql://root@db/x", "postgres"),
        ("database_url", "postgresql://db:99999/x", "port"),
        ("database_url", "postgresql://db:abc/x", "port"),
        ("jwt_secret", "short", "at least 32"),
        ("heartbeat_interval_s", "-1", "positive"),
        ("heartbeat_interval_s", "nan", "positive"),
        ("heartbeat_min_interval_s", "soon", "number"),
        ("missed_heartbeats_offline", "0", "at least 1"),
        ("write_rate_per_s", "0", "positive"),
        ("ws_connections_per_account", "0", "at least 1"),
        ("jwt_ttl_s", "1.5", "integer"),
        ("log_level", "loud", "expected one of"),
        ("regions", "us-east-2,{bad}", "bad region"),
        ("redis_url", "redis+cluster://10.0.0.1", "not host:port"),
        ("redis_url", "redis+cluster://10.0.0.1:7000,10.0.0.2:x", "malformed port"),
        ("redis_url", "redis+cluster://10.0.0.1:7000/2", "no databases"),
        ("redis_url", "redis+cluster://10.0.0.1:7000?db=2", "takes no options"),
        ("redis_ack_replicas", "-1", "at least 0"),
        ("redis_ack_replicas", "one", "integer"),
        ("platform_fee_bps", "10001", "must be 0..10000"),
        ("platform_fee_bps", "ten", "integer"),
        ("max_open_contracts", "-1", "must be 0.."),
        ("transfer_repair_after_s", "0", "positive"),
    ],
)
def test_malformed_value_names_the_variable(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    """A malformed value raises ConfigError whose one-line text names the variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(_env(tmp_path, **{variable: value}))
    name = f"MNEMO_{variable.upper()}"
    assert caught.value.variable == name
    text = str(caught.value)
    assert text.startswith(f"{name}: ")
    assert says in text
    assert "\n" not in text


def test_a_cluster_url_names_its_seed_nodes(tmp_path: Path) -> None:
    """`redis+cluster://` lists seed nodes (credentials once for all), kept as given and
    masked in the repr; `rediss+cluster://` is the same over TLS."""
    url = "redis+cluster://app:p%40ss-secret-9@10.0.0.1:7000,[::1]:7001, node-3:7002"
    s = Settings.from_env(_env(tmp_path, redis_url=url, redis_ack_replicas="1"))
    assert s.redis_url == url and s.redis_ack_replicas == 1
    assert "p%40ss-secret-9" not in repr(s)
    parsed = parse_cluster_url(url)
    assert parsed.nodes == [("10.0.0.1", 7000), ("::1", 7001), ("node-3", 7002)]
    assert (parsed.username, parsed.password, parsed.ssl) == ("app", "p@ss-secret-9", False)
    assert parse_cluster_url("rediss+cluster://h:6380").ssl
    assert Settings.from_env(_env(tmp_path)).redis_ack_replicas == 0


def test_malformed_url_error_masks_the_password(tmp_path: Path) -> None:
    """The error for a bad URL does not print the password it contains."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(_env(tmp_path, database_url="mysql://root:hunter2-secret@db/x"))
    assert "hunter2-secret" not in str(caught.value)


def test_dotenv_file_is_read_and_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.env` in the working directory supplies values; real environment variables win."""
    monkeypatch.chdir(tmp_path)
    # Registered with monkeypatch so whatever load_dotenv puts in os.environ is undone.
    monkeypatch.delenv("MNEMO_PORT", raising=False)
    monkeypatch.delenv("MNEMO_HOST", raising=False)
    monkeypatch.setenv("MNEMO_LOG_LEVEL", "warning")
    monkeypatch.setenv("MNEMO_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / ".env").write_text("MNEMO_PORT=9123\nMNEMO_HOST=0.0.0.0\nMNEMO_LOG_LEVEL=debug\n")
    s = Settings.from_env()
    assert s.port == 9123
    assert s.host == "0.0.0.0"
    assert s.log_level == "WARNING"


def test_settings_are_frozen(tmp_path: Path) -> None:
    """Settings cannot be changed after start-up."""
    s = Settings.from_env(_env(tmp_path))
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_money_settings(tmp_path: Path) -> None:
    """The platform's fee, the caps and the transfer repair delay (issue 14) have defaults and
    are read from their variables."""
    default = Settings.from_env(_env(tmp_path))
    assert (default.platform_fee_bps, default.max_open_contracts, default.max_open_bids) == (
        1000,
        1000,
        1000,
    )
    given = Settings.from_env(
        _env(
            tmp_path,
            platform_fee_bps="250",
            max_open_contracts="0",
            max_open_bids="7",
            transfer_repair_after_s="1.5",
        )
    )
    assert (given.platform_fee_bps, given.max_open_contracts, given.max_open_bids) == (250, 0, 7)
    assert given.transfer_repair_after_s == 1.5
