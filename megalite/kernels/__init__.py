"""Fused kernels (Triton) with torch references, and the Transformer Engine glue for FP8.

The Triton kernels need a GPU, or TRITON_INTERPRET=1 on a CPU. Where Triton itself is missing, the
torch references still import and the kernel names raise one clear line when called.
"""

from __future__ import annotations

from megalite.kernels.reference import (
    cross_entropy_ref,
    fused_linear_cross_entropy_ref,
    rms_norm_ref,
    swiglu_ref,
)

try:
    from megalite.kernels.cross_entropy import cross_entropy
    from megalite.kernels.fused_linear_ce import fused_linear_cross_entropy, fused_linear_logprobs
    from megalite.kernels.rmsnorm import rms_norm
    from megalite.kernels.swiglu import swiglu, swiglu_linear
except ImportError as _e:  # no Triton on this machine
    _why = f"megalite.kernels needs Triton ({_e}); use the torch implementations (impl='torch')"

    def _missing(*_a, **_k):
        raise RuntimeError(_why)

    cross_entropy = fused_linear_cross_entropy = fused_linear_logprobs = _missing
    rms_norm = swiglu = swiglu_linear = _missing

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
