"""Sessions: follow-up questions about an image without sending it again.

Every `/v1/analyze` answer carries a `session_id`. A later request that gives that `session_id` instead of an image
asks about the same image: the decoded image is kept, and so is the vision stage's description, which a follow-up on
the reasoning route reuses instead of asking the vision stage again (a vision-only follow-up still asks the vision
stage, about the kept image, since its answer is the question's). A session belongs to the API key that opened it
(to the client address when no keys are configured): another caller's session id is unknown to it.

Sessions live in this process's memory: at most `max_sessions`, holding at most `max_bytes` of images (decoded pixels
and uploaded bytes; the least recently used go first), each for `ttl_s` after its last use. With several replicas,
route a session's requests to the same replica, or send the image again.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace

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


class SessionStore:
    def __init__(self, settings: SessionSettings) -> None:
        self._settings = settings
        # keyed by owner too, so that another caller's lookup misses without touching the session; sized in bytes
        self._sessions: TTLCache[tuple[str, str], Session] = TTLCache(math.inf, settings.ttl_s, getsizeof=_size)

    def open(self, owner: str, image: DecodedImage, image_url: str | None) -> Session:
        session = Session(secrets.token_urlsafe(18), owner, image, image_url, None)
        self._put(session)
        return session

    def get(self, session_id: str, owner: str) -> Session:
        """The live session `session_id` of `owner`; `SessionNotFound` otherwise (expired, evicted, never opened,
        or another caller's: all look the same)."""
        session = self._sessions.get((owner, session_id))
        if session is None:
            raise SessionNotFound(
                f"no session {session_id!r}: it expired ({self._settings.ttl_s:g} s after its last use), was "
                "evicted, or was never opened by this caller; send the image again"
            )
        self._put(session)
        return session

    def remember(self, session: Session, vision: VisionResult) -> Session:
        """Keep `vision` as the session's description when it is one (a `describe` result)."""
        if vision.task != "describe" or vision.fallback is not None:
            return session
        updated = replace(session, description=vision)
        if (session.owner, session.id) in self._sessions:
            self._put(updated)
        return updated

    def _put(self, session: Session) -> None:
        """Keep `session` for `ttl_s` from now as the most recently used; then the least recently used go while
        there are more than `max_sessions`, or while they hold more than `max_bytes` (all but the last one)."""
        sessions, limits = self._sessions, self._settings
        sessions[session.owner, session.id] = session
        while len(sessions) > limits.max_sessions or (sessions.currsize > limits.max_bytes and len(sessions) > 1):
            sessions.popitem()


def _size(session: Session) -> int:
    """What a session's image holds in memory: its RGB pixels (counted whether or not they are decoded yet, so that
    the total never depends on when they were) and the uploaded bytes kept with them."""
    image = session.image
    return image.width * image.height * 3 + len(image.source or b"")
