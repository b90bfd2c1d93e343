"""Fused output projection + cross-entropy, chunked over tokens: the [tokens, vocab] logits never exist.

For each chunk of tokens: logits_c = hidden_c @ W^T (this rank's vocab shard), the cross-entropy
statistics kernel, the TP combine of per-token scalars, the gradient kernel writing d logits_c in
place, then d hidden_c = d logits_c @ W and d W += d logits_c^T @ hidden_c. Peak extra memory is
one chunk of logits plus the gradients of the inputs.

- reduction 'mean' / 'sum': the upstream gradient is one scalar, so the gradients are computed in the
  forward pass (with unit scale) and backward only scales them: three matmuls in total, as unfused.
- reduction 'none' (per-token losses; DPO/PPO log-probs): each token's upstream gradient is only
  known in backward and dW needs it inside the sum over tokens, so the logits are recomputed chunk
  by chunk in backward (one extra matmul). Pre-scaling by a scalar here is the wrong-gradient bug
  that this avoids. fp16 takes this path for every reduction, so that the loss scale reaches the
  gradients before they are rounded to fp16.

Autocast (bf16/fp16 over fp32 master weights): the matmuls run in the autocast dtype, as a plain
F.linear would, and the whole body runs with autocast off so the out=/in-place matmuls see one
dtype; autograd casts the gradients back to the fp32 parameters' dtype.

Vocab parallel: `weight` is this rank's [V_local, H] shard starting at `vocab_start`. The returned
hidden gradient is this shard's partial sum; the caller routes `hidden` through the usual column-
parallel input mapping (copy_to_tp or gather_from_sequence), whose backward reduces it over TP.
"""

from __future__ import annotations

import math

import torch
import triton

from megalite.kernels._common import as_rows, check_device, check_float
from megalite.kernels.cross_entropy import (
    combine_stats,
    grad_scale,
    shard_stats,
    shard_valid_cols,
    token_losses,
    write_grad,
)
from megalite.kernels.reference import check_ce_args, reduce_losses

Group = torch.distributed.ProcessGroup | None


def default_chunk_size(n_tokens: int, v_local: int, hidden: int) -> int:
    """Tokens per chunk so that a chunk of logits is about as large as the hidden input itself."""
    chunks = max(1, math.ceil(v_local / hidden))
    return max(1, min(n_tokens, triton.next_power_of_2(math.ceil(n_tokens / chunks))))


class _Ctx:
    """Everything one chunk loop needs, so forward and backward share the same loop body."""

    def __init__(self, labels, ignore_index, smooth, z_loss, vocab_start, vocab, valid_cols, tp_group):
        self.labels, self.ignore_index, self.smooth, self.z_loss = labels, ignore_index, smooth, z_loss
        self.vocab_start, self.vocab, self.valid_cols, self.tp_group = vocab_start, vocab, valid_cols, tp_group

    def chunk(self, h: torch.Tensor, w: torch.Tensor, lo: int, hi: int):
        logits = h[lo:hi] @ w.t()
        lab = self.labels[lo:hi]
        stats = shard_stats(logits, lab, self.vocab_start, self.valid_cols, self.ignore_index, self.smooth > 0)
        lse, tgt, sum_x = combine_stats(stats, self.tp_group, self.smooth > 0)
        return logits, lab, lse, tgt, sum_x

    def grads(self, logits, lab, lse, scale, h, w, lo, hi, dh, dw) -> None:
        write_grad(logits, logits, lab, lse, scale, self.vocab_start, self.valid_cols, self.ignore_index,
                   self.smooth, self.vocab, self.z_loss)
        if dh is not None:
            torch.mm(logits, w, out=dh[lo:hi])
        if dw is not None:
            # Accumulates in the weight dtype; the matmul itself sums in fp32 within a chunk.
            dw.addmm_(logits.t(), h[lo:hi])


class _FusedLinearCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, smooth, z_loss, reduction, vocab_start, vocab,
                tp_group, chunk_size):
        dev = hidden.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        with torch.autocast(dev, enabled=False):
            return _FusedLinearCEFn._forward(ctx, hidden.to(dt), weight.to(dt), labels, ignore_index, smooth,
                                             z_loss, reduction, vocab_start, vocab, tp_group, chunk_size)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, ignore_index, smooth, z_loss, reduction, vocab_start, vocab,
                 tp_group, chunk_size):
        h = as_rows(hidden, "fused_linear_cross_entropy: hidden")
        lab = labels.reshape(-1).contiguous()
        n, v_local = h.shape[0], weight.shape[0]
        chunk = chunk_size or default_chunk_size(n, v_local, h.shape[1])
        c = _Ctx(lab, ignore_index, smooth, z_loss, vocab_start, vocab,
                 shard_valid_cols(vocab_start, v_local, vocab), tp_group)
        valid = lab != ignore_index
        n_valid = valid.sum()
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # fp16 keeps its gradients unscaled no longer than it must: with unit-scale gradients stored in
        # the forward, the small ones would underflow before fp16 loss scaling could lift them.
        eager = reduction != "none" and (need_dh or need_dw) and h.dtype != torch.float16
        dh = torch.empty_like(h) if eager and need_dh else None
        dw = torch.zeros_like(weight) if eager and need_dw else None
        if eager:
            unit = grad_scale(torch.ones((), device=h.device), reduction, n, n_valid)
        loss = torch.empty(n, dtype=torch.float32, device=h.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=h.device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            logits, lab_c, lse, tgt, sum_x = c.chunk(h, weight, lo, hi)
            loss[lo:hi] = token_losses(lse, tgt, sum_x, valid[lo:hi], smooth, z_loss, vocab)
            lse_all[lo:hi] = lse
            if eager:
                c.grads(logits, lab_c, lse, unit[lo:hi], h, weight, lo, hi, dh, dw)
            del logits
        ctx.c, ctx.chunk, ctx.reduction, ctx.eager = c, chunk, reduction, eager
        ctx.shapes = (hidden.shape, n_valid)
        if eager:
            ctx.save_for_backward(dh, dw)
        else:
            ctx.save_for_backward(h, weight, lse_all)
        out = reduce_losses(loss, valid, reduction)
        return out.view(labels.shape) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _FusedLinearCEFn._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden_shape, n_valid = ctx.shapes
        if ctx.eager:
            if getattr(ctx, "consumed", False):
                raise RuntimeError("fused_linear_cross_entropy: backward ran twice through the same graph "
                                   "(retain_graph) with reduction='mean'/'sum'; use reduction='none' for that")
            ctx.consumed = True
            dh, dw = ctx.saved_tensors
            g = grad_out.to(torch.float32)
            # Scaling in place: these buffers belong to this node and are not read again.
            dh = dh.mul_(g.to(dh.dtype)).view(hidden_shape) if dh is not None else None
            dw = dw.mul_(g.to(dw.dtype)) if dw is not None else None
            return dh, dw, None, None, None, None, None, None, None, None, None
        h, weight, lse_all = ctx.saved_tensors
        c, n = ctx.c, h.shape[0]
        scale = grad_scale(grad_out, ctx.reduction, n, n_valid)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for lo in range(0, n, ctx.chunk):
            hi = min(n, lo + ctx.chunk)
            logits = h[lo:hi] @ weight.t()
            c.grads(logits, c.labels[lo:hi], lse_all[lo:hi], scale[lo:hi], h, weight, lo, hi, dh, dw)
            del logits
        dh = dh.view(hidden_shape) if dh is not None else None
        return dh, dw, None, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                               reduction: str = "none", vocab_start: int = 0, vocab_size: int | None = None,
                               tp_group: Group = None, chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden [..., H] @ weight[V_local, H]^T` against `labels [...]`, chunked.

    Same loss definition and arguments as `cross_entropy`; `chunk_size` (tokens per chunk) defaults
    to a size whose logits match the hidden input in size.
    """
    check_float(hidden, "fused_linear_cross_entropy: hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused_linear_cross_entropy: weight {tuple(weight.shape)} does not match hidden "
                         f"size {hidden.shape[-1]}")
    if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"fused_linear_cross_entropy: weight dtype {weight.dtype} differs from hidden "
                         f"{hidden.dtype}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be positive, got {chunk_size}")
    logits_shape = torch.Size((*hidden.shape[:-1], weight.shape[0]))
    vocab = check_ce_args(logits_shape, labels, vocab_start, vocab_size, reduction, label_smoothing, z_loss)
    check_device(hidden, weight)
    return _FusedLinearCEFn.apply(hidden, weight, labels, ignore_index, float(label_smoothing), float(z_loss),
                                  reduction, int(vocab_start), vocab, tp_group, chunk_size)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = -100, vocab_start: int = 0, vocab_size: int | None = None,
                          tp_group: Group = None, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log p(label) (0 at ignored positions) for DPO/PPO, without materializing logits."""
    return -fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index,
                                       reduction="none", vocab_start=vocab_start, vocab_size=vocab_size,
                                       tp_group=tp_group, chunk_size=chunk_size)
