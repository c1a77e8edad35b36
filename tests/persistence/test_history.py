"""The API's reads of the journal's tables: closed contracts by scope and page, and ids that
cannot name anything."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from persistence import history
from persistence.journal.batch import write_batch
from persistence.journal.stored import decode_entry
from tests.conftest import _SEED
from tests.persistence.history import History, seed_accounts


@pytest.fixture
async def contracts(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """A history journaled into Postgres; its contract rows, closed and active ones both (the
    first history from the session's seed on that has both: some seeds end every contract)."""
    for k in range(50):
        h = History.generate(_SEED + k, 400, regions=("us-east-2", "eu-west-1"))
        tr = conn.transaction()
        await tr.start()
        await seed_accounts(conn, h)
        await write_batch(conn, [decode_entry(p) for _, p in h.encoded()])
        rows = await conn.fetch("SELECT * FROM contracts")
        if {r["status"] == "active" for r in rows} == {True, False}:
            await tr.commit()
            return rows
        await tr.rollback()
    raise AssertionError(f"no history from seed {_SEED} on holds closed and active contracts")


def _ids(rows: list[asyncpg.Record]) -> list[uuid.UUID]:
    return [r["id"] for r in rows]


async def test_closed_contracts_by_scope_status_and_page(
    conn: asyncpg.Connection, contracts: list[asyncpg.Record]
) -> None:
    """Each scope holds the closed contracts it names, newest first; pages cut that order."""
    by_id = sorted((r for r in contracts if r["status"] != "active"), key=lambda r: r["id"])
    closed = sorted(by_id, key=lambda r: r["start_time"], reverse=True)  # stable: ties by id
    assert closed and any(r["status"] == "active" for r in contracts)
    some = closed[0]
    party = str(some["user_id"])
    scopes = [
        ({}, closed),
        ({"client_id": str(some["client_id"])}, [r for r in closed if r["client_id"] == some["client_id"]]),
        ({"node_id": some["node_id"].hex}, [r for r in closed if r["node_id"] == some["node_id"]]),
        ({"party_id": party}, [r for r in closed if party in (str(r["user_id"]), str(r["owner_id"]))]),
        # A client's scope wins over the party's (the gateway checked the client is the caller's).
        ({"client_id": str(some["client_id"]), "party_id": str(uuid.uuid4())}, [r for r in closed if r["client_id"] == some["client_id"]]),
        ({"status": some["status"]}, [r for r in closed if r["status"] == some["status"]]),
    ]  # fmt: skip
    for scope, expected in scopes:
        total, rows = await history.closed_contracts(conn, **scope, limit=500, offset=0)
        assert (total, _ids(rows)) == (len(expected), _ids(expected)), scope
    total, rows = await history.closed_contracts(conn, limit=3, offset=2)
    assert (total, _ids(rows)) == (len(closed), _ids(closed[2:5]))
    assert await history.closed_contracts(conn, limit=0, offset=0) == (len(closed), [])
    assert await history.closed_contracts(conn, limit=5, offset=len(closed)) == (len(closed), [])


async def test_ids_that_are_not_uuids_name_nothing(
    conn: asyncpg.Connection, contracts: list[asyncpg.Record]
) -> None:
    """A malformed or unknown id reads as absent, never as an error."""
    known = contracts[0]
    found = await history.contract(conn, known["id"].hex)
    assert found is not None and found["id"] == known["id"]
    for missing in ("not-an-id", str(uuid.uuid4())):
        assert await history.contract(conn, missing) is None
        assert await history.node_owner(conn, missing) is None
    assert await history.node_owner(conn, known["node_id"].hex) == known["owner_id"].hex
    settled = await history.node_settled(conn, known["node_id"].hex)
    mine = [r for r in contracts if r["node_id"] == known["node_id"] and r["status"] != "active"]
    assert settled == (sum(r["total_cost_pusd"] for r in mine), len(mine))
