"""`POST /api/nodes/register/batch`: many nodes in one call, all or none, idempotent."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.schemas import MAX_REGISTER_BATCH

from .conftest import (
    LONDON,
    Actor,
    Gateway,
    assert_error,
    eventually,
    in_view,
    listed,
    node_body,
    signup,
)

BATCH = "/api/nodes/register/batch"


async def registered(gw: Gateway) -> int:
    """Nodes registered in the market, in every region."""
    return len(await gw.state["market"].nodes())


def bodies(count: int, **overrides: Any) -> list[dict[str, Any]]:
    """`count` distinct registration bodies, every third one in London (eu-west-1)."""
    out = []
    for i in range(count):
        body = node_body(name=f"batch-{i}", total_ram_gb=16 + i, **overrides)
        if i % 3 == 2:
            body.update(region="eu-west-1", latitude=LONDON[0], longitude=LONDON[1])
        out.append(body)
    return out


async def own_nodes(gw: Gateway, provider: Actor) -> list[dict[str, Any]]:
    r = await gw.client.get(
        "/api/nodes", params={"mine": "true", "limit": 500}, headers=provider.headers
    )
    assert r.status_code == 200, r.text
    return r.json()["nodes"]


async def test_batch_registers_nodes_that_list_trade_and_heartbeat(
    gw: Gateway, journal: None
) -> None:
    """Every node of a batch is registered as a single registration would register it: live,
    in the market, journaled into the listing, heartbeating; ids come back in order."""
    api = gw.client
    provider = await signup(gw, "provider")
    sent = bodies(5)
    r = await api.post(BATCH, json={"nodes": sent}, headers=provider.headers)
    assert r.status_code == 201, r.text
    ids = r.json()["node_ids"]
    assert len(ids) == len(set(ids)) == 5
    for node_id, body in zip(ids, sent, strict=True):
        got = await api.get(f"/api/nodes/{node_id}", headers=provider.headers)
        assert got.status_code == 200, got.text
        node = got.json()
        assert (node["name"], node["region"], node["total_ram_gb"]) == (
            body["name"], body["region"], body["total_ram_gb"],
        )  # fmt: skip
        assert (node["owner_id"], node["status"], node["available_ram_gb"]) == (
            provider.user_id, "active", body["total_ram_gb"],
        )  # fmt: skip
        assert node["metadata"] == body["metadata"]
    renter = await signup(gw, "user")
    offer = await in_view(gw, renter, ids[4])
    assert offer["region"] == "us-east-2"
    assert {n["node_id"] for n in await own_nodes(gw, provider)} == set(ids)
    page = await listed(gw, provider, {"limit": 500}, 5)
    assert sorted(n["node_id"] for n in page["nodes"]) == sorted(ids)
    assert {n["name"] for n in page["nodes"]} == {b["name"] for b in sent}
    rows = await gw.state["pool"].fetch(
        "SELECT region, seq, payload->'node'->>'node_id' AS node_id FROM events "
        "WHERE type = 'node_registered' ORDER BY region DESC, seq"
    )
    by_region = [(r["region"], r["seq"]) for r in rows]
    assert by_region == [("us-east-2", s) for s in (1, 2, 3, 4)] + [("eu-west-1", 1)]
    assert [r["node_id"] for r in rows] == [ids[0], ids[1], ids[3], ids[4], ids[2]]
    beat = {"available_ram_gb": 10, "available_vram_gb": 4, "cpu_usage_pct": 12.5}
    r = await api.post(f"/api/nodes/{ids[2]}/heartbeat", json=beat, headers=provider.headers)
    assert r.status_code == 200, r.text
    assert (r.json()["available_ram_gb"], r.json()["available_vram_gb"]) == (10, 4)


async def test_a_bad_node_refuses_the_whole_batch(gw: Gateway) -> None:
    """A node the single endpoint would refuse refuses the batch, named by its index; nothing
    of the batch is registered (neither in Redis nor in the provider's listing)."""
    api = gw.client
    provider = await signup(gw, "provider")
    cases: list[tuple[int, dict[str, Any], str]] = [
        (17, {"latitude": 95.0}, "nodes[17].latitude"),
        (3, {"total_ram_gb": 0, "total_vram_gb": 0}, "nodes[3].total_ram_gb"),
        (0, {"min_duration_sec": 600, "max_duration_sec": 60}, "nodes[0].min_duration_sec"),
        (19, {"price_per_gb_sec": 1e-13}, "nodes[19].price_per_gb_sec"),
        (8, {"colour": "red"}, "nodes[8].colour"),
    ]
    for index, change, field in cases:
        sent = bodies(20)
        sent[index].update(change)
        r = await api.post(BATCH, json={"nodes": sent}, headers=provider.headers)
        assert_error(r, 422, field=field)
    del_field = bodies(3)
    del del_field[1]["region"]
    r = await api.post(BATCH, json={"nodes": del_field}, headers=provider.headers)
    assert_error(r, 422, field="nodes[1].region")
    assert_error(await api.post(BATCH, json={"nodes": []}, headers=provider.headers), 422)
    too_many = {"nodes": [node_body(name=f"n{i}") for i in range(MAX_REGISTER_BATCH + 1)]}
    assert_error(await api.post(BATCH, json=too_many, headers=provider.headers), 422)
    too_big = {"nodes": bodies(10, metadata={f"k{j}": "x" * 256 for j in range(32)}) * 100}
    assert len(msgspec.json.encode(too_big)) > 4 * 1024 * 1024
    assert_error(await api.post(BATCH, json=too_big, headers=provider.headers), 413)
    renter = await signup(gw, "user")
    r = await api.post(BATCH, json={"nodes": bodies(2)}, headers=renter.headers)
    assert_error(r, 403)

    redis, keys = gw.state["redis"], gw.state["keys"]
    for region in ("us-east-2", "eu-west-1"):
        assert await redis.get(keys.seq(region)) is None
        assert await redis.zcard(keys.asks(region)) == 0
        assert await redis.zcard(keys.geo(region)) == 0
    assert await own_nodes(gw, provider) == []


async def test_batch_replays_with_the_same_idempotency_key(gw: Gateway) -> None:
    """A retried batch (same key, same body) gets the first ids and registers nothing more; the
    key with another body is refused."""
    api = gw.client
    provider = await signup(gw, "provider")
    headers = {**provider.headers, "Idempotency-Key": "fleet-batch-0"}
    sent = {"nodes": bodies(4)}
    first = await api.post(BATCH, json=sent, headers=headers)
    assert first.status_code == 201, first.text
    ids = first.json()["node_ids"]
    again = await api.post(BATCH, json=sent, headers=headers)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["node_ids"] == ids
    assert await registered(gw) == 4

    async def all_mine() -> list[dict[str, Any]] | None:
        nodes = await own_nodes(gw, provider)
        return nodes if len(nodes) == 4 else None

    assert {n["node_id"] for n in await eventually(all_mine)} == set(ids)
    other = {"nodes": bodies(4, price_per_gb_sec=0.000002)}
    assert_error(await api.post(BATCH, json=other, headers=headers), 409, "idempotency_key_reused")
    single = await api.post("/api/nodes/register", json=sent["nodes"][0], headers=headers)
    assert_error(single, 409, "idempotency_key_reused")


@pytest.mark.parametrize("count", [1, MAX_REGISTER_BATCH])
async def test_batch_sizes_at_the_bounds(gw: Gateway, count: int) -> None:
    """One node and a full batch both register every node, ids in order."""
    provider = await signup(gw, "provider")
    sent = bodies(count)
    r = await gw.client.post(BATCH, json={"nodes": sent}, headers=provider.headers)
    assert r.status_code == 201, r.text
    ids = r.json()["node_ids"]
    assert len(set(ids)) == count
    market = gw.state["market"]
    stored = [await market.get_node(ids[0]), await market.get_node(ids[-1])]
    assert [n.name for n in stored] == [sent[0]["name"], sent[-1]["name"]]
    assert await registered(gw) == count
