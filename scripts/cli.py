"""The `mnemo` command: run the whole exchange, or one of its processes.

    mnemo up [--no-demo] [--fleet N]   everything in the Procfile (+ a demo fleet and renter bot)
    mnemo migrate                      apply pending schema migrations
    mnemo gateway [--workers N]        the HTTP/WebSocket API (uvicorn, uvloop, httptools)
    mnemo engine                       matching, expiry, settlement, failover, quotes
    mnemo journal                      Redis event streams -> Postgres
    mnemo journal-status               the journal's lag and the events it set aside
    mnemo journal-replay [--region R]  apply a region's history again (after a reject is mended)
    mnemo rebuild-live                 repopulate Redis's live market from Postgres
    mnemo crypto-reconcile [--apply]   on-chain payments against the ledger (re-ask lost credits)
    mnemo payouts run [--period DAY]   pay providers their earnings through Stripe Connect
    mnemo payments reconcile           finish and check card payments and payouts against Stripe
    mnemo servers [--migrate]          only the embedded Valkey/PostgreSQL, in the foreground

Configuration comes from `MNEMO_*` variables (see `engine.settings`). With `MNEMO_REDIS_URL` /
`MNEMO_DATABASE_URL` unset, `up`, `migrate` and `servers` start embedded servers under
`MNEMO_DATA_DIR`; the single-process commands need the URLs (`up` passes them to its children).

`mnemo up` keeps the exchange up: once it is serving, a process or embedded server that exits
by itself is started again with backoff (see `RestartPolicy`); only Ctrl-C or SIGTERM stops
everything.

Anything that keeps a command from starting (a malformed or missing setting, a server that cannot
be reached, a migration that cannot apply) is one line on stderr, `mnemo: error: ...`, and exit
status 2. The entry points of the other packages are imported inside their subcommand, so each
command works as soon as its own package does.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from engine.settings import ConfigError, Settings, mask_url

if TYPE_CHECKING:
    from scripts.embedded import EmbeddedServers

__all__ = ["PROCFILE", "StartupError", "main"]

EXIT_STARTUP = 2
DISTRIBUTION = "mnemo-exchange"
"""This project's distribution name (pyproject.toml); not "mnemo", an unrelated PyPI project."""
_GATEWAY_APP = "gateway.app:app_from_env"
_HEALTH_WAIT_S = 90.0
_STOP_WAIT_S = 10.0


class StartupError(Exception):
    """A command cannot start; `str()` is the one line shown, `details` optional lines below it."""

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.details = list(details)


class ProcessSpec(NamedTuple):
    """One line of the Procfile: a name and the command that runs it."""

    name: str
    argv: tuple[str, ...]


# The production process list; `mnemo up` runs these (the agent only as a demo fleet) and
# tests/test_cli.py checks that the Procfile says the same.
PROCFILE: tuple[ProcessSpec, ...] = (
    ProcessSpec("gateway", ("mnemo", "gateway")),
    ProcessSpec("engine", ("mnemo", "engine")),
    ProcessSpec("journal", ("mnemo", "journal")),
    ProcessSpec("agent", ("mnemo-agent", "--simulate", "1000")),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mnemo` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        _require_exchange()
        result: int = args.func(args)
        return result
    except ConfigError as e:
        return _fail(str(e))
    except StartupError as e:
        return _fail(str(e), e.details)
    except KeyboardInterrupt:
        return 130


def _configure_logging() -> None:
    # Settings validates MNEMO_LOG_LEVEL later (one clear line); an invalid value logs at INFO.
    level = os.environ.get("MNEMO_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnemo",
        description="Mnemo: an exchange for idle RAM and VRAM.",
        epilog="Configuration: MNEMO_* environment variables (README.md lists them).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole exchange (embedded servers unless URLs are set)")
    up.add_argument("--no-demo", action="store_true", help="no simulated fleet, no renter bot")
    up.add_argument(
        "--fleet", type=_positive_int, default=1000, metavar="N", help="virtual nodes (1000)"
    )
    up.set_defaults(func=_cmd_up)

    sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(
        func=_cmd_migrate
    )

    gw = sub.add_parser("gateway", help="serve the HTTP/WebSocket API")
    gw.add_argument("--workers", type=_positive_int, default=1, metavar="N")
    gw.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="no line per request"
    )
    gw.set_defaults(func=_cmd_gateway)

    eng = sub.add_parser("engine", help="run the matching engine loop")
    eng.add_argument("--regions", type=_region_list, default=None, metavar="R1,R2")
    eng.set_defaults(func=_cmd_engine)

    jr = sub.add_parser("journal", help="journal Redis event streams into Postgres")
    jr.add_argument("--consumer", default=None, help="consumer name in the group")
    jr.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="K/N",
        help="journal only the regions dealt to worker K of N (run N of them, K = 0..N-1)",
    )
    jr.set_defaults(func=_cmd_journal)

    sub.add_parser(
        "journal-status", help="show the journal's lag and the events it set aside"
    ).set_defaults(func=_cmd_journal_status)
    rp = sub.add_parser(
        "journal-replay",
        help="apply a region's stored history again, once the cause of its rejects is mended",
    )
    rp.add_argument(
        "--region",
        type=_region_list,
        default=(),
        metavar="R1,R2",
        help="regions to replay (default: every region with events set aside)",
    )
    rp.set_defaults(func=_cmd_journal_replay)
    cr = sub.add_parser(
        "crypto-reconcile",
        help="compare on-chain payments with the ledger; --apply re-asks credits it lacks",
    )
    cr.add_argument(
        "--apply",
        action="store_true",
        help="ask the market's credit again (same key: applied at most once) for each payment "
        "whose credit is not in the ledger",
    )
    cr.add_argument(
        "--min-age-s",
        type=float,
        default=60.0,
        help="ignore payments changed more recently than this (the journal's lag); default 60",
    )
    cr.set_defaults(func=_cmd_crypto_reconcile)
    sub.add_parser("rebuild-live", help="rebuild Redis's live market from Postgres").set_defaults(
        func=_cmd_rebuild_live
    )

    po = sub.add_parser("payouts", help="provider payouts through Stripe Connect")
    po_sub = po.add_subparsers(dest="payouts_command", required=True, metavar="ACTION")
    po_run = po_sub.add_parser(
        "run", help="pay each onboarded provider its earnings up to a day's end (once per day)"
    )
    po_run.add_argument(
        "--period",
        type=_day,
        default=None,
        metavar="YYYY-MM-DD",
        help="the settlement day (UTC) whose end earnings are paid up to (default: yesterday)",
    )
    po_run.set_defaults(func=_cmd_payouts_run)
    pm = sub.add_parser("payments", help="card payments through Stripe")
    pm_sub = pm.add_subparsers(dest="payments_command", required=True, metavar="ACTION")
    rec = pm_sub.add_parser(
        "reconcile",
        help="finish what Stripe finished, then compare Stripe's objects with the ledger",
    )
    rec.add_argument(
        "--days",
        type=_positive_int,
        default=2,
        metavar="N",
        help="also ask Stripe again about every card payment and payout of the last N days (2)",
    )
    rec.set_defaults(func=_cmd_payments_reconcile)
    for name, helptext in (
        ("credit", "credit a renter's balance (operator; ledgered with a reason)"),
        ("clawback", "take credit back from a renter's balance (operator; ledgered)"),
    ):
        money = sub.add_parser(name, help=helptext)
        money.add_argument("client_id", help="the renter profile (client) id")
        money.add_argument("amount_usd", type=_usd_amount, help="USD, e.g. 25 or 12.50")
        money.add_argument("--reason", required=True, help="why (kept in the ledger)")
        money.add_argument(
            "--key", default=None, help="idempotency key: the same key again changes nothing"
        )
        if name == "clawback":
            money.add_argument(
                "--allow-negative",
                action="store_true",
                help="take it even if the balance goes below zero (a debt)",
            )
        money.set_defaults(func=_cmd_money, clawback=name == "clawback")
    cl = sub.add_parser(
        "credit-line", help="grant (or withdraw, 0) a renter's postpaid credit line"
    )
    cl.add_argument("client_id", help="the renter profile (client) id")
    cl.add_argument("amount_usd", type=_usd_limit, help="USD the balance may go below zero")
    cl.set_defaults(func=_cmd_credit_line)

    srv = sub.add_parser("servers", help="run only the embedded Valkey and PostgreSQL")
    srv.add_argument("--migrate", action="store_true", help="also apply migrations")
    srv.set_defaults(func=_cmd_servers)
    return parser


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _day(raw: str) -> dt.date:
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a day as YYYY-MM-DD, got {raw!r}") from None


def _shard(raw: str) -> tuple[int, int]:
    k, sep, n = raw.partition("/")
    try:
        shard = (int(k), int(n))
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {raw!r}")
    return shard


def _usd_amount(raw: str) -> int:
    from scripts.money import parse_usd

    try:
        return parse_usd(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _usd_limit(raw: str) -> int:
    from scripts.money import parse_usd

    try:
        return parse_usd(raw, allow_zero=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _region_list(raw: str) -> tuple[str, ...]:
    return tuple(r.strip() for r in raw.split(",") if r.strip())


def _fail(message: str, details: Sequence[str] = ()) -> int:
    print(f"mnemo: error: {message}", file=sys.stderr)
    for line in details:
        print(f"  | {line}", file=sys.stderr)
    return EXIT_STARTUP


# --- commands -------------------------------------------------------------------------------


def _cmd_migrate(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if settings.database_url is not None:
        applied = _migrate(settings.database_url)
    else:
        with _embedded(settings, want_redis=False, want_postgres=True) as servers:
            assert servers is not None
            applied = _migrate(servers.database_url)
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def _cmd_servers(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    want_redis = settings.redis_url is None
    want_postgres = settings.database_url is None
    if not (want_redis or want_postgres):
        raise StartupError("MNEMO_REDIS_URL and MNEMO_DATABASE_URL are both set: nothing to start")
    with _stop_on_signals(), _embedded(settings, want_redis, want_postgres) as servers:
        assert servers is not None
        redis_url = servers.redis_url if want_redis else None
        database_url = servers.database_url if want_postgres else None
        if args.migrate and database_url:
            _migrate(database_url)
        if redis_url:
            print(f"MNEMO_REDIS_URL={redis_url}", flush=True)
        if database_url:
            print(f"MNEMO_DATABASE_URL={database_url}", flush=True)
        print(f"# data in {settings.data_dir.resolve()}; Ctrl-C stops them", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    settings = _settings_with_servers()
    _check_redis(settings)
    _check_database(settings)
    _require_module("gateway.app")
    import uvicorn

    uvicorn.run(
        _GATEWAY_APP,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        # /ws encodes each notification once for every subscriber; per-message deflate would
        # compress it again per socket (about 60% more CPU per frame, and a zlib context each).
        ws_per_message_deflate=False,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
        server_header=False,
    )
    return 0


def _cmd_engine(args: argparse.Namespace) -> int:
    settings = _settings_with_servers(need_database=False)
    _check_redis(settings)
    run_engine = _entry_point("engine.process", "run_engine")
    _run_until_signal(lambda stop: run_engine(settings, regions=args.regions, stop=stop))
    return 0


def _cmd_journal(args: argparse.Namespace) -> int:
    settings = _settings_with_servers()
    _check_redis(settings)
    _check_database(settings)
    run_journal = _entry_point("persistence.journal.worker", "run_journal")
    _run_until_signal(
        lambda stop: run_journal(settings, consumer=args.consumer, stop=stop, shard=args.shard)
    )
    return 0


def _cmd_journal_status(args: argparse.Namespace) -> int:
    settings = _settings_with_servers()
    _check_redis(settings)
    _check_database(settings)
    result = _entry_point("persistence.journal.status", "print_status")(settings)
    return _finish(result)


def _cmd_journal_replay(args: argparse.Namespace) -> int:
    settings = _settings_with_servers()
    _check_database(settings)
    result = _entry_point("persistence.journal.replay", "replay")(settings, args.region)
    return _finish(result)


def _cmd_crypto_reconcile(args: argparse.Namespace) -> int:
    settings = _settings_with_servers()
    _check_redis(settings)
    _check_database(settings)
    result = _entry_point("gateway.payments.crypto_reconcile", "reconcile")(
        settings, apply=args.apply, min_age_s=args.min_age_s
    )
    return _finish(result)


def _stripe_settings(*, need_redis: bool) -> Settings:
    settings = _settings_with_servers() if need_redis else Settings.from_env()
    if settings.database_url is None:
        raise ConfigError("MNEMO_DATABASE_URL", "not set")
    if not settings.stripe_secret_key:
        raise ConfigError("MNEMO_STRIPE_SECRET_KEY", "not set: Stripe is not configured")
    _check_database(settings)
    if need_redis:
        _check_redis(settings)
    return settings


def _cmd_payouts_run(args: argparse.Namespace) -> int:
    settings = _stripe_settings(need_redis=False)
    run = _entry_point("gateway.payments.stripe_payouts", "main")
    return _finish(run(settings, args.period))


def _cmd_payments_reconcile(args: argparse.Namespace) -> int:
    settings = _stripe_settings(need_redis=True)
    run = _entry_point("gateway.payments.stripe_reconcile", "main")
    return _finish(run(settings, days=args.days))


def _cmd_rebuild_live(args: argparse.Namespace) -> int:
    settings = _settings_with_servers()
    _check_redis(settings)
    _check_database(settings)
    result = _entry_point("persistence.rebuild", "rebuild_live")(settings)
    return _finish(result)


def _cmd_money(args: argparse.Namespace) -> int:
    settings = _settings_with_servers()
    _check_redis(settings)
    _check_database(settings)
    result = _entry_point("scripts.money", "credit_command")(
        settings,
        args.client_id,
        args.amount_usd,
        reason=args.reason,
        key=args.key,
        clawback=args.clawback,
        allow_negative=getattr(args, "allow_negative", False),
    )
    return _finish(result)


def _cmd_credit_line(args: argparse.Namespace) -> int:
    settings = _settings_with_servers()
    _check_database(settings)
    result = _entry_point("scripts.money", "credit_line_command")(
        settings, args.client_id, args.amount_usd
    )
    return _finish(result)


def _cmd_up(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    _check_port_free(settings)
    with _stop_on_signals():
        try:
            return _up(settings, args)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM while still starting: what had started was stopped on the way
            # out, and the user asked for exactly that.
            return 0


def _up(settings: Settings, args: argparse.Namespace) -> int:
    data_dir = settings.data_dir.resolve()
    want_redis, want_postgres = settings.redis_url is None, settings.database_url is None
    with _embedded(settings, want_redis, want_postgres) as servers:
        redis_url = settings.redis_url or (servers.redis_url if servers else None)
        database_url = settings.database_url or (servers.database_url if servers else None)
        assert redis_url is not None and database_url is not None
        if settings.redis_url is not None:
            _check_redis(settings)
        applied = _migrate(database_url)
        if applied:
            print(f"mnemo: applied migrations {', '.join(applied)}", flush=True)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        base = f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"
        env = dict(os.environ)
        env.update(
            MNEMO_REDIS_URL=redis_url,
            MNEMO_DATABASE_URL=database_url,
            MNEMO_DATA_DIR=str(data_dir),
            MNEMO_API_URL=base,
            MNEMO_AGENT_API_URL=base,
            PYTHONUNBUFFERED="1",
        )
        core = [_command(spec) for spec in PROCFILE if spec.name != "agent"]
        if settings.log_level != "DEBUG":
            # A line per request of the demo fleet and bot would drown everything else.
            core = [
                ProcessSpec(p.name, (*p.argv, "--no-access-log")) if p.name == "gateway" else p
                for p in core
            ]
        demo = (
            []
            if args.no_demo
            else _demo_processes(args.fleet, base, settings.ws_connections_per_account)
        )
        if any(p.name == "renter" for p in demo):
            # The bot trades with money an operator credited it (issue 14), as any renter does.
            provision = _entry_point("scripts.money", "provision_demo_renter")
            env["MNEMO_API_KEY"] = asyncio.run(
                provision(
                    msgspec.structs.replace(
                        settings, redis_url=redis_url, database_url=database_url
                    ),
                    data_dir,
                )
            )
        supervisor = _Supervisor(env)
        try:
            supervisor.start(core)
            if not _wait_healthy(f"{base}/healthz", supervisor):
                gone = supervisor.exited()
                reason = (
                    f"{gone[0]} exited ({_exit_text(gone[1])})"
                    if gone is not None
                    else f"the gateway did not answer {base}/healthz within {_HEALTH_WAIT_S:.0f} s"
                )
                return supervisor.stop(reason=reason)
            print(_banner(base, redis_url, database_url, data_dir, demo), flush=True)
            supervisor.start(demo)
            if servers is not None:
                # Only the servers `up` started: with a URL set, the operator owns that server.
                names = ["Valkey"] * want_redis + ["PostgreSQL"] * want_postgres
                supervisor.watch_servers(servers, names)
            return supervisor.wait()
        finally:
            supervisor.stop()


# --- pieces ---------------------------------------------------------------------------------


def _settings_with_servers(*, need_database: bool = True) -> Settings:
    """Settings for a single process, which needs real URLs (`mnemo up` passes them down)."""
    settings = Settings.from_env()
    hint = "not set (`mnemo up` sets it for its processes; `mnemo servers` prints one)"
    if settings.redis_url is None:
        raise ConfigError("MNEMO_REDIS_URL", hint)
    if need_database and settings.database_url is None:
        raise ConfigError("MNEMO_DATABASE_URL", hint)
    return settings


@contextmanager
def _embedded(
    settings: Settings, want_redis: bool, want_postgres: bool
) -> Iterator[EmbeddedServers | None]:
    """Embedded servers for what the settings leave unset (None when both URLs are set)."""
    if not (want_redis or want_postgres):
        yield None
        return
    from scripts.embedded import EmbeddedError, EmbeddedServers

    servers = EmbeddedServers(settings.data_dir, want_redis=want_redis, want_postgres=want_postgres)
    try:
        servers.start()
    except EmbeddedError as e:
        raise StartupError(str(e), e.log_tail) from None
    try:
        yield servers
    finally:
        try:
            servers.stop()
        except EmbeddedError as e:
            print(f"mnemo: warning: {e}", file=sys.stderr)


def _migrate(database_url: str) -> list[str]:
    from persistence.migrations import MigrationError, migrate

    try:
        return asyncio.run(migrate(database_url))
    except MigrationError as e:
        raise StartupError(f"migration: {e}") from None
    except Exception as e:
        problem = _connection_problem(e)
        if problem is None:
            raise
        raise ConfigError("MNEMO_DATABASE_URL", f"{problem} ({mask_url(database_url)})") from None


def _check_database(settings: Settings) -> None:
    assert settings.database_url is not None
    import asyncpg

    async def probe(url: str) -> None:
        conn = await asyncpg.connect(url, timeout=10)
        await conn.close()

    try:
        asyncio.run(probe(settings.database_url))
    except Exception as e:
        problem = _connection_problem(e)
        if problem is None:
            raise
        raise ConfigError(
            "MNEMO_DATABASE_URL", f"{problem} ({mask_url(settings.database_url)})"
        ) from None


def _check_redis(settings: Settings) -> None:
    assert settings.redis_url is not None
    import redis
    import redis.exceptions

    from engine.redis_url import is_cluster_url, parse_cluster_url

    try:
        if is_cluster_url(settings.redis_url):
            parsed = parse_cluster_url(settings.redis_url)
            host, port = parsed.nodes[0]
            client = redis.Redis(
                host=host,
                port=port,
                username=parsed.username,
                password=parsed.password,
                ssl=parsed.ssl,
                socket_connect_timeout=5,
                socket_timeout=5,
            )
        else:
            client = redis.Redis.from_url(
                settings.redis_url, socket_connect_timeout=5, socket_timeout=5
            )
    except ValueError as e:
        raise ConfigError("MNEMO_REDIS_URL", str(e)) from None
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as e:
        raise ConfigError(
            "MNEMO_REDIS_URL", f"cannot connect: {_one_line(e)} ({mask_url(settings.redis_url)})"
        ) from None
    finally:
        client.close()


def _check_port_free(settings: Settings) -> None:
    """Fail before starting anything if the gateway's address is taken (say, by another `up`)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((settings.host, settings.port))
        except OSError as e:
            raise ConfigError(
                "MNEMO_PORT", f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}"
            ) from None


def _connection_problem(e: BaseException) -> str | None:
    """A one-line reason if `e` means "this database cannot be used", else None."""
    import asyncpg

    if isinstance(e, OSError | TimeoutError):
        return f"cannot connect: {_one_line(e)}"
    if isinstance(e, asyncpg.InvalidCatalogNameError):
        return f"no such database: {_one_line(e)}"
    if isinstance(
        e,
        asyncpg.InvalidAuthorizationSpecificationError
        | asyncpg.InvalidPasswordError
        | asyncpg.InsufficientPrivilegeError,
    ):
        return f"access refused: {_one_line(e)}"
    if isinstance(e, asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError):
        return f"cannot connect: {_one_line(e)}"
    if isinstance(e, asyncpg.InterfaceError | asyncpg.ClientConfigurationError):
        return f"cannot use: {_one_line(e)}"
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


_EXCHANGE_EXTRA = re.compile(r"""\bextra\s*==\s*['"]exchange['"]""")
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _require_exchange() -> None:
    """Refuse to start, in one line, where the exchange's dependencies are not installed.

    A provider's install (the `agent` extra) has this command too; without the check, every
    subcommand would end in a traceback about some missing module. Outside an installed
    distribution (a bare checkout on PYTHONPATH) there is nothing to check against.
    """
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        name = _REQUIREMENT_NAME.match(spec.strip())
        if name is None or not _EXCHANGE_EXTRA.search(marker):
            continue
        try:
            importlib.metadata.distribution(name.group())
        except importlib.metadata.PackageNotFoundError:
            missing.append(name.group())
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise StartupError(
            f"the exchange's dependencies are not installed here (no {shown}); this install "
            "runs the node agent (mnemo-agent) only. The exchange needs the exchange extra: "
            "pip install '/path/to/mnemo-checkout[exchange]'"
        )


def _require_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and name.startswith(e.name):
            raise StartupError(f"{name} is not part of this checkout yet") from None
        raise StartupError(f"cannot import {name}: {e}") from None


def _entry_point(module: str, name: str) -> Callable[..., Any]:
    fn = getattr(_require_module(module), name, None)
    if not callable(fn):
        raise StartupError(f"{module} has no {name}()")
    return fn


def _finish(result: Any) -> int:
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    return result if isinstance(result, int) else 0


async def _awaited(aw: Awaitable[Any]) -> Any:
    return await aw


def _run_until_signal(run: Callable[[asyncio.Event], Awaitable[Any]]) -> None:
    """Run a long-lived coroutine until SIGINT/SIGTERM, which set its `stop` event."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(stop)

    try:
        import uvloop
    except ImportError:
        asyncio.run(runner())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(runner())


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM both raise KeyboardInterrupt, so every `finally` runs.

    SIGINT explicitly too: a shell starting us in the background hands us SIGINT ignored, and
    a supervisor must still stop on `kill -INT`.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, handler),
    }
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _command(spec: ProcessSpec) -> ProcessSpec:
    """A Procfile line as something this interpreter can run, console script or not."""
    program, *rest = spec.argv
    if program == "mnemo":
        return ProcessSpec(spec.name, (sys.executable, "-m", "scripts.cli", *rest))
    script = Path(sys.executable).parent / program
    found = str(script) if script.exists() else shutil.which(program)
    if found is None:
        raise StartupError(f"{program} is not installed (pip install -e '.[dev]')")
    return ProcessSpec(spec.name, (found, *rest))


_FLEET_NODES_PER_SOCKET = 25_000  # mnemo-agent --simulate's default --nodes-per-connection


def _demo_processes(fleet: int, base_url: str, sockets_per_account: int) -> list[ProcessSpec]:
    """A simulated fleet and a renter bot, where the agent package provides them."""
    procs: list[ProcessSpec] = []
    if importlib.util.find_spec("agent.cli") is not None:
        argv = ["mnemo-agent", "--simulate", str(fleet)]
        # The fleet is one account, a WebSocket per so many nodes: a big one spreads its nodes
        # over fewer, fuller sockets rather than be refused past the account's socket limit.
        if -(-fleet // _FLEET_NODES_PER_SOCKET) > sockets_per_account:
            argv += ["--nodes-per-connection", str(-(-fleet // sockets_per_account))]
        procs.append(_command(ProcessSpec("agent", tuple(argv))))
    if importlib.util.find_spec("scripts.renter_bot") is not None:
        procs.append(
            ProcessSpec("renter", (sys.executable, "-m", "scripts.renter_bot", "--api", base_url))
        )
    return procs


def _wait_healthy(url: str, supervisor: _Supervisor) -> bool:
    deadline = time.monotonic() + _HEALTH_WAIT_S
    while time.monotonic() < deadline:
        if supervisor.exited() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


def _banner(
    base: str, redis_url: str, database_url: str, data_dir: Path, demo: list[ProcessSpec]
) -> str:
    demo_line = (
        ", ".join(p.name for p in demo) if demo else "none (--no-demo, or not in this checkout)"
    )
    return "\n".join(
        [
            "",
            "mnemo is up",
            f"  web app   {base}/",
            f"  API       {base}/api",
            f"  docs      {base}/docs",
            f"  health    {base}/healthz",
            f"  Redis     {mask_url(redis_url)}",
            f"  Postgres  {mask_url(database_url)}",
            f"  data      {data_dir}",
            f"  demo      {demo_line}",
            "Ctrl-C stops everything.",
            "",
        ]
    )


class RestartPolicy(NamedTuple):
    """When `mnemo up` starts a process again after it exits by itself.

    Like systemd's `Restart=always` with a growing `RestartSec`: the first restart comes after
    `first_s`, each further one waits twice as long, up to `max_s`, while the process keeps
    exiting within `reset_after_s` of its start; one that ran longer than that counts as healthy,
    and its next exit starts over at `first_s`. There is no limit on attempts: a process that
    keeps failing is retried at `max_s` intervals for as long as `mnemo up` runs.
    """

    first_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay_s(self, streak: int) -> float:
        """The wait before restart number `streak` of a row of quick exits (1, 2, ...)."""
        return min(self.first_s * 2.0 ** max(0, streak - 1), self.max_s)


_CRASH_LOOP = 3
"""Quick exits in a row after which the log calls it a crash loop."""


class _Unit:
    """One supervised thing (a Procfile process or an embedded server) and its restart state."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.restarts = 0
        self.streak = 0
        """Exits in a row, each within the policy's `reset_after_s` of its start."""
        self.started_at = time.monotonic()
        self.due: float | None = None
        """When to start it again; None while it runs."""

    def launch(self) -> int:
        """Start it; its pid."""
        raise NotImplementedError

    def poll(self) -> int | None:
        """Its exit status once it ended by itself, else None."""
        raise NotImplementedError

    def reap(self) -> None:
        """Release what an exited run left behind."""


class _Child(_Unit):
    def __init__(self, spec: ProcessSpec, supervisor: _Supervisor) -> None:
        super().__init__(spec.name)
        self.spec = spec
        self.supervisor = supervisor
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> int:
        from scripts.embedded import parent_death_signal

        proc = subprocess.Popen(
            list(self.spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.supervisor.env,
            start_new_session=True,
            preexec_fn=parent_death_signal(signal.SIGTERM),
        )
        self.proc = proc
        pump = threading.Thread(
            target=self.supervisor._pump, args=(self.name, proc), name=f"pump-{self.name}"
        )
        pump.daemon = True
        pump.start()
        self.supervisor.pumps.append(pump)
        return proc.pid

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def reap(self) -> None:
        # Whatever the child left in its group (uvicorn workers, helpers) goes with it, so the
        # next run finds its port and its peers free.
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)


class _Server(_Unit):
    def __init__(self, name: str, servers: EmbeddedServers) -> None:
        super().__init__(name)
        self.servers = servers

    def launch(self) -> int:
        return self.servers.restart(self.name)

    def poll(self) -> int | None:
        return dict(self.servers.exited()).get(self.name)


class _Supervisor:
    """Runs child processes, prefixes their output, restarts them, and stops them all together.

    Each child gets a session (process group) of its own, so it and anything it spawns (uvicorn
    workers) are signalled as one, and the parent-death signal, so a `kill -9` of `mnemo up`
    still ends them. Until `wait()`, a child that exits is a failed start (the caller stops
    everything, `exited()` says who). From `wait()` on, the exchange is up and anything that
    exits by itself, children and the embedded servers given to `watch_servers` alike, is
    started again under the `RestartPolicy`, each on its own: the others keep running and
    reconnect by themselves. Only Ctrl-C or SIGTERM stops everything, in reverse start order
    (the demo fleet first, so it can sign off through a still-running gateway): SIGTERM, then
    SIGKILL after a grace period. The servers are stopped by their owner afterwards.

    Restarts happen in the calling (main) thread: the parent-death signal of a process follows
    the thread that started it.
    """

    def __init__(self, env: dict[str, str], policy: RestartPolicy | None = None) -> None:
        self.env = env
        self.policy = policy or RestartPolicy()
        self.units: list[_Unit] = []
        self.pumps: list[threading.Thread] = []
        self.print_lock = threading.Lock()
        self.width = 8
        self.stopped = False

    def watch_servers(self, servers: EmbeddedServers, names: Sequence[str]) -> None:
        """Restart the embedded servers `names` too when they exit (they run already)."""
        self.width = max([self.width, *(len(name) for name in names)])
        self.units[:0] = [_Server(name, servers) for name in names]

    def start(self, specs: Sequence[ProcessSpec]) -> None:
        for spec in specs:
            self.width = max(self.width, len(spec.name))
            child = _Child(spec, self)
            self.units.append(child)
            pid = child.launch()
            self._say(f"started {spec.name} (pid {pid})")

    def exited(self) -> tuple[str, int] | None:
        """The first child that has exited, and its status (while starting up)."""
        for unit in self.units:
            if isinstance(unit, _Child) and (code := unit.poll()) is not None:
                return unit.name, code
        return None

    def wait(self) -> int:
        """Keep everything running until Ctrl-C/SIGTERM; then stop the children. Returns 0."""
        try:
            while True:
                self._tick(time.monotonic())
                time.sleep(0.2)
        except KeyboardInterrupt:
            return self.stop(reason=None)

    def _tick(self, now: float) -> None:
        # Servers come first in `units`: a child due in the same tick finds them back.
        for unit in self.units:
            if unit.due is None:
                code = unit.poll()
                if code is not None:
                    unit.reap()
                    self._schedule(unit, now, f"exited {_exit_words(code)}")
            elif now >= unit.due:
                self._restart(unit)

    def _schedule(self, unit: _Unit, now: float, what: str, *, ran: bool = True) -> None:
        ran_s = now - unit.started_at
        healthy = ran and ran_s >= self.policy.reset_after_s
        unit.streak = 1 if healthy else unit.streak + 1
        unit.restarts += 1
        delay = self.policy.delay_s(unit.streak)
        unit.due = now + delay
        note = ""
        if unit.streak >= _CRASH_LOOP:
            note = (
                f"; crash loop: {unit.streak} exits in a row, each within "
                f"{self.policy.reset_after_s:.0f} s of its start; retrying with backoff up to "
                f"{self.policy.max_s:.0f} s"
            )
        self._say(
            f"{unit.name} {what} after {ran_s:.1f} s; restarting in {delay:.1f} s "
            f"(restart {unit.restarts}{note})"
        )

    def _restart(self, unit: _Unit) -> None:
        from scripts.embedded import EmbeddedError

        unit.started_at = time.monotonic()
        try:
            pid = unit.launch()
        except (EmbeddedError, OSError) as e:
            # Nothing of the failed start is left running (EmbeddedServers.restart stops what
            # it started; a child that could not be spawned has no process).
            self._schedule(unit, time.monotonic(), f"could not start ({_one_line(e)})", ran=False)
            return
        unit.due = None
        self._say(f"restarted {unit.name} (pid {pid}, restart {unit.restarts})")

    def stop(self, reason: str | None = None) -> int:
        """Stop every child (idempotent); 0 when asked to stop, 1 when `reason` says why."""
        if self.stopped:
            return 0 if reason is None else 1
        self.stopped = True
        if reason is not None:
            print(f"mnemo: error: {reason}; stopping everything", file=sys.stderr, flush=True)
        # A second Ctrl-C (or a SIGTERM) must not cut the stopping short.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for unit in reversed(self.units):
                if isinstance(unit, _Child) and unit.proc is not None:
                    self._end(unit.name, unit.proc)
            for pump in self.pumps:
                pump.join(timeout=2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0 if reason is None else 1

    def _end(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            self._say(f"stopping {name}")
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self._say(f"{name} did not stop within {_STOP_WAIT_S:.0f} s; killing it")
                proc.kill()
                proc.wait()
            self._say(f"{name} stopped ({_exit_text(proc.returncode)})")
        # Whatever the child left in its group (workers, helpers) goes with it.
        _signal_group(proc.pid, signal.SIGKILL)

    def _pump(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self._say(raw.decode(errors="replace").rstrip("\n"), name)
        proc.stdout.close()

    def _say(self, line: str, name: str = "mnemo") -> None:
        with self.print_lock:
            sys.stdout.write(f"{name:<{self.width}} | {line}\n")
            sys.stdout.flush()


def _exit_words(code: int) -> str:
    """How a process ended, for the restart log: "with signal 9 (SIGKILL)", "with exit code 1"."""
    if code < 0:
        try:
            return f"with signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"with signal {-code}"
    return f"with exit code {code}"


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"by {signal.Signals(-code).name}"
        except ValueError:
            return f"by signal {-code}"
    return f"exit code {code}"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    sys.exit(main())
