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
from megalite.checkpoint.reshard import ShardReader, load_key, load_weight
from megalite.config import Config, ConfigError
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


def load_base_weights(base: dict, chunks: list[nn.Module], ps: ParallelState, cfg: Config,
                      stored: set[str], where: Path) -> None:
    """For a LoRA checkpoint at `where` (storing the keys `stored`): loads the other parameters
    from the base checkpoint it points to, which must still be the step it was trained on."""
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        raise ConfigError(f"{where}: malformed 'base' entry in the checkpoint metadata: {base!r}")
    step_dir, meta = _base_dir(base["path"], f"{where} (LoRA base)")
    if int(meta["step"]) != base.get("step"):
        raise ConfigError(f"{where}: the LoRA base {step_dir} is at step {meta['step']}, the adapters were "
                          f"trained on step {base.get('step')}")
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



def merged_global_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the LoRA checkpoint's metadata, global base tensors with its adapters folded in): for the
    conversion tool's --merge-lora, without process groups."""
    from megalite.checkpoint.global_weights import load_global_weights
    from megalite.config import LoraConfig, section_from_dict
    from megalite.model.lora import merge_lora

    meta, adapters = load_global_weights(path)
    where = f"{path} (step {meta.get('step')})"
    base = meta.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        raise ConfigError(f"--merge-lora: {where} is not a LoRA checkpoint (no 'base' in its metadata)")
    base_meta, weights = load_global_weights(_base_dir(base["path"], f"{where}: LoRA base")[0])
    if int(base_meta["step"]) != base.get("step"):
        raise ConfigError(f"{where}: the LoRA base {base['path']} is at step {base_meta['step']}, the adapters "
                          f"were trained on step {base.get('step')}")
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    lora = section_from_dict(LoraConfig, config.get("lora") or {}, "lora.", where)
    if lora.rank <= 0:
        raise ConfigError(f"{where}: lora.rank is {lora.rank} in the checkpoint config")
    return meta, merge_lora({**weights, **adapters}, lora)
