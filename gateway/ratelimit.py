"""Rate limits kept in Redis, so every gateway worker counts against the same budget.

Fixed windows: a counter per (rule, subject) that expires with its window, bumped by one small
script (INCR, then set the expiry on the first hit) in a single round trip. Subjects (an email, an
IP) are hashed into the key so arbitrary input never shapes a Redis key.

The heartbeat limit ("1 per node per 30 s") is not here: the market's heartbeat script enforces it
atomically with the heartbeat itself and tells the gateway how long to wait.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import redis.asyncio as aioredis

from engine.keys import Keys
from gateway.errors import RateLimited

__all__ = ["DEFAULT_RULES", "RateLimiter", "Rule"]


class Rule(msgspec.Struct, frozen=True):
    """At most `limit` hits per `window_s` seconds."""

    limit: int
    window_s: int


DEFAULT_RULES: dict[str, Rule] = {
    # Sign-ups per client address: slows account farming without hurting a shared office.
    "signup_ip": Rule(limit=30, window_s=3600),
    # Token requests per client address, and failed logins per account (password guessing).
    "token_ip": Rule(limit=60, window_s=60),
    "login_failures": Rule(limit=10, window_s=900),
    # API keys minted per user.
    "api_key_create": Rule(limit=30, window_s=3600),
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


class RateLimiter:
    """Counts hits per rule and subject; raises RateLimited (429 + Retry-After) past the limit."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, rules: dict[str, Rule] | None = None
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.rules = dict(DEFAULT_RULES if rules is None else rules)
        self._hit: Any = redis.register_script(_HIT)

    def _key(self, rule: str, subject: str) -> str:
        digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self._keys.rate_limit(f"{rule}:{digest}")

    async def hit(self, rule: str, subject: str) -> None:
        """Count one hit; raise RateLimited if this hit goes over the rule's limit."""
        spec = self.rules[rule]
        count, ttl_ms = await self._hit(
            keys=[self._key(rule, subject)], args=[spec.window_s * 1000]
        )
        if int(count) > spec.limit:
            raise RateLimited(
                f"too many requests ({rule}); retry later", retry_after_s=int(ttl_ms) / 1000
            )

    async def check(self, rule: str, subject: str) -> None:
        """Raise RateLimited if the rule is already at its limit, without counting a hit."""
        spec = self.rules[rule]
        key = self._key(rule, subject)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            raw, ttl_ms = await pipe.execute()
        if raw is not None and int(raw) >= spec.limit:
            raise RateLimited(
                f"too many requests ({rule}); retry later",
                retry_after_s=max(int(ttl_ms), 1000) / 1000,
            )

    async def reset(self, rule: str, subject: str) -> None:
        """Forget a subject's count (a successful login clears its failures)."""
        await self._redis.delete(self._key(rule, subject))
