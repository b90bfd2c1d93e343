"""SwiGLU MLP: fused gate|up column-parallel projection, row-parallel down projection."""

from __future__ import annotations

import torch
import torch.nn as nn

from megalite.config import ModelConfig
from megalite.model.spec import column_linear, row_linear, swiglu_fn, te_mlp
from megalite.parallel.layers import RowParallelLinear
from megalite.parallel.state import ParallelState


class SwiGLUMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, device=None) -> None:
        super().__init__()
        f = cfg.ffn_size
        if cfg.mlp_impl == "te":  # TE LayerNormMLP, with the pre-norm inside (the layer skips its own)
            self.te = te_mlp(cfg, ps, device=device)
            return
        self.gate_up = column_linear(cfg, cfg.hidden_size, (f, f), ps, device=device)
        self.down = row_linear(cfg, f, cfg.hidden_size, ps, device=device)
        self.act = swiglu_fn(cfg.mlp_impl)
        # Triton: the down projection takes gate/up and rebuilds the activation in its backward, so
        # no [tokens, ffn] activation is kept for the weight gradient.
        self.fused_down = cfg.mlp_impl == "triton" and isinstance(self.down, RowParallelLinear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "te"):
            return self.te(x)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        if self.fused_down:
            from megalite.kernels.swiglu import swiglu_linear

            return self.down.reduce_output(swiglu_linear(gate, up, self.down.weight))
        return self.down(self.act(gate, up))
