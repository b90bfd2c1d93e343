"""Forward and backward over a step's micro-batches (gradient accumulation), for any stage.

Every schedule shares this signature; pipeline schedules live in megalite/parallel/pipeline/.
Each micro-batch backprops `stage loss sum / num_units`, where `num_units` counts the loss units
(tokens, pairs, ...) of the whole step on all DP ranks, so summing grads over micro-batches and
DP ranks gives exactly the gradient of the global mean loss, for any split and layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn

from megalite.config import ParallelConfig
from megalite.parallel.pipeline.step import ForwardStep, TokenLoss, add_sums, new_sums
from megalite.parallel.state import ParallelState

NoSync = Callable[[], contextlib.AbstractContextManager] | None


def forward_backward_no_pipelining(chunks: list[nn.Module], micro_batches: list[dict], ps: ParallelState, *,
                                   num_units: float, step: ForwardStep | None = None,
                                   forward_only: bool = False, loss_scale: float = 1.0,
                                   no_sync: NoSync = None) -> dict[str, torch.Tensor]:
    (model,) = chunks
    step = step if step is not None else TokenLoss()
    sums = new_sums(step, ps.device)
    last = len(micro_batches) - 1
    for i, mb in enumerate(micro_batches):
        # Grad reduction is deferred to the last micro-batch's backward, where it overlaps compute.
        ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
        with ctx, torch.set_grad_enabled(not forward_only):
            loss, metrics = step.loss(step.forward(model, mb, None), mb)
            if not forward_only:
                (loss * (loss_scale / num_units)).backward()
        add_sums(sums, loss, metrics)
    return sums


def get_forward_backward(ps: ParallelState, par: ParallelConfig):
    if ps.pp == 1:
        return forward_backward_no_pipelining
    from megalite.parallel.pipeline import get_pipeline_schedule  # noqa: PLC0415

    return get_pipeline_schedule(ps, par)
