"""Schema migrations: applied once, in order, safely from concurrent runners; the accounts schema."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from persistence.journal.batch import write_batch
from persistence.journal.clusters import refresh_clusters
from persistence.journal.stored import decode_entry
from persistence.migrations import MIGRATIONS_DIR, MigrationError, load, migrate, pending
from tests.conftest import _SEED
from tests.persistence.conftest import digest
from tests.persistence.history import History, seed_accounts


@pytest.fixture
async def empty_db(database_url: str) -> AsyncIterator[str]:
    """URL of a brand-new, empty database (dropped afterwards)."""
    name = f"mnemo_m_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await asyncio.shield(admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            await admin.close()


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


async def test_migrate_applies_every_file_once(empty_db: str) -> None:
    """A first run applies all files in order and records them; a second run does nothing."""
    names = [m.name for m in load()]
    assert names[0] == "001_accounts"
    assert await pending(empty_db) == names
    assert await migrate(empty_db) == names
    assert await migrate(empty_db) == []
    assert await pending(empty_db) == []
    conn = await asyncpg.connect(empty_db)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [r["name"] for r in rows] == names
    assert {"users", "api_keys", "clients", "idempotency_keys"} <= await _tables(empty_db)


async def test_concurrent_runs_leave_one_schema(empty_db: str) -> None:
    """Two runners started together on a fresh database: no error, each file applied once."""
    names = [m.name for m in load()]
    first, second = await asyncio.gather(migrate(empty_db), migrate(empty_db))
    assert sorted([first, second], key=len) == [[], names]
    conn = await asyncpg.connect(empty_db)
    try:
        count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
    finally:
        await conn.close()
    assert count == len(names)


def _copy_migrations(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


async def test_edited_applied_migration_is_refused(empty_db: str, tmp_path: Path) -> None:
    """Changing a file after it was applied is an error, not a silent divergence."""
    directory = _copy_migrations(tmp_path)
    await migrate(empty_db, directory=directory)
    first = sorted(directory.glob("001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited afterwards\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(empty_db, directory=directory)


async def test_failed_migration_rolls_back_whole_file(empty_db: str, tmp_path: Path) -> None:
    """A file that fails leaves nothing of itself behind and is not recorded; fixed, it applies."""
    directory = _copy_migrations(tmp_path)
    bad = directory / "900_broken.sql"
    bad.write_text("CREATE TABLE half_done (id int);\nSELECT no_such_function();\n")
    with pytest.raises(MigrationError, match=r"900_broken\.sql"):
        await migrate(empty_db, directory=directory)
    tables = await _tables(empty_db)
    assert "users" in tables
    assert "half_done" not in tables
    assert await pending(empty_db, directory=directory) == ["900_broken"]
    bad.write_text("CREATE TABLE half_done (id int);\n")
    assert await migrate(empty_db, directory=directory) == ["900_broken"]


async def test_badly_named_file_is_refused(tmp_path: Path) -> None:
    """Files must be named NNN_name.sql, and versions must be unique."""
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "1-first.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNN_name\.sql"):
        load(directory)
    (directory / "1-first.sql").unlink()
    (directory / "001_a.sql").write_text("SELECT 1;")
    (directory / "001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="version 1"):
        load(directory)


_LATER_COLUMNS = frozenset({"007_delivery", "008_ledger", "012_trust"})
"""Later migrations that add columns today's journal writes (no re-keying), and the ledger
whose account kinds 012 extends."""


async def test_lean_indexes_keep_a_journaled_history(empty_db: str, tmp_path: Path) -> None:
    """004 re-keys `events` and `node_metrics_1m` of a database the journal has written: every
    row stays as it was, and the journal carries on over it (redeliveries included)."""
    before_004 = tmp_path / "m"
    before_004.mkdir()
    for m in load():
        # and the columns today's journal writes that came later (added columns, no re-keying)
        if m.version < 4 or m.name in _LATER_COLUMNS:
            shutil.copy(m.path, before_004)
    await migrate(empty_db, directory=before_004)
    h = History.generate(_SEED, 600)
    events = [decode_entry(p) for _, p in h.encoded()]
    conn = await asyncpg.connect(empty_db)
    try:
        await seed_accounts(conn, h)
        await write_batch(conn, events[:400])
        await refresh_clusters(conn, h.regions)
        journaled = await digest(conn)
        assert await migrate(empty_db) == [
            m.name for m in load() if m.version >= 4 and m.name not in _LATER_COLUMNS
        ]
        assert await digest(conn) == journaled
        assert (
            await conn.fetchval(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'events_pkey'"
            )
            == "PRIMARY KEY (region, seq)"
        )
        again = await write_batch(conn, events[300:])
        assert (again.stored, again.applied) == (len(events) - 400, len(events) - 400)
        assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM events") == len(events)
    finally:
        await conn.close()


# --- the accounts schema (001) -----------------------------------------------------------------


async def _user(conn: asyncpg.Connection, email: str, role: str = "user") -> uuid.UUID:
    user_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO users (email, password_hash, role) VALUES ($1, 'argon2id$...', $2) RETURNING id",
        email,
        role,
    )
    return user_id


async def test_users_email_unique_ignoring_case(pool: asyncpg.Pool) -> None:
    """One account per e-mail address, whatever its case."""
    async with pool.acquire() as conn:
        await _user(conn, "Ada@example.com")
        with pytest.raises(asyncpg.UniqueViolationError):
            await _user(conn, "ada@EXAMPLE.com")


async def test_users_role_is_checked(pool: asyncpg.Pool) -> None:
    """Role is one of user, provider, admin; default user; ids are generated."""
    async with pool.acquire() as conn:
        uid = await conn.fetchval(
            "INSERT INTO users (email, password_hash) VALUES ('a@x.io', 'h') RETURNING id"
        )
        assert isinstance(uid, uuid.UUID)
        assert await conn.fetchval("SELECT role FROM users WHERE id = $1", uid) == "user"
        await _user(conn, "p@x.io", "provider")
        with pytest.raises(asyncpg.CheckViolationError):
            await _user(conn, "r@x.io", "root")


async def test_users_have_no_plaintext_key_columns(pool: asyncpg.Pool) -> None:
    """API keys and per-user secrets are not stored in users."""
    async with pool.acquire() as conn:
        columns = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'"
            )
        }
    assert "api_key" not in columns and "jwt_secret" not in columns
    assert {"id", "email", "password_hash", "role", "full_name", "organization"} <= columns


async def test_api_keys_store_hashes_only(pool: asyncpg.Pool) -> None:
    """An API key row holds a 64-hex SHA-256, unique; deleting the user deletes its keys."""
    digest = "ab" * 32
    async with pool.acquire() as conn:
        uid = await _user(conn, "k@x.io")
        await conn.execute(
            "INSERT INTO api_keys (user_id, prefix, key_hash, name) VALUES ($1, 'mn_abcd', $2, 'ci')",
            uid,
            digest,
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO api_keys (user_id, prefix, key_hash) VALUES ($1, 'mn_abcd', $2)",
                uid,
                digest,
            )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO api_keys (user_id, prefix, key_hash) VALUES ($1, 'mn_x', $2)",
                uid,
                "mn_live_plaintext_key_that_is_not_a_hash_at_all_0123456789abcdef",
            )
        row = await conn.fetchrow("SELECT created_at, last_used_at, revoked_at FROM api_keys")
        assert row["created_at"] is not None and row["revoked_at"] is None
        await conn.execute("DELETE FROM users WHERE id = $1", uid)
        assert await conn.fetchval("SELECT count(*) FROM api_keys") == 0


async def test_clients_belong_to_a_user(pool: asyncpg.Pool) -> None:
    """A client needs a user; coordinates and preferences are range-checked; spend starts at 0."""
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.NotNullViolationError):
            await conn.execute("INSERT INTO clients (org_name) VALUES ('Acme')")
        uid = await _user(conn, "c@x.io")
        cid = await conn.fetchval(
            "INSERT INTO clients (user_id, org_name, default_region, latitude, longitude)"
            " VALUES ($1, 'Acme', 'us-east-2', 40.7128, -74.006) RETURNING id",
            uid,
        )
        row = await conn.fetchrow("SELECT * FROM clients WHERE id = $1", cid)
        assert row["current_spend_usd"] == 0 and row["prefer_local"] is True
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO clients (user_id, org_name, latitude) VALUES ($1, 'B', 91)", uid
            )


async def test_idempotency_key_is_per_user(pool: asyncpg.Pool) -> None:
    """(user, key) is unique: the claim of a key by INSERT ... ON CONFLICT DO NOTHING wins once."""
    claim = (
        "INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING RETURNING key"
    )
    async with pool.acquire() as conn:
        a = await _user(conn, "a@x.io")
        b = await _user(conn, "b@x.io")
        assert await conn.fetchval(claim, a, "k1", "0" * 64) == "k1"
        assert await conn.fetchval(claim, a, "k1", "0" * 64) is None
        assert await conn.fetchval(claim, b, "k1", "0" * 64) == "k1"
        await conn.execute(
            "UPDATE idempotency_keys SET status_code = 201, response_body = $3"
            " WHERE user_id = $1 AND key = $2",
            a,
            "k1",
            b'{"id": 1}',
        )
        row = await conn.fetchrow(
            "SELECT status_code, response_body FROM idempotency_keys WHERE user_id = $1", a
        )
        assert (row["status_code"], row["response_body"]) == (201, b'{"id": 1}')
