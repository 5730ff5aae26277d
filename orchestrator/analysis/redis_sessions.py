"""Sessions in a Redis shared by every replica (`ORCH_STATE__URL`): a follow-up may land on any of them.

A session is one Redis hash under `session:<owner digest>:<id>`: `meta` (JSON: the image's facts, its URL, the kept
description as `orchestrator.stages.cache.result_to_json` writes it) and `image` (the uploaded bytes when they hold
the pixels as they are, else the pixels as a lossless PNG). Another replica rebuilds the `DecodedImage` from them,
with the facts the upload had (format, size, SHA-256) and its pixels decoded when first needed.

Bounds, as for sessions in memory: a hash lives `ttl_s` after its last use (Redis expires it); `session:lru` (a
sorted set by last use) and `session:bytes` (each session's size) let one Lua script, run at every write, drop
expired entries and then the least recently used while there are more than `max_sessions` or they hold more than
`max_bytes`. Every step is one atomic script or one command, so replicas never see half a session.

Redis failing (refused, reset, or no answer within `TIMEOUT_S`) is `SessionsUnavailable`: a 503 with `Retry-After`.
Data under a session key that does not read back as a session is a `SessionNotFound`, never a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import secrets
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from PIL import Image
from pydantic import ValidationError

from orchestrator.analysis.sessions import Session, describes, not_found, session_size
from orchestrator.errors import SessionsUnavailable
from orchestrator.settings import SessionSettings
from orchestrator.stages.cache import result_from_json, result_to_json
from vision_stage.types import DecodedImage, VisionResult

log = logging.getLogger(__name__)

TIMEOUT_S = 1.0
LRU = "session:lru"
SIZES = "session:bytes"
T = TypeVar("T")

_PUT = """
local clock = redis.call('TIME')
local key, now, ttl = KEYS[3], tonumber(clock[1]) + tonumber(clock[2]) / 1e6, tonumber(ARGV[4])
redis.call('HSET', key, 'meta', ARGV[1], 'image', ARGV[2])
redis.call('PEXPIRE', key, math.floor(ttl * 1000))
redis.call('ZADD', KEYS[1], now, key)
redis.call('HSET', KEYS[2], key, ARGV[5])
local function drop(victim)
  redis.call('ZREM', KEYS[1], victim)
  redis.call('HDEL', KEYS[2], victim)
  redis.call('DEL', victim)
end
for _, victim in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do drop(victim) end
local total = 0
for _, size in ipairs(redis.call('HVALS', KEYS[2])) do total = total + tonumber(size) end
local count = redis.call('ZCARD', KEYS[1])
while count > tonumber(ARGV[6]) or (total > tonumber(ARGV[7]) and count > 1) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  total = total - tonumber(redis.call('HGET', KEYS[2], oldest) or '0')
  drop(oldest)
  count = count - 1
end
return count
"""
"""Write a session and mark it the most recently used; then drop the expired and the least recently used over the
bounds (KEYS: the LRU set, the sizes, the session; ARGV: meta, image, unused, ttl, size, max sessions, max bytes).
Time is Redis's own (`TIME`), so that replicas whose clocks differ agree on what has expired."""

_TOUCH = """
local clock = redis.call('TIME')
if redis.call('PEXPIRE', KEYS[3], math.floor(tonumber(ARGV[2]) * 1000)) == 1 then
  redis.call('ZADD', KEYS[1], tonumber(clock[1]) + tonumber(clock[2]) / 1e6, KEYS[3])
  return redis.call('HGETALL', KEYS[3])
end
redis.call('ZREM', KEYS[1], KEYS[3])
redis.call('HDEL', KEYS[2], KEYS[3])
return {}
"""
"""Read a live session and mark it used (its time to live starts again); forget one that has expired."""

_REMEMBER = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'meta', ARGV[1]) end
"""


class RedisSessions:
    """The session store (`orchestrator.analysis.sessions.SessionStore`) in Redis at `url` (module docstring)."""

    def __init__(self, url: str, settings: SessionSettings) -> None:
        import redis.asyncio as redis

        self._settings = settings
        self._client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._put_script = self._client.register_script(_PUT)
        self._touch_script = self._client.register_script(_TOUCH)
        self._remember_script = self._client.register_script(_REMEMBER)

    async def open(self, owner: str, image: DecodedImage, image_url: str | None) -> Session:
        session = Session(secrets.token_urlsafe(18), owner, image, image_url, None)
        # the upload's own bytes, or its pixels as a PNG, encoded off the event loop
        data = image.source if image.source is not None else await asyncio.to_thread(_png, image)
        meta = _meta(session)
        settings = self._settings
        await self._call(
            self._put_script(
                keys=[LRU, SIZES, _key(owner, session.id)],
                args=[
                    meta,
                    data,
                    0,  # unused: the script reads Redis's clock
                    settings.ttl_s,
                    session_size(session),
                    settings.max_sessions,
                    settings.max_bytes,
                ],
            )
        )
        return session

    async def get(self, session_id: str, owner: str) -> Session:
        """The live session `session_id` of `owner` (its time to live starts again); `SessionNotFound` otherwise."""
        found = await self._call(
            self._touch_script(keys=[LRU, SIZES, _key(owner, session_id)], args=[0, self._settings.ttl_s])
        )
        fields = dict(zip(found[::2], found[1::2], strict=True)) if isinstance(found, list) else {}
        try:
            return _session(session_id, owner, fields[b"meta"], fields[b"image"])
        except (KeyError, ValueError, TypeError):  # gone, or not a session we wrote: the same to the caller
            raise not_found(session_id, self._settings) from None

    async def remember(self, session: Session, vision: VisionResult) -> Session:
        """Keep `vision` as the session's description when it is one (a `describe` result), if it still lives."""
        if not describes(vision):
            return session
        updated = replace(session, description=vision)
        try:
            await self._call(self._remember_script(keys=[_key(session.owner, session.id)], args=[_meta(updated)]))
        except SessionsUnavailable as exc:  # the answer stands; a later follow-up asks the vision stage again
            log.warning("the session's description was not kept: %s", exc)
        return updated

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, pending: Awaitable[T]) -> T:
        from redis.exceptions import RedisError

        try:
            return await pending
        except (RedisError, OSError, TimeoutError) as exc:
            raise SessionsUnavailable(
                f"the session store does not answer ({type(exc).__name__}); send the image again, or retry",
                retry_after_s=1.0,
            ) from exc


def _key(owner: str, session_id: str) -> str:
    """Owner and id: another caller's lookup of the same id reads another key (digested: an owner may be an address)."""
    return f"session:{hashlib.sha256(owner.encode()).hexdigest()[:32]}:{session_id}"


def _meta(session: Session) -> str:
    image = session.image
    facts = {"format": image.format, "width": image.width, "height": image.height, "byte_size": image.byte_size,
             "sha256": image.sha256, "source": image.source is not None}  # fmt: skip
    description = result_to_json(session.description) if session.description is not None else None
    return json.dumps({"image": facts, "image_url": session.image_url, "description": description})


def _png(image: DecodedImage) -> bytes:
    """The pixels of an image whose upload does not hold them as they are, losslessly."""
    out = io.BytesIO()
    image.pixels.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _session(session_id: str, owner: str, meta_json: bytes, data: bytes) -> Session:
    meta: dict[str, Any] = json.loads(meta_json)
    facts = meta["image"]

    def pixels() -> Image.Image:
        with Image.open(io.BytesIO(data)) as opened:
            return opened.convert("RGB")

    image = DecodedImage(
        pixels, str(facts["format"]), int(facts["width"]), int(facts["height"]), int(facts["byte_size"]),
        str(facts["sha256"]), source=data if facts["source"] else None,
    )  # fmt: skip
    description = meta.get("description")
    try:
        kept = result_from_json(description) if isinstance(description, str) else None
    except ValidationError:
        kept = None  # a description that no longer reads is only a lost shortcut: the image is what matters
    url = meta.get("image_url")
    return Session(session_id, owner, image, url if isinstance(url, str) else None, kept)
