"""Fused kernels (Triton) with torch references, and the Transformer Engine glue for FP8.

The Triton-backed names are imported on first use, so `import megalite.kernels` (and the torch
references) work where Triton is unavailable; the kernels themselves need a GPU, or
TRITON_INTERPRET=1 on a CPU.
"""

from __future__ import annotations

import importlib
from typing import Any

from megalite.kernels.reference import (
    cross_entropy_ref,
    fused_linear_cross_entropy_ref,
    rms_norm_ref,
    swiglu_ref,
)

_LAZY = {
    "rms_norm": "megalite.kernels.rmsnorm",
    "swiglu": "megalite.kernels.swiglu",
    "swiglu_linear": "megalite.kernels.swiglu",
    "cross_entropy": "megalite.kernels.cross_entropy",
    "fused_linear_cross_entropy": "megalite.kernels.fused_linear_ce",
    "fused_linear_logprobs": "megalite.kernels.fused_linear_ce",
}

__all__ = [
    "cross_entropy",
    "cross_entropy_ref",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "fused_linear_logprobs",
    "rms_norm",
    "rms_norm_ref",
    "swiglu",
    "swiglu_linear",
    "swiglu_ref",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megalite.kernels' has no attribute {name!r}")
