"""Reward-model training loss: the Bradley-Terry pairwise likelihood on scalar scores, with an optional
per-pair margin (Llama 2), and the pairwise accuracy metric. Formulas: docs/alignment_losses.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megalite.config import ConfigError


def _check(name: str, t: Tensor, like: Tensor, fn: str) -> None:
    if t.shape != like.shape:
        raise ConfigError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Per-pair `-log sigmoid(chosen - rejected - margin)` ([N], at least float32).

    `margin` (scalar or [N]) asks the chosen score to win by at least that much; Llama 2 sets it from
    how strongly the annotator preferred the chosen answer."""
    _check("rejected_scores", rejected_scores, chosen_scores, "bradley_terry_loss")
    dtype = torch.promote_types(torch.promote_types(chosen_scores.dtype, rejected_scores.dtype), torch.float32)
    diff = chosen_scores.to(dtype) - rejected_scores.to(dtype)
    if margin is not None:
        if isinstance(margin, Tensor):
            _check("margin", margin, chosen_scores, "bradley_terry_loss")
            margin = margin.to(dtype)
        diff = diff - margin
    return -F.logsigmoid(diff)


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Per-pair 1.0 where the chosen score is strictly higher, else 0.0 (ties count as wrong, so an
    untrained model that scores everything alike reads 0, not 0.5). Returned per pair so a stage can
    sum it across micro-batches and ranks; `.mean()` gives the accuracy."""
    _check("rejected_scores", rejected_scores, chosen_scores, "pairwise_accuracy")
    return (chosen_scores.detach() > rejected_scores.detach()).float()
