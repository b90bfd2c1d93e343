"""Small helpers shared by the Triton kernels: launch sizing and input checks.

Kept separate so each kernel file stays about its math. Nothing here imports Triton at module
level beyond what the kernels themselves need, so `megalite.kernels.reference` stays importable
on a machine without Triton.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compile_boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a kernel's entry point for torch.compile (train.compile). On a GPU dynamo traces the
    launch as a user-defined Triton kernel, so nothing changes. Under TRITON_INTERPRET it would try
    to trace the interpreter's numpy loop and fail, so there the call stays eager behind a graph break."""
    return torch.compiler.disable(fn) if interpreting() else fn


def check_device(*tensors: torch.Tensor) -> None:
    """Triton compiles only for GPUs; on a CPU it runs solely through its interpreter."""
    for t in tensors:
        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "Triton kernels need a GPU; on a CPU set TRITON_INTERPRET=1 (slow, for tests) "
                "or use the torch implementation (impl='torch')"
            )


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs(device: torch.device, rows: int, per_sm: int = 4) -> int:
    """How many persistent programs to launch for a row loop: a few per SM, never more than rows.

    In the interpreter every program is a Python loop iteration, so a handful is both fastest and
    enough to exercise the multi-program reduction paths.
    """
    if device.type == "cuda":
        target = _sm_count(device.index or 0) * per_sm
    else:
        target = 4
    return max(1, min(rows, target))


def warps_for(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """Views `x` as [rows, last dim] with a unit stride on the last dim (copying only if needed)."""
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least one dimension, got a scalar")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.unsqueeze(0)
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (use float32, float16 or bfloat16)")
