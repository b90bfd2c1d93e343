"""Checkpoints: one directory per step, written atomically, with a `latest` pointer.

Layout: <dir>/step_00000010/{meta.json, rank_00000.pt, ...}. Every rank writes its own file into a
temporary directory; rank 0 renames the directory into place only after all files are complete,
then rewrites `latest` (itself via rename). A crash at any point leaves the previous checkpoint
and `latest` untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megalite.config import Config, ConfigError
from megalite.parallel.state import ParallelState

LATEST = "latest"


def _barrier(ps: ParallelState) -> None:
    if ps.world_size > 1:
        dist.barrier()


def rng_state(tracker) -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
         "tracker": tracker.state_dict() if tracker is not None else {}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict, tracker) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    if tracker is not None and s.get("tracker"):
        tracker.load_state_dict(s["tracker"])


def _layout(ps: ParallelState) -> dict:
    return {"tp": ps.tp, "pp": ps.pp, "dp": ps.dp, "vpp": ps.vpp, "world_size": ps.world_size}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: str | Path, step: int, chunks, optimizer, ps: ParallelState, cfg: Config,
                    extra: dict, tracker=None) -> Path:
    root = Path(ckpt_dir)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if ps.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(ps)
    state = {"model": [c.state_dict() for c in chunks], "optimizer": optimizer.state_dict(),
             "rng": rng_state(tracker)}
    part = tmp / f"rank_{ps.rank:05d}.pt"
    torch.save(state, str(part) + ".partial")
    os.replace(str(part) + ".partial", part)
    _barrier(ps)
    if ps.rank == 0:
        meta = {"step": step, "layout": _layout(ps), "config": cfg.to_dict(), **extra}
        _atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, final.name)
    _barrier(ps)
    return final


def resolve_checkpoint(path: str | Path) -> Path | None:
    """A step directory, or a checkpoint root whose `latest` names one; None if there is none."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    latest = p / LATEST
    if latest.is_file():
        step_dir = p / latest.read_text().strip()
        if not (step_dir / "meta.json").is_file():
            raise ConfigError(f"{latest} points to {step_dir}, which is not a complete checkpoint")
        return step_dir
    return None


def load_checkpoint(path: str | Path, chunks, optimizer, ps: ParallelState, cfg: Config, tracker=None) -> dict:
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ConfigError(f"no checkpoint found at {path}")
    try:
        meta = json.loads((step_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{step_dir / 'meta.json'}: unreadable checkpoint metadata ({e})") from None
    if meta["layout"] != _layout(ps):
        raise ConfigError(f"{step_dir} was saved with layout {meta['layout']}, this run is {_layout(ps)}; "
                          "resharding is not supported by this checkpoint format")
    part = step_dir / f"rank_{ps.rank:05d}.pt"
    try:
        state = torch.load(part, map_location=ps.device, weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise ConfigError(f"{part}: cannot read checkpoint shard ({e})") from None
    for c, sd in zip(chunks, state["model"], strict=True):
        c.load_state_dict(sd)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], tracker)
    return meta
