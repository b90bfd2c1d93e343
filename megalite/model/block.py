"""One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)), each add fused into the norm after it."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.config import ModelConfig
from megalite.model.attention import Attention
from megalite.model.kv_cache import LayerKVCache
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None = None,
                pending: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is x + pending: `pending` is the previous layer's MLP output, left
        unadded so that this layer's pre-norm adds it in the same kernel. Returns (stream, this
        layer's MLP output), the next layer's (x, pending). `kv_cache`: incremental decoding."""
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, doc_ids, pending, kv_cache, rng=self.rng)
        return self._forward(x, cos, sin, doc_ids, pending, kv_cache)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None,
                 pending: torch.Tensor | None,
                 kv_cache: LayerKVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        normed, x = add_norm(self.attn_norm, pending, x)
        a = self._dropout(self.attn(normed, cos, sin, doc_ids, kv_cache))
        normed, x = add_norm(self.mlp_norm, a, x)
        return x, self._dropout(self.mlp(normed))


def add_norm(norm: nn.Module, delta: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + delta), x + delta); one kernel with Triton norms. The TE-fused norms are Identity here."""
    if delta is None:
        return norm(x), x
    if isinstance(norm, RMSNorm):
        return norm(delta, residual=x)
    x = x + delta
    return norm(x), x
