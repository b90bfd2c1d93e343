"""Rotary position embeddings (rotate-half convention, as HF Llama), with Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch

from megalite.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if cfg.rope_scaling == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between is blended,
        # so the model extends context without disturbing local attention.
        lo_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
        hi_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * inv / cfg.rope_scaling_factor + smooth * inv
        inv = torch.where(wavelen > lo_wavelen, inv / cfg.rope_scaling_factor,
                          torch.where(wavelen < hi_wavelen, inv, blended))
    elif cfg.rope_scaling != "none":
        raise ValueError(f"unknown model.rope_scaling '{cfg.rope_scaling}'")
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [b, s] -> cos, sin [s, b, 1, head_dim]."""
    angles = positions.t().unsqueeze(-1).float() * inv_freq.to(positions.device)  # [s, b, d/2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [s, b, heads, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
