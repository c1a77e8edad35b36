"""`mnemo-agent`: the node agent's command line.

    mnemo-agent init [--api-url URL --api-key KEY --name N --region R --lat X --lng Y
                      --price P ...]          write the config (asks for what is missing on a TTY)
    mnemo-agent run                          register if needed, heartbeat until SIGINT/SIGTERM
    mnemo-agent status [--json]              the config, this machine, and the node as the
                                             exchange sees it
    mnemo-agent --simulate N [--api-url URL] [--api-key KEY] [--interval S] ...
                                             drive N virtual nodes (demo fleet / load source)

`--config PATH` (or `MNEMO_AGENT_CONFIG`) picks the file; the default is
`~/.config/mnemo/node_config.json`. Exit codes: 0 done, 1 the agent stopped on a refusal
(message on stderr), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from agent.client import ApiError, Gateway, GatewayUnavailable
from agent.config import (
    ENV_PREFIX,
    AgentConfig,
    ConfigError,
    build_config,
    default_config_path,
    load_config,
    parse_port_range,
    save_config,
)
from agent.detect import GpuProbe, read_machine

__all__ = ["main"]

log = logging.getLogger("mnemo.agent")

_INIT_FLAGS: tuple[tuple[str, str, str, Callable[[str], Any]], ...] = (
    # (flag, config field, prompt, parser)
    ("--api-url", "api_url", "Exchange URL", str),
    ("--api-key", "api_key", "API key (provider account)", str),
    ("--name", "name", "Node name", str),
    ("--node-type", "node_type", "Node type (mist_node, edge_cluster, datacenter)", str),
    ("--region", "region", "Region (e.g. us-east-2)", str),
    ("--lat", "latitude", "Latitude", float),
    ("--lng", "longitude", "Longitude", float),
    ("--price", "price_per_gb_sec", "Ask price, USD per GB-second (e.g. 0.0000008)", float),
    ("--bandwidth", "bandwidth_mbps", "Bandwidth, Mbit/s", int),
    ("--latency", "base_latency_ms", "Base latency, ms", float),
    (
        "--idle-schedule",
        "idle_schedule",
        "Idle schedule ('always' or e.g. '9am-5pm, 11pm-7am')",
        str,
    ),
    ("--timezone", "timezone", "Time zone of the schedule (IANA, blank: this machine's)", str),
    ("--heartbeat-interval", "heartbeat_interval", "Heartbeat interval, s", float),
    ("--max-ram-gb", "max_ram_gb", "Most RAM to lend, GB (blank: whatever is free)", int),
    ("--max-vram-gb", "max_vram_gb", "Most VRAM to lend, GB (blank: whatever is free)", int),
)
_REQUIRED = ("api_url", "api_key", "name", "region", "latitude", "longitude", "price_per_gb_sec")
_DEFAULTS: dict[str, Any] = {"node_type": "mist_node", "idle_schedule": "always"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnemo-agent", description="Lend this machine's idle RAM and VRAM on Mnemo."
    )
    parser.add_argument(
        "--config", type=Path, help="config file (default: %(default)s)", default=None
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sim = parser.add_argument_group("simulation (--simulate N)")
    sim.add_argument("--simulate", type=int, metavar="N", help="drive N virtual nodes")
    sim.add_argument(
        "--api-url",
        dest="sim_api_url",
        metavar="URL",
        help="gateway for the fleet (default: $MNEMO_AGENT_API_URL or http://127.0.0.1:8000)",
    )
    sim.add_argument(
        "--api-key",
        dest="sim_api_key",
        metavar="KEY",
        help="provider key owning the fleet (default: sign up a new account)",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--regions", help="comma-separated regions to place nodes in (default: all)")
    sim.add_argument("--interval", type=float, default=60.0, help="seconds between a node's beats")
    sim.add_argument(
        "--min-gap",
        type=float,
        default=None,
        help="least seconds between two beats of one node (default 0.9 x interval)",
    )
    sim.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="registrations in flight when registering node by node (a gateway without "
        "batch registration; the fleet otherwise sends batches of 1,000, 4 in flight)",
    )
    sim.add_argument("--nodes-per-connection", type=int, default=25_000)
    sim.add_argument(
        "--notices",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="subscribe to node channels (default: on up to 20,000 nodes)",
    )
    sim.add_argument(
        "--churn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="simulate outages of unreliable nodes",
    )
    sim.add_argument("--state", type=Path, help="keep the fleet's key and node ids here to resume")
    sim.add_argument(
        "--lease-servers",
        type=int,
        default=16,
        metavar="N",
        help="most real lease servers the fleet runs at once (default %(default)s; 0: deliver "
        "nothing); past it a lease is not reported ready and the exchange fails it over",
    )
    sim.add_argument(
        "--lease-mib-per-gb",
        type=int,
        default=1,
        metavar="MIB",
        help="memory a simulated lease's server holds per leased GB (default %(default)s MiB)",
    )
    sim.add_argument(
        "--lease-ports",
        default="17000-17999",
        metavar="LOW-HIGH",
        help="ports the fleet's lease servers take (default %(default)s)",
    )
    sim.add_argument(
        "--lease-host",
        default="127.0.0.1",
        help="address the fleet's lease servers listen on and renters dial (default %(default)s)",
    )
    sim.add_argument("--duration", type=float, help="stop after this many seconds")

    # --config and -v also after the subcommand (`mnemo-agent run --config x.json`); SUPPRESS keeps
    # a value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    init = sub.add_parser("init", help="write the config file", parents=[common])
    for flag, field, _, parse in _INIT_FLAGS:
        init.add_argument(flag, dest=field, type=parse, default=None)
    init.add_argument(
        "--metadata",
        type=json.loads,
        default=None,
        help='extra descriptive metadata as JSON, e.g. \'{"cooling": "water"}\'',
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing config")
    init.add_argument("--no-input", action="store_true", help="never prompt")
    sub.add_parser("run", help="run the agent until SIGINT/SIGTERM", parents=[common])
    status = sub.add_parser(
        "status", help="show the config, this machine and the node", parents=[common]
    )
    status.add_argument("--json", action="store_true")
    return parser


def _config_path(args: argparse.Namespace) -> Path:
    return args.config.expanduser() if args.config else default_config_path()


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        # Connection chatter from the HTTP/WebSocket libraries is noise for a provider.
        for name in ("httpx", "httpcore", "websockets"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _run_until_signal(make: Callable[[asyncio.Event], Any], duration_s: float | None = None) -> Any:
    """Run `make(stop)` with SIGINT/SIGTERM (and an optional deadline) setting `stop`."""

    async def runner() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread / Windows
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
        if duration_s is not None:
            loop.call_later(duration_s, stop.set)
        return await make(stop)

    return asyncio.run(runner())


# -- init --------------------------------------------------------------------------------------


def _prompt(label: str, default: Any) -> str:
    suffix = f" [{default}]" if default not in (None, "") else ""
    return input(f"{label}{suffix}: ").strip()


def cmd_init(args: argparse.Namespace) -> int:
    path = _config_path(args)
    if path.exists() and not args.force:
        print(f"{path} exists; use --force to overwrite it", file=sys.stderr)
        return 2
    values: dict[str, Any] = {
        field: getattr(args, field)
        for _, field, _, _ in _INIT_FLAGS
        if getattr(args, field) is not None
    }
    if args.metadata:
        values["metadata"] = args.metadata
    interactive = sys.stdin.isatty() and not args.no_input
    for _, field, label, parse in _INIT_FLAGS:
        if field in values or os.environ.get(f"{ENV_PREFIX}{field.upper()}"):
            continue
        if not interactive:
            if field in _DEFAULTS:
                values[field] = _DEFAULTS[field]
            continue
        while True:
            raw = _prompt(label, _DEFAULTS.get(field))
            if not raw:
                if field in _DEFAULTS:
                    values[field] = _DEFAULTS[field]
                if field not in _REQUIRED or field in values:
                    break
                print(f"  {field} is required")
                continue
            try:
                values[field] = parse(raw)
                break
            except ValueError:
                print(f"  not a valid {parse.__name__}: {raw!r}")
    missing = [
        f for f in _REQUIRED if f not in values and not os.environ.get(f"{ENV_PREFIX}{f.upper()}")
    ]
    if missing:
        flags = {field: flag for flag, field, _, _ in _INIT_FLAGS}
        print("missing: " + ", ".join(flags[f] for f in missing), file=sys.stderr)
        return 2
    try:
        # Validate what goes into the file on its own (an env value must not hide a bad flag).
        config = build_config(values, source="mnemo-agent init", env={})
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    save_config(path, config)
    print(f"wrote {path}")
    return 0


# -- run ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from agent.runner import AgentStopped, NodeAgent

    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    log.info(
        "Mnemo node agent: %s (%s, %s); config %s",
        config.name,
        config.node_type,
        config.region,
        path,
    )

    async def main(stop: asyncio.Event) -> None:
        await NodeAgent(config, path).run(stop)

    try:
        _run_until_signal(main)
    except AgentStopped as exc:
        print(f"mnemo-agent: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    log.info("agent stopped")
    return 0


# -- status ------------------------------------------------------------------------------------


async def _status(config: AgentConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    gpus = GpuProbe.open()
    try:
        machine = read_machine(gpus)
    finally:
        gpus.close()
    out["machine"] = msgspec.to_builtins(machine) | {
        "total_vram_gb": machine.total_vram_gb,
        "free_vram_gb": machine.free_vram_gb,
    }
    from datetime import datetime

    zone = config.zone
    local = datetime.now(zone) if zone is not None else datetime.now().astimezone()
    out["idle_now"] = config.schedule.is_idle_at(local)
    if config.node_id is None:
        out["node"] = None
        return out
    async with Gateway(config.base_url, config.api_key) as gateway:
        try:
            out["node"] = await gateway.get_node(config.node_id)
            out["contracts"] = await gateway.node_contracts(config.node_id)
        except (ApiError, GatewayUnavailable) as exc:
            out["node_error"] = str(exc)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    report = asyncio.run(_status(config))
    if args.json:
        config_out = msgspec.to_builtins(config) | {"api_key": config.api_key[:4] + "***"}
        print(json.dumps({"config_path": str(path), "config": config_out, **report}, indent=2))
        return 0 if "node_error" not in report else 1
    m = report["machine"]
    gpu = m["gpu"]
    print(f"config      {path}")
    print(
        f"node        {config.name} ({config.node_type}, {config.region}) id={config.node_id or '-'}"
    )
    print(f"exchange    {config.base_url}")
    print(
        f"machine     RAM {m['free_ram_gb']}/{m['total_ram_gb']} GB free, "
        f"VRAM {m['free_vram_gb']}/{m['total_vram_gb']} GB free, "
        f"GPU {gpu['model'] or 'none'}"
    )
    limits = (
        f"RAM {config.max_ram_gb if config.max_ram_gb is not None else 'all free'}, "
        f"VRAM {config.max_vram_gb if config.max_vram_gb is not None else 'all free'}"
    )
    print(
        f"lending     {limits}; schedule '{config.idle_schedule}' "
        f"({'open' if report['idle_now'] else 'closed'} now)"
    )
    if "node_error" in report:
        print(f"exchange    error: {report['node_error']}")
        return 1
    node = report.get("node")
    if node:
        last_ms = node["last_heartbeat_ms"]
        ago = f"{max(0.0, time.time() - last_ms / 1000):.0f} s ago" if last_ms else "never"
        print(f"status      {node['status']}, last heartbeat {ago}")
        print(
            f"capacity    offered {node['offered_ram_gb']} GB RAM + {node['offered_vram_gb']} GB VRAM, "
            f"leased {node['reserved_ram_gb']} + {node['reserved_vram_gb']}, "
            f"free {node['available_ram_gb']} + {node['available_vram_gb']}"
        )
        print(f"price       ${node['price_per_gb_sec']:.12g} per GB-second")
        contracts = report.get("contracts", [])
        print(f"contracts   {len(contracts)} active")
        for c in contracts:
            print(
                f"  {c['contract_id']}  {c['ram_gb']} GB RAM + {c['vram_gb']} GB VRAM until {c['end_ms']}"
            )
    return 0


# -- simulate ----------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from agent.fleet import run_fleet

    if args.simulate < 1:
        print("--simulate needs N >= 1", file=sys.stderr)
        return 2
    api_url = args.sim_api_url or os.environ.get(f"{ENV_PREFIX}API_URL") or "http://127.0.0.1:8000"
    api_key = args.sim_api_key or os.environ.get(f"{ENV_PREFIX}API_KEY") or None
    regions = [r.strip() for r in args.regions.split(",") if r.strip()] if args.regions else None
    if args.lease_servers < 0 or args.lease_mib_per_gb < 1:
        print("--lease-servers needs N >= 0, --lease-mib-per-gb MIB >= 1", file=sys.stderr)
        return 2
    try:
        lease_ports = parse_port_range(args.lease_ports)
    except ValueError as exc:
        print(f"--lease-ports: {exc}", file=sys.stderr)
        return 2

    async def main(stop: asyncio.Event) -> Any:
        return await run_fleet(
            api_url,
            args.simulate,
            stop=stop,
            api_key=api_key,
            seed=args.seed,
            regions=regions,
            interval_s=args.interval,
            min_gap_s=args.min_gap,
            concurrency=args.concurrency,
            nodes_per_connection=args.nodes_per_connection,
            notices=args.notices,
            churn=args.churn,
            state_path=args.state,
            lease_servers=args.lease_servers,
            lease_mib_per_gb=args.lease_mib_per_gb,
            lease_ports=lease_ports,
            lease_host=args.lease_host,
        )

    try:
        stats = _run_until_signal(main, args.duration)
    except (ApiError, ValueError) as exc:
        print(f"mnemo-agent: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        return 0
    print(json.dumps(stats.snapshot()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mnemo-agent` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.simulate is not None:
        return cmd_simulate(args)
    match args.command:
        case "init":
            return cmd_init(args)
        case "run":
            return cmd_run(args)
        case "status":
            return cmd_status(args)
        case _:
            parser.print_help()
            return 2


if __name__ == "__main__":
    sys.exit(main())
