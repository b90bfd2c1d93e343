"""RMSNorm with a replicated weight; under SP each rank sees a sequence shard, so its grad is partial."""

from __future__ import annotations

import torch
import torch.nn as nn

from megalite.model.spec import rms_norm_fn, te_norm
from megalite.parallel.state import ParallelState


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, impl: str = "torch", partial_grad: bool = False,
                 device=None, dtype=None, ps: ParallelState | None = None) -> None:
        super().__init__()
        self.eps = eps
        if impl == "te":
            # TE's module owns the weight; we register that same Parameter as ours, so names and
            # checkpoints stay those of the torch norm. The module sits in a list (unregistered).
            mod = te_norm(dim, eps, ps or ParallelState(), partial_grad, device=device)
            self.weight = mod.weight
            self._te = [mod]
            self.fn = lambda x, w, eps: mod(x)
            return
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.weight.init = "ones"  # type: ignore[attr-defined]
        self.weight.sync_tp_grad = partial_grad  # type: ignore[attr-defined]
        self.fn = rms_norm_fn(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.eps)
