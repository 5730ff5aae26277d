"""Errors raised by the reasoning stage.

The tree::

    ReasoningError
    ├── ReasoningDisabled             no reasoning backend is deployed (the `none` backend), by design
    ├── ReasoningUnavailable          the backend cannot answer now (not loaded, down, overloaded)
    │   └── ReasoningOverloaded       the orchestrator admits no more reasoning requests now (admission control)
    ├── ReasoningRejected             the backend refused the request (prompt too long, bad parameters)
    ├── ReasoningInvalidOutput        the backend answered something unusable
    └── ReasoningModelError           the model could not be loaded from the configured path or id

Foreign errors (torch's, transformers', OS errors while loading) are translated into this tree by the backend that
calls the foreign library; nothing outside the stage sees them.
"""

from __future__ import annotations


class ReasoningError(Exception):
    """Root of every error the reasoning stage raises."""


class ReasoningDisabled(ReasoningError):
    """No reasoning backend is deployed."""


class ReasoningUnavailable(ReasoningError):
    """The backend cannot answer now. `retryable`: whether asking again may help — False once part of an answer
    had arrived (the work would be redone) or when the request's own deadline passed."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.retryable = retryable


class ReasoningOverloaded(ReasoningUnavailable):
    """This service already has as many reasoning requests in flight and waiting as it admits."""


class ReasoningRejected(ReasoningError):
    """The backend refused the request."""


class ReasoningInvalidOutput(ReasoningError):
    """The backend produced output that cannot be used."""


class ReasoningModelError(ReasoningError):
    """The model could not be loaded."""
