"""One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.config import ModelConfig
from megalite.model.attention import Attention
from megalite.model.mlp import SwiGLUMLP
from megalite.model.norm import RMSNorm
from megalite.model.recompute import checkpoint
from megalite.model.spec import fuses_attn_norm, fuses_mlp_norm
from megalite.parallel.rng import RNGTracker
from megalite.parallel.state import ParallelState


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, rng: RNGTracker | None, device=None) -> None:
        super().__init__()
        self.cfg, self.ps, self.rng = cfg, ps, rng
        # With TE, LayerNormLinear / LayerNormMLP carry these pre-norms inside them.
        self.attn_norm = nn.Identity() if fuses_attn_norm(cfg) else RMSNorm(
            cfg.hidden_size, cfg.norm_eps, cfg.norm_impl, partial_grad=ps.sp, device=device, ps=ps)
        self.attn = Attention(cfg, ps, rng, device=device)
        self.mlp_norm = nn.Identity() if fuses_mlp_norm(cfg) else RMSNorm(
            cfg.hidden_size, cfg.norm_eps, cfg.norm_impl, partial_grad=ps.sp, device=device, ps=ps)
        self.mlp = SwiGLUMLP(cfg, ps, device=device)
        self.recompute = False  # full recomputation of this layer (set by model.recompute)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.hidden_dropout
        if p == 0.0 or not self.training:
            return x
        # Under SP each rank holds different tokens, so masks must differ; otherwise they must match.
        ctx = self.rng.fork() if (self.ps.sp and self.rng is not None) else contextlib.nullcontext()
        with ctx:
            return F.dropout(x, p, training=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, doc_ids, rng=self.rng)
        return self._forward(x, cos, sin, doc_ids)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 doc_ids: torch.Tensor | None) -> torch.Tensor:
        a = self._dropout(self.attn(self.attn_norm(x), cos, sin, doc_ids))
        if isinstance(self.mlp_norm, RMSNorm):
            # The residual add and the MLP's pre-norm: one pass over the stream with Triton norms.
            normed, x = self.mlp_norm(a, residual=x)
        else:
            x = x + a
            normed = self.mlp_norm(x)
        return x + self._dropout(self.mlp(normed))
