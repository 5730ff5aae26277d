"""The failures of a call to a stage server (the tree is drawn in `stage_protocol.client.chat`)."""

from __future__ import annotations

from collections.abc import Mapping


class StageHttpError(Exception):
    """Root of every failure of a call to a stage server. The message says what happened, to follow the server's
    name: "could not be reached (…)", "answered HTTP 503: …"."""


class StageUnreachable(StageHttpError):
    pass


class StageTimedOut(StageHttpError):
    pass


class StageStatus(StageHttpError):
    def __init__(self, status: int, body: object, headers: Mapping[str, str]) -> None:
        super().__init__(f"answered HTTP {status}: {detail(body, f'status {status}')}")
        self.status = status
        self.body = body
        self.headers = headers


class StageErrorEvent(StageHttpError):
    def __init__(self, body: object) -> None:
        super().__init__(f"sent an error event: {detail(body, 'no message')}")
        self.body = body


class StageMalformed(StageHttpError):
    pass


def detail(body: object, fallback: str) -> str:
    """The server's own words: `message` of an OpenAI-style error object, else the body's text."""
    message = body.get("message") if isinstance(body, dict) else body
    return clip(message) if isinstance(message, str) and message else fallback


def clip(value: object, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
