"""Trust through the API: a node's measured uptime, standing and reputation where renters and
providers look, announced maintenance, the hourly history, the renter's stored preferences
applied to matching, and the `node:<node_id>` channel."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import redis.asyncio as aioredis

from engine import trust
from engine.notify import Notifier
from engine.types import Heartbeat, TrustEntry, TrustUpdated
from gateway import protocol
from persistence import ledger
from tests.gateway.conftest import (
    Gateway,
    assert_error,
    create_client,
    eventually,
    in_view,
    register_node,
    signup,
)
from tests.gateway.test_ws import Live, live, recv, subscribe  # noqa: F401  (the fixture)

W = trust.WINDOW_MS


async def _node(gw: Gateway, actor: Any, node_id: str) -> dict[str, Any]:
    r = await gw.client.get(f"/api/nodes/{node_id}", headers=actor.headers)
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_new_node_is_shown_as_new(gw: Gateway) -> None:
    """Not 99: a node without history scores 90 and says it is new, on the node and the
    marketplace; its reputation starts at 100 and it is not suspended."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    node_id = await register_node(gw, provider)
    node = await _node(gw, renter, node_id)
    assert (node["uptime_score"], node["uptime_new"], node["uptime_history_windows"]) == (
        90.0,
        True,
        0,
    )
    assert (node["reputation_score"], node["suspended"], node["cut_contracts"]) == (100, False, 0)
    offer = await in_view(gw, renter, node_id)
    assert (offer["uptime_score"], offer["uptime_new"], offer["reputation_score"]) == (
        90.0,
        True,
        100,
    )


async def test_announcing_maintenance(gw: Gateway) -> None:
    """The owner announces a window ahead (shown on the node), replaces or withdraws it; late,
    overlong or foreign announcements are refused with the field named."""
    owner, other = await signup(gw, "provider"), await signup(gw, "provider")
    node_id = await register_node(gw, owner)
    path = f"/api/nodes/{node_id}/maintenance"
    now = int(time.time() * 1000)
    start = now + 2 * 3_600_000
    r = await gw.client.post(
        path, json={"start_ms": now + 60_000, "end_ms": now + W}, headers=owner.headers
    )
    assert_error(r, 422, "invalid_request", "start_ms")
    r = await gw.client.post(
        path, json={"start_ms": start, "end_ms": start + 5 * W}, headers=owner.headers
    )
    assert_error(r, 422, "invalid_request", "end_ms")
    r = await gw.client.post(
        path, json={"start_ms": start, "end_ms": start + W}, headers=other.headers
    )
    assert_error(r, 403)
    r = await gw.client.post(
        path, json={"start_ms": start, "end_ms": start + W}, headers=owner.headers
    )
    assert r.status_code == 200, r.text
    assert (r.json()["maintenance_start_ms"], r.json()["maintenance_end_ms"]) == (start, start + W)
    # a pending window is replaced
    r = await gw.client.post(
        path, json={"start_ms": start + W, "end_ms": start + 3 * W}, headers=owner.headers
    )
    assert r.status_code == 200 and r.json()["maintenance_start_ms"] == start + W
    r = await gw.client.delete(path, headers=owner.headers)
    assert r.status_code == 200 and r.json()["maintenance_start_ms"] == 0
    assert_error(await gw.client.delete(path, headers=owner.headers), 404)
    node = await _node(gw, owner, node_id)
    assert (node["maintenance_start_ms"], node["maintenance_end_ms"]) == (0, 0)


async def test_stored_preferences_apply_to_requests(gw: Gateway) -> None:
    """A renter profile's min_reliability and max_latency_ms filter its requests' matches,
    unless the request gives its own."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    near = await register_node(gw, provider, base_latency_ms=0.8)
    far = await register_node(gw, provider, base_latency_ms=40.0)
    for node_id in (near, far):
        await in_view(gw, renter, node_id)

    async def profile(**prefs: Any) -> str:
        body = {"org_name": "prefs", "latitude": 40.7, "longitude": -73.8, **prefs}
        r = await gw.client.post("/api/clients", json=body, headers=renter.headers)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def matched(**body: Any) -> set[str]:
        request = {"ram_gb": 4, "vram_gb": 0, "max_price_per_gb_sec": 0.00001, **body}
        r = await gw.client.post("/api/marketplace/request", json=request, headers=renter.headers)
        assert r.status_code == 200, r.text
        return {m["node_id"] for m in r.json()["matches"]} & {near, far}

    strict = await profile(min_reliability=95.0)
    assert await matched(client_id=strict) == set()  # both new: 90
    assert await matched(client_id=strict, min_uptime_score=0) == {near, far}
    quick = await profile(max_latency_ms=10.0)
    assert await matched(client_id=quick) == {near}
    assert await matched(client_id=quick, max_latency_ms=100.0) == {near, far}
    # without client_id: the caller's first profile (min_reliability 95) applies
    assert await matched(max_latency_ms=100.0) == set()
    assert await matched(max_latency_ms=1.0, min_uptime_score=0) == {near}


async def test_scores_route(gw: Gateway, journal: None) -> None:
    """The node's hours from the journal: each one's up share and the score once it closed."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    node_id = await register_node(gw, provider)
    market = gw.state["market"]
    start = int(time.time() * 1000)
    beat = Heartbeat(node_id=node_id, available_ram_gb=64, available_vram_gb=0)
    # steady for 2-3 h but a silence of 30 min inside the next whole hour
    hour = (start // W + 1) * W
    for t in range(start + 60_000, hour + 2 * W + 120_000, 60_000):
        if not (hour + 600_000 <= t < hour + 2_400_000):
            [outcome] = await market.heartbeat(provider.user_id, [beat], t, 0)
            assert outcome.outcome == "ok"

    def rfc3339(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()

    async def scored() -> dict[str, Any] | None:
        r = await gw.client.get(
            f"/api/nodes/{node_id}/scores",
            params={"start": rfc3339(start - 86_400_000), "end": rfc3339(hour + 4 * W)},
            headers=renter.headers,
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        closed = {w["window_start_ms"] for w in body["windows"]}
        return body if {hour, hour + W} <= closed else None

    r = await gw.client.get(
        f"/api/nodes/{node_id}/scores",
        params={"start": "2000-01-01T00:00:00Z", "end": "2001-01-01T00:00:00Z"},
        headers=renter.headers,
    )
    assert_error(r, 422, field="start")  # more than 92 days
    body = await eventually(scored, timeout_s=30)
    ups = {w["window_start_ms"]: w["up_pct"] for w in body["windows"]}
    # silent about 28.5 min of that hour (30 min less the 90 s of grace, give or take the minute
    # between beats): about 52.5 % up
    assert 50 <= ups[hour] <= 54 and ups[hour + W] == 100
    assert body["uptime_new"] is True and body["uptime_history_windows"] >= 3
    node = await _node(gw, renter, node_id)
    assert node["uptime_score"] == body["uptime_score"] < 90.0


async def test_standing_is_told_on_the_node_channel(live: Live, redis: aioredis.Redis) -> None:  # noqa: F811
    """The engine's change of a node's standing reaches its owner on `node:<id>` (others are
    refused the channel) as a `TrustNotice`, told apart from the channel's contract notices by
    `event`; the agent's decoder reads both."""
    owner, other = await signup(live.gw, "provider"), await signup(live.gw, "provider")
    node_id = await register_node(live.gw, owner)
    theirs = await live.socket(other)
    reply = await subscribe(theirs, f"node:{node_id}")
    assert (reply["type"], reply["error"]["code"]) == ("error", "forbidden")
    mine = await live.socket(owner)
    assert (await subscribe(mine, f"node:{node_id}"))["type"] == "subscribed"
    node = await live.state["market"].get_node(node_id)
    assert node is not None
    entry = TrustEntry(
        node_id=node_id, uptime_score=55.5, uptime_windows=720, suspend_at_ms=86_400_007,
        notice="warned",
    )  # fmt: skip
    event = TrustUpdated(event_id="1-0", region=node.region, ts_ms=7, entries=[entry])
    for channel, message in Notifier(live.keys, node.region).on_event(event):
        await redis.publish(channel, message)
    got = await recv(mine)
    assert got["channel"] == f"node:{node_id}"
    assert got["data"] == {
        "event": "standing",
        "notice": "warned",
        "ts_ms": 7,
        "node_id": node_id,
        "uptime_score": 55.5,
        "uptime_history_windows": 720,
        "suspension_due_ms": 86_400_007,
        "suspended_since_ms": 0,
    }
    told = protocol.decode_event(got["channel"], json.dumps(got["data"]).encode())
    assert isinstance(told, protocol.TrustNotice) and told.suspension_due_ms == 86_400_007
    for s in (mine, theirs):
        await s.close()


async def test_stake_routes(gw: Gateway) -> None:
    """A provider locks part of its earnings as its node's stake (shown on the node and its
    marketplace offer), cannot lock more than it earned, and releases what the leases do not
    need (once per Idempotency-Key)."""
    owner = await signup(gw, "provider")
    node_id = await register_node(gw, owner)
    path = f"/api/nodes/{node_id}/stake"
    assert_error(await gw.client.post(path, json={"amount_usd": 1.0}, headers=owner.headers), 402)
    for route in (path, f"{path}/release"):  # less than the ledger's unit is no amount
        r = await gw.client.post(route, json={"amount_usd": 1e-13}, headers=owner.headers)
        assert_error(r, 422, field="amount_usd")
    # earnings: 5 USD credited to the provider in the ledger (as settlements would)
    await ledger.post_movement(
        gw.state["pool"],
        "test:earnings",
        "settle",
        [(ledger.provider(owner.user_id), 5 * 10**12), (ledger.rail("operator"), -5 * 10**12)],
    )
    r = await gw.client.post(
        path, json={"amount_usd": 2.0, "lock_id": "first"}, headers=owner.headers
    )
    assert r.status_code == 200, r.text
    assert (r.json()["stake_usd"], r.json()["stake_pusd"], r.json()["stake_required_pusd"]) == (
        2.0,
        2 * 10**12,
        0,
    )
    # the marketplace shows it on the node's offer (its market view follows the stake)

    async def offered() -> dict[str, Any] | None:
        r = await gw.client.get("/api/marketplace", params={"limit": 500}, headers=owner.headers)
        assert r.status_code == 200, r.text
        row = next((o for o in r.json()["offers"] if o["node_id"] == node_id), None)
        return row if row is not None and row["stake_pusd"] == 2 * 10**12 else None

    offer = await eventually(offered)
    assert (offer["stake_usd"], offer["stake_held_usd"], offer["stake_held_pusd"]) == (2.0, 0.0, 0)
    # the same lock again changes nothing
    r = await gw.client.post(
        path, json={"amount_usd": 2.0, "lock_id": "first"}, headers=owner.headers
    )
    assert r.status_code == 200 and r.json()["stake_pusd"] == 2 * 10**12
    refused = await gw.client.post(path, json={"amount_usd": 3.5}, headers=owner.headers)
    assert_error(refused, 402, "insufficient_funds", "amount_usd")
    assert refused.json()["error"]["shortfall_pusd"] == 5 * 10**11
    assert await ledger.balance(gw.state["pool"], ledger.provider(owner.user_id)) == 3 * 10**12
    # a release retried with its Idempotency-Key releases once
    once = {**owner.headers, "Idempotency-Key": "release-1"}
    r = await gw.client.post(f"{path}/release", json={"amount_usd": 0.5}, headers=once)
    assert r.status_code == 200 and r.json()["stake_pusd"] == 15 * 10**11
    again = await gw.client.post(f"{path}/release", json={"amount_usd": 0.5}, headers=once)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["stake_pusd"] == 15 * 10**11
    r = await gw.client.get(f"/api/nodes/{node_id}", headers=owner.headers)
    assert r.json()["stake_pusd"] == 15 * 10**11
    r = await gw.client.post(f"{path}/release", json={"amount_usd": 5.0}, headers=owner.headers)
    assert_error(r, 409, field="amount_usd")


async def test_the_statement_shows_each_nodes_trust(gw: Gateway, journal: None) -> None:
    """The provider's statement gives each node with contracts in its range the node's
    measured uptime, reputation, standing and stake, as `GET /api/nodes/{id}` does."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    node_id = await register_node(gw, provider)
    client_id = await create_client(gw, renter)
    take = {"client_id": client_id, "node_id": node_id, "ram_gb": 4, "vram_gb": 0}
    r = await gw.client.post("/api/contracts/create", json=take, headers=renter.headers)
    assert r.status_code == 201, r.text
    # settled a minute in (completed) while the node has no stake: half the provider's
    # earnings from it are held back into the stake
    await gw.state["market"].settle(r.json()["contract_id"], 0, r.json()["start_ms"] + 60_000)

    async def stated() -> dict[str, Any] | None:
        r = await gw.client.get("/api/payments/statement", headers=provider.headers)
        assert r.status_code == 200, r.text
        rows = [n for n in r.json()["nodes"] if n["node_id"] == node_id]
        return rows[0] if rows and rows[0]["stake_held_pusd"] else None

    row = await eventually(stated, timeout_s=30)
    node = await _node(gw, provider, node_id)
    assert node["delivered_contracts"] == 1 and node["stake_held_pusd"] > 0
    for field in (
        "uptime_score",
        "uptime_new",
        "reputation_score",
        "suspended",
        "suspension_due_ms",
        "stake_usd",
        "stake_pusd",
        "stake_held_usd",
        "stake_held_pusd",
    ):
        assert row[field] == node[field], field
    assert (row["uptime_score"], row["uptime_new"], row["reputation_score"]) == (90.0, True, 100)
    assert (row["suspended"], row["contracts"]) == (False, 1)
