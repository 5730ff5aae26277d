"""Sessions: follow-up questions about an image without sending it again.

Every `/v1/analyze` answer carries a `session_id`. A later request that gives that `session_id` instead of an image
asks about the same image: the decoded image is kept, and so is the vision stage's description, which a follow-up on
the reasoning route reuses instead of asking the vision stage again (a vision-only follow-up still asks the vision
stage, about the kept image, since its answer is the question's). A session belongs to the API key that opened it
(to the client address when no keys are configured): another caller's session id is unknown to it.

At most `max_sessions` are kept, holding at most `max_bytes` of images (decoded pixels and uploaded bytes; the least
recently used go first), each for `ttl_s` after its last use. `MemorySessions` keeps them in this process;
`RedisSessions` (`ORCH_STATE__URL`) in a Redis shared by every replica, so that a follow-up may land on any of them.
A Redis that fails or does not answer within a second makes the request fail with `SessionsUnavailable` (503, retry
after a second): never a hung request, never another caller's session.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Protocol

from cachetools import TTLCache

from orchestrator.errors import SessionNotFound
from orchestrator.settings import SessionSettings
from vision_stage.types import DecodedImage, VisionResult


@dataclass(frozen=True)
class Session:
    id: str
    owner: str
    image: DecodedImage
    image_url: str | None
    description: VisionResult | None
    """The vision stage's last `describe` result for this image, reused on the reasoning route."""


class SessionStore(Protocol):
    async def open(self, owner: str, image: DecodedImage, image_url: str | None) -> Session: ...

    async def get(self, session_id: str, owner: str) -> Session: ...

    async def remember(self, session: Session, vision: VisionResult) -> Session: ...

    async def aclose(self) -> None: ...


def build_sessions(settings: SessionSettings, url: str | None) -> SessionStore:
    """Sessions in Redis at `url` (shared by every replica), or in this process's memory."""
    if url:
        from orchestrator.analysis.redis_sessions import RedisSessions

        return RedisSessions(url, settings)
    return MemorySessions(settings)


def not_found(session_id: str, settings: SessionSettings) -> SessionNotFound:
    return SessionNotFound(
        f"no session {session_id!r}: it expired ({settings.ttl_s:g} s after its last use), was evicted, or was never "
        "opened by this caller; send the image again"
    )


def describes(vision: VisionResult) -> bool:
    """Whether `vision` is what a session keeps: the vision stage's own `describe` result."""
    return vision.task == "describe" and vision.fallback is None


class MemorySessions:
    def __init__(self, settings: SessionSettings) -> None:
        self._settings = settings
        # keyed by owner too, so that another caller's lookup misses without touching the session; sized in bytes
        self._sessions: TTLCache[tuple[str, str], Session] = TTLCache(math.inf, settings.ttl_s, getsizeof=session_size)

    async def open(self, owner: str, image: DecodedImage, image_url: str | None) -> Session:
        session = Session(secrets.token_urlsafe(18), owner, image, image_url, None)
        self._put(session)
        return session

    async def get(self, session_id: str, owner: str) -> Session:
        """The live session `session_id` of `owner`; `SessionNotFound` otherwise (expired, evicted, never opened,
        or another caller's: all look the same)."""
        session = self._sessions.get((owner, session_id))
        if session is None:
            raise not_found(session_id, self._settings)
        self._put(session)
        return session

    async def remember(self, session: Session, vision: VisionResult) -> Session:
        """Keep `vision` as the session's description when it is one (a `describe` result)."""
        if not describes(vision):
            return session
        updated = replace(session, description=vision)
        if (session.owner, session.id) in self._sessions:
            self._put(updated)
        return updated

    async def aclose(self) -> None:
        self._sessions.clear()

    def _put(self, session: Session) -> None:
        """Keep `session` for `ttl_s` from now as the most recently used; then the least recently used go while
        there are more than `max_sessions`, or while they hold more than `max_bytes` (all but the last one)."""
        sessions, limits = self._sessions, self._settings
        sessions[session.owner, session.id] = session
        while len(sessions) > limits.max_sessions or (sessions.currsize > limits.max_bytes and len(sessions) > 1):
            sessions.popitem()


def session_size(session: Session) -> int:
    """What a session's image holds in memory: its RGB pixels (counted whether or not they are decoded yet, so that
    the total never depends on when they were) and the uploaded bytes kept with them."""
    image = session.image
    return image.width * image.height * 3 + len(image.source or b"")
