"""Rate limits kept in Redis, so every gateway worker counts against the same budget.

Three kinds of limit, each checked by one small script in one round trip (O(1) in the number of
callers, so an account at its limit costs the others nothing):
- `Rule`: a fixed window, a counter per (rule, subject) that expires with its window (INCR, then
  the expiry on the first hit). Sign-ups, logins, API keys.
- `Rate`: a sustained rate with a burst (GCRA: one timestamp per subject, the "theoretical
  arrival time" of its next hit). An idle subject may send `burst` hits at once, then one every
  1/`per_s` seconds; refused hits are not counted. The writes of an account.
- connection slots: at most `connections` open at once per subject (an account's WebSockets,
  over every gateway). A sorted set per subject holds its connection ids scored by an expiry;
  the gateway that holds a connection pushes its expiry forward every `connection_ttl_s / 3`
  (`keep_connections_alive`), so the slots of a gateway that died free themselves within
  `connection_ttl_s`. Taking a slot drops the expired ones, counts and adds in one script.
Clocks: the scripts read Redis's `TIME`, so gateways with skewed clocks still agree.
Subjects (an email, an IP, a user id) are hashed into the key so arbitrary input never shapes a
Redis key. Every refusal is reported to `on_refused(limit name)` (the `/metrics` counter).

The heartbeat limit ("1 per node per 30 s") is not here: the market's heartbeat script enforces it
atomically with the heartbeat itself and tells the gateway how long to wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from engine.connection import is_cluster
from engine.keys import Keys
from engine.settings import Settings
from gateway.errors import RateLimited

__all__ = ["DEFAULT_RULES", "WS_CONNECTIONS", "Rate", "RateLimiter", "Rule", "rules_for"]

log = logging.getLogger("mnemo.gateway.ratelimit")


class Rule(msgspec.Struct, frozen=True):
    """At most `limit` hits per `window_s` seconds (fixed windows)."""

    limit: int
    window_s: int


class Rate(msgspec.Struct, frozen=True):
    """`per_s` hits per second sustained, up to `burst` at once after a quiet spell."""

    per_s: float
    burst: int


DEFAULT_RULES: dict[str, Rule | Rate] = {
    # Sign-ups per client address: slows account farming without hurting a shared office.
    "signup_ip": Rule(limit=30, window_s=3600),
    # Token requests per client address, and failed logins per account (password guessing).
    "token_ip": Rule(limit=60, window_s=60),
    "login_failures": Rule(limit=10, window_s=900),
    # API keys minted per user.
    "api_key_create": Rule(limit=30, window_s=3600),
}

WRITES = "writes"
"""The per-account rule of the order, contract, RFQ and registration routes."""
WS_CONNECTIONS = "ws_connections"
"""The name under which refused WebSocket connections are counted."""


def rules_for(settings: Settings) -> dict[str, Rule | Rate]:
    """The default rules plus the per-account write rate of `settings`."""
    return {
        **DEFAULT_RULES,
        WRITES: Rate(per_s=settings.write_rate_per_s, burst=settings.write_burst),
    }


_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""

# KEYS[1]: the subject's next-arrival time (us); ARGV: interval between hits (us), burst.
# Returns 0 (allowed) or the microseconds until the next hit would be.
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local next_tat = tat + interval
local allowed_at = next_tat - tonumber(ARGV[2]) * interval
if allowed_at > now then return math.ceil(allowed_at - now) end
-- At rates beyond the clock's resolution (benchmarks raise the limit that far) next_tat may
-- round to now; an expiry must still be at least 1 ms.
redis.call('SET', KEYS[1], string.format('%.0f', next_tat),
           'PX', math.max(1, math.ceil((next_tat - now) / 1000)))
return 0
"""

# KEYS[1]: the subject's connections (sorted set, id -> expiry ms); ARGV: ttl ms, limit, id.
# Returns the number held before: below the limit the id was added, at it nothing changed.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then return held end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return held
"""

# KEYS[1]: as above; ARGV: ttl ms, ids. Only ids still present are renewed (XX): one released
# meanwhile must not come back.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""


class RateLimiter:
    """Counts hits per rule and subject; raises RateLimited (429 + Retry-After) past the limit.

    `connections` and `connection_ttl_s` bound the connection slots of one subject (see the
    module docstring); `keep_connections_alive()` must run while slots are held.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        rules: dict[str, Rule | Rate] | None = None,
        *,
        connections: int = 20,
        connection_ttl_s: float = 30.0,
        connection_retry_after_s: float = 5.0,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.rules = dict(DEFAULT_RULES if rules is None else rules)
        self.connections = connections
        self.connection_ttl_s = connection_ttl_s
        self.connection_retry_after_s = connection_retry_after_s
        self._on_refused = on_refused
        self._hit: Any = redis.register_script(_HIT)
        self._rate: Any = redis.register_script(_RATE)
        self._acquire: Any = redis.register_script(_ACQUIRE)
        self._renew: Any = redis.register_script(_RENEW)
        # This process's open connections: slot key -> their ids.
        self._held: dict[str, set[str]] = {}

    def _key(self, rule: str, subject: str) -> str:
        digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self._keys.rate_limit(f"{rule}:{digest}")

    def refused(self, limit: str) -> None:
        """Report one refusal by `limit` (a rule name, `ws_connections`, `subscriptions`)."""
        if self._on_refused is not None:
            self._on_refused(limit)

    async def hit(self, rule: str, subject: str) -> None:
        """Count one hit; raise RateLimited if this hit goes over the rule's limit."""
        spec = self.rules[rule]
        key = self._key(rule, subject)
        if isinstance(spec, Rate):
            wait_us = int(await self._rate(keys=[key], args=[1e6 / spec.per_s, spec.burst]))
            if wait_us > 0:
                self.refused(rule)
                raise RateLimited(
                    f"too many requests ({rule}: {spec.per_s:g}/s, burst {spec.burst}); "
                    "retry later",
                    retry_after_s=wait_us / 1e6,
                )
            return
        count, ttl_ms = await self._hit(keys=[key], args=[spec.window_s * 1000])
        if int(count) > spec.limit:
            self.refused(rule)
            raise RateLimited(
                f"too many requests ({rule}); retry later", retry_after_s=int(ttl_ms) / 1000
            )

    async def check(self, rule: str, subject: str) -> None:
        """Raise RateLimited if a fixed-window rule is already at its limit, without counting."""
        spec = self.rules[rule]
        assert isinstance(spec, Rule), "check() reads fixed-window rules"
        key = self._key(rule, subject)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            raw, ttl_ms = await pipe.execute()
        if raw is not None and int(raw) >= spec.limit:
            self.refused(rule)
            raise RateLimited(
                f"too many requests ({rule}); retry later",
                retry_after_s=max(int(ttl_ms), 1000) / 1000,
            )

    async def reset(self, rule: str, subject: str) -> None:
        """Forget a subject's count (a successful login clears its failures)."""
        await self._redis.delete(self._key(rule, subject))

    # -- connection slots ------------------------------------------------------------------------

    async def open_connection(self, subject: str) -> str:
        """Take one of `subject`'s connection slots and return its id (give it back with
        `close_connection`); RateLimited if all `connections` are held."""
        key = self._key(WS_CONNECTIONS, subject)
        conn_id = uuid.uuid4().hex
        held = int(
            await self._acquire(
                keys=[key],
                args=[round(self.connection_ttl_s * 1000), self.connections, conn_id],
            )
        )
        if held >= self.connections:
            self.refused(WS_CONNECTIONS)
            raise RateLimited(
                f"at most {self.connections} open WebSockets per account; close one first",
                retry_after_s=self.connection_retry_after_s,
            )
        self._held.setdefault(key, set()).add(conn_id)
        return conn_id

    async def close_connection(self, subject: str, conn_id: str) -> None:
        """Give a slot back (never raises: a slot Redis did not hear about expires on its own)."""
        key = self._key(WS_CONNECTIONS, subject)
        ids = self._held.get(key)
        if ids is not None:
            ids.discard(conn_id)
            if not ids:
                del self._held[key]
        try:
            await self._redis.zrem(key, conn_id)
        except (RedisError, OSError) as exc:
            log.warning("releasing a connection slot failed (it expires by itself): %s", exc)

    async def renew_connections(self) -> None:
        """Push the expiry of every slot this process holds forward by `connection_ttl_s`."""
        if not self._held:
            return
        ttl_ms = round(self.connection_ttl_s * 1000)
        held = [(key, list(ids)) for key, ids in self._held.items()]
        if is_cluster(self._redis):
            # a cluster's pipeline does not load scripts a node lacks: one call per key, each
            # to its key's node (the script loads itself where missing)
            await asyncio.gather(
                *(self._renew(keys=[key], args=[ttl_ms, *ids]) for key, ids in held)
            )
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, ids in held:
                await self._renew(keys=[key], args=[ttl_ms, *ids], client=pipe)
            await pipe.execute()

    async def keep_connections_alive(self) -> None:
        """Renew this process's slots every `connection_ttl_s / 3` until cancelled."""
        while True:
            await asyncio.sleep(self.connection_ttl_s / 3)
            try:
                await self.renew_connections()
            except (RedisError, OSError) as exc:
                log.warning("renewing connection slots failed (retrying): %s", exc)
            except Exception:
                log.exception("renewing connection slots failed (retrying)")
