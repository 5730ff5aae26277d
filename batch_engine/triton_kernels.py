"""What the engine's two Triton kernels (`batch_engine.decode_attention`, `batch_engine.skinny_linear`) share: whether
Triton is there, where a kernel can run, the check at start that it agrees with what it replaces, and the choice of
it from its setting. Importing this imports neither torch nor Triton."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("batch_engine")

_DEPENDENT_LAUNCH = False
"""Whether the kernels launch with programmatic dependent launch (`dependent_launch`)."""


@functools.cache
def available() -> bool:
    """Whether Triton can be imported (it ships with the CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def runs_on(device: torch.device) -> bool:
    """Whether a kernel can run on `device`: a CUDA device with Triton, or any under Triton's interpreter
    (`TRITON_INTERPRET=1`, how the tests run them on the CPU)."""
    return available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def agrees(
    what: str, instead: str, run: Callable[[], torch.Tensor], expected: torch.Tensor, tolerance: float, where: str
) -> bool:
    """Whether `run` (the kernel `what` on a small example) runs and comes within `tolerance` of `expected` (what
    `instead`, the path it replaces, gives); if not, why is logged as a warning, so that a GPU or a Triton too old for
    the kernel keeps `instead` rather than failing to start."""
    try:
        got = run().float()
    except Exception:  # Triton's failures have no common class; what failed is logged
        log.warning("%s does not run on %s: %s instead", what, where, instead, exc_info=True)
        return False
    error = float((got - expected.float()).abs().max())
    if not error <= tolerance:  # NaN fails too
        log.warning("%s differs from %s by %.3g on %s: %s instead", what, instead, error, where, instead)
        return False
    return True


def wanted(setting: bool | None, what: str, device: torch.device, check: Callable[[], bool]) -> bool:
    """Whether to use the kernel `what`: `setting` if given (True refused where it cannot run), else on a CUDA device
    with Triton where `check` finds it agreeing."""
    if setting is None:
        return device.type == "cuda" and available() and check()
    if setting and not runs_on(device):
        raise ValueError(f"{what} needs Triton and a CUDA device, not {device}")
    return setting


def dependent_launch(setting: bool | None, device: torch.device) -> bool:
    """Whether the kernels launch with programmatic dependent launch (`EngineSettings.dependent_launch`): `setting`
    if given (True refused where it cannot run), else on a CUDA device of compute capability 9.0 or later (Hopper's
    `griddepcontrol`) where Triton is installed. Process-wide, as the kernels' operators are: once an engine of the
    process turns it on, it stays on, and this says so to every engine started after (their compiled layers then
    launch so too). Each kernel waits for the one before it at its entry, before it reads or writes anything, and
    lets the next one launch right after (`launch_options`): that next kernel waits in turn before it touches this
    one's inputs or outputs, as these kernels do at their entry and inductor's do before their first access to what
    the kernel before them reads or writes (its `triton.enable_pdl`); kernels launched without it (cuBLAS's, eager
    torch's) start only once this one has finished."""
    import torch

    global _DEPENDENT_LAUNCH
    supported = device.type == "cuda" and available() and torch.cuda.get_device_capability(device) >= (9, 0)
    if setting and not supported:
        raise ValueError(
            f"dependent launch needs Triton and a CUDA device of compute capability 9.0 or later, not {device}"
        )
    _DEPENDENT_LAUNCH = _DEPENDENT_LAUNCH or (supported if setting is None else setting)
    return _DEPENDENT_LAUNCH and supported


def launch_options(device: torch.device) -> dict[str, bool]:
    """The keywords of a kernel's launch on `device`: its `pdl` (whether it waits for the kernel before it at its
    entry, then lets the next one start) and, when that is on (`dependent_launch`, on a CUDA device), Triton's
    `launch_pdl`."""
    return {"pdl": True, "launch_pdl": True} if _DEPENDENT_LAUNCH and device.type == "cuda" else {"pdl": False}
