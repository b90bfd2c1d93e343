"""Plain torch implementations of every kernel: the `impl='torch'` path and the tests' oracle.

They compute in float32 (or float64 when given float64, which is how the tests use them) and are
written for clarity, not memory: the cross-entropy reference materializes softmax over the shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalite.parallel import comm
from megalite.parallel.mappings import reduce_from_tp

Group = torch.distributed.ProcessGroup | None
REDUCTIONS = ("none", "sum", "mean")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    """y = x / rms(x) * weight, statistics in fp32. With `residual`: h = x + residual, returns (y, h)."""
    h = x if residual is None else x + residual
    ct = _compute_dtype(h)
    hf = h.to(ct)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = (hf * rstd * weight.to(ct)).to(x.dtype)
    return y if residual is None else (y, h)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    ct = _compute_dtype(gate)
    return (F.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def check_ce_args(logits_shape: torch.Size, labels: torch.Tensor, vocab_start: int, vocab_size: int | None,
                  reduction: str, label_smoothing: float, z_loss: float) -> int:
    """Validates the cross-entropy arguments; returns the true vocabulary size."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if len(logits_shape) == 0 or logits_shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits_shape)} and labels {tuple(labels.shape)} "
                         "disagree (expected logits = labels.shape + [vocab])")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"cross_entropy: z_loss must be >= 0, got {z_loss}")
    if vocab_start < 0:
        raise ValueError(f"cross_entropy: vocab_start must be >= 0, got {vocab_start}")
    vocab = vocab_size if vocab_size is not None else vocab_start + logits_shape[-1]
    if vocab <= 0:
        raise ValueError(f"cross_entropy: vocab_size must be positive, got {vocab}")
    return vocab


def reduce_losses(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """`mean` divides by the number of non-ignored tokens (0 when every token is ignored)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def cross_entropy_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                      label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "none",
                      vocab_start: int = 0, vocab_size: int | None = None, tp_group: Group = None,
                      ) -> torch.Tensor:
    """Vocab-parallel cross-entropy: `logits` is this rank's shard [..., V_local] of columns
    [vocab_start, vocab_start + V_local); ids >= `vocab_size` are padding and excluded from softmax.

    Per token: (1-e)(lse - x_t) + e(lse - mean_j x_j) + z * lse^2, with lse over the true vocabulary
    (the smoothing mean too). Ignored tokens get 0.
    """
    vocab = check_ce_args(logits.shape, labels, vocab_start, vocab_size, reduction, label_smoothing, z_loss)
    ct = _compute_dtype(logits)
    x = logits.to(ct)
    v_local = x.shape[-1]
    col = torch.arange(vocab_start, vocab_start + v_local, device=x.device)
    valid_col = col < vocab
    x = x.masked_fill(~valid_col, float("-inf"))

    # The max is only a shift for stability: no gradient flows through it.
    m = x.detach().amax(-1)
    m = m.masked_fill(torch.isinf(m), 0.0)  # a shard that is all padding
    comm.all_reduce(m, tp_group, op=torch.distributed.ReduceOp.MAX)
    sumexp = reduce_from_tp(torch.exp(x - m.unsqueeze(-1)).sum(-1), tp_group)
    lse = m + torch.log(sumexp)

    valid = labels != ignore_index
    local = labels.long() - vocab_start
    in_shard = valid & (local >= 0) & (local < v_local)
    idx = local.clamp(0, v_local - 1).unsqueeze(-1)
    tgt = torch.where(in_shard, x.gather(-1, idx).squeeze(-1), torch.zeros((), dtype=ct))
    tgt = reduce_from_tp(tgt, tp_group)

    loss = lse - tgt
    if label_smoothing > 0:
        sum_x = reduce_from_tp(torch.where(valid_col, x, 0.0).sum(-1), tp_group)
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - sum_x / vocab)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros((), dtype=ct))
    return reduce_losses(loss, valid, reduction)


def fused_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None, **ce_kwargs) -> torch.Tensor:
    """The unfused path: the full [tokens, V_local] logits, then `cross_entropy_ref`."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy_ref(logits, labels, **ce_kwargs)
