"""LoRA checkpoints: the adapters only, plus a pointer to the base checkpoint they were trained on.

A LoRA run initializes its frozen base from `checkpoint.pretrained` (`load_pretrained_base`; the
adapters keep their seeded init) and records it as `base = {"path": <step dir>, "step": N}`.
Its checkpoints (`save_checkpoint(..., base=...)`) store only the trainable parameters and their
optimizer state, and meta.json carries `base`. Loading one (`load_checkpoint`, which calls
`load_base_weights` here) first loads every parameter the checkpoint does not store from the
base, resharded to the current layout, then the adapters and optimizer state from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from megalite.checkpoint.dist import _check_model, load_checkpoint, read_metadata, resolve_checkpoint
from megalite.checkpoint.reshard import (
    ShardReader,
    global_shape,
    global_weight,
    load_key,
    load_weight,
    local_for,
)
from megalite.config import Config, ConfigError, LoraConfig, section_from_dict
from megalite.model.lora import merge_lora
from megalite.parallel.lora import is_adapter
from megalite.parallel.state import ParallelState


def _base_dir(path: str | Path, what: str) -> tuple[Path, dict]:
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ConfigError(f"{what}: no checkpoint found at {path}")
    meta = read_metadata(step_dir)
    if "base" in meta:
        raise ConfigError(f"{what}: {step_dir} is itself a LoRA (adapter-only) checkpoint; merge it first "
                          "(tools/convert_checkpoint.py --merge-lora)")
    return step_dir, meta


@torch.no_grad()
def _load_weights(step_dir: Path, meta: dict, chunks: list[nn.Module], ps: ParallelState,
                  wanted) -> None:
    reader = ShardReader(step_dir)
    for c in chunks:
        for name, p in c.named_parameters():
            if wanted(name, p):
                p.copy_(load_weight(reader, meta, load_key(name, p, ps, meta), p, ps).to(p.dtype))


def load_pretrained_base(path: str | Path, chunks: list[nn.Module], ps: ParallelState, cfg: Config) -> dict:
    """Loads every non-adapter parameter from a (full, any-layout) checkpoint; the adapters keep
    their init. Returns the base pointer a LoRA checkpoint records."""
    step_dir, meta = _base_dir(path, "checkpoint.pretrained")
    _check_model(meta, cfg, step_dir)
    _load_weights(step_dir, meta, chunks, ps, lambda name, p: not is_adapter(p))
    return {"path": str(step_dir.resolve()), "step": int(meta["step"])}


def base_checkpoint(meta: dict, where: str) -> tuple[Path, dict]:
    """(step dir, metadata) of the base a LoRA checkpoint's metadata points to, which must still be
    the step the adapters were trained on."""
    base = meta.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        raise ConfigError(f"{where}: not a LoRA checkpoint (no valid 'base' in its metadata: {base!r})")
    step_dir, base_meta = _base_dir(base["path"], f"{where} (LoRA base)")
    if int(base_meta["step"]) != base.get("step"):
        raise ConfigError(f"{where}: the LoRA base {step_dir} is at step {base_meta['step']}, the adapters were "
                          f"trained on step {base.get('step')}")
    return step_dir, base_meta


def saved_lora_config(meta: dict, where: str) -> LoraConfig:
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    lora = section_from_dict(LoraConfig, config.get("lora") or {}, "lora.", where)
    if lora.rank <= 0:
        raise ConfigError(f"{where}: lora.rank is {lora.rank} in the checkpoint config")
    return lora


def load_base_weights(base: dict, chunks: list[nn.Module], ps: ParallelState, cfg: Config,
                      stored: set[str], where: Path) -> None:
    """For a LoRA checkpoint at `where` (storing the keys `stored`): loads the other parameters
    from its base checkpoint `base`, resharded to this layout."""
    step_dir, meta = base_checkpoint({"base": base}, str(where))
    _check_model(meta, cfg, step_dir)
    _load_weights(step_dir, meta, chunks, ps, lambda name, p: load_key(name, p, ps, meta) not in stored)


def load_lora_checkpoint(path: str | Path, chunks, optimizer, ps: ParallelState, cfg: Config,
                         tracker=None) -> dict:
    """A LoRA checkpoint: base from its pointer, then adapters and optimizer state (a plain
    `load_checkpoint` does the same when it meets a `base`; this one insists on it)."""
    step_dir = resolve_checkpoint(path)
    if step_dir is not None and "base" not in read_metadata(step_dir):
        raise ConfigError(f"{step_dir}: not a LoRA checkpoint (no 'base' in its metadata)")
    return load_checkpoint(path, chunks, optimizer, ps, cfg, tracker)


@torch.no_grad()
def load_merged_weights(model: nn.Module, step_dir: Path, meta: dict, ps: ParallelState) -> None:
    """Inference: a plain (adapter-less) model gets its base from the LoRA checkpoint's pointer with
    the adapters folded in (W += scale * B @ A on the global tensor), then its TP slice."""
    where = str(step_dir)
    base_dir, base_meta = base_checkpoint(meta, where)
    lora = saved_lora_config(meta, where)
    base_reader, reader = ShardReader(base_dir), ShardReader(step_dir)
    for name, p in model.named_parameters():
        key = load_key(name, p, ps, base_meta)
        prefix = key.removesuffix(".weight")
        if prefix + ".lora_a" not in meta["params"]:
            p.copy_(load_weight(base_reader, base_meta, key, p, ps).to(p.dtype))
            continue
        w = {key: global_weight(base_reader, base_meta, key)}
        for ab in (".lora_a", ".lora_b"):
            w[prefix + ab] = global_weight(reader, meta, prefix + ab)
        full = merge_lora(w, lora)[key]
        if list(full.shape) != global_shape(p):
            raise ConfigError(f"{where}: '{key}' has global shape {list(full.shape)}, the model expects "
                              f"{global_shape(p)}")
        p.copy_(local_for(full, p, ps).to(p.dtype))


def merged_global_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the LoRA checkpoint's metadata, global base tensors with its adapters folded in): for the
    conversion tool's --merge-lora, without process groups."""
    from megalite.checkpoint.global_weights import load_global_weights

    meta, adapters = load_global_weights(path)
    where = f"--merge-lora: {path} (step {meta.get('step')})"
    base_dir, _ = base_checkpoint(meta, where)
    _, weights = load_global_weights(base_dir)
    return meta, merge_lora({**weights, **adapters}, saved_lora_config(meta, where))
