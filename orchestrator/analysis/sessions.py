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

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

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
        self._sessions: OrderedDict[str, tuple[float, Session]] = OrderedDict()
        self._bytes = 0

    def open(self, owner: str, image: DecodedImage, image_url: str | None) -> Session:
        session = Session(secrets.token_urlsafe(18), owner, image, image_url, None)
        self._put(session)
        return session

    def get(self, session_id: str, owner: str) -> Session:
        """The live session `session_id` of `owner`; `SessionNotFound` otherwise (expired, evicted, never opened,
        or another caller's: all look the same)."""
        entry = self._sessions.get(session_id)
        if entry is None or entry[1].owner != owner or entry[0] <= time.monotonic():
            if entry is not None and entry[0] <= time.monotonic():
                del self._sessions[session_id]
                self._bytes -= _size(entry[1])
            raise SessionNotFound(
                f"no session {session_id!r}: it expired ({self._settings.ttl_s:g} s after its last use), was "
                "evicted, or was never opened by this caller; send the image again"
            )
        self._put(entry[1])
        return entry[1]

    def remember(self, session: Session, vision: VisionResult) -> Session:
        """Keep `vision` as the session's description when it is one (a `describe` result)."""
        if vision.task != "describe" or vision.fallback is not None:
            return session
        updated = replace(session, description=vision)
        if session.id in self._sessions:
            self._put(updated)
        return updated

    def _put(self, session: Session) -> None:
        previous = self._sessions.pop(session.id, None)
        if previous is not None:
            self._bytes -= _size(previous[1])
        self._sessions[session.id] = (time.monotonic() + self._settings.ttl_s, session)
        self._bytes += _size(session)
        limits = self._settings
        while len(self._sessions) > limits.max_sessions or (self._bytes > limits.max_bytes and len(self._sessions) > 1):
            _, (_, evicted) = self._sessions.popitem(last=False)
            self._bytes -= _size(evicted)


def _size(session: Session) -> int:
    """What a session's image holds in memory: its RGB pixels (counted whether or not they are decoded yet, so that
    the total never depends on when they were) and the uploaded bytes kept with them."""
    image = session.image
    return image.width * image.height * 3 + len(image.source or b"")
