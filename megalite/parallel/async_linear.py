"""Column-parallel matmul whose backward overlaps its TP communication with the weight gradient.

The blocking path is two autograd nodes: an input mapping (copy_to_tp / gather_from_sequence)
and F.linear. Backward then waits for the input-grad all-reduce (reduce-scatter under SP) after
F.linear has computed both of its grads, so the weight-grad matmul and the collective run one
after the other. Fused into one Function, backward computes the input grad, launches its
collective asynchronously, computes the weight grad while it is in flight, then waits
(Megatron's async TP all-reduce).

Under SP the forward all-gathers the sequence, and the blocking path keeps the gathered
[seq, b, h] input for the weight grad. Here only the local [seq/tp, b, h] shard is kept: backward
gathers it again, asynchronously, while the input-grad matmul runs (it does not need it). That is
one more all-gather per column layer per backward, in exchange for (tp-1)/tp of its input.

Numbers are those of the blocking path: the same collectives on the same tensors and the same
matmuls as F.linear's backward (fp32: bit-identical, tests/parallel/test_async_linear.py).
Autocast is applied by hand: x, weight and bias are cast to the autocast dtype as F.linear under
autocast would (under SP before the gather: same values, half the bytes), so backward needs no
autocast state; the input grad is cast back to x's dtype before its collective, as the blocking
path's autocast cast does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.parallel.comm import (
    all_gather_dim0,
    all_reduce,
    start_all_gather_dim0,
    start_reduce_scatter_dim0,
    wait,
)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class _ColumnParallelMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group, sp):
        ctx.x_dtype = x.dtype
        dtype = _autocast_dtype(x)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        total = all_gather_dim0(x, group) if sp else x
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(total, weight, bias)
        ctx.group, ctx.sp, ctx.has_bias, ctx.dtype = group, sp, bias is not None, dtype
        ctx.save_for_backward(x, weight)  # x: the local shard under SP; weight: the original
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.dtype is not None:
            weight = weight.to(ctx.dtype)
        gather = None
        if ctx.sp and (need_w or need_b):
            total, gather = start_all_gather_dim0(x, ctx.group)  # recompute, behind the dgrad matmul
        else:
            total = x
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = work = None
        if need_x:
            # Reduced in x's own dtype, as the blocking path does (its autocast cast comes first).
            grad_x = g2.mm(weight).view(*grad_out.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
            wait(gather)
            gather = None
            if ctx.sp:
                grad_x, work = start_reduce_scatter_dim0(grad_x, ctx.group)
            else:
                work = all_reduce(grad_x, ctx.group, async_op=True)  # in place: grad_x is ours
        wait(gather)
        # Weight grad while the input grad's collective is in flight.
        grad_w = g2.t().mm(total.reshape(-1, total.shape[-1])) if need_w else None
        grad_b = g2.sum(0) if need_b else None
        wait(work)
        return grad_x, grad_w, grad_b, None, None


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           group: dist.ProcessGroup | None, sp: bool) -> torch.Tensor:
    """F.linear of x (sequence-gathered over `group` first when `sp`) with this rank's output
    columns; backward all-reduces (reduce-scatters under SP) the input grad, overlapped."""
    return _ColumnParallelMatmul.apply(x, weight, bias, group, sp)
