"""Gradient fix-ups after backward that follow from how parameters are laid out.

* TP-partial grads (`sync_tp_grad`: norm weights under SP, replicated kv heads) are summed over TP.
* A tied output head on the last pipeline stage and the embedding on the first are one parameter:
  their grads are summed over the embedding group.
* Data-parallel grads are summed over DP (the loss is already normalized by the global token count).
  When the chunks are wrapped by `data_parallel.DataParallel` (contiguous buffers, bucketed and
  overlapped with backward), it does all three in the right order; `sync_dp_grads` is the simple
  unbucketed reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup

from megalite.parallel.comm import all_reduce, group_size
from megalite.parallel.sharding import is_tied_embedding
from megalite.parallel.state import ParallelState


def group_syncs(p: nn.Parameter, ps: ParallelState) -> list[tuple[tuple[int, int] | None, ProcessGroup | None]]:
    """What of `p`'s local grad must be summed over a group other than DP, and over which, in order:
    [(dim-0 rows [start, end), or None for all of it, group)]. Empty for most parameters."""
    out: list[tuple[tuple[int, int] | None, ProcessGroup | None]] = []
    sync = getattr(p, "sync_tp_grad", False)
    if sync is not False and ps.tp > 1:
        out.append((None if sync is True else (sync[0], sync[1]), ps.tp_group))
    if is_tied_embedding(p) and ps.pp > 1 and (ps.is_first_stage or ps.is_last_stage):
        out.append((None, ps.embedding_group))
    return out


def _coalesced_all_reduce(grads: list[torch.Tensor], group) -> None:
    if not grads or group_size(group) == 1:
        return
    if len(grads) == 1 and grads[0].is_contiguous():
        all_reduce(grads[0], group)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce(flat, group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_group_grads(modules: Iterable[nn.Module], ps: ParallelState) -> None:
    """Sums TP-partial grads over TP and a tied embedding's grads over the embedding group, one
    coalesced all-reduce per group (`DataParallel` does this in place in its buffer instead)."""
    # Every rank issues the groups in the same order (TP, then the embedding group).
    by_group: dict[ProcessGroup | None, list[torch.Tensor]] = {ps.tp_group: [], ps.embedding_group: []}
    for m in modules:
        for p in m.parameters():
            if p.grad is None:
                continue
            for rows, group in group_syncs(p, ps):
                by_group[group].append(p.grad if rows is None else p.grad[rows[0]: rows[1]])
    for group, grads in by_group.items():
        _coalesced_all_reduce(grads, group)


def sync_dp_grads(modules: Iterable[nn.Module], ps: ParallelState) -> None:
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    _coalesced_all_reduce(grads, ps.dp_group)


def finalize_grads(modules: list[nn.Module], ps: ParallelState) -> None:
    grad_sync = next((m.grad_sync for m in modules if hasattr(m, "grad_sync")), None)
    if grad_sync is not None:
        grad_sync.finish_grad_sync()  # DataParallel: all three, idempotent until its zero_grad
        return
    sync_group_grads(modules, ps)
    sync_dp_grads(modules, ps)
