"""Layer specs: which implementation each op uses (torch | triton | te), chosen by ModelConfig.

The model only calls these selectors, so swapping an implementation never touches model code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megalite.config import ConfigError


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32 whatever the activation dtype, as the fused kernels do.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def torch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rms_norm_fn(impl: str) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    if impl == "torch":
        return torch_rms_norm
    if impl == "triton":
        from megalite.kernels.rmsnorm import rms_norm

        return rms_norm
    raise ConfigError(f"model.norm_impl '{impl}' is not available (expected one of: torch, triton)")


def swiglu_fn(impl: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if impl == "torch":
        return torch_swiglu
    if impl == "triton":
        from megalite.kernels.swiglu import swiglu

        return swiglu
    raise ConfigError(f"model.mlp_impl '{impl}' is not available (expected one of: torch, triton)")


LossFn = Callable[..., torch.Tensor]


def torch_vocab_parallel_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              vocab_start: int, vocab_size: int, group) -> torch.Tensor:
    """x [s, b, h] (full sequence), weight [V_local, h], labels [s, b] -> per-token loss [s, b]."""
    from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy

    logits = F.linear(x, weight)
    return vocab_parallel_cross_entropy(logits, labels, vocab_start, vocab_size, group)


def triton_vocab_parallel_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               vocab_start: int, vocab_size: int, group) -> torch.Tensor:
    """As the torch loss, with the Triton cross-entropy (its gradient overwrites the logits buffer)."""
    from megalite.kernels.cross_entropy import cross_entropy

    logits = F.linear(x, weight)
    return cross_entropy(logits, labels, vocab_start=vocab_start, vocab_size=vocab_size, tp_group=group)


def fused_linear_vocab_parallel_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                     vocab_start: int, vocab_size: int, group) -> torch.Tensor:
    """Head matmul + cross-entropy chunked over tokens: the [tokens, V_local] logits never exist."""
    from megalite.kernels.fused_linear_ce import fused_linear_cross_entropy

    return fused_linear_cross_entropy(x, weight, labels, vocab_start=vocab_start, vocab_size=vocab_size,
                                      tp_group=group)


def loss_fn(impl: str) -> LossFn:
    if impl == "torch":
        return torch_vocab_parallel_loss
    if impl == "triton":
        return triton_vocab_parallel_loss
    if impl == "fused_linear":
        return fused_linear_vocab_parallel_loss
    raise ConfigError(f"model.loss_impl '{impl}' is not available (expected one of: torch, triton, fused_linear)")
