"""Whole-model (global, TP=1) views of a checkpoint, for conversion tools and inspection.

`load_global_weights` reassembles every parameter of any saved layout into its global tensor,
without process groups. `save_global_weights` writes global tensors as a weights-only checkpoint
in the same format (one rank file, layout TP1 x PP1 x DP1, no optimizer state): any layout loads
it through `checkpoint.load_checkpoint`, and Adam starts fresh.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megalite.atomic import atomic_write
from megalite.checkpoint.dist import (
    FORMAT,
    _commit,
    _rank_file,
    read_metadata,
    resolve_checkpoint,
    step_dirs,
)
from megalite.checkpoint.reshard import ShardReader, global_weight
from megalite.config import Config, ConfigError


def load_global_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, {global name: global tensor}) of a step directory or a checkpoint root."""
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ConfigError(f"no checkpoint found at {path}")
    meta = read_metadata(step_dir)
    reader = ShardReader(step_dir)
    out = {name: global_weight(reader, meta, name).clone() for name in meta["params"]}
    return meta, out


def save_global_weights(ckpt_dir: str | Path, step: int, weights: dict[str, torch.Tensor], cfg: Config,
                        extra: dict | None = None) -> Path:
    """Writes a single-process, weights-only checkpoint of global tensors (atomic, like a save)."""
    root = Path(ckpt_dir)
    final, tmp = step_dirs(root, step)
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fname = _rank_file(0)
    payload = {"model": {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, "optim": {}}
    atomic_write(tmp / fname, lambda p: torch.save(payload, p))
    params = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "tp_shard": None, "local_shape": list(v.shape),
                  "weights": {"0": fname}, "optim": {}} for k, v in weights.items()}
    extra = {"consumed_samples": 0, **(extra or {})}
    meta = {"format": FORMAT, "step": step, **extra,
            "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "world_size": 1, "distributed_optimizer": False},
            "optimizer": {"steps": None, "reshardable": True, "weights_only": True},
            "ranks": [{"file": fname, "tp_rank": 0, "pp_rank": 0, "dp_rank": 0}], "params": params,
            "config": cfg.to_dict()}
    _commit(root, tmp, final, meta)  # no retention: the checkpoint root may hold a run's others
    return final
