"""SwiGLU MLP: fused gate|up column-parallel projection, row-parallel down projection."""

from __future__ import annotations

import torch
import torch.nn as nn

from megalite.config import ModelConfig
from megalite.model.spec import swiglu_fn
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalite.parallel.state import ParallelState


class SwiGLUMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, device=None) -> None:
        super().__init__()
        f = cfg.ffn_size
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, (f, f), ps, device=device)
        self.down = RowParallelLinear(f, cfg.hidden_size, ps, init="scaled", device=device)
        self.act = swiglu_fn(cfg.mlp_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate, up))
