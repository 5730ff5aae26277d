"""The vision cache: what hits, what misses, what is never cached, and Redis shared by replicas (a real
`redis-server`, started here)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from orchestrator.api.app import create_app
from orchestrator.settings import CacheSettings, Settings
from orchestrator.stages.cache import CachedVision, MemoryStore, RedisStore, cache_key, result_from_json, result_to_json
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from vision_stage.errors import VisionUnavailable
from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import DecodedImage, VisionFallback, VisionRequest, VisionResult

SETTINGS = CacheSettings()


def picture(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A picture with shapes and text, different for each `seed`."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for index in range(6):
        x, y = (seed * 37 + index * 53) % (size[0] - 60), (seed * 61 + index * 29) % (size[1] - 40)
        draw.rectangle((x, y, x + 50, y + 30), fill=((seed * 80 + index * 40) % 256, 40 * index % 256, 90))
    draw.text((10, size[1] - 30), f"TOTAL {seed}.00", fill="black")
    return image


def encoded(image: Image.Image, format: str = "PNG", **options: object) -> DecodedImage:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return decode_image(buffer.getvalue(), ImageLimits())


def request(image: DecodedImage, question: str = "What is the total?", profile: str = "general") -> VisionRequest:
    return VisionRequest(image, question, task="answer", profile=profile)


def test_the_same_picture_re_encoded_or_resized_has_the_same_key() -> None:
    original = picture()
    key = cache_key(request(encoded(original)), "fake", "m", "perceptual")
    assert cache_key(request(encoded(original, "JPEG", quality=85)), "fake", "m", "perceptual") == key
    assert cache_key(request(encoded(original.resize((640, 480)))), "fake", "m", "perceptual") == key
    assert cache_key(request(encoded(picture(seed=1))), "fake", "m", "perceptual") != key
    assert cache_key(request(encoded(original), "Who sold it?"), "fake", "m", "perceptual") != key
    assert cache_key(request(encoded(original)), "fake", "other-model", "perceptual") != key
    exact = cache_key(request(encoded(original)), "fake", "m", "exact")
    assert cache_key(request(encoded(original, "JPEG", quality=85)), "fake", "m", "exact") != exact


def test_a_result_survives_the_json_round_trip() -> None:
    result = asyncio.run(FakeVision().generate(request(encoded(picture()))))
    assert result_from_json(result_to_json(result)) == result
    with pytest.raises((TypeError, ValueError, KeyError)):
        result_from_json('{"backend": 3}')


async def test_a_stored_value_that_is_not_a_vision_result_is_a_miss() -> None:
    vision, store = FakeVision(), MemoryStore(10, 60)
    cached = CachedVision(vision, store, SETTINGS)
    asked = request(encoded(picture()))
    key = cache_key(asked, vision.name, vision.model, SETTINGS.key)
    coerced = json.loads(result_to_json(await FakeVision().generate(asked))) | {"prompt_tokens": "12"}
    for value in ("not json", '{"backend": 3}', "[]", json.dumps(coerced)):
        await store.set(key, value)
        assert (await cached.generate(asked)).cached is False
    assert len(vision.requests) == 4
    assert (await cached.generate(asked)).cached is True  # the last miss stored the backend's own answer


async def test_a_hit_is_marked_and_skips_the_backend() -> None:
    vision = FakeVision()
    cached = CachedVision(vision, MemoryStore(10, 60), SETTINGS)
    first = await cached.generate(request(encoded(picture())))
    again = await cached.generate(request(encoded(picture(), "JPEG", quality=90)))
    assert (first.cached, again.cached) == (False, True)
    assert again.answer == first.answer
    assert len(vision.requests) == 1
    assert (cached.hits, cached.misses) == (1, 1)


async def test_bypassed_profiles_and_fallback_answers_are_never_cached() -> None:
    vision = FakeVision()
    cached = CachedVision(vision, MemoryStore(10, 60), SETTINGS)
    image = encoded(picture())
    await cached.generate(request(image, profile="medical"))
    await cached.generate(request(image, profile="medical"))
    assert len(vision.requests) == 2

    class StandIn(FakeVision):
        async def generate(self, vision_request: VisionRequest) -> VisionResult:
            result = await super().generate(vision_request)
            return dataclasses.replace(result, fallback=VisionFallback("remote", "VisionUnavailable", "down"))

    stand_in = StandIn()
    fallback_cache = CachedVision(stand_in, MemoryStore(10, 60), SETTINGS)
    await fallback_cache.generate(request(image))
    await fallback_cache.generate(request(image))
    assert len(stand_in.requests) == 2


async def test_the_memory_store_expires_and_evicts_the_least_recently_used() -> None:
    store = MemoryStore(max_entries=2, ttl_s=0.05)
    await store.set("a", "1")
    await store.set("b", "2")
    assert await store.get("a") == "1"
    await store.set("c", "3")  # evicts b, the least recently used
    assert (await store.get("b"), await store.get("a")) == (None, "1")
    await asyncio.sleep(0.06)
    assert await store.get("a") is None


async def test_a_failing_store_is_a_miss_and_errors_still_propagate() -> None:
    class Broken(MemoryStore):
        async def get(self, key: str) -> str | None:
            raise ConnectionError("store down")

    vision = FakeVision()
    cached = CachedVision(vision, Broken(10, 60), SETTINGS)
    assert (await cached.generate(request(encoded(picture())))).cached is False
    failing = CachedVision(FakeVision(error=VisionUnavailable("down")), MemoryStore(10, 60), SETTINGS)
    with pytest.raises(VisionUnavailable):
        await failing.generate(request(encoded(picture())))


def test_the_response_says_when_the_cache_answered() -> None:
    vision = FakeVision()
    backends = Backends(CachedVision(vision, MemoryStore(10, 60), SETTINGS), FakeReasoning())
    png = io.BytesIO()
    picture().save(png, format="PNG")
    files = {"image": ("x.png", png.getvalue(), "image/png")}
    with TestClient(create_app(Settings(), backends)) as client:
        first = client.post("/v1/analyze", files=files, data={"question": "What is the total?"}).json()
        second = client.post("/v1/analyze", files=files, data={"question": "What is the total?"}).json()
    assert (first["vision"]["cached"], second["vision"]["cached"]) == (False, True)
    assert len(vision.requests) == 1


# --- Redis -------------------------------------------------------------------------------------------------------


async def test_replicas_share_results_through_redis(redis_url: str) -> None:
    settings = CacheSettings(url=redis_url, ttl_s=30)
    first_vision, second_vision = FakeVision(), FakeVision()
    first = CachedVision(first_vision, RedisStore(redis_url, settings.ttl_s), settings)
    second = CachedVision(second_vision, RedisStore(redis_url, settings.ttl_s), settings)
    try:
        answered = await first.generate(request(encoded(picture(seed=7))))
        shared = await second.generate(request(encoded(picture(seed=7), "JPEG", quality=90)))
    finally:
        await first.aclose()
        await second.aclose()
    assert shared.cached is True
    assert shared.answer == answered.answer
    assert (len(first_vision.requests), len(second_vision.requests)) == (1, 0)


async def test_values_expire_in_redis(redis_url: str) -> None:
    store = RedisStore(redis_url, ttl_s=0.2)
    try:
        await store.set("k", "v")
        assert await store.get("k") == "v"
        await asyncio.sleep(0.3)
        assert await store.get("k") is None
    finally:
        await store.aclose()
