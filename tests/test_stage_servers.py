"""What both stage servers share: every stage error has a status, and the command lines start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reasoning_stage import errors as reasoning_errors
from reasoning_stage import server as reasoning_server
from tests.test_errors import leaves
from vision_stage import errors as vision_errors
from vision_stage import server as vision_server


def test_every_reasoning_error_has_its_status_and_code() -> None:
    missing = leaves(reasoning_errors.ReasoningError) - set(reasoning_server.REASONING_ERRORS)
    assert not missing, f"add these to REASONING_ERRORS: {sorted(cls.__name__ for cls in missing)}"


def test_every_vision_error_has_its_status_and_code() -> None:
    missing = leaves(vision_errors.VisionError) - set(vision_server.VISION_ERRORS)
    assert not missing, f"add these to VISION_ERRORS: {sorted(cls.__name__ for cls in missing)}"
    assert all(status.status == 400 for cls, status in vision_server.VISION_ERRORS.items() if "Image" in cls.__name__)


# -- the command lines ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["vision_stage", "reasoning_stage"])
def test_serve_help_lists_the_flags(stage: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", stage, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert all(flag in done.stdout for flag in ("--backend", "--model", "--host", "--port", "--device", "--dtype"))
