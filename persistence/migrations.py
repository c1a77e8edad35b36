"""Versioned plain-SQL migrations.

Files `persistence/migrations/NNN_name.sql` are applied in the order of their number, each in its
own transaction, and recorded in `schema_migrations` (version, name, SHA-256 of the file, time).

Rules:

- Safe to run again: an applied version is skipped. Safe from several processes at once: the
  whole run holds a session-level `pg_advisory_lock`, so the second runner waits, then finds
  everything applied and does nothing.
- Applied files are history: changing one afterwards is refused (`MigrationError`, checksum
  mismatch) instead of silently diverging. Change the schema with a new file.
- A file either applies completely or not at all (its transaction), so a failed run can be
  fixed and rerun.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import NamedTuple

import asyncpg

__all__ = ["MIGRATIONS_DIR", "Migration", "MigrationError", "migrate", "pending"]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Any constant works as long as nothing else takes it; this one is "mnemo" in ASCII.
_LOCK_KEY = 0x6D6E656D6F
_FILE_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
_CONNECT_TIMEOUT_S = 10.0


class MigrationError(Exception):
    """The migration files or the recorded history are inconsistent; `str()` is one line."""


class Migration(NamedTuple):
    """One migration file."""

    version: int
    name: str
    path: Path
    sql: str
    checksum: str


def load(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration in `directory`, ordered by version; duplicate versions are an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"{path.name}: version {version} is also used by {found[version].path.name}"
            )
        data = path.read_bytes()
        found[version] = Migration(
            version, path.stem, path, data.decode("utf-8"), hashlib.sha256(data).hexdigest()
        )
    return [found[v] for v in sorted(found)]


async def migrate(database_url: str, *, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every pending migration to the database at `database_url`.

    Returns the names (`001_accounts`, ...) of the migrations applied by this call, empty when the
    schema was already current. Connection failures propagate as asyncpg/OS errors.
    """
    migrations = load(directory)
    conn = await asyncpg.connect(database_url, timeout=_CONNECT_TIMEOUT_S)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _apply(conn, migrations)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def pending(database_url: str, *, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Names of the migrations not yet applied (checks recorded checksums too)."""
    migrations = load(directory)
    conn = await asyncpg.connect(database_url, timeout=_CONNECT_TIMEOUT_S)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        applied = await _applied(conn) if exists else {}
    finally:
        await conn.close()
    _check_history(migrations, applied)
    return [m.name for m in migrations if m.version not in applied]


async def _apply(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    # Created under the lock: two first runs racing on CREATE TABLE IF NOT EXISTS can still
    # collide in the catalog.
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            checksum    char(64) NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    applied = await _applied(conn)
    _check_history(migrations, applied)
    done: list[str] = []
    for m in migrations:
        if m.version in applied:
            continue
        try:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
        except asyncpg.PostgresError as e:
            raise MigrationError(f"{m.path.name}: {type(e).__name__}: {e}") from e
        done.append(m.name)
    return done


async def _applied(conn: asyncpg.Connection) -> dict[int, tuple[str, str]]:
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    return {r["version"]: (r["name"], r["checksum"].strip()) for r in rows}


def _check_history(migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> None:
    by_version = {m.version: m for m in migrations}
    for version, (name, checksum) in sorted(applied.items()):
        m = by_version.get(version)
        if m is None:
            raise MigrationError(
                f"the database has migration {name} which is not among the files; "
                "is this an older checkout?"
            )
        if m.checksum != checksum:
            raise MigrationError(
                f"{m.path.name} changed after it was applied (checksum mismatch); "
                "add a new migration instead of editing an applied one"
            )
