"""Vocab-parallel cross-entropy in Triton, per-token losses with correct gradients for every reduction.

Each TP rank holds logits for columns [vocab_start, vocab_start + V_local) of a padded vocabulary;
columns at or past the true `vocab_size` are padding and never enter the softmax.

Forward, per token:
  1. one pass over the shard (kernel): an online max m and sum of exp(x - m), folded into the
     shard's logsumexp m + log(s); the target logit if the label falls in this shard; the sum of
     logits (only with label smoothing);
  2. TP combine, one collective: every rank's two scalars per token (three with smoothing) are
     all-gathered, then reduced locally: lse = logsumexp over ranks, target and logit sum by sum.
     No ReduceOp computes a logsumexp, and a MAX all-reduce followed by a SUM all-reduce would pay
     two latencies per chunk for a few bytes per token;
  3. loss = (1-e)(lse - x_t) + e(lse - sum_x / V) + z lse^2, zero for ignored tokens.
Backward (kernel): d x_j = g_i ((1 + 2 z lse) softmax_j - (1-e)[j = t] - e/V), written by default
in place into the saved logits buffer, so no second [tokens, V] tensor is allocated. g_i is the
per-token upstream gradient: with reduction='none' it differs per row, which is exactly the case
that a scalar-only backward gets wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalite.kernels._common import as_rows, check_device, check_float, warps_for
from megalite.kernels.reference import check_ce_args, reduce_losses
from megalite.parallel import comm

Group = torch.distributed.ProcessGroup | None
_BLOCK = 4096


@triton.jit
def _ce_stats_kernel(X, LABELS, STATS, stride_x, valid_cols, vocab_start, ignore_index,
                     HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = float("-inf")
    s = 0.0
    sum_x = 0.0
    for start in range(0, valid_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < valid_cols
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # A fully masked block leaves m at -inf; shift by 0 then so exp never sees (-inf) - (-inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        if HAS_SMOOTH:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
    label = tl.load(LABELS + row).to(tl.int64)
    local = label - vocab_start
    hit = (label != ignore_index) & (local >= 0) & (local < valid_cols)
    tgt = tl.load(x_row + tl.where(hit, local, 0), mask=hit, other=0.0).to(tl.float32)
    # An all-padding shard has m = -inf and s = 0: its lse is -inf, which logsumexp then ignores.
    lse = tl.where(s > 0.0, m + tl.log(tl.maximum(s, 1e-30)), float("-inf"))
    tl.store(STATS + row * 3 + 0, lse)
    tl.store(STATS + row * 3 + 1, tl.where(hit, tgt, 0.0))
    tl.store(STATS + row * 3 + 2, sum_x)


@triton.jit
def _ce_grad_kernel(X, DX, LABELS, LSE, SCALE, stride_x, stride_dx, n_cols, valid_cols, vocab_start,
                    ignore_index, smooth, inv_vocab, z_loss, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    g = tl.load(SCALE + row)
    lse = tl.load(LSE + row)
    label = tl.load(LABELS + row).to(tl.int64)
    local = label - vocab_start
    is_valid = label != ignore_index
    g = tl.where(is_valid, g, 0.0)
    p_scale = g * (1.0 + 2.0 * z_loss * lse)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        real = cols < valid_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(tl.where(real, x, float("-inf")) - lse)
        dx = p_scale * p - g * smooth * inv_vocab * real.to(tl.float32)
        dx = tl.where(cols == local, dx - g * (1.0 - smooth), dx)
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)


def shard_stats(x2: torch.Tensor, labels: torch.Tensor, vocab_start: int, valid_cols: int,
                ignore_index: int, need_sum: bool) -> torch.Tensor:
    """[rows, 3] fp32: (shard logsumexp, target logit or 0, logit sum or 0)."""
    n_rows = x2.shape[0]
    stats = torch.empty((n_rows, 3), dtype=torch.float32, device=x2.device)
    if n_rows:
        _ce_stats_kernel[(n_rows,)](x2, labels, stats, x2.stride(0), valid_cols, vocab_start, ignore_index,
                                    HAS_SMOOTH=need_sum, BLOCK=_BLOCK, num_warps=warps_for(_BLOCK))
    return stats


def combine_stats(stats: torch.Tensor, tp_group: Group, need_sum: bool):
    """The TP step: one all-gather of the per-token scalars, reduced here. Returns (lse, tgt, sum_x)."""
    width = 3 if need_sum else 2
    local = stats[:, :width]
    if comm.group_size(tp_group) == 1:
        # The gradient kernel indexes lse by row, so it must not stay a strided column view.
        return local[:, 0].contiguous(), local[:, 1], (local[:, 2] if need_sum else None)
    every = comm.all_gather_dim0(local.unsqueeze(0), tp_group)  # [tp, rows, width]
    lse = torch.logsumexp(every[:, :, 0], dim=0)
    rest = every[:, :, 1:].sum(dim=0)
    return lse, rest[:, 0], (rest[:, 1] if need_sum else None)


def token_losses(lse: torch.Tensor, tgt: torch.Tensor, sum_x: torch.Tensor | None, valid: torch.Tensor,
                 label_smoothing: float, z_loss: float, vocab: int) -> torch.Tensor:
    loss = lse - tgt
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - sum_x / vocab)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def grad_scale(grad_out: torch.Tensor, reduction: str, n_rows: int, n_valid: torch.Tensor) -> torch.Tensor:
    """The upstream gradient per row as fp32 [rows]: per-token for 'none', broadcast otherwise."""
    g = grad_out.float()
    if reduction == "none":
        return g.reshape(n_rows).contiguous()
    if reduction == "mean":
        g = g / n_valid.clamp(min=1)
    return g.reshape(1).expand(n_rows).contiguous()


def write_grad(x2: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
               scale: torch.Tensor, vocab_start: int, valid_cols: int, ignore_index: int,
               label_smoothing: float, vocab: int, z_loss: float) -> None:
    """d loss / d logits for a shard, into `out` (which may be `x2` itself)."""
    n_rows, n_cols = x2.shape
    if n_rows:
        _ce_grad_kernel[(n_rows,)](x2, out, labels, lse, scale, x2.stride(0), out.stride(0), n_cols,
                                   valid_cols, vocab_start, ignore_index, float(label_smoothing),
                                   1.0 / vocab, float(z_loss), BLOCK=_BLOCK, num_warps=warps_for(_BLOCK))


def shard_valid_cols(vocab_start: int, v_local: int, vocab: int) -> int:
    return max(0, min(v_local, vocab - vocab_start))


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, z_loss, reduction, vocab_start,
                vocab, tp_group, inplace_backward):
        x2 = as_rows(logits, "cross_entropy: logits")
        lab = labels.reshape(-1).contiguous()
        valid_cols = shard_valid_cols(vocab_start, x2.shape[1], vocab)
        need_sum = label_smoothing > 0
        stats = shard_stats(x2, lab, vocab_start, valid_cols, ignore_index, need_sum)
        lse, tgt, sum_x = combine_stats(stats, tp_group, need_sum)
        valid = lab != ignore_index
        loss = token_losses(lse, tgt, sum_x, valid, label_smoothing, z_loss, vocab)
        n_valid = valid.sum()
        ctx.save_for_backward(x2, lab, lse, n_valid)
        ctx.args = (ignore_index, label_smoothing, z_loss, reduction, vocab_start, vocab, valid_cols,
                    inplace_backward, logits.shape, logits.dtype)
        out = reduce_losses(loss, valid, reduction)
        return out.view(labels.shape) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_out):
        x2, lab, lse, n_valid = ctx.saved_tensors
        (ignore_index, smooth, z_loss, reduction, vocab_start, vocab, valid_cols, inplace, shape,
         dtype) = ctx.args
        scale = grad_scale(grad_out, reduction, x2.shape[0], n_valid)
        dx = x2 if inplace else torch.empty(x2.shape, dtype=dtype, device=x2.device)
        write_grad(x2, dx, lab, lse, scale, vocab_start, valid_cols, ignore_index, smooth, vocab, z_loss)
        return dx.view(shape), None, None, None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "none",
                  vocab_start: int = 0, vocab_size: int | None = None, tp_group: Group = None,
                  inplace_backward: bool = True) -> torch.Tensor:
    """Cross-entropy over (vocab-parallel) logits [..., V_local] with labels [...] (global ids).

    Returns per-token losses shaped like `labels` (reduction='none'), or their sum/mean ('mean'
    averages over non-ignored tokens of this call). `vocab_size` is the true vocabulary: padding ids
    at or beyond it are masked out of the softmax; None means no padding. With `inplace_backward`
    (default) the gradient overwrites the logits buffer, which must not be read after backward.
    """
    check_float(logits, "cross_entropy: logits")
    vocab = check_ce_args(logits.shape, labels, vocab_start, vocab_size, reduction, label_smoothing, z_loss)
    check_device(logits)
    return _CrossEntropyFn.apply(logits, labels, ignore_index, float(label_smoothing), float(z_loss),
                                 reduction, int(vocab_start), vocab, tp_group, inplace_backward)
