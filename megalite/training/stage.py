"""A training stage: its data, its loss on the last pipeline stage, and its metrics.

The trainer (trainer.py) owns everything a stage shares: the model chunks, the schedules, the
optimizer, precision, checkpoints, logging and preemption. A stage only says what a step feeds the
model and what it optimizes, so pretraining, SFT, reward modelling, DPO and RL all run the same
loop under every layout. `PretrainStage` is the default; the post-training stages live in
megalite/alignment/.

    batches(trainer, dataset, consumed)  this DP rank's micro-batches of one step (host-built dicts)
    loss_units(mb)                       what the loss averages over; summed over the step and DP
    forward(model, mb, hidden)           one chunk's forward (pipeline/step.py's protocol)
    loss(output, mb)                     last stage: (loss SUM, {metric: SUM})
    reduce_metrics(sums, num_units)      the step's logged metrics, from globally reduced sums
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from megalite.data import build_pretrain_datasets
from megalite.data.sampler import get_micro_batch
from megalite.parallel.pipeline.step import TokenLoss
from megalite.training.batch import batch_to_device, make_micro_batch

if TYPE_CHECKING:
    from megalite.training.trainer import Trainer


class Stage(TokenLoss, ABC):
    """Token cross-entropy over `labels` by default; subclasses supply the data and override what
    else differs."""

    name = "stage"
    perplexity = True  # the loss is a token cross-entropy: log exp(eval_loss) as eval_ppl
    evaluates_checkpoint = False  # train.train_steps=0 evaluates the loaded weights (megalite rm)
    pretrained_fresh: tuple[str, ...] = ()  # heads checkpoint.pretrained may lack (they keep their init)

    @abstractmethod
    def build_datasets(self, trainer: Trainer) -> tuple[Any, Any | None]: ...

    @abstractmethod
    def batches(self, trainer: Trainer, dataset: Any, consumed: int) -> list[dict]: ...

    def loss_units(self, mb: dict) -> float:
        return float(mb["num_loss_tokens"])

    def reduce_metrics(self, sums: dict[str, float], num_units: float) -> dict[str, float]:
        return {}

    def on_save(self, trainer: Trainer) -> None:
        """Called after every checkpoint save, for state the stage owns beside the trainer's."""

    def describe(self, trainer: Trainer) -> str:
        """Extra words for the start banner (e.g. packing efficiency)."""
        return ""


def sampled_batches(trainer: Trainer, dataset: Any, consumed: int,
                    micro_batch: Callable[[Any, int, int, int, int, int], dict]) -> list[dict]:
    """This DP rank's `trainer.num_micro` micro-batches of the step starting at `consumed` samples,
    in the pretraining sampler's order: `micro_batch(dataset, consumed, i, mbs, dp_rank, dp)` builds
    micro-batch i on the host, then its tensors go to the device."""
    t, ps = trainer.cfg.train, trainer.ps
    return [batch_to_device(micro_batch(dataset, consumed, i, t.micro_batch_size, ps.dp_rank, ps.dp),
                            trainer.device)
            for i in range(trainer.num_micro)]


class PretrainStage(Stage):
    """Next-token prediction on packed token windows (documents separated by EOD)."""

    name = "pretrain"

    def build_datasets(self, trainer: Trainer) -> tuple[Any, Any | None]:
        cfg, t = trainer.cfg, trainer.cfg.train
        wanted = {"train": t.train_steps * t.global_batch_size, "valid": t.eval_steps * t.global_batch_size}
        train, valid, _ = build_pretrain_datasets(cfg.data, t.seq_len, t.seed, trainer.tokenizer,
                                                  num_samples=wanted, global_batch_size=t.global_batch_size)
        return train, valid

    def batches(self, trainer: Trainer, dataset: Any, consumed: int) -> list[dict]:
        d = trainer.cfg.data

        def window(*args) -> dict:  # built on the host; sampled_batches moves it
            return make_micro_batch(get_micro_batch(*args), trainer.tokenizer.eod, d.reset_at_eod,
                                    d.eod_mask_loss, torch.device("cpu"))

        return sampled_batches(trainer, dataset, consumed, window)
