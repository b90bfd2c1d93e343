"""How a tensor-parallel parameter maps onto its global (TP=1) tensor.

Init and checkpoints both go through `split_for_rank` / `gather_full`, so a weight is created, saved
and resharded by one definition. A fused weight (e.g. gate|up) is several blocks concatenated along
the sharded dim; each block is split separately so rank r holds [gate_r, up_r].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from megalite.parallel.comm import all_gather_dim0


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


def gather_full(local: torch.Tensor, shard: TPShard, group, tp: int) -> torch.Tensor:
    """Inverse of `split_for_rank`: every rank gets the global tensor (padding dropped)."""
    if tp == 1:
        full = local
    else:
        moved = local.movedim(shard.dim, 0)
        g = all_gather_dim0(moved, group).view(tp, *moved.shape)  # [tp, local, ...]
        pieces = torch.split(g, shard.local_blocks(tp), dim=1)  # each [tp, b/tp, ...]
        full = torch.cat([p[0] if shard.is_replicated(i) else p.reshape(-1, *p.shape[2:])
                          for i, p in enumerate(pieces)], dim=0).movedim(0, shard.dim)
    if shard.logical is not None:
        full = full.narrow(shard.dim, 0, shard.logical)
    return full.contiguous()
