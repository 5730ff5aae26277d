"""Errors raised by the vision stage.

The tree::

    VisionError
    ├── ImageRejected                 the input is not a usable image (the caller's fault)
    │   ├── ImageEmpty                zero bytes
    │   ├── ImageTooLarge             more bytes than the configured limit
    │   ├── ImageTooManyPixels        more pixels than the configured limit (decompression bombs too)
    │   ├── ImageUnsupported          bytes of no image format we accept
    │   └── ImageCorrupt              a known format, but truncated or damaged
    ├── VisionUnavailable             the backend cannot answer now (not loaded, down, overloaded)
    │   └── VisionOverloaded          the orchestrator admits no more vision requests now (admission control)
    ├── VisionRejected                the backend refused the request (too long, bad parameters, unknown model)
    └── VisionInvalidOutput           the backend answered something unusable

Foreign errors (Pillow's, onnxruntime's, torch's) are translated into this tree by the module that calls the
foreign library; nothing outside the stage sees them.
"""

from __future__ import annotations

from stage_protocol.errors import Unavailable


class VisionError(Exception):
    """Root of every error the vision stage raises."""


class ImageRejected(VisionError):
    """The input is not a usable image."""


class ImageEmpty(ImageRejected):
    """The image has no bytes."""


class ImageTooLarge(ImageRejected):
    """The image has more bytes than allowed."""


class ImageTooManyPixels(ImageRejected):
    """The image has more pixels than allowed."""


class ImageUnsupported(ImageRejected):
    """The bytes are not an image in a format we accept."""


class ImageCorrupt(ImageRejected):
    """The image is truncated or damaged."""


class VisionUnavailable(VisionError, Unavailable):
    """The backend cannot answer now (`retry_after_s`, `retryable`: see `stage_protocol.errors.Unavailable`)."""


class VisionOverloaded(VisionUnavailable):
    """This service already has as many vision requests in flight and waiting as it admits."""


class VisionRejected(VisionError):
    """The backend refused the request."""


class VisionInvalidOutput(VisionError):
    """The backend produced output that cannot be used."""
