"""How a tensor-parallel parameter maps onto its global (TP=1) tensor.

`split_for_rank` cuts a rank's slice out of the global tensor (init, and checkpoint loading into any
TP size); `assemble_global` is its inverse over all ranks' slices (checkpoint loading and the
offline tools), and `gather_full` runs that inverse after an all-gather. So a weight is created,
saved and resharded by one definition. A fused weight (e.g. gate|up) is several blocks
concatenated along the sharded dim; each block is split separately so rank r holds [gate_r, up_r].

Every parameter is tagged once, where it is created (`tag_param`, `mark_tied_embedding`), with the
metadata that init, grad sync, the optimizer and checkpoints read:
  * `init`: how the global tensor is initialized (normal | scaled | ones | zeros);
  * `tp_shard`: its `TPShard` layout (absent: replicated over TP);
  * `sync_tp_grad`: the gradient is partial on each TP rank and must be summed over TP
    (replicated weights that only see a sequence shard under SP). A (start, end) pair limits
    this to those dim-0 rows (replicated kv heads inside a fused qkv weight);
  * `tied_embedding` / `tied_to`: the input embedding and output head are one parameter; split over
    a pipeline, the last stage holds a copy (`tied_to` names the parameter it duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from megalite.parallel.comm import all_gather_dim0

if TYPE_CHECKING:
    from megalite.parallel.state import ParallelState


@dataclass(frozen=True)
class TPShard:
    dim: int  # the sharded dim of the parameter
    blocks: tuple[int, ...]  # global sizes, along `dim`, of the independently split blocks
    logical: int | None = None  # for a padded vocab: the real rows kept in the global tensor
    replicated: tuple[bool, ...] | None = None  # blocks held whole by every rank (e.g. kv heads < tp)

    @property
    def global_size(self) -> int:
        return sum(self.blocks)

    def is_replicated(self, i: int) -> bool:
        return bool(self.replicated and self.replicated[i])

    def local_blocks(self, tp: int) -> list[int]:
        return [b if self.is_replicated(i) else b // tp for i, b in enumerate(self.blocks)]


def tag_param(p: nn.Parameter, init: str, shard: TPShard | None = None,
              sync_tp_grad: bool | tuple[int, int] = False) -> nn.Parameter:
    """Attaches a parameter's metadata (see the module docstring); returns `p`."""
    p.init = init  # type: ignore[attr-defined]
    p.sync_tp_grad = sync_tp_grad  # type: ignore[attr-defined]
    if shard is not None:
        set_tp_shard(p, shard)
    return p


def mark_tied_embedding(p: nn.Parameter, copy_of: str | None = None) -> None:
    """Marks the tied input embedding / output head: the embedding itself, or (`copy_of`: the global
    name of the parameter it duplicates) the last pipeline stage's copy of it."""
    p.tied_embedding = True  # type: ignore[attr-defined]
    p.tied_to = copy_of  # type: ignore[attr-defined]


def is_tied_embedding(p: torch.Tensor) -> bool:
    """The embedding or its copy: split over a pipeline, their grads are summed over the embedding group."""
    return bool(getattr(p, "tied_embedding", False))


def tied_copy_of(p: torch.Tensor) -> str | None:
    """For a tied embedding's copy, the name of the parameter it duplicates (and is initialized and
    loaded as); None otherwise."""
    return getattr(p, "tied_to", None)


def is_tied_copy(p: torch.Tensor, ps: ParallelState) -> bool:
    """A pipeline stage's copy of a tied embedding: after the grad sync it equals the embedding, so
    the grad norm and checkpoints count the embedding only."""
    return tied_copy_of(p) is not None and ps.pp > 1


def set_tp_shard(p: nn.Parameter, shard: TPShard | None) -> None:
    p.tp_shard = shard  # type: ignore[attr-defined]


def get_tp_shard(p: torch.Tensor) -> TPShard | None:
    return getattr(p, "tp_shard", None)


def is_tp_sharded(p: torch.Tensor) -> bool:
    return get_tp_shard(p) is not None


def split_for_rank(full: torch.Tensor, shard: TPShard, rank: int, tp: int) -> torch.Tensor:
    """The rank's slice of a global tensor (padded blocks are padded with zeros first)."""
    if shard.logical is not None and full.shape[shard.dim] < shard.global_size:
        pad = [0, 0] * (full.dim() - 1 - shard.dim) + [0, shard.global_size - full.shape[shard.dim]]
        full = torch.nn.functional.pad(full, pad)
    parts = torch.split(full, list(shard.blocks), dim=shard.dim)
    return torch.cat([p if shard.is_replicated(i) else p.chunk(tp, dim=shard.dim)[rank]
                      for i, p in enumerate(parts)], dim=shard.dim).contiguous()


def assemble_global(locals_: list[torch.Tensor], shard: TPShard | None) -> torch.Tensor:
    """Inverse of `split_for_rank`: the TP ranks' local tensors (in TP order) -> global (padding dropped)."""
    if shard is None:
        return locals_[0]
    tp = len(locals_)
    per_rank = [torch.split(t, shard.local_blocks(tp), dim=shard.dim) for t in locals_]
    parts = [per_rank[0][i] if shard.is_replicated(i) else torch.cat([r[i] for r in per_rank], dim=shard.dim)
             for i in range(len(shard.blocks))]
    full = torch.cat(parts, dim=shard.dim)
    if shard.logical is not None:
        full = full.narrow(shard.dim, 0, shard.logical)
    return full


def gather_full(local: torch.Tensor, shard: TPShard, group, tp: int) -> torch.Tensor:
    """Every rank gets the global tensor: the TP group's slices gathered, then `assemble_global`."""
    if tp == 1:
        return assemble_global([local], shard).contiguous()
    moved = local.movedim(shard.dim, 0)
    g = all_gather_dim0(moved, group).view(tp, *moved.shape)  # [tp, local, ...]
    return assemble_global([g[r].movedim(0, shard.dim) for r in range(tp)], shard).contiguous()
