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

from megalite.parallel.comm import all_reduce, group_size
from megalite.parallel.sharding import is_tied_embedding
from megalite.parallel.state import ParallelState


def _coalesced_all_reduce(grads: list[torch.Tensor], group) -> None:
    if not grads or group_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce(flat, group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_tp_partial_grads(modules: Iterable[nn.Module], ps: ParallelState) -> None:
    grads = []
    for m in modules:
        for p in m.parameters():
            sync = getattr(p, "sync_tp_grad", False)
            if p.grad is None or sync is False:
                continue
            grads.append(p.grad if sync is True else p.grad[sync[0]: sync[1]])
    _coalesced_all_reduce(grads, ps.tp_group)


def sync_tied_embedding_grads(modules: Iterable[nn.Module], ps: ParallelState) -> None:
    if ps.pp == 1 or not (ps.is_first_stage or ps.is_last_stage):
        return
    grads = []
    for m in modules:
        for p in m.parameters():
            if is_tied_embedding(p) and p.grad is not None:
                grads.append(p.grad)
    _coalesced_all_reduce(grads, ps.embedding_group)


def sync_dp_grads(modules: Iterable[nn.Module], ps: ParallelState) -> None:
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    _coalesced_all_reduce(grads, ps.dp_group)


def finalize_grads(modules: list[nn.Module], ps: ParallelState) -> None:
    grad_sync = next((m.grad_sync for m in modules if hasattr(m, "grad_sync")), None)
    if grad_sync is not None:
        grad_sync.finish_grad_sync()  # DataParallel: all three, idempotent until its zero_grad
        return
    sync_tp_partial_grads(modules, ps)
    sync_tied_embedding_grads(modules, ps)
    sync_dp_grads(modules, ps)
