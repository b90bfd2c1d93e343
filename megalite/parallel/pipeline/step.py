"""What a schedule runs on one (model chunk, micro-batch): the stage's forward and, on the last
pipeline stage, its loss (Megatron's forward_step_func / loss_func split).

The schedules only know this protocol, so every training stage (pretraining, SFT, DPO, RL) runs
under every schedule without copying the loop. `TokenLoss` is the default: the model's per-token
cross-entropy summed over the micro-batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn


class ForwardStep(Protocol):
    metric_names: tuple[str, ...]

    def forward(self, model: nn.Module, mb: dict, hidden: torch.Tensor | None) -> torch.Tensor:
        """One chunk's forward: tokens on the first stage, `hidden` from the previous one after."""
        ...

    def loss(self, output: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Last stage only: (differentiable SUM of the loss over the micro-batch's units, detached
        SUMS of `metric_names`). The schedule scales it by loss_scale / (the step's global units)."""
        ...


class TokenLoss:
    """Per-token cross-entropy of `mb["labels"]` (-100: no loss), summed."""

    metric_names: tuple[str, ...] = ()

    def forward(self, model: nn.Module, mb: dict, hidden: torch.Tensor | None) -> torch.Tensor:
        return model(tokens=mb["tokens"] if model.pre_process else None, hidden=hidden,
                     labels=mb["labels"] if model.post_process else None,
                     position_ids=mb.get("position_ids"), doc_ids=mb.get("doc_ids"))

    def loss(self, output: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return output.sum(), {}


def new_sums(step: ForwardStep, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed per-step sums, present on every rank (PP stages without the loss send zeros)."""
    return {k: torch.zeros((), dtype=torch.float32, device=device) for k in ("loss", *step.metric_names)}


def add_sums(sums: dict[str, torch.Tensor], loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
    sums["loss"] += loss.detach().float()
    for k, v in metrics.items():
        sums[k] += v.detach().float()
