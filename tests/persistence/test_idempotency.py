"""The idempotency records' statements: claims, stale take-overs, stored responses, sweeps."""

from __future__ import annotations

import uuid

import asyncpg

from persistence import idempotency as records


async def _user(conn: asyncpg.Connection) -> str:
    user_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')",
        user_id,
        f"{user_id}@example.test",
    )
    return user_id


async def _age(conn: asyncpg.Connection, user_id: str, key: str, seconds: int) -> None:
    await conn.execute(
        "UPDATE idempotency_keys SET created_at = now() - make_interval(secs => $3) "
        "WHERE user_id = $1 AND key = $2",
        user_id,
        key,
        float(seconds),
    )


async def test_a_claim_is_taken_once_and_over_only_when_stale_and_unanswered(
    conn: asyncpg.Connection,
) -> None:
    """A second claim fails; a take-over needs the same fingerprint, no response, and age."""
    user_id = await _user(conn)
    assert await records.claim(conn, user_id, "k", "a" * 64)
    assert not await records.claim(conn, user_id, "k", "a" * 64)
    row = await records.recorded(conn, user_id, "k", stale_after_s=60)
    assert row is not None
    assert (row["request_hash"], row["status_code"], row["stale"]) == ("a" * 64, None, False)
    assert not await records.take_over(conn, user_id, "k", "a" * 64, stale_after_s=60)

    await _age(conn, user_id, "k", 120)
    row = await records.recorded(conn, user_id, "k", stale_after_s=60)
    assert row is not None and row["stale"]
    assert not await records.take_over(conn, user_id, "k", "b" * 64, stale_after_s=60)
    assert await records.take_over(conn, user_id, "k", "a" * 64, stale_after_s=60)
    # Taken over: young again, so a second process cannot take it as well.
    assert not await records.take_over(conn, user_id, "k", "a" * 64, stale_after_s=60)

    await records.store_response(conn, user_id, "k", 201, b'{"ok":true}')
    await _age(conn, user_id, "k", 120)
    assert not await records.take_over(conn, user_id, "k", "a" * 64, stale_after_s=60)
    row = await records.recorded(conn, user_id, "k", stale_after_s=60)
    assert row is not None and (row["status_code"], row["response_body"]) == (201, b'{"ok":true}')


async def test_release_frees_only_unanswered_keys_and_sweep_deletes_old_ones(
    conn: asyncpg.Connection,
) -> None:
    """A released key can be claimed again; an answered one stays; the sweep counts by age."""
    user_id = await _user(conn)
    for key in ("open", "answered", "old"):
        assert await records.claim(conn, user_id, key, "a" * 64)
    await records.store_response(conn, user_id, "answered", 200, b"{}")
    await records.release(conn, user_id, "open")
    await records.release(conn, user_id, "answered")
    assert await records.recorded(conn, user_id, "open", stale_after_s=60) is None
    assert await records.recorded(conn, user_id, "answered", stale_after_s=60) is not None
    assert await records.claim(conn, user_id, "open", "b" * 64)

    await _age(conn, user_id, "old", 90_000)
    assert await records.sweep(conn, 86_400) == 1
    assert await records.recorded(conn, user_id, "old", stale_after_s=60) is None
    assert await records.sweep(conn, 86_400) == 0
