"""Shared pieces of the GRPO / PPO tests: a tiny policy on the byte tokenizer, prompts, rewards."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from megalite.config import load_config

PROMPTS = ["x", "y", "z", "w"]


def lower_frac(prompt: str, response: str) -> float:
    """Verifiable toy reward: the share of lowercase letters in the answer (about 0.1 at random init)."""
    return sum(c.islower() for c in response) / max(len(response), 1)


def constant_for_x(prompt: str, response: str) -> float:
    """All answers to prompt "x" score the same (a uniform group for DAPO's filter)."""
    return 0.5 if prompt == "x" else lower_frac(prompt, response)


def raises_on_z(prompt: str, response: str) -> float:
    if prompt == "z":
        raise ValueError("cannot score this\nsecond line")
    return 0.0


def nan_on_y(prompt: str, response: str) -> float:
    return math.nan if prompt == "y" else 0.0


def write_prompts(tmp: Path) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "prompts.jsonl"
    part = tmp / f"prompts.{os.getpid()}.part"  # ranks of one test write it at once: replace atomically
    part.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    os.replace(part, path)
    return str(path)


def tiny_config(tmp: Path, *overrides: str):
    ov = ["model.vocab_size=0", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
          "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.max_seq_len=64", "train.seq_len=16",
          "train.micro_batch_size=8", "train.global_batch_size=32", "train.train_steps=3",
          f"train.run_dir={tmp / 'run'}", "train.progress_bar=false", "train.device=cpu", "checkpoint.load=",
          "checkpoint.save_on_exit=false", "optim.lr=3e-2", "optim.min_lr=3e-2", "optim.warmup_steps=0",
          "optim.weight_decay=0", f"rl.prompts={write_prompts(tmp)}", "rl.group_size=8", "rl.max_new_tokens=8",
          "reward.function=tests.alignment.rl_helpers:lower_frac", "rl.kl_coef=0", *overrides]
    return load_config(None, ov)


def save_score_model(tmp: Path, vocab_size: int | None = None, seed: int = 7) -> str:
    """A reward-model checkpoint (score head) of the tiny architecture, at world size 1."""
    import copy

    import torch

    from megalite.checkpoint import dist as ckpt
    from megalite.config import Config
    from megalite.data.tokenizer import build_tokenizer
    from megalite.model import LlamaModel
    from megalite.parallel.state import ParallelState

    mcfg = copy.deepcopy(tiny_config(tmp).model)
    mcfg.vocab_size = vocab_size or build_tokenizer("byte", "").vocab_size
    mcfg.output_head = "score"
    model = LlamaModel(mcfg, ParallelState())
    model.init_weights(seed)
    out = tmp / f"rm_{mcfg.vocab_size}"
    ckpt.save_checkpoint(out, 1, [model], torch.optim.SGD(model.parameters(), lr=0.0), ParallelState(),
                         Config(model=mcfg), {"consumed_samples": 0})
    ckpt.wait_for_pending_save()
    return str(out)


def constant(prompt: str, response: str) -> float:
    return 1.0
