"""Tiny synthetic preference data and a random-init "SFT" checkpoint for the RM/DPO tests."""

from __future__ import annotations

import random
from pathlib import Path

from megalite.data.preprocess import preprocess
from megalite.training.trainer import Trainer
from tests.data.test_sft_data import write_jsonl
from tests.training.common import tiny_config

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Separable pairs: the chosen answer is always made of 'yes', the rejected one of 'no', with
    lengths drawn independently (so length alone does not separate them)."""
    rnd = random.Random(seed)
    return [{"prompt": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 4))),
             "chosen": " ".join(["yes"] * rnd.randint(1, 3)),
             "rejected": " ".join(["no"] * rnd.randint(1, 4))} for _ in range(n)]


def preference_shard(d: Path, n: int = 64, seed: int = 0) -> str:
    src = write_jsonl(d / "pref.jsonl", preference_records(n, seed))
    preprocess([str(src)], str(d / "pref"), "byte", mode="preference", workers=0, progress=False)
    return str(d / "pref")


def sft_checkpoint(d: Path, steps: int = 1, *extra: str) -> str:
    """A short SFT run's checkpoint (prompts with chosen answers), standing in for a policy's start."""
    d.mkdir(parents=True, exist_ok=True)
    recs = preference_records(32, seed=99)
    src = write_jsonl(d / "chat.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in recs])
    preprocess([str(src)], str(d / "chat"), "byte", mode="chat", workers=0, progress=False)
    from megalite.alignment.sft import SFTStage  # noqa: PLC0415

    cfg = tiny_config(str(d / "run"), f"train.train_steps={steps}", f"data.path={d / 'chat'}",
                      "data.split=100,0,0", f"data.cache_dir={d / 'cache'}", "train.seq_len=32",
                      "checkpoint.save_on_exit=true", "optim.lr=1e-4", *extra)
    Trainer(cfg, SFTStage()).train()
    return str(d / "run" / "checkpoints")
