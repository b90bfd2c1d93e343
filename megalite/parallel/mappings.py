"""Autograd-aware communication for tensor and sequence parallelism.

Each mapping is a pair of conjugate operations: what the forward does, the backward undoes with the
adjoint collective (identity <-> all-reduce, split <-> all-gather, all-gather <-> reduce-scatter).
Activations are [seq, batch, hidden], so the sequence dim is dim 0 and SP collectives are contiguous.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.parallel.comm import all_gather_dim0, all_reduce, group_size, reduce_scatter_dim0

Group = dist.ProcessGroup | None


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    rank = dist.get_rank(group)
    return x.chunk(n, dim=-1)[rank].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    last = x.dim() - 1
    gathered = all_gather_dim0(x.movedim(last, 0), group)  # [n*d, ...]
    return gathered.movedim(0, last).contiguous()


def _split_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[0] % n != 0:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the TP size {n}")
    return x.chunk(n, dim=0)[dist.get_rank(group)].contiguous()


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    all_reduce(x, group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        # In place, as in Megatron: the consumer is a column-parallel matmul (F.linear, the fused
        # linear cross-entropy) whose backward hands over a gradient that nothing else reads.
        return _all_reduce(g, ctx.group), None


def _reduces_in_place(x: torch.Tensor) -> bool:
    """Whether _ReduceFromTP may overwrite its input: a contiguous non-view non-leaf, i.e. an op's
    fresh output (a row-parallel matmul, the embedding lookup). Autograd forbids in-place changes
    to a view returned by a custom Function (the fused SwiGLU + down projection returns one), and
    a view or leaf may be read elsewhere, so those are reduced in a copy."""
    return x.is_contiguous() and not x._is_view() and not (x.is_leaf and x.requires_grad)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if not _reduces_in_place(x):
            return _all_reduce(x.clone(memory_format=torch.contiguous_format), group)
        all_reduce(x, group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim0(g, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence. A TP-parallel consumer leaves each rank a partial gradient of
    the full sequence, so backward reduce-scatters it; a consumer every rank runs identically (a
    scalar head's loss) leaves each rank the full gradient already, so backward keeps the slice."""

    @staticmethod
    def forward(ctx, x, group, replicated_consumer):
        ctx.group, ctx.replicated = group, replicated_consumer
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        grad = _split_first(g, ctx.group) if ctx.replicated else reduce_scatter_dim0(g, ctx.group)
        return grad, None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim0(g, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (input of a column-parallel layer)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather the last dim; backward keeps this rank's slice."""
    return x if group_size(group) == 1 else _GatherLast.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's slice of the sequence (dim 0); backward all-gathers."""
    return x if group_size(group) == 1 else _ScatterSeq.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather the sequence; backward reduce-scatters."""
    return x if group_size(group) == 1 else _GatherSeq.apply(x, group, False)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Reduce-scatter along the sequence (output of a row-parallel layer under SP); backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterSeq.apply(x, group)


def gather_from_sequence_replicated(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather the sequence for a TP-replicated consumer; backward keeps this rank's slice."""
    return x if group_size(group) == 1 else _GatherSeq.apply(x, group, True)
