"""A small trained checkpoint and texts shared by the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

MODEL = ["model.num_layers=4", "model.max_seq_len=64", "data.tokenizer_type=byte"]
TEXTS = ["def add(a, b):\n    return a + b\n", "import os", "x = [i * i for i in range(10)]",
         # longer than one 64-token window: scored in two and three windows
         "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n    def norm(self):\n",
         "The quick brown fox jumps over the lazy dog. " * 4]


def make_checkpoint(root: Path) -> Path:
    """A 4-layer byte-level model trained for 3 steps (so its predictions are not uniform)."""
    cfg = tiny_config(str(root / "train"), *MODEL, "train.train_steps=3", "checkpoint.save_on_exit=true")
    Trainer(cfg).train()
    return root / "train" / "checkpoints"


def write_texts(path: Path, texts: list[str] = TEXTS) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@torch.no_grad()
def reference_loglikelihood(model, text: str, window: int, eod: int = 257) -> float:
    """log p(text) from plain full-logit forwards of megalite.load_model's model, window by window."""
    seq = [eod, *text.encode("utf-8")]
    total = 0.0
    for start in range(0, len(seq) - 1, window):
        n = min(window, len(seq) - 1 - start)
        logp = F.log_softmax(model.full_logits(torch.tensor([seq[start: start + n]])).double(), -1)[0]
        total += float(logp.gather(1, torch.tensor(seq[start + 1: start + 1 + n])[:, None]).sum())
    return total
