"""`checkpoint.pretrained`: start a run from another run's (or an HF import's) weights.

Weights only: the optimizer, the step counter, the data position and the RNG streams all start
fresh. The trainer uses it only when the run's own checkpoint directory has no `latest`, so a
relaunched (e.g. requeued) fine-tuning run resumes its own progress instead of starting over.
Every tensor is checked against the model before any is copied: a mismatch names the tensor,
both shapes and the checkpoint file, and leaves the model untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megalite.checkpoint.dist import METADATA, read_metadata, resolve_checkpoint
from megalite.checkpoint.reshard import ShardReader, global_shape, global_weight, load_key, local_for
from megalite.config import ConfigError
from megalite.parallel.state import ParallelState


@torch.no_grad()
def load_pretrained(path: str | Path, chunks, optimizer, ps: ParallelState, fresh: tuple[str, ...] = ()) -> Path:
    """Copies the checkpoint's weights into this rank's chunks (any saved TP/PP/DP layout) and
    re-syncs the optimizer's master weights from them. Returns the step directory read.
    `fresh`: stored names that may be absent from the checkpoint and then keep this model's init
    (a reward model's `score` head started from an SFT checkpoint); nothing else may be missing."""
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ConfigError(f"checkpoint.pretrained: no checkpoint at {path} (neither a step directory with "
                          f"{METADATA} nor a checkpoint root with a `latest`)")
    meta = read_metadata(step_dir)
    where = step_dir / METADATA
    params = [(name, p) for c in chunks for name, p in c.named_parameters()]
    keys = []
    for name, p in params:  # check everything first: a mismatch must not leave a half-loaded model
        key = load_key(name, p, ps, meta)
        entry = meta["params"].get(key)
        if entry is None and key in fresh:
            keys.append(None)
            continue
        if entry is None:
            raise ConfigError(f"{where}: tensor '{key}' (shape {global_shape(p)} in this model) is missing "
                              f"from the pretrained checkpoint")
        if list(entry["shape"]) != global_shape(p):
            raise ConfigError(f"{where}: tensor '{key}' has shape {list(entry['shape'])} in the pretrained "
                              f"checkpoint but {global_shape(p)} in this model")
        keys.append(key)
    reader = ShardReader(step_dir)
    for (_, p), key in zip(params, keys):
        if key is None:
            continue
        full = global_weight(reader, meta, key)
        if list(full.shape) != global_shape(p):  # the shard itself disagrees with its metadata
            raise ConfigError(f"{step_dir}: tensor '{key}' is stored with shape {list(full.shape)} but the "
                              f"model expects {global_shape(p)}")
        p.copy_(local_for(full, p, ps).to(p.dtype))
    if hasattr(optimizer, "sync_master_from_params"):
        optimizer.sync_master_from_params()  # fp32 master copies must start from the loaded weights
    return step_dir
