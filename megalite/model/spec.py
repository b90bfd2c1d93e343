"""Layer specs: which implementation each op uses (torch | triton | te), chosen by ModelConfig.

The model only calls these selectors, so swapping an implementation never touches model code.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.config import ConfigError, ModelConfig
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalite.parallel.sharding import TPShard, tag_param
from megalite.parallel.state import ParallelState


def check_impls(cfg: ModelConfig, device: torch.device) -> None:
    """Rejects, before any work, a spec whose kernels cannot run here: Triton needs a GPU (or the
    interpreter, for tests), and a name must be one we have."""
    choices = {"norm_impl": ("torch", "triton", "te"), "mlp_impl": ("torch", "triton", "te"),
               "linear_impl": ("torch", "te"), "loss_impl": ("torch", "triton", "fused_linear")}
    for field, allowed in choices.items():
        impl = getattr(cfg, field)
        if impl not in allowed:
            raise ConfigError(f"model.{field} '{impl}' is not available (expected one of: {', '.join(allowed)})")
        uses_triton = impl in ("triton", "fused_linear")
        if uses_triton and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ConfigError(f"model.{field}={impl} runs Triton kernels, which need a CUDA GPU "
                              "(TRITON_INTERPRET=1 runs them slowly on a CPU, for tests); use torch here")


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

    logits = F.linear(x, weight)  # made for the loss alone: the CE may overwrite it
    return vocab_parallel_cross_entropy(logits, labels, vocab_start, vocab_size, group, inplace=True)


def overlapped_vocab_parallel_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                   vocab_start: int, vocab_size: int, ps: ParallelState) -> torch.Tensor:
    """The torch loss with the head as an overlapped column-parallel matmul (parallel/async_linear.py):
    x is the final norm's output before the TP input mapping ([s/tp, b, h] under SP), which the
    matmul does itself; its backward reduces the input grad while the head's weight grad runs."""
    from megalite.parallel.async_linear import column_parallel_linear
    from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy

    logits = column_parallel_linear(x, weight, None, ps.tp_group, ps.sp)
    return vocab_parallel_cross_entropy(logits, labels, vocab_start, vocab_size, ps.tp_group, inplace=True)


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


# ----------------------------------------------------------------------------------------------
# Module-level choices: the projections, and the Transformer Engine modules that fuse a norm in.
#
# TE modules bring their own parameters; they get the same metadata our layers set (TP shard
# layout, init kind, TP-partial grads), so init_weights, checkpoint resharding and grad sync treat
# them exactly like the torch layers. TE does the TP/SP communication itself (tp_group,
# sequence_parallel), on the same [seq, batch, hidden] layout.


def _te_common(ps: ParallelState, device) -> dict:
    # fp32 parameters: they are the master weights; TE casts to FP8 inside its GEMMs.
    return dict(tp_group=ps.tp_group, sequence_parallel=ps.sp, params_dtype=torch.float32,
                device=device if device is not None else ps.device)


def fuses_attn_norm(cfg: ModelConfig) -> bool:
    """TE LayerNormLinear (norm + QKV in one module) replaces the attention's pre-norm."""
    return cfg.linear_impl == "te" and cfg.norm_impl == "te"


def fuses_mlp_norm(cfg: ModelConfig) -> bool:
    """TE LayerNormMLP (norm + gate/up + SwiGLU + down) replaces the MLP's pre-norm."""
    return cfg.mlp_impl == "te"


def column_linear(cfg: ModelConfig, in_features: int, blocks: tuple[int, ...], ps: ParallelState, *,
                  replicated: tuple[bool, ...] | None = None, fuse_norm: bool = False,
                  device=None) -> nn.Module:
    if cfg.linear_impl == "torch":
        return ColumnParallelLinear(in_features, blocks, ps, replicated=replicated, device=device)
    if cfg.linear_impl != "te":
        raise ConfigError(f"model.linear_impl '{cfg.linear_impl}' is not available (expected one of: torch, te)")
    if replicated and any(replicated):
        raise ConfigError(f"model.linear_impl=te needs num_kv_heads ({cfg.kv_heads}) divisible by parallel.tp "
                          f"({ps.tp})")
    from megalite.kernels import te

    if fuse_norm:
        m = te.te_layernorm_linear(in_features, sum(blocks), cfg.norm_eps, **_te_common(ps, device))
        tag_param(m.layer_norm_weight, "ones", sync_tp_grad=ps.sp)
    else:
        m = te.te_linear(in_features, sum(blocks), "column", **_te_common(ps, device))
    tag_param(m.weight, "normal", TPShard(0, tuple(blocks)))
    return m


def row_linear(cfg: ModelConfig, in_features: int, out_features: int, ps: ParallelState, *,
               device=None) -> nn.Module:
    if cfg.linear_impl == "torch":
        return RowParallelLinear(in_features, out_features, ps, init="scaled", device=device)
    if cfg.linear_impl != "te":
        raise ConfigError(f"model.linear_impl '{cfg.linear_impl}' is not available (expected one of: torch, te)")
    from megalite.kernels import te

    m = te.te_linear(in_features, out_features, "row", **_te_common(ps, device))
    tag_param(m.weight, "scaled", TPShard(1, (in_features,)))
    return m


def te_mlp(cfg: ModelConfig, ps: ParallelState, device=None) -> nn.Module:
    """TE LayerNormMLP: fc1 holds [gate; up] (this rank's slice of each), as our gate_up does."""
    from megalite.kernels import te

    f = cfg.ffn_size
    m = te.te_layernorm_mlp(cfg.hidden_size, f, cfg.norm_eps, **_te_common(ps, device))
    tag_param(m.layer_norm_weight, "ones", sync_tp_grad=ps.sp)
    tag_param(m.fc1_weight, "normal", TPShard(0, (f, f)))
    tag_param(m.fc2_weight, "scaled", TPShard(1, (f,)))
    return m


def te_norm(dim: int, eps: float, ps: ParallelState, partial_grad: bool, device=None) -> nn.Module:
    from megalite.kernels import te

    m = te.te_rmsnorm(dim, eps, sequence_parallel=ps.sp, params_dtype=torch.float32,
                      device=device if device is not None else ps.device)
    tag_param(m.weight, "ones", sync_tp_grad=partial_grad)
    return m
