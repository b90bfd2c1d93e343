"""Forward and backward over a step's micro-batches (gradient accumulation).

Every schedule shares this signature; pipeline schedules live in megalite/parallel/pipeline/.
Each micro-batch's backward uses `sum(token losses) / num_tokens`, where `num_tokens` counts the
loss tokens of the whole step on all DP ranks, so summing grads over micro-batches and DP ranks
gives exactly the gradient of the global token-mean loss, for any layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn

from megalite.config import ParallelConfig
from megalite.parallel.state import ParallelState

NoSync = Callable[[], contextlib.AbstractContextManager] | None


def run_forward(model: nn.Module, mb: dict, hidden: torch.Tensor | None = None) -> torch.Tensor:
    return model(tokens=mb["tokens"] if model.pre_process else None, hidden=hidden,
                 labels=mb["labels"] if model.post_process else None,
                 position_ids=mb["position_ids"], doc_ids=mb["doc_ids"])


def forward_backward_no_pipelining(chunks: list[nn.Module], micro_batches: list[dict], ps: ParallelState, *,
                                   num_tokens: float, forward_only: bool = False, loss_scale: float = 1.0,
                                   no_sync: NoSync = None) -> torch.Tensor:
    (model,) = chunks
    total = torch.zeros((), device=ps.device)
    last = len(micro_batches) - 1
    for i, mb in enumerate(micro_batches):
        # Grad reduction is deferred to the last micro-batch's backward, where it overlaps compute.
        ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
        with ctx:
            losses = run_forward(model, mb)
            if not forward_only:
                (losses.sum() * (loss_scale / num_tokens)).backward()
        total += losses.detach().sum().float()
    return total


def get_forward_backward(ps: ParallelState, par: ParallelConfig):
    if ps.pp == 1:
        return forward_backward_no_pipelining
    from megalite.parallel.pipeline import get_pipeline_schedule  # noqa: PLC0415

    return get_pipeline_schedule(ps, par)
