"""The journal's batch write: idempotent, order-independent, exact."""

from __future__ import annotations

import os
import random

import asyncpg
import msgspec
import pytest

from engine.types import (
    ContractCreated,
    ContractSettled,
    HeartbeatEntry,
    HeartbeatsApplied,
    NodeRegistered,
)
from persistence.journal.batch import write, write_batch
from persistence.journal.clusters import refresh_clusters
from persistence.journal.replay import replay_region
from persistence.journal.stored import decode_entry
from tests.conftest import _SEED
from tests.persistence.conftest import digest, reset_journal
from tests.persistence.history import History, seed_accounts

ROUNDS = int(os.environ.get("MNEMO_TEST_JOURNAL_ROUNDS", "3"))


async def _apply_until_quiet(conn: asyncpg.Connection, regions: list[str]) -> None:
    while (await write_batch(conn, [], regions=regions, max_apply=500)).applied:
        pass
    await refresh_clusters(conn, regions)


async def _reference(conn: asyncpg.Connection, h: History) -> dict[str, tuple[int, str]]:
    events = [decode_entry(p) for _, p in h.encoded()]
    await write_batch(conn, events)
    await refresh_clusters(conn, h.regions)
    return await digest(conn)


async def test_any_delivery_order_with_duplicates_gives_the_same_tables(
    conn: asyncpg.Connection,
) -> None:
    """Each event delivered 1-5 times, shuffled across batches: same tables as one clean pass."""
    h = History.generate(_SEED, 400)
    await seed_accounts(conn, h)
    expected = await _reference(conn, h)
    assert expected["events"][0] == len(h.events)
    events = [decode_entry(p) for _, p in h.encoded()]
    for round_ in range(ROUNDS):
        rng = random.Random(f"{_SEED}-{round_}")
        await reset_journal(conn)
        deliveries = [e for e in events for _ in range(rng.randint(1, 5))]
        rng.shuffle(deliveries)
        i = 0
        while i < len(deliveries):
            size = rng.randint(1, 120)
            # One read returns each stream's entries in stream order.
            batch = sorted(deliveries[i : i + size], key=lambda e: (e.region, e.seq))
            await write_batch(conn, batch, max_apply=rng.choice([5, 50, 20_000]))
            i += size
        await _apply_until_quiet(conn, h.regions)
        assert await digest(conn) == expected, f"round {round_} (seed {_SEED})"


async def test_redelivery_after_commit_changes_nothing(conn: asyncpg.Connection) -> None:
    """A batch delivered again after it committed is a no-op, counters included."""
    h = History.generate(_SEED + 1, 200)
    await seed_accounts(conn, h)
    events = [decode_entry(p) for _, p in h.encoded()]
    first = await write_batch(conn, events)
    assert (first.stored, first.applied) == (len(events), len(events))
    await refresh_clusters(conn, h.regions)
    before = await digest(conn)
    again = await write_batch(conn, events[50:150])
    assert (again.stored, again.applied) == (0, 0)
    await refresh_clusters(conn, h.regions)
    assert await digest(conn) == before


async def test_an_event_ahead_of_a_gap_waits_for_it(conn: asyncpg.Connection) -> None:
    """Events after a missing one are stored but not applied until the gap is filled."""
    h = History.generate(_SEED + 2, 60, regions=("r1",))
    await seed_accounts(conn, h)
    events = [decode_entry(p) for _, p in h.encoded()]
    result = await write_batch(conn, events[10:])
    n = len(events)
    assert (result.stored, result.applied, result.waiting) == (n - 10, 0, ["r1"])
    assert await conn.fetchval("SELECT applied_seq FROM journal_positions") == 0
    result = await write_batch(conn, events[:10])
    assert (result.stored, result.applied, result.waiting) == (10, n, [])
    assert await conn.fetchval("SELECT applied_seq FROM journal_positions") == n


async def test_money_and_capacity_are_exact(conn: asyncpg.Connection) -> None:
    """Spend, costs and capacity in Postgres equal the integers the events carry."""
    h = History.generate(_SEED + 3, 300)
    await seed_accounts(conn, h)
    await write_batch(conn, [decode_entry(p) for _, p in h.encoded()])
    spend: dict[str, int] = {}
    for e in h.events:
        if e.__struct_config__.tag == "contract_settled":
            spend[e.client_id] = spend.get(e.client_id, 0) + e.cost_pusd  # type: ignore[attr-defined]
    rows = await conn.fetch("SELECT id, current_spend_pusd, current_spend_usd FROM clients")
    for r in rows:
        expected = spend.get(r["id"].hex, 0)
        assert r["current_spend_pusd"] == expected
        assert (
            str(r["current_spend_usd"]) == f"{expected / 10**12:.2f}"
            or abs(float(r["current_spend_usd"]) - expected / 10**12) <= 0.005
        )
    total = await conn.fetchval("SELECT sum(total_cost_pusd) FROM contracts")
    assert total == sum(spend.values())
    assert await conn.fetchval(
        "SELECT bool_and(total_cost_usd = total_cost_pusd::numeric / 1e12) FROM contracts"
    )
    # Node capacity: reserved equals the sum of its active contracts, available = offered - it.
    bad = await conn.fetch(
        "SELECT n.id FROM nodes n LEFT JOIN contracts c ON c.node_id = n.id AND c.status = 'active' "
        "GROUP BY n.id HAVING n.reserved_ram_gb <> coalesce(sum(c.ram_gb), 0) "
        "OR n.available_ram_gb <> n.offered_ram_gb - n.reserved_ram_gb"
    )
    assert bad == []


async def test_a_refused_event_is_set_aside_and_replayed_once_mended(
    conn: asyncpg.Connection,
) -> None:
    """A contract for an unknown client raises in the fast write; the careful one sets that
    event aside (with the reason) and applies every other event of both regions. Once the
    client exists, a replay of the region applies it, and the tables equal a clean pass."""
    h = History.generate(_SEED + 4, 120, regions=("good", "bad"))
    await seed_accounts(conn, h)
    events = [decode_entry(p) for _, p in h.encoded()]
    victim = next(e for e in events if isinstance(e.event, ContractCreated) and e.region == "bad")
    stranger = "0" * 31 + "1"
    contract = msgspec.structs.replace(victim.event.contract, client_id=stranger)
    poisoned = msgspec.structs.replace(victim.event, contract=contract)
    raw = msgspec.json.encode(poisoned)
    events = [decode_entry(raw) if e.event_id == victim.event_id else e for e in events]
    # The contract's settlement names the same (unknown) client.
    events = [
        decode_entry(msgspec.json.encode(msgspec.structs.replace(e.event, client_id=stranger)))
        if isinstance(e.event, ContractSettled) and e.event.contract_id == contract.contract_id
        else e
        for e in events
    ]
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await write_batch(conn, events)
    result = await write(conn, events)
    assert (result.rejected, result.applied) == (1, len(events) - 1)
    rows = {r["region"]: r for r in await conn.fetch("SELECT * FROM journal_positions")}
    for region in ("good", "bad"):
        assert rows[region]["applied_seq"] == max(e.seq for e in events if e.region == region)
    (reject,) = await conn.fetch("SELECT * FROM journal_rejects")
    assert (reject["region"], reject["seq"], reject["stage"]) == ("bad", victim.seq, "apply")
    assert "ForeignKeyViolation" in reject["problem"] and reject["raw"] == raw
    assert await conn.fetchval("SELECT count(*) FROM contracts WHERE client_id = $1", stranger) == 0

    user = h.renters[0][0]
    await conn.execute(
        "INSERT INTO clients (id, user_id, org_name) VALUES ($1, $2, 'late')", stranger, user
    )
    replayed = await replay_region(conn, "bad")
    await refresh_clusters(conn, ["good", "bad"])
    assert replayed.recovered == [victim.seq] and replayed.refused == []
    assert replayed.events == sum(e.region == "bad" for e in events)
    assert await conn.fetchval("SELECT replayed_at IS NOT NULL FROM journal_rejects")
    after = await digest(conn)

    # The same events, written cleanly once the client existed: the very same tables.
    await reset_journal(conn)
    await write_batch(conn, events)
    await refresh_clusters(conn, ["good", "bad"])
    assert after == await digest(conn)


async def test_node_rows_follow_the_last_whole_node_event(conn: asyncpg.Connection) -> None:
    """A node's row holds the registration's terms, then each later change, in order."""
    h = History.generate(_SEED + 5, 150, regions=("r",))
    await seed_accounts(conn, h)
    await write_batch(conn, [decode_entry(p) for _, p in h.encoded()])
    first = next(e for e in h.events if isinstance(e, NodeRegistered))
    row = await conn.fetchrow("SELECT * FROM nodes WHERE id = $1", first.node.node_id)
    assert row["owner_id"].hex == first.node.owner_id
    assert row["total_ram_gb"] == first.node.total_ram_gb
    assert row["created_at"].timestamp() * 1000 == first.node.created_ms
    assert row["price_per_gb_sec"] * 10**12 == row["price_pusd"]


async def test_a_batch_mixing_stored_and_new_events_stores_each_once(
    conn: asyncpg.Connection,
) -> None:
    """Events stored before, redelivered beside new ones: the new ones are stored and applied."""
    h = History.generate(_SEED + 6, 300)
    await seed_accounts(conn, h)
    expected = await _reference(conn, h)
    await reset_journal(conn)
    events = [decode_entry(p) for _, p in h.encoded()]
    first = await write_batch(conn, events[:120])
    assert (first.stored, first.applied) == (120, 120)
    mixed = await write_batch(conn, events[60:])
    assert (mixed.stored, mixed.applied) == (len(events) - 120, len(events) - 120)
    await refresh_clusters(conn, h.regions)
    assert await digest(conn) == expected


async def test_heartbeat_values_land_exactly(conn: asyncpg.Connection) -> None:
    """Percentages, coordinates and times of heartbeats reach the row, the metrics and the
    per-minute rollup as the exact decimals and instants they stand for."""
    h = History.generate(_SEED + 7, 40, regions=("r",))
    await seed_accounts(conn, h)
    registered = next(e for e in h.events if isinstance(e, NodeRegistered))
    registered = msgspec.structs.replace(registered, event_id="r:1")
    node_id = registered.node.node_id
    minute_ms = 1_760_000_040_000  # a whole minute
    samples = [
        (minute_ms + 1_234, 12.5, None, 40.712776, -74.005974),
        (minute_ms + 31_000, 37.25, 99.99, None, None),
        (minute_ms + 60_000, 1.0, 0.01, 41.5, -73.25),  # the next minute
    ]
    events = [registered]
    for seq, (ts_ms, cpu, gpu, lat, lng) in enumerate(samples, 2):
        entry = HeartbeatEntry(
            node_id=node_id,
            offered_ram_gb=8,
            offered_vram_gb=0,
            available_ram_gb=8,
            available_vram_gb=0,
            cpu_usage_pct=cpu,
            gpu_usage_pct=gpu,
            lat=lat,
            lng=lng,
        )
        events.append(
            HeartbeatsApplied(event_id=f"r:{seq}", region="r", ts_ms=ts_ms, entries=[entry])
        )
    await write_batch(conn, [decode_entry(msgspec.json.encode(e)) for e in events])
    metrics = await conn.fetch(
        "SELECT cpu_usage_pct::text, gpu_usage_pct::text, latitude::text, longitude::text, "
        '(extract(epoch FROM "timestamp") * 1000)::int8 AS ms FROM node_metrics ORDER BY 5'
    )
    assert [tuple(r) for r in metrics] == [
        ("12.50", None, "40.712776", "-74.005974", minute_ms + 1_234),
        ("37.25", "99.99", None, None, minute_ms + 31_000),
        ("1.00", "0.01", "41.500000", "-73.250000", minute_ms + 60_000),
    ]
    rollup = await conn.fetch(
        "SELECT (extract(epoch FROM minute) * 1000)::int8, samples, cpu_samples, "
        "sum_cpu_usage_pct::text, gpu_samples, sum_gpu_usage_pct::text "
        "FROM node_metrics_1m ORDER BY 1"
    )
    assert [tuple(r) for r in rollup] == [
        (minute_ms, 2, 2, "49.75", 1, "99.99"),
        (minute_ms + 60_000, 1, 1, "1.00", 1, "0.01"),
    ]
    row = await conn.fetchrow(
        "SELECT latitude::text, longitude::text, "
        "(extract(epoch FROM last_heartbeat) * 1000)::int8 AS ms FROM nodes WHERE id = $1",
        node_id,
    )
    assert tuple(row) == ("41.500000", "-73.250000", minute_ms + 60_000)


async def test_a_minute_written_over_several_batches_rolls_up_as_one(
    conn: asyncpg.Connection,
) -> None:
    """Heartbeats of one node and minute arriving in separate batches add up in one rollup row,
    exactly as when they arrive together."""
    h = History.generate(_SEED + 8, 40, regions=("r",))
    await seed_accounts(conn, h)
    registered = next(e for e in h.events if isinstance(e, NodeRegistered))
    registered = msgspec.structs.replace(registered, event_id="r:1")
    node_id = registered.node.node_id
    minute_ms = 1_760_000_040_000
    beats = []
    for seq, (offset_ms, avail, cpu) in enumerate(
        [(1_000, 6, 10.0), (20_000, 2, None), (59_999, 7, 30.5)], 2
    ):
        entry = HeartbeatEntry(
            node_id=node_id,
            offered_ram_gb=8,
            offered_vram_gb=0,
            available_ram_gb=avail,
            available_vram_gb=0,
            cpu_usage_pct=cpu,
        )
        beats.append(
            HeartbeatsApplied(
                event_id=f"r:{seq}", region="r", ts_ms=minute_ms + offset_ms, entries=[entry]
            )
        )
    stored = [decode_entry(msgspec.json.encode(e)) for e in [registered, *beats]]
    rollup_sql = "SELECT * FROM node_metrics_1m ORDER BY minute, node_id"
    await write_batch(conn, stored)
    rows = await conn.fetch(rollup_sql)
    assert [(r["samples"], r["min_available_ram_gb"], r["max_available_ram_gb"]) for r in rows] == [
        (3, 2, 7)
    ]
    together = [tuple(r) for r in rows]
    await reset_journal(conn)
    for event in stored:
        await write_batch(conn, [event])
    assert [tuple(r) for r in await conn.fetch(rollup_sql)] == together


async def test_an_event_id_that_does_not_spell_its_region_and_seq_is_refused(
    conn: asyncpg.Connection,
) -> None:
    """`events` is keyed by (region, seq) and holds event_id to exactly `<region>:<seq>`, so
    event ids stay unique: an id written any other way (a zero-padded seq) is not an event the
    journal decodes, and a row cannot take another row's id."""
    h = History.generate(_SEED + 9, 20, regions=("r",))
    await seed_accounts(conn, h)
    events = [decode_entry(p) for _, p in h.encoded()]
    for odd in (f"r:0{events[-1].seq}", "r:-1", "r: 7", "s:7", f"r:{2**63}"):
        raw = msgspec.json.encode(msgspec.structs.replace(h.events[-1], event_id=odd))
        for lenient in (False, True):
            with pytest.raises(ValueError, match="malformed event id"):
                decode_entry(raw, lenient=lenient)
    await write_batch(conn, events)
    assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM events") == len(events)
    insert = (
        "INSERT INTO events (event_id, region, seq, type, ts, payload) "
        "VALUES ($1, $2, $3, 'x', now(), '{}')"
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(insert, "r:1", "r", 10_000)
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(insert, "r:1", "r", 1)
