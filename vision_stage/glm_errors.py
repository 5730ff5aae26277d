"""Foreign errors of the `glm` vision backend (`vision_stage.glm`) translated into the `vision_stage.errors` tree, in
one place.

=========  =========================================================  ====================================
phase      raised                                                     becomes
=========  =========================================================  ====================================
load       anything (our own errors too: a failed warm-up request)    VisionUnavailable, naming the model
                                                                      and what to do
encode,    MemoryError, torch.OutOfMemoryError (CUDA OOM included)    VisionUnavailable (retry_after_s=1)
generate
encode     ValueError, TypeError, jinja2 TemplateError (the processor  VisionRejected
           or the template refused the image or prompt)
generate   ValueError (the model refused its inputs)                  VisionRejected
encode,    anything else (torch's RuntimeError, CUDA errors)          VisionUnavailable
generate
decode     anything                                                   VisionInvalidOutput
=========  =========================================================  ====================================

With the `batched` engine, `generate` covers submitting to the engine and whatever its thread fails the request with
(its own refusals, a full queue and a closed engine are `VisionError`s already). After loading, our own `VisionError`s
pass through unchanged. Unusable model output (no JSON where JSON was asked for, an empty answer, thinking cut off by
the token limit) is `VisionInvalidOutput`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from vision_stage.errors import VisionError, VisionInvalidOutput, VisionRejected, VisionUnavailable

Phase = Literal["load", "encode", "generate", "decode"]
OOM_RETRY_AFTER_S = 1.0


def translate_error(exc: Exception, *, phase: Phase, model: str) -> VisionError:
    """Map any exception raised while loading or running `model` into the vision error tree (the module's table)."""
    import torch
    from jinja2 import TemplateError

    if isinstance(exc, VisionUnavailable) or (isinstance(exc, VisionError) and phase != "load"):
        return exc
    detail = f"{type(exc).__name__}: {exc}"
    if phase == "load":  # a checkpoint that fails its warm-up request is not loaded either
        return VisionUnavailable(f"could not load the glm vision model {model!r} ({detail}); {_hint(model)}")
    if phase == "decode":
        return VisionInvalidOutput(f"the glm vision model {model!r} wrote output that could not be read ({detail})")
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        message = f"the glm vision model {model!r} ran out of memory ({detail}); retry, or send a smaller image"
        return VisionUnavailable(message, retry_after_s=OOM_RETRY_AFTER_S)
    refused = (ValueError, TypeError, TemplateError) if phase == "encode" else (ValueError,)
    if isinstance(exc, refused):
        return VisionRejected(f"the glm vision model {model!r} refused the request ({detail})")
    doing = "preparing the inputs for" if phase == "encode" else "generating an answer to"
    return VisionUnavailable(f"the glm vision model {model!r} failed while {doing} the request ({detail})")


def _hint(model: str) -> str:
    if Path(model).expanduser().is_dir():
        return (
            "check that the directory holds a GLM-4.6V-Flash checkpoint: config.json, the weights, and the processor "
            "files (processor_config.json or preprocessor_config.json, tokenizer.json, chat_template.jinja)"
        )
    return (
        "it is neither an existing local directory nor in the local hub cache: download zai-org/GLM-4.6V-Flash to a "
        "directory and set ORCH_VISION__MODEL to it, or set ORCH_VISION__ALLOW_DOWNLOAD=true to fetch a hub id"
    )


@contextmanager
def translated(phase: Phase, model: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise translate_error(exc, phase=phase, model=model) from exc
