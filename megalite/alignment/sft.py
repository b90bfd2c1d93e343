"""`megalite sft`: supervised fine-tuning on chat shards (tools/preprocess_data.py --mode chat).

The loss is the pretraining loss on other labels: token cross-entropy on the assistant tokens only
(`data.loss_on`), normalized by the loss-token count of the whole step over all micro-batches and
DP ranks, so how a batch is split never changes the gradient. Samples are best-fit packed into
rows with positions reset and attention stopped at every sample boundary (megalite/data/sft.py).
Start from a pretrained or HF-converted checkpoint with `checkpoint.pretrained=DIR`.
"""

from __future__ import annotations

from typing import Any

from megalite.config import Config
from megalite.data.sft import build_sft_datasets, sft_micro_batch
from megalite.training.stage import Stage, sampled_batches
from megalite.training.trainer import Trainer, run_stage


class SFTStage(Stage):
    name = "sft"

    def build_datasets(self, trainer: Trainer) -> tuple[Any, Any | None]:
        t = trainer.cfg.train
        return build_sft_datasets(trainer.cfg.data, t.seq_len, t.seed, trainer.tokenizer,
                                  log=print if trainer.ps.rank == 0 else None)

    def batches(self, trainer: Trainer, dataset: Any, consumed: int) -> list[dict]:
        return sampled_batches(trainer, dataset, consumed, sft_micro_batch)

    def describe(self, trainer: Trainer) -> str:
        return f" | packing efficiency {trainer.train_ds.packing_efficiency:.1%}"


def run(cfg: Config) -> list[dict]:
    return run_stage(cfg, SFTStage())
