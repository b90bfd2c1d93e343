"""Cross-entropy over vocab-parallel logits, without ever gathering the full vocabulary.

Per token, each rank contributes its shard's max, sum of exponentials and (if it owns the label)
the label's logit; two all-reduces combine them. Columns past the true vocabulary (the padding
that makes the vocab divisible by tp*128) are set to -inf first: leaving them in the softmax is
the wrong-loss bug Megatron users hit when vocab % tp != 0.

The softmax is computed in a [tokens, V_local] fp32 buffer that backward turns into the gradient.
With `inplace=True` (the head's logits, made only for this loss) and fp32 logits, that buffer is
the logits tensor itself: no copy of the largest activation per micro-batch. Autograd is told
(mark_dirty), so any other holder of the logits fails its version check instead of reading
softmax values. Otherwise (or for bf16 logits, which need an fp32 copy anyway) a new buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.parallel.comm import all_reduce

IGNORE_INDEX = -100


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group, ignore_index, inplace):
        n_local = logits.shape[-1]
        x = logits.float().reshape(-1, n_local)
        reuse = x.data_ptr() == logits.data_ptr() and logits.is_contiguous()  # x is a view of logits
        if reuse and not inplace:
            x, reuse = x.clone(), False
        t = target.reshape(-1)
        valid_cols = max(0, min(n_local, vocab_size - vocab_start))
        if valid_cols < n_local:
            x[:, valid_cols:] = float("-inf")
        mx = x.max(dim=-1).values
        all_reduce(mx, group, op=dist.ReduceOp.MAX)
        x.sub_(mx.unsqueeze(1))
        owned = (t >= vocab_start) & (t < vocab_start + n_local)
        local_t = (t - vocab_start).clamp(0, n_local - 1)
        # where(), not a product: on a rank whose slice is all padding the gathered value is -inf.
        label_local = torch.where(owned, x.gather(1, local_t.unsqueeze(1)).squeeze(1), 0.0)
        stats = torch.stack([label_local, x.exp_().sum(-1)])
        all_reduce(stats, group)
        label_logit, sumexp = stats[0], stats[1]
        keep = t != ignore_index
        loss = (sumexp.log() - label_logit) * keep
        x.div_(sumexp.unsqueeze(1))  # x now holds the softmax, reused by backward
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        if not reuse:
            ctx.save_for_backward(x, owned, local_t, keep)
            return loss.view(target.shape), None
        # Saved as the (dirty) output itself: autograd forbids saving x, a view of it made here.
        ctx.save_for_backward(logits, owned, local_t, keep)
        ctx.mark_dirty(logits)
        ctx.set_materialize_grads(False)  # no zeros [tokens, V] for the unused second output
        return loss.view(target.shape), logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits=None):
        softmax, owned, local_t, keep = ctx.saved_tensors
        grad = softmax.view(-1, ctx.shape[-1])  # in place: the softmax is not needed after this
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= owned.to(grad.dtype)
        grad.mul_((grad_loss.reshape(-1) * keep).unsqueeze(1))
        return grad.view(ctx.shape).to(ctx.dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 vocab_size: int, group=None, ignore_index: int = IGNORE_INDEX,
                                 inplace: bool = False) -> torch.Tensor:
    """Per-token losses (0 where target == ignore_index) for logits [..., V_local]. With `inplace`,
    fp32 logits are overwritten (softmax, then their gradient): pass it only when nothing else
    reads them."""
    return _VocabParallelCE.apply(logits, target, vocab_start, vocab_size, group, ignore_index, inplace)[0]
