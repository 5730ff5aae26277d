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

from stage_protocol.errors import Unavailable


class ReasoningError(Exception):
    """Root of every error the reasoning stage raises."""


class ReasoningDisabled(ReasoningError):
    """No reasoning backend is deployed."""


class ReasoningUnavailable(ReasoningError, Unavailable):
    """The backend cannot answer now (`retry_after_s`, `retryable`: see `stage_protocol.errors.Unavailable`)."""


class ReasoningOverloaded(ReasoningUnavailable):
    """This service already has as many reasoning requests in flight and waiting as it admits."""


class ReasoningRejected(ReasoningError):
    """The backend refused the request."""


class ReasoningInvalidOutput(ReasoningError):
    """The backend produced output that cannot be used."""


class ReasoningModelError(ReasoningError):
    """The model could not be loaded."""
