"""Per-key rate limits that hold across replicas: the same token buckets and in-flight bounds as
`orchestrator.security.access.RateLimiter`, kept in the Redis every replica shares (`ORCH_STATE__URL`).

One Lua script takes a request's token and in-flight slot from each of its clients (the key, and the address with
`per_address`), or from none, atomically, on Redis's own clock (`TIME`), so that N replicas allow what one would.
A client's bucket is a hash (`limits:bucket:<client>`: tokens and when they were counted); its requests in flight are
a sorted set (`limits:flight:<client>`) of one ticket per request, scored by when it started: a replica that dies
with requests in flight leaks their slots only until `stale_after_s` has passed (the request deadline and a margin),
when the next acquisition drops them. Both keys expire once idle.

Redis failing (refused, reset, or no answer within a second) is `rate_limit.on_state_failure`'s choice: `open` (the
default: the request goes on, uncounted, and the failure is logged) or `closed` (503 `rate_limits_unavailable`
with `Retry-After`). Either way no request hangs on it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import LimitsUnavailable
from orchestrator.security.access import rate_limited, too_many_in_flight
from orchestrator.settings import RateLimitSettings

log = logging.getLogger(__name__)

TIMEOUT_S = 1.0

_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local rate, burst, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ticket, stale, ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local counted = {}
for i = 1, #KEYS, 2 do
  local bucket, flight = KEYS[i], KEYS[i + 1]
  redis.call('ZREMRANGEBYSCORE', flight, '-inf', now - stale)
  local held = redis.call('ZCARD', flight)
  if held >= most then return {1, (i + 1) / 2, held} end
  local state = redis.call('HMGET', bucket, 'tokens', 'updated')
  local tokens = tonumber(state[1]) or burst
  local updated = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
  if tokens < 1 then return {2, (i + 1) / 2, tostring(tokens)} end
  counted[i] = tokens
end
for i = 1, #KEYS, 2 do
  redis.call('HSET', KEYS[i], 'tokens', tostring(counted[i] - 1), 'updated', tostring(now))
  redis.call('PEXPIRE', KEYS[i], ttl)
  redis.call('ZADD', KEYS[i + 1], now, ticket)
  redis.call('PEXPIRE', KEYS[i + 1], ttl)
end
return {0}
"""
"""KEYS: bucket and flight keys, a pair per client; ARGV: rate, burst, max in flight, ticket, stale after (s), time
to live (ms). Returns {0} when taken, {1, client, held} over the in-flight bound, {2, client, tokens} out of
tokens."""


@dataclass(frozen=True)
class Ticket:
    """One request's claim on its clients' in-flight slots (`release` gives them back)."""

    clients: tuple[str, ...]
    id: str


class RedisRateLimiter:
    """`acquire` before a request, `release` its ticket after it (module docstring)."""

    def __init__(self, url: str, settings: RateLimitSettings, *, stale_after_s: float) -> None:
        import redis.asyncio as redis

        self._settings = settings
        self._stale_after_s = stale_after_s
        self._client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._acquire = self._client.register_script(_ACQUIRE)
        idle_s = max(stale_after_s, settings.burst / settings.requests_per_s)
        self._ttl_ms = math.ceil(idle_s * 1000) + 1000

    async def acquire(self, *clients: str) -> Ticket | None:
        """A ticket for a request of `clients`, or `TooManyInFlight` / `RateLimited` (from none of them); None when
        Redis failed and the setting lets the request through uncounted."""
        if not clients:
            return None
        settings, ticket = self._settings, Ticket(clients, secrets.token_hex(8))
        keys = [key for client in clients for key in (f"limits:bucket:{client}", f"limits:flight:{client}")]
        args: list[str | float] = [settings.requests_per_s, settings.burst, settings.max_concurrent, ticket.id,
                                   self._stale_after_s, self._ttl_ms]  # fmt: skip
        try:
            verdict = await self._acquire(keys=keys, args=args)
        except Exception as exc:  # redis-py's errors, OS errors, timeouts: the store failed, not the request
            self._failed(exc)
            return None
        _refuse(verdict, clients, settings)
        return ticket

    async def release(self, ticket: Ticket | None) -> None:
        if ticket is None:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for client in ticket.clients:
                    pipe.zrem(f"limits:flight:{client}", ticket.id)
                await pipe.execute()
        except Exception as exc:  # the slot then lapses after `stale_after_s`
            log.warning("rate limits: a request's in-flight slot was not given back: %s", exc)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _failed(self, exc: Exception) -> None:
        if self._settings.on_state_failure == "closed":
            raise LimitsUnavailable(
                f"the shared rate limits do not answer ({type(exc).__name__}); retry shortly", retry_after_s=1.0
            ) from exc
        log.warning("rate limits: the shared store failed, the request goes on uncounted: %s", exc)


def _refuse(verdict: Sequence[Any], clients: tuple[str, ...], settings: RateLimitSettings) -> None:
    """Raise what the script's verdict says, worded as the in-process limiter words it."""
    code = int(verdict[0])
    if code == 0:
        return
    client = clients[int(verdict[1]) - 1]
    if code == 1:
        raise too_many_in_flight(client, int(verdict[2]), settings.max_concurrent)
    raise rate_limited(client, float(verdict[2]), settings.requests_per_s, settings.burst)
