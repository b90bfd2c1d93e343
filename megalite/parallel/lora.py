"""LoRA adapters on tensor-parallel linears: y = x W^T + (alpha / r) * B A dropout(x), W frozen.

The wrappers take over a built `ColumnParallelLinear` / `RowParallelLinear`: they hold its weight
(and bias) under the same names, so checkpoints and HF conversion see the same base tensors, and
add `lora_a` [r, in] and `lora_b` [out, r] sharded the way the base weight is:

* column-parallel (output rows sharded): A is replicated and applied to the layer's (all-gathered
  under SP) input; B is sharded exactly like the weight, fused blocks included (rank t holds
  [q_t | k_t | v_t] of a qkv weight, so B's rows line up with W's). Each rank only sees its B
  rows, so A's gradient is partial and summed over TP (`sync_tp_grad`, as for replicated norms).
* row-parallel (input columns sharded): A is sharded like the weight's columns, B replicated.
  A_t x_t is a partial sum over TP, so B A_t x_t is too: it is added to the base partial product
  and both go through the layer's one all-reduce (reduce-scatter under SP). B's gradient is then
  partial per rank and summed over TP.

Adapters are tagged `lora_adapter`; their global tensors are initialized by the model (seeded by
name, see megalite/model/lora.py) so that every TP layout starts from the same adapters.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalite.parallel.mappings import copy_to_tp, gather_from_sequence, gather_from_tp
from megalite.parallel.rng import RNGTracker
from megalite.parallel.sharding import TPShard, get_tp_shard, tag_param


def _adapter(shape: tuple[int, int], like: torch.Tensor, init: str, shard: TPShard | None,
             sync: bool | tuple[int, int]) -> nn.Parameter:
    p = tag_param(nn.Parameter(torch.zeros(shape, device=like.device, dtype=like.dtype)), init, shard, sync)
    p.lora_adapter = True  # type: ignore[attr-defined]
    return p


def is_adapter(p: torch.Tensor) -> bool:
    return bool(getattr(p, "lora_adapter", False))


class _LoRALinear(nn.Module):
    """The shared part: rank, scaling, dropout and the low-rank product (no communication)."""

    lora_a: nn.Parameter
    lora_b: nn.Parameter

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scaling, self.dropout = rank, alpha / rank, dropout
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout:g}"


class LoRAColumnParallelLinear(_LoRALinear):
    """A `ColumnParallelLinear` plus an adapter whose B is sharded like its weight (see module doc)."""

    def __init__(self, base: ColumnParallelLinear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.ps, self.gather_output = base.ps, base.gather_output
        out_local, in_features = base.weight.shape
        sync = base.weight.sync_tp_grad  # type: ignore[attr-defined]  # replicated kv rows stay partial
        self.lora_a = _adapter((rank, in_features), base.weight, "lora_a", None, base.ps.tp > 1)
        self.lora_b = _adapter((out_local, rank), base.weight, "zeros", get_tp_shard(base.weight), sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ColumnParallelLinear.forward, with the adapter reading the same (gathered) input, so the
        # input's gradient from both paths is reduced by the one collective of this mapping.
        g = self.ps.tp_group
        x = gather_from_sequence(x, g) if self.ps.sp else copy_to_tp(x, g)
        # The gathered input is identical on every TP rank: the default stream gives one mask.
        d = F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x
        y = F.linear(x, self.weight, self.bias) + self.low_rank(d)
        return gather_from_tp(y, g) if self.gather_output else y


class LoRARowParallelLinear(_LoRALinear):
    """A `RowParallelLinear` plus an adapter whose A is sharded like its weight's input columns."""

    def __init__(self, base: RowParallelLinear, rank: int, alpha: float, dropout: float = 0.0,
                 rng: RNGTracker | None = None) -> None:
        super().__init__(base, rank, alpha, dropout)
        # Not a submodule: its parameters are ours (same objects, same names); we reuse its reduction.
        self.__dict__["base"] = base
        self.ps, self.rng = base.ps, rng
        out_features, in_local = base.weight.shape
        self.lora_a = _adapter((rank, in_local), base.weight, "lora_a", get_tp_shard(base.weight), False)
        self.lora_b = _adapter((out_features, rank), base.weight, "zeros", None, base.ps.tp > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x
        if self.dropout and self.training:
            # Each rank holds different input columns: their masks must differ.
            ctx = self.rng.fork() if self.rng is not None and self.ps.tp > 1 else contextlib.nullcontext()
            with ctx:
                d = F.dropout(x, self.dropout, training=True)
        # Both partial products (base and adapter) summed over TP by one collective.
        return self.base.reduce_output(F.linear(x, self.weight) + self.low_rank(d))
