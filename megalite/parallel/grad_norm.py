"""The global gradient norm of a TP x PP (x DP-sharded) model, counting every element once.

A parameter (or the replicated rows of one) that is identical on all TP ranks is counted on TP
rank 0 only; a tied head on the last pipeline stage duplicates the embedding and is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from megalite.parallel.comm import all_reduce
from megalite.parallel.sharding import get_tp_shard
from megalite.parallel.state import ParallelState


def owned_grad_square_sum(params: Iterable[torch.nn.Parameter], ps: ParallelState,
                          grads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Sum of squared grad elements this rank is responsible for. `grads` may map id(param) to a
    replacement gradient tensor (e.g. a flat DP shard view)."""
    total = torch.zeros((), dtype=torch.float32, device=ps.device)
    for p in params:
        g = grads.get(id(p)) if grads is not None else p.grad
        if g is None or getattr(p, "tied_to", None) and ps.pp > 1:
            continue
        g = g.float()
        shard = get_tp_shard(p)
        sync = getattr(p, "sync_tp_grad", False)
        if shard is None or sync is True:  # fully replicated over TP
            if ps.tp_rank == 0:
                total += g.pow(2).sum()
        elif isinstance(sync, tuple):  # sharded rows plus replicated rows [start, end)
            lo, hi = sync
            total += g[:lo].pow(2).sum() + g[hi:].pow(2).sum()
            if ps.tp_rank == 0:
                total += g[lo:hi].pow(2).sum()
        else:
            total += g.pow(2).sum()
    return total


def global_grad_norm(params: Iterable[torch.nn.Parameter], ps: ParallelState, dp_sharded: bool = False,
                     grads: dict[int, torch.Tensor] | None = None) -> float:
    sq = owned_grad_square_sum(params, ps, grads)
    all_reduce(sq, ps.mp_group)
    if dp_sharded:  # each DP rank holds a different slice of the grads
        all_reduce(sq, ps.dp_group)
    return float(sq.sqrt())
