"""`megalite rm`: a reward model on preference pairs (tools/preprocess_data.py --mode preference).

The policy's architecture with a scalar head (`model.output_head=score`, set here before the model
is built, so checkpoints record it). A row's reward is the score at its last real token, the last
labelled position, which has read the whole prompt and answer. Chosen and rejected rows of a pair
sit in the same micro-batch, and the loss is Bradley-Terry, `-log sigmoid(r_c - r_r - rm.margin)`,
averaged over the step's pairs on all DP ranks. Works under TP, SP and PP like every stage.

Start from an SFT checkpoint with `checkpoint.pretrained=DIR`: the score head starts fresh and the
checkpoint's lm head is ignored. `train.train_steps=0` evaluates a reward model instead
(`checkpoint.load` or `checkpoint.pretrained`): the pairwise accuracy on the held-out split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megalite.alignment.reward import bradley_terry_loss, pairwise_accuracy
from megalite.checkpoint.dist import resolve_checkpoint
from megalite.config import Config, ConfigError
from megalite.data.sft import IGNORE_INDEX, build_preference_datasets, preference_micro_batch
from megalite.training.stage import Stage, sampled_batches
from megalite.training.trainer import Trainer, run_stage

PAIR_METRICS = ("reward_accuracy", "chosen_reward", "rejected_reward", "margin")


def last_token_index(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the last position with a label (the row's last real input token) ([b] int64)."""
    has = labels != IGNORE_INDEX
    s = labels.shape[-1]
    return (s - 1) - has.flip(-1).int().argmax(-1)


def pairs_of(values: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values [2B] -> (chosen [B], rejected [B]), pair i at index i."""
    chosen = mb["is_chosen"]
    return values[chosen], values[~chosen]


class PreferenceStage(Stage):
    """Data shared by the pairwise stages (RM, DPO): one item is a pair, rows [c0..cB-1, r0..rB-1]."""

    perplexity = False

    def build_datasets(self, trainer: Trainer) -> tuple[Any, Any | None]:
        t = trainer.cfg.train
        return build_preference_datasets(trainer.cfg.data, t.seq_len, t.seed, trainer.tokenizer,
                                         log=print if trainer.ps.rank == 0 else None)

    def batches(self, trainer: Trainer, dataset: Any, consumed: int) -> list[dict]:
        return sampled_batches(trainer, dataset, consumed, preference_micro_batch)

    def loss_units(self, mb: dict) -> float:
        return float(len(mb["pair_ids"]))

    def reduce_metrics(self, sums: dict[str, float], num_units: float) -> dict[str, float]:
        return {k: sums[k] / num_units for k in self.metric_names}


class RMStage(PreferenceStage):
    name = "rm"
    metric_names = PAIR_METRICS
    evaluates_checkpoint = True

    def __init__(self, margin: float = 0.0, fresh_head: bool = True) -> None:
        self.margin = margin
        # Trained from an SFT checkpoint the score head is new; evaluated, it must come from the checkpoint.
        self.pretrained_fresh = ("score",) if fresh_head else ()

    def loss(self, output: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = last_token_index(mb["labels"])
        rewards = output.gather(1, idx.unsqueeze(1)).squeeze(1)  # scores [2B, s] -> [2B]
        chosen, rejected = pairs_of(rewards, mb)
        losses = bradley_terry_loss(chosen, rejected, self.margin or None)
        diff = (chosen - rejected).detach()
        return losses.sum(), {"reward_accuracy": pairwise_accuracy(chosen, rejected).sum(),
                              "chosen_reward": chosen.detach().sum(), "rejected_reward": rejected.detach().sum(),
                              "margin": diff.sum()}


def _check_evaluable(cfg: Config) -> None:
    ck = cfg.checkpoint
    own = Path(ck.dir or Path(cfg.train.run_dir) / "checkpoints")
    if ck.load == "auto" and (own / "latest").is_file() or ck.load not in ("", "auto") or ck.pretrained:
        return
    raise ConfigError(f"train.train_steps=0 evaluates a reward model, but there is none to load ({own} has no "
                      f"checkpoint): set checkpoint.load=DIR or checkpoint.pretrained=DIR")


def evaluate_checkpoint(trainer: Trainer) -> dict:
    """The loaded reward model's held-out loss and pairwise accuracy (`train.eval_steps` steps of
    `train.global_batch_size` pairs), printed and logged by rank 0."""
    if trainer.valid_ds is None:
        raise ConfigError(f"train.train_steps=0 evaluates on the held-out split, but data.split "
                          f"'{trainer.cfg.data.split}' leaves it empty")
    rec = {"step": trainer.state.step, **trainer.evaluate()}
    if trainer.is_logger:
        trainer.metrics.log(rec)
        pairs = trainer.cfg.train.eval_steps * trainer.cfg.train.global_batch_size
        print(f"rm eval | {pairs} pairs | reward_accuracy {rec['eval_reward_accuracy']:.4f} | "
              f"loss {rec['eval_loss']:.4f} | chosen {rec['eval_chosen_reward']:.4f} | "
              f"rejected {rec['eval_rejected_reward']:.4f}", flush=True)
    return rec


def run(cfg: Config) -> list[dict]:
    cfg.model.output_head = "score"
    evaluate_only = cfg.train.train_steps == 0
    stage = RMStage(cfg.rm.margin, fresh_head=not evaluate_only)
    if not evaluate_only:
        return run_stage(cfg, stage)
    _check_evaluable(cfg)
    if cfg.checkpoint.load not in ("", "auto"):
        resolve_checkpoint(cfg.checkpoint.load)  # a broken `latest` is named before any work
    trainer = Trainer(cfg, stage)
    try:
        return [evaluate_checkpoint(trainer)]
    finally:
        trainer.metrics.close()
        if trainer.run_lock is not None:
            trainer.run_lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
