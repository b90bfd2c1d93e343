"""Grouped-query self-attention on tensor-parallel projections.

Heads are split over TP. When there are fewer kv heads than TP ranks, the kv blocks of the fused
qkv weight are kept whole on every rank and each rank uses the kv head its query heads belong to;
those rows' gradients are then partial per rank and summed over TP after backward.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.config import ConfigError, ModelConfig
from megalite.model.kv_cache import LayerKVCache
from megalite.model.norm import RMSNorm
from megalite.model.recompute import checkpoint
from megalite.model.rope import apply_rope
from megalite.model.spec import column_linear, fuses_attn_norm, row_linear
from megalite.parallel.rng import RNGTracker
from megalite.parallel.state import ParallelState

_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def attention_backend(requested: str, device: torch.device) -> str:
    if requested == "flash" and not (_HAS_FLASH and device.type == "cuda"):
        raise ConfigError("model.attention_backend=flash needs the flash-attn package and a CUDA GPU")
    if requested == "auto":
        return "flash" if _HAS_FLASH and device.type == "cuda" else "sdpa"
    if requested not in ("flash", "sdpa"):
        raise ConfigError(f"unknown model.attention_backend '{requested}' (auto | flash | sdpa)")
    return requested


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [b, s] -> boolean [b, 1, s, s]: causal and within the same document."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))).unsqueeze(1)


def _flash(q, k, v, doc_ids, dropout_p):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    s, b, nh, d = q.shape
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [b, s, heads, d]
    if doc_ids is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True).transpose(0, 1)
    # Packed documents: cut at doc boundaries and run varlen attention over the flattened batch.
    flat = (doc_ids + torch.arange(b, device=doc_ids.device).unsqueeze(1) * (doc_ids.max() + 1)).reshape(-1)
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    max_len = int(torch.diff(cu).max())
    out = flash_attn_varlen_func(q.reshape(b * s, nh, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d),
                                 cu, cu, max_len, max_len, dropout_p=dropout_p, causal=True)
    return out.view(b, s, nh, d).transpose(0, 1)


def core_attention(q, k, v, doc_ids, dropout_p: float, backend: str) -> torch.Tensor:
    """q [s, b, nh, d], k/v [s, b, nkv, d] -> [s, b, nh, d]."""
    if backend == "flash" and q.dtype in (torch.float16, torch.bfloat16):  # flash-attn has no fp32 kernels
        return _flash(q, k, v, doc_ids, dropout_p)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    gqa = q.shape[1] != k.shape[1]
    if doc_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc_ids),
                                             dropout_p=dropout_p, enable_gqa=gqa)
    return out.permute(2, 0, 1, 3)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, rng: RNGTracker | None, device=None) -> None:
        super().__init__()
        self.ps, self.rng, self.cfg = ps, rng, cfg
        d, nh, nkv, tp = cfg.head_dim, cfg.num_heads, cfg.kv_heads, ps.tp
        self.head_dim, self.local_heads = d, nh // tp
        self.replicated_kv = nkv < tp
        self.local_kv = 1 if self.replicated_kv else nkv // tp
        self.backend = attention_backend(cfg.attention_backend, ps.device if device is None else torch.device(device))
        self.recompute_core = False  # selective recomputation, set by model.recompute
        self.kv_index = ps.tp_rank // (tp // nkv) if self.replicated_kv else 0
        self.qkv = column_linear(cfg, cfg.hidden_size, (nh * d, nkv * d, nkv * d), ps, device=device,
                                 replicated=(False, True, True) if self.replicated_kv else None,
                                 fuse_norm=fuses_attn_norm(cfg))
        self.out = row_linear(cfg, nh * d, cfg.hidden_size, ps, device=device)
        if cfg.qk_norm:
            # The norm weight is shared by all heads, and each TP rank sees different heads.
            self.q_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_impl, partial_grad=tp > 1, device=device, ps=ps,
                                  feeds_matmul=False)
            self.k_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_impl, partial_grad=tp > 1, device=device, ps=ps,
                                  feeds_matmul=False)

    def _project(self, x: torch.Tensor):
        s, b = x.shape[0] * (self.ps.tp if self.ps.sp else 1), x.shape[1]
        d, nkv_local = self.head_dim, self.cfg.kv_heads if self.replicated_kv else self.local_kv
        q, k, v = self.qkv(x).split([self.local_heads * d, nkv_local * d, nkv_local * d], dim=-1)
        k, v = k.reshape(s, b, nkv_local, d), v.reshape(s, b, nkv_local, d)
        if self.replicated_kv:
            # Every rank holds all kv heads (there are fewer than TP ranks); use the one this
            # rank's query heads attend with.
            k, v = k[:, :, self.kv_index: self.kv_index + 1], v[:, :, self.kv_index: self.kv_index + 1]
        return q.view(s, b, -1, d), k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: torch.Tensor | None = None, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        q, k, v = self._project(x)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            return self.out(self._cached_core(q, k, v, kv_cache).flatten(2))
        p = self.cfg.attention_dropout if self.training else 0.0
        if self.recompute_core:
            # Replays dropout from the same RNG (tracker streams included) when recomputed.
            out = checkpoint(self._core, q, k, v, doc_ids, p, rng=self.rng if p > 0 else None)
        else:
            out = self._core(q, k, v, doc_ids, p)
        return self.out(out.flatten(2))

    def _core(self, q, k, v, doc_ids, p):
        if p > 0 and self.rng is not None:
            with self.rng.fork():  # heads differ per TP rank, so must their dropout masks
                return core_attention(q, k, v, doc_ids, p, self.backend)
        return core_attention(q, k, v, doc_ids, p, self.backend)

    def _cached_core(self, q, k, v, kv_cache: LayerKVCache) -> torch.Tensor:
        """Inference: attend the new positions to the cached prefix plus themselves (SDPA on every
        backend: decoding reads the cache, a [b, heads, len, d] view SDPA takes as it is)."""
        k, v, mask, causal = kv_cache.update(k, v)
        q = q.permute(1, 2, 0, 3)  # [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3)
