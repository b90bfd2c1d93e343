"""`megalite dpo`: direct preference optimization (and IPO, SLiC hinge, SimPO, RPO) on preference shards.

Chosen and rejected rows of a pair go through one forward in the same micro-batch. A row's sequence
log-prob is `-(per-token CE * answer mask).sum()`, the model's labels path: vocab-parallel, never
gathering the vocabulary, under every `model.loss_impl` (fused_linear included). The loss is
`preference_loss` (dpo.py) per pair, summed, averaged over the step's pairs on all DP ranks.

Reference log-probs (`dpo.reference`), from `dpo.ref_checkpoint` (default: checkpoint.pretrained):
- `precompute`: one forward-only pass over the train and valid splits before the first step,
  stored beside the data (ref_logps.py) and reused on a rerun; the reference is then freed, so a
  step costs about what an SFT step on the same rows costs.
- `model`: a frozen reference (frozen.py: no grads, no optimizer, dropout off; parked on the CPU
  between uses with `dpo.offload_reference`) runs forward-only on every step's micro-batches.
SimPO needs no reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megalite.alignment.dpo import nll_term, preference_loss
from megalite.alignment.frozen import (
    build_frozen_model,
    check_checkpoint_vocab,
    offload_chunks,
    sequence_logps,
    sequence_logps_of,
    to_device,
)
from megalite.alignment.ref_logps import load_or_compute
from megalite.alignment.rm import PAIR_METRICS, PreferenceStage, pairs_of
from megalite.config import ConfigError, DPOConfig
from megalite.data.sft import IGNORE_INDEX
from megalite.training.trainer import Trainer

REFERENCES = ("precompute", "model")


class DPOStage(PreferenceStage):
    name = "dpo"

    def __init__(self, dpo: DPOConfig) -> None:
        if dpo.reference not in REFERENCES:
            raise ConfigError(f"dpo.reference '{dpo.reference}': expected {' | '.join(REFERENCES)}")
        # preference_loss validates the rest; check it now, not at the first step.
        one = torch.zeros(1)
        preference_loss(one, one, one, one, dpo.beta, dpo.loss_type, dpo.label_smoothing, dpo.gamma, one, one)
        self.dpo = dpo
        self.needs_ref = dpo.loss_type != "simpo"
        self.metric_names = (*PAIR_METRICS, "chosen_logp", "rejected_logp") + (("nll",) if dpo.rpo_alpha else ())
        self.ref_chunks: list | None = None
        self.tables: dict[str, Any] = {}  # split name -> [pairs, 2] precomputed reference log-probs
        self.prepared = False

    # -- the reference --------------------------------------------------------------------------
    def _ref_dir(self, trainer: Trainer) -> Path:
        src = self.dpo.ref_checkpoint or trainer.cfg.checkpoint.pretrained
        if not src:
            raise ConfigError("dpo needs a reference model: set dpo.ref_checkpoint or checkpoint.pretrained "
                              "(the SFT checkpoint DPO starts from)")
        what = "dpo.ref_checkpoint" if self.dpo.ref_checkpoint else "checkpoint.pretrained (the DPO reference)"
        return check_checkpoint_vocab(src, trainer.cfg, what)

    def _build_ref(self, trainer: Trainer, ref_dir: Path) -> list:
        return build_frozen_model(trainer.cfg, trainer.ps, ref_dir, "lm", offload=self.dpo.offload_reference,
                                  what="dpo.ref_checkpoint")

    def prepare(self, trainer: Trainer) -> None:
        """Runs once, on every rank, before the first batch: loads or computes the reference."""
        self.prepared = True
        if not self.needs_ref:
            return
        ref_dir = self._ref_dir(trainer)
        if self.dpo.reference == "model":
            self.ref_chunks = self._build_ref(trainer, ref_dir)
            return
        built: list = []

        def build() -> list:
            if not built:
                built.append(self._build_ref(trainer, ref_dir))
                if self.dpo.offload_reference:
                    to_device(built[0], trainer.device)
            return built[0]

        for ds in (trainer.train_ds, trainer.valid_ds):
            if ds is None:
                continue
            table, path, computed = load_or_compute(trainer, ds, ref_dir, build)
            self.tables[ds.name] = torch.from_numpy(table)
            if trainer.is_logger:
                print(f"dpo reference log-probs ({ds.name}, {len(ds):,} pairs): "
                      f"{'computed and stored in' if computed else 'reused from'} {path}", flush=True)
        built.clear()  # the reference is freed: training holds only the policy

    # -- batches --------------------------------------------------------------------------------
    def batches(self, trainer: Trainer, dataset: Any, consumed: int) -> list[dict]:
        if not self.prepared:
            self.prepare(trainer)
        mbs = super().batches(trainer, dataset, consumed)
        if not self.needs_ref:
            return mbs
        if self.ref_chunks is not None:
            if self.dpo.offload_reference:
                to_device(self.ref_chunks, trainer.device)
            sequence_logps(self.ref_chunks, mbs, trainer.ps, trainer.cfg.parallel, autocast=trainer.autocast)
            if self.dpo.offload_reference:
                offload_chunks(self.ref_chunks)
            return mbs
        table = self.tables[dataset.name]
        for mb in mbs:
            pairs = table[mb["pair_ids"].cpu()]  # [B, 2]
            mb["ref_logps"] = torch.cat([pairs[:, 0], pairs[:, 1]]).to(trainer.device)  # rows: chosen, rejected
        return mbs

    # -- the loss (last pipeline stage) ---------------------------------------------------------
    def loss(self, output: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.dpo
        labels = mb["labels"]
        logps = sequence_logps_of(output, labels)  # [2B], differentiable
        lengths = (labels != IGNORE_INDEX).sum(-1)
        pc, pr = pairs_of(logps, mb)
        lc, lr = pairs_of(lengths, mb)
        rc, rr = pairs_of(mb["ref_logps"], mb) if self.needs_ref else (None, None)
        losses, chosen_r, rejected_r = preference_loss(pc, pr, rc, rr, d.beta, d.loss_type, d.label_smoothing,
                                                       d.gamma, lc, lr)
        metrics = {"reward_accuracy": (chosen_r > rejected_r).float().sum(), "chosen_reward": chosen_r.sum(),
                   "rejected_reward": rejected_r.sum(), "margin": (chosen_r - rejected_r).sum(),
                   "chosen_logp": pc.detach().sum(), "rejected_logp": pr.detach().sum()}
        if d.rpo_alpha:
            nll = nll_term(pc, lc)
            losses = losses + d.rpo_alpha * nll
            metrics["nll"] = nll.detach().sum()
        return losses.sum(), metrics
