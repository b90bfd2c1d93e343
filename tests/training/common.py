"""Shared tiny configs for trainer tests."""

from __future__ import annotations

from megalite.config import Config, load_config

TINY = [
    "model.vocab_size=0", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.max_seq_len=64",
    "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.log_interval=1", "train.progress_bar=false", "optim.lr=3e-3", "optim.warmup_steps=2",
    "optim.clip_grad=1.0", "checkpoint.load=", "checkpoint.save_on_exit=false",
]


def tiny_config(run_dir: str, *extra: str) -> Config:
    return load_config(None, [*TINY, f"train.run_dir={run_dir}", *extra])
