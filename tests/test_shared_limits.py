"""Rate limits shared through Redis (`orchestrator.security.shared_limits`): two limiters on one real Redis act as one
in-process limiter would, take from every client of a request or from none, let slots of dead replicas lapse, and
fail as `rate_limit.on_state_failure` says when Redis is gone."""

from __future__ import annotations

import asyncio

import pytest
import redis

from orchestrator.errors import LimitsUnavailable, RateLimited, TooManyInFlight
from orchestrator.security.shared_limits import RedisRateLimiter
from orchestrator.settings import RateLimitSettings
from tests.servers import unused_port

SLOW = RateLimitSettings(requests_per_s=0.01, burst=3, max_concurrent=2)


def limiters(url: str, settings: RateLimitSettings, stale_after_s: float = 60.0) -> tuple[RedisRateLimiter, ...]:
    redis.Redis.from_url(url).flushdb()
    return tuple(RedisRateLimiter(url, settings, stale_after_s=stale_after_s) for _ in range(2))


async def test_two_replicas_share_one_bucket_per_key(redis_url: str) -> None:
    first, second = limiters(redis_url, SLOW.model_copy(update={"max_concurrent": 10}))
    for limiter in (first, second, first):
        await limiter.release(await limiter.acquire("key:a"))
    with pytest.raises(RateLimited, match="bursts of 3") as refused:
        await second.acquire("key:a")
    assert refused.value.retry_after_s >= 1
    await first.release(await first.acquire("key:b"))  # another key has its own bucket
    for limiter in (first, second):
        await limiter.aclose()


async def test_in_flight_is_bounded_across_replicas_and_a_refusal_takes_nothing(redis_url: str) -> None:
    first, second = limiters(redis_url, RateLimitSettings(requests_per_s=100, burst=100, max_concurrent=1))
    held = await first.acquire("key:a", "address:x")
    with pytest.raises(TooManyInFlight, match="this API key already has 1"):
        await second.acquire("key:a", "address:y")
    with pytest.raises(TooManyInFlight, match="this client address already has 1"):
        await second.acquire("key:b", "address:x")
    await second.release(await second.acquire("key:b", "address:y"))  # the refusals took no slot from b or y
    await first.release(held)
    await second.release(await second.acquire("key:a", "address:x"))
    for limiter in (first, second):
        await limiter.aclose()


async def test_a_dead_replica_s_slots_lapse(redis_url: str) -> None:
    first, second = limiters(redis_url, RateLimitSettings(max_concurrent=1), stale_after_s=0.3)
    await first.acquire("key:a")  # never released: its replica "died"
    with pytest.raises(TooManyInFlight):
        await second.acquire("key:a")
    await asyncio.sleep(0.4)
    await second.release(await second.acquire("key:a"))
    for limiter in (first, second):
        await limiter.aclose()


@pytest.mark.parametrize("choice", ["open", "closed"])
async def test_a_failed_store_lets_through_or_refuses_as_set(choice: str) -> None:
    settings = RateLimitSettings(on_state_failure=choice)
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{unused_port()}/0", settings, stale_after_s=60)
    if choice == "open":
        ticket = await limiter.acquire("key:a")
        assert ticket is None
        await limiter.release(ticket)
    else:
        with pytest.raises(LimitsUnavailable, match="do not answer") as refused:
            await limiter.acquire("key:a")
        assert refused.value.retry_after_s == 1.0
    await limiter.aclose()
