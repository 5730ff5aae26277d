"""The error shapes every stage's tree shares; each stage keeps its own classes and names (`vision_stage.errors`,
`reasoning_stage.errors`) and derives them from these."""

from __future__ import annotations


class Unavailable(Exception):
    """The backend cannot answer now (the base of a stage's `…Unavailable`). `retry_after_s`: how long the server
    asked to wait, when it said so. `retryable`: whether asking again may help — False once part of an answer had
    arrived (the work would be redone) or when the request's own deadline passed."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.retryable = retryable
