"""Vision results cached under a perceptual hash of the image plus the vision prompt.

The key is the image's perceptual hashes (a 64-bit DCT hash and a 64-bit difference hash of its grey levels,
`imagehash`), its orientation, the task and question the vision stage was asked, and the backend and model that
answered: the same picture re-encoded, recompressed or resized hits; another picture, another question, or another
model misses. A perceptual hash is blind to small print: two pictures that differ only in a few digits (the same
receipt with another total) can share a key. Profiles where a digit matters bypass the cache (`bypass`, `medical` by
default); `key: exact` keys on the decoded pixels' SHA-256 instead (only the very same pixels hit).

Stores: `MemoryStore` (LRU with a time to live, bounded in entries) by default; `RedisStore` when `url` is set, shared
by every orchestrator replica. Values are JSON (`result_to_json` / `result_from_json`), never pickles: a store that
others can write to cannot make this process run code, and a value that does not validate as a `VisionResult` (strict
types, no coercion) is a miss. A store that fails is logged and treated as a miss; the cache never fails a request.
Results that a fallback backend gave are not cached.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
from typing import Literal, Protocol

from cachetools import TTLCache
from pydantic import TypeAdapter

from orchestrator.settings import CacheSettings
from vision_stage.backend import Health, VisionBackend
from vision_stage.types import DecodedImage, VisionRequest, VisionResult

log = logging.getLogger(__name__)

HASH_SIZE = 8
"""8 × 8 grey levels per hash: 64 bits each. At 16 × 16 a JPEG re-encoding or a resize already flips a bit or two,
and a key must match exactly."""
ON_LOOP_KEY_PIXELS = 65_536
"""The key of an image with decoded pixels up to this many is computed on the event loop; a bigger image, or one
whose pixels are still to be decoded (`DecodedImage.pixels` is lazy), in a worker thread."""
KEY_VERSION = "v1"


class Store(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str) -> None: ...

    async def aclose(self) -> None: ...


def image_key(image: DecodedImage, kind: Literal["perceptual", "exact"]) -> str:
    """What identifies the picture: its perceptual hashes and orientation, or the SHA-256 of its pixels."""
    if kind == "exact":
        return "px:" + hashlib.sha256(image.pixels.tobytes()).hexdigest()
    import imagehash

    grey = image.pixels.convert("L")
    shape = "l" if image.width > image.height * 1.1 else "p" if image.height > image.width * 1.1 else "s"
    return f"ph:{imagehash.phash(grey, hash_size=HASH_SIZE)}:{imagehash.dhash(grey, hash_size=HASH_SIZE)}:{shape}"


def cache_key(request: VisionRequest, backend: str, model: str, kind: Literal["perceptual", "exact"]) -> str:
    prompt = json.dumps([request.task, request.question or "", backend, model], ensure_ascii=False)
    return f"vision:{KEY_VERSION}:{image_key(request.image, kind)}:{hashlib.sha256(prompt.encode()).hexdigest()}"


class MemoryStore:
    """At most `max_entries` values, each for `ttl_s`; the least recently used goes first."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self._entries: TTLCache[str, str] = TTLCache(max_entries, ttl_s)

    async def get(self, key: str) -> str | None:
        return self._entries.get(key)

    async def set(self, key: str, value: str) -> None:
        self._entries[key] = value

    async def aclose(self) -> None:
        self._entries.clear()


class RedisStore:
    """Values in Redis at `url`, each with a time to live of `ttl_s`."""

    def __init__(self, url: str, ttl_s: float) -> None:
        import redis.asyncio as redis

        self._client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._ttl_ms = max(1, int(ttl_s * 1000))

    async def get(self, key: str) -> str | None:
        value = await self._client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    async def set(self, key: str, value: str) -> None:
        await self._client.set(key, value, px=self._ttl_ms)

    async def aclose(self) -> None:
        await self._client.aclose()


class CachedVision:
    """`backend` behind the cache (module docstring); a hit comes back with `cached=True`."""

    def __init__(self, backend: VisionBackend, store: Store, settings: CacheSettings) -> None:
        self.name = backend.name
        self.model = backend.model
        self.backend = backend
        self.hits = 0
        self.misses = 0
        self._store = store
        self._settings = settings
        self._bypass = frozenset(name.strip() for name in settings.bypass.split(",") if name.strip())

    async def generate(self, request: VisionRequest) -> VisionResult:
        if request.profile in self._bypass:
            return await self.backend.generate(request)
        image, args = request.image, (request, self.backend.name, self.backend.model, self._settings.key)
        on_loop = image.pixels_decoded and image.width * image.height <= ON_LOOP_KEY_PIXELS
        key = cache_key(*args) if on_loop else await asyncio.to_thread(cache_key, *args)
        cached = await self._get(key)
        if cached is not None:
            self.hits += 1
            return dataclasses.replace(cached, cached=True)
        self.misses += 1
        result = await self.backend.generate(request)
        if result.fallback is None:
            await self._set(key, result)
        return result

    async def _get(self, key: str) -> VisionResult | None:
        try:
            value = await self._store.get(key)
            return result_from_json(value) if value is not None else None
        except Exception as exc:  # a failing or corrupted store is a miss, never a failed request
            log.warning("vision cache read failed (%s: %s); treated as a miss", type(exc).__name__, exc)
            return None

    async def _set(self, key: str, result: VisionResult) -> None:
        try:
            await self._store.set(key, result_to_json(result))
        except Exception as exc:
            log.warning("vision cache write failed (%s: %s)", type(exc).__name__, exc)

    async def health(self) -> Health:
        return await self.backend.health()

    async def aclose(self) -> None:
        try:
            await self.backend.aclose()
        finally:
            await self._store.aclose()


def build_store(settings: CacheSettings) -> Store:
    if settings.url:
        return RedisStore(settings.url, settings.ttl_s)
    return MemoryStore(settings.max_entries, settings.ttl_s)


@functools.cache
def _results() -> TypeAdapter[VisionResult]:
    return TypeAdapter(VisionResult)


def result_to_json(result: VisionResult) -> str:
    # through Python's json: a score that is not a number stays NaN (pydantic's JSON would write null)
    return json.dumps(_results().dump_python(result, mode="json"), ensure_ascii=False, separators=(",", ":"))


def result_from_json(text: str) -> VisionResult:
    """The `VisionResult` that `result_to_json` wrote; a value of another shape raises `pydantic.ValidationError`
    (a `ValueError`)."""
    return _results().validate_json(text, strict=True)
