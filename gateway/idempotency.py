"""`Idempotency-Key` for creating POSTs, kept in Postgres (`idempotency_keys`, through
`persistence.idempotency`).

Semantics (per user and key):
- the first request claims the key (INSERT ... ON CONFLICT DO NOTHING) before any work starts;
- it runs; its response (success or client error, not 429 and not 5xx) is stored and returned;
- a later request with the same key and the same request (method, path and body, compared after
  decoding, so key order and whitespace do not matter) gets the stored response again, marked
  `Idempotent-Replayed: true`;
- with the same key and a different request: 409 `idempotency_key_reused`;
- a concurrent duplicate (the first still running) waits for it, up to `wait_s`, then replays its
  response; past that, 409 `idempotency_in_progress` with `Retry-After`;
- a failure the caller cannot be blamed for (5xx, cancellation) releases the claim so a retry
  runs afresh; a claim left by a crashed worker is taken over after `stale_after_s`.
Responses carrying a secret (a new API key) are stored with the secret removed: a replay tells the
caller what was created, never the secret again. The request fingerprint is an HMAC (keyed with
the server's secret) so that a stored fingerprint of a body is no offline guessing aid.
Records older than `retention_s` (24 h) are swept by `sweep()`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable

import asyncpg
import msgspec
from starlette.responses import Response

from gateway.errors import IdempotencyConflict, ValidationFailed
from persistence import idempotency as records

__all__ = ["IdempotencyStore", "Produced", "check_key"]

log = logging.getLogger("mnemo.gateway.idempotency")

_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_REPLAY_HEADER = "Idempotent-Replayed"


class Produced(msgspec.Struct):
    """A response as the handler produced it, and the body to keep for replays."""

    response: Response
    stored_body: bytes


def check_key(raw: str) -> str:
    """The header's value if it is 1..255 visible ASCII characters, else a 422."""
    if not _KEY.match(raw):
        raise ValidationFailed(
            "Idempotency-Key must be 1 to 255 visible ASCII characters", field="Idempotency-Key"
        )
    return raw


class IdempotencyStore:
    """Runs creating requests at most once per (user, Idempotency-Key)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        secret: str,
        *,
        wait_s: float = 10.0,
        poll_s: float = 0.05,
        stale_after_s: float = 60.0,
        retention_s: int = 86_400,
    ) -> None:
        self._pool = pool
        self._secret = hashlib.sha256(b"mnemo-idempotency:" + secret.encode()).digest()
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.stale_after_s = stale_after_s
        self.retention_s = retention_s

    def fingerprint(self, method: str, path: str, canonical_body: bytes) -> str:
        """HMAC-SHA256 hex of the request (64 characters, the column's width)."""
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        mac.update(method.encode() + b"\n" + path.encode() + b"\n")
        mac.update(canonical_body)
        return mac.hexdigest()

    async def run(
        self,
        user_id: str,
        key: str,
        fingerprint: str,
        produce: Callable[[], Awaitable[Produced]],
    ) -> Response:
        """The response to this request: produced now (and stored), or replayed."""
        if await self._claim(user_id, key, fingerprint):
            return await self._produce_and_store(user_id, key, produce)
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while True:
            row = await records.recorded(self._pool, user_id, key, stale_after_s=self.stale_after_s)
            if row is None:
                # The first attempt failed and released the key: this one runs afresh.
                if await self._claim(user_id, key, fingerprint):
                    return await self._produce_and_store(user_id, key, produce)
                continue
            if row["request_hash"] != fingerprint:
                raise IdempotencyConflict(
                    "this Idempotency-Key was used with a different request",
                    code="idempotency_key_reused",
                    field="Idempotency-Key",
                )
            if row["status_code"] is not None:
                return Response(
                    bytes(row["response_body"] or b""),
                    status_code=row["status_code"],
                    media_type="application/json",
                    headers={_REPLAY_HEADER: "true"},
                )
            if row["stale"] and await self._take_over(user_id, key, fingerprint):
                return await self._produce_and_store(user_id, key, produce)
            if asyncio.get_running_loop().time() >= deadline:
                raise IdempotencyConflict(
                    "a request with this Idempotency-Key is still in progress",
                    code="idempotency_in_progress",
                    field="Idempotency-Key",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(self.poll_s)

    async def _claim(self, user_id: str, key: str, fingerprint: str) -> bool:
        return await records.claim(self._pool, user_id, key, fingerprint)

    async def _take_over(self, user_id: str, key: str, fingerprint: str) -> bool:
        return await records.take_over(
            self._pool, user_id, key, fingerprint, stale_after_s=self.stale_after_s
        )

    async def _produce_and_store(
        self, user_id: str, key: str, produce: Callable[[], Awaitable[Produced]]
    ) -> Response:
        try:
            produced = await produce()
        except BaseException:
            # Not the caller's fault (a bug, a lost dependency, a cancelled request): release the
            # key so that a retry runs afresh. Shielded: a cancellation must not skip it.
            await asyncio.shield(self._release(user_id, key))
            raise
        status = produced.response.status_code
        if status >= 500 or status == 429:
            await asyncio.shield(self._release(user_id, key))
            return produced.response
        await asyncio.shield(
            records.store_response(self._pool, user_id, key, status, produced.stored_body)
        )
        return produced.response

    async def _release(self, user_id: str, key: str) -> None:
        try:
            await records.release(self._pool, user_id, key)
        except Exception:
            log.exception("could not release Idempotency-Key of user %s", user_id)

    async def sweep(self) -> int:
        """Delete records older than `retention_s`; returns how many."""
        return await records.sweep(self._pool, self.retention_s)

    async def sweep_forever(self, every_s: float = 3600.0) -> None:
        """Sweep periodically until cancelled; a failed sweep is logged and retried next time."""
        while True:
            try:
                deleted = await self.sweep()
                if deleted:
                    log.info("swept %d expired idempotency records", deleted)
            except Exception:
                log.exception("idempotency sweep failed")
            await asyncio.sleep(every_s)
