"""RMSNorm with a replicated weight; under SP each rank sees a sequence shard, so its grad is partial."""

from __future__ import annotations

import torch
import torch.nn as nn

from megalite.model.spec import rms_norm_fn, te_norm
from megalite.parallel.sharding import tag_param
from megalite.parallel.state import ParallelState


def _matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype, if one is active: this norm's output feeds a matmul, which would cast it
    to that dtype anyway. Writing it there directly halves the bytes written and the TP traffic in
    front of the matmul (the SP all-gather, and in backward the reduce-scatter or all-reduce of the
    input grad, which then sums bf16 partials as Megatron's bf16 activations do). The matmul inputs
    are bit-identical."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, impl: str = "torch", partial_grad: bool = False,
                 device=None, dtype=None, ps: ParallelState | None = None, feeds_matmul: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.feeds_matmul = feeds_matmul  # False for the q/k norms, whose output goes to RoPE first
        self.fused_add = impl == "triton"
        if impl == "te":
            # TE's module owns the weight; we register that same Parameter as ours, so names and
            # checkpoints stay those of the torch norm. The module sits in a list (unregistered).
            mod = te_norm(dim, eps, ps or ParallelState(), partial_grad, device=device)
            self.weight = mod.weight
            self._te = [mod]
            self.fn = lambda x, w, eps: mod(x)
            return
        self.weight = tag_param(nn.Parameter(torch.empty(dim, device=device, dtype=dtype)), "ones",
                                sync_tp_grad=partial_grad)
        self.fn = rms_norm_fn(impl)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(residual + x), residual + x), one kernel on the Triton path."""
        out_dtype = _matmul_dtype(x) if self.feeds_matmul else None
        if self.fused_add:
            return self.fn(x, self.weight, self.eps, residual=residual, out_dtype=out_dtype)
        h = x if residual is None else residual + x
        y = self.fn(h, self.weight, self.eps)
        y = y if out_dtype is None else y.to(out_dtype)
        return y if residual is None else (y, h)
