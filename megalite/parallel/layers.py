"""Tensor-parallel layers (Megatron's column/row split) and the vocab-parallel embedding.

Weights are created empty; the model's `init_weights` fills every parameter from its global (TP=1)
tensor through `sharding.split_for_rank`, so any TP layout starts from the same model.
Each parameter is tagged with `sharding.tag_param` (init kind, TP shard layout, TP-partial grads),
which tells init, the training loop's grad sync and checkpoints what to do with it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel.async_linear import column_parallel_linear
from megalite.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence,
)
from megalite.parallel.sharding import TPShard, tag_param
from megalite.parallel.state import ParallelState


def _empty(*shape: int, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))


class ColumnParallelLinear(nn.Module):
    """y = x A^T with A split by output rows. `out_blocks` lists fused outputs (e.g. gate, up),
    each split separately so that rank r holds its slice of every block. Blocks flagged in
    `replicated` are held whole by every rank; their grads are partial and summed over TP."""

    # The local matmul, F.linear(x, weight, bias); FP8 backends replace it per instance.
    linear_fn = F.linear

    def __init__(self, in_features: int, out_blocks: int | tuple[int, ...], ps: ParallelState, *,
                 bias: bool = False, gather_output: bool = False, init: str = "normal",
                 replicated: tuple[bool, ...] | None = None, device=None, dtype=None) -> None:
        super().__init__()
        blocks = (out_blocks,) if isinstance(out_blocks, int) else tuple(out_blocks)
        shard = TPShard(0, blocks, replicated=replicated if ps.tp > 1 else None)
        if any(b % ps.tp for i, b in enumerate(blocks) if not shard.is_replicated(i)):
            raise ValueError(f"output sizes {blocks} are not divisible by tp={ps.tp}")
        if gather_output and len(blocks) > 1:
            raise ValueError("gather_output needs a single output block")
        self.ps, self.gather_output, self.blocks = ps, gather_output, blocks
        local = shard.local_blocks(ps.tp)
        sync: bool | tuple[int, int] = False
        if shard.replicated and any(shard.replicated):
            first = next(i for i in range(len(blocks)) if shard.is_replicated(i))
            if not all(shard.is_replicated(i) for i in range(first, len(blocks))):
                raise ValueError("replicated blocks must come last")
            sync = (sum(local[:first]), sum(local))
        self.weight = tag_param(_empty(sum(local), in_features, device=device, dtype=dtype), init, shard, sync)
        self.bias = None
        if bias:
            self.bias = tag_param(_empty(sum(local), device=device, dtype=dtype), "zeros", shard, sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.ps.tp_group
        # The overlapped path does its own matmul; an FP8 matmul (linear_fn) takes the blocking one.
        if self.ps.tp > 1 and self.ps.tp_comm_overlap and self.linear_fn is F.linear:
            y = column_parallel_linear(x, self.weight, self.bias, g, self.ps.sp)  # backward overlaps (async_linear.py)
        else:
            x = gather_from_sequence(x, g) if self.ps.sp else copy_to_tp(x, g)
            y = self.linear_fn(x, self.weight, self.bias)
        return gather_from_tp(y, g) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T with A split by input columns; the input is this rank's slice of those columns
    (a column-parallel layer's output) and the partial sums are reduced over TP
    (reduce-scattered along the sequence under SP)."""

    linear_fn = F.linear  # as in ColumnParallelLinear

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, *, bias: bool = False,
                 init: str = "scaled", device=None, dtype=None) -> None:
        super().__init__()
        if in_features % ps.tp:
            raise ValueError(f"input size {in_features} is not divisible by tp={ps.tp}")
        self.ps = ps
        self.weight = tag_param(_empty(out_features, in_features // ps.tp, device=device, dtype=dtype), init,
                                TPShard(1, (in_features,)))
        self.bias = None
        if bias:
            self.bias = tag_param(_empty(out_features, device=device, dtype=dtype), "zeros", sync_tp_grad=ps.sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce_output(self.linear_fn(x, self.weight))

    def reduce_output(self, y: torch.Tensor) -> torch.Tensor:
        """Sums this rank's partial product over TP (reduce-scatter under SP), then adds the bias.
        Public so that a fused kernel computing x A^T itself (e.g. SwiGLU + down) can finish here."""
        g = self.ps.tp_group
        y = reduce_scatter_to_sequence(y, g) if self.ps.sp else reduce_from_tp(y, g)
        return y + self.bias if self.bias is not None else y


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    m = divisible_by * tp
    return ((vocab_size + m - 1) // m) * m


class VocabParallelEmbedding(nn.Module):
    """Each TP rank holds a contiguous slice of a vocabulary padded to a multiple of tp*128.
    Ids outside the slice embed to zero here and are filled in by the TP reduction."""

    def __init__(self, vocab_size: int, hidden: int, ps: ParallelState, divisible_by: int = 128,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.ps, self.vocab_size = ps, vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, ps.tp, divisible_by)
        self.local_vocab = self.padded_vocab // ps.tp
        self.vocab_start = ps.tp_rank * self.local_vocab
        self.weight = tag_param(_empty(self.local_vocab, hidden, device=device, dtype=dtype), "normal",
                                TPShard(0, (self.padded_vocab,), logical=vocab_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, seq] -> embeddings [seq, batch, hidden] (sequence-sharded under SP)."""
        ids = ids.t()
        if self.ps.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)  # a fresh tensor (embedding backward keeps ids only)
        g = self.ps.tp_group
        return reduce_scatter_to_sequence(out, g) if self.ps.sp else reduce_from_tp(out, g)
