"""Checkpoints: a directory per step, written atomically, reshardable to any TP/PP/DP layout.

    <dir>/step_00000010/meta.json        global shapes, TP layout of every parameter, where each
                                         piece lives, config, layout, step, consumed samples
    <dir>/step_00000010/rank_00003.pt    that rank's model shards (DP rank 0 only), optimizer
                                         pieces, RNG states
    <dir>/latest                         the name of the last complete step directory

Every rank writes its file into `<dir>/.tmp_step_00000010`; rank 0 writes meta.json last and
renames the directory into place, then rewrites `latest` (itself through a rename). A crash at any
point leaves the previous checkpoint and `latest` untouched; the stale temp dir is removed by the
next save. Retention keeps the last `keep_last` checkpoints plus every power-of-two step.

With `async_save`, tensors are copied to CPU at once and written by a background thread; rank 0's
thread waits for all rank files to appear before committing, so no collective runs off the main
thread. The next save (or `wait_for_pending_save`) joins it, and raises `CheckpointSaveError` if
it failed (a write error, or rank 0 giving up on the other ranks' files).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalite.atomic import atomic_write, atomic_write_text
from megalite.checkpoint.reshard import (
    OPTIM_KEYS,
    ShardReader,
    load_key,
    load_optim_state,
    load_weight,
    merge_index,
    rank_payload,
)
from megalite.config import Config, ConfigError, ModelConfig, RunError, section_from_dict
from megalite.parallel.state import ParallelState

LATEST = "latest"
METADATA = "meta.json"
FORMAT = "megalite-dist-ckpt-1"
# The model fields that must agree for a checkpoint to load (the rest may differ, e.g. dropout).
MODEL_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size",
                "tie_embeddings", "qk_norm")
# Tests set this to interrupt a save between the rank files and the commit.
_before_commit: Callable[[Path], None] | None = None
_pending: threading.Thread | None = None
_pending_error: str | None = None  # set by a failed async save, raised on the main thread
_COMMIT_TIMEOUT_S = 3600.0


class CheckpointSaveError(RunError):
    """An async save failed in its background thread; raised by the next save or `wait_for_pending_save`."""


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


def _layout(ps: ParallelState, optimizer: Any) -> dict:
    return {"tp": ps.tp, "pp": ps.pp, "dp": ps.dp, "vpp": ps.vpp, "world_size": ps.world_size,
            "distributed_optimizer": bool(getattr(optimizer, "sharded", False))}


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------
# Retention


def retained_steps(steps: list[int], keep_last: int, keep_pow2: bool) -> set[int]:
    keep = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_pow2:
        keep |= {s for s in steps if s > 0 and s & (s - 1) == 0}
    return keep


def apply_retention(root: Path, keep_last: int, keep_pow2: bool, protect: str) -> None:
    """Deletes complete checkpoints outside the policy, and stale temp dirs of crashed saves."""
    steps = {}
    for d in root.glob("step_*"):
        try:
            steps[int(d.name.removeprefix("step_"))] = d
        except ValueError:
            continue
    keep = retained_steps(list(steps), keep_last, keep_pow2)
    for s, d in steps.items():
        if s not in keep and d.name != protect:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Saving


def wait_for_pending_save() -> None:
    """Blocks until a previous async save of this rank (and, on rank 0, its commit) finished;
    raises CheckpointSaveError (once) if it failed."""
    global _pending, _pending_error
    if _pending is not None:
        _pending.join()
        _pending = None
    if _pending_error is not None:
        error, _pending_error = _pending_error, None
        raise CheckpointSaveError(error)


def step_dirs(root: Path, step: int) -> tuple[Path, Path]:
    """(the step directory, the temp directory a save fills before renaming it into place)."""
    name = f"step_{step:08d}"
    return root / name, root / f".tmp_{name}"


def replace_path(src: Path, dst: Path) -> None:
    """Renames `src` to `dst`. An existing `dst` is first renamed aside (to `<src>.old`, beside `src`)
    and deleted only after `src` took its place: its content is never deleted before the new one is
    there, and the window in which `dst` does not exist is two renames, not a recursive delete."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = src.with_name(f"{src.name}.old")
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)  # left by a crash between the two renames
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _wait_for_rank_files(tmp: Path, world: int) -> None:
    """Async saves on rank 0: the other ranks' files appear (atomically) when their writes finish."""
    deadline = time.time() + _COMMIT_TIMEOUT_S
    while missing := [r for r in range(world) if not (tmp / _rank_file(r)).is_file()]:
        if time.time() > deadline:
            raise CheckpointSaveError(f"gave up after {_COMMIT_TIMEOUT_S:.0f}s waiting for the files of "
                                      f"ranks {missing} in {tmp}")
        time.sleep(0.05)


def _torch_save(payload: dict, path: str) -> None:
    # Through a Python file object: a failed write raises the OSError (ENOSPC, EFBIG, EROFS, ...)
    # that torch's own writer would hide behind "unexpected pos".
    with open(path, "wb") as f:
        torch.save(payload, f)


def storage_reason(e: BaseException, where: Path) -> str:
    """The OS reason behind a failed write (e.g. "No space left on device"), found in the exception
    chain or, failing that, in the free space left."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    try:
        st = os.statvfs(where if where.exists() else where.parent)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return "No space left on device"
    except OSError:
        pass
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _commit(root: Path, tmp: Path, final: Path, meta: dict, retention: tuple[int, bool] | None = None) -> None:
    """Rank 0: metadata last, then the rename that makes the checkpoint exist, then `latest`, then
    (given `retention` = (keep_last, keep_pow2)) the deletion of checkpoints outside the policy."""
    if _before_commit is not None:
        _before_commit(tmp)
    atomic_write_text(tmp / METADATA, json.dumps(meta, indent=1, default=str))
    replace_path(tmp, final)
    atomic_write_text(root / LATEST, final.name)
    if retention is not None:
        apply_retention(root, *retention, protect=final.name)


def save_checkpoint(ckpt_dir: str | Path, step: int, chunks, optimizer, ps: ParallelState, cfg: Config,
                    extra: dict, tracker=None, base: dict | None = None) -> Path:
    """Saves this rank's shards; every rank must call it. Returns the step directory.
    `base` (LoRA, see checkpoint/lora.py): store only the trainable parameters, and this pointer
    to the checkpoint holding the frozen rest."""
    global _pending
    wait_for_pending_save()
    root = Path(ckpt_dir)
    final, tmp = step_dirs(root, step)
    if ps.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp_step_*"):  # left by a crashed save (incl. a `.old` moved aside)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise CheckpointSaveError(f"checkpoint of step {step} ({final}) was not saved: cannot create "
                                      f"{e.filename or tmp}: {e.strerror}") from None
    payload, index = rank_payload(chunks, optimizer, ps, trainable_only=base is not None)
    payload["rng"] = rng_state(tracker)
    payload["extra"] = dict(extra)
    if not hasattr(optimizer, "pieces"):  # an optimizer without a reshardable layout
        payload["optimizer_state"] = optimizer.state_dict()
    entry = {"file": _rank_file(ps.rank), "tp_rank": ps.tp_rank, "pp_rank": ps.pp_rank, "dp_rank": ps.dp_rank,
             "params": index}
    entries: list[Any] = [None] * ps.world_size
    if ps.world_size > 1:
        dist.all_gather_object(entries, entry)  # also orders the mkdir above before any write
    else:
        entries = [entry]
    meta = {"format": FORMAT, "step": step, **extra, "layout": _layout(ps, optimizer),
            "optimizer": {"steps": getattr(optimizer, "steps", None), "reshardable": hasattr(optimizer, "pieces")},
            "ranks": [{k: e[k] for k in ("file", "tp_rank", "pp_rank", "dp_rank")} for e in entries],
            "params": merge_index(entries), "config": cfg.to_dict()}
    if base is not None:
        meta["base"] = base

    def write() -> None:
        atomic_write(tmp / _rank_file(ps.rank), lambda p: _torch_save(payload, p))

    def failed(e: BaseException) -> CheckpointSaveError:
        reason = str(e) if isinstance(e, CheckpointSaveError) else storage_reason(e, tmp)
        return CheckpointSaveError(f"checkpoint of step {step} ({final}) was not saved on rank {ps.rank}: {reason}")

    ck = cfg.checkpoint
    retention = (ck.keep_last, ck.keep_pow2)
    if ck.async_save:
        def background() -> None:
            global _pending_error
            try:
                write()
                if ps.rank == 0:
                    _wait_for_rank_files(tmp, ps.world_size)
                    _commit(root, tmp, final, meta, retention)
            except Exception as e:  # noqa: BLE001 - any failure is reported on the main thread
                _pending_error = str(failed(e))

        _pending = threading.Thread(target=background, name=f"ckpt-save-{step}", daemon=False)
        _pending.start()
        return final
    try:
        write()
    except Exception as e:  # noqa: BLE001 - torch wraps the OS error (ENOSPC, EROFS) in a RuntimeError
        raise failed(e) from None
    _barrier(ps)
    if ps.rank == 0:
        try:
            _commit(root, tmp, final, meta, retention)
        except OSError as e:
            raise failed(e) from None
    _barrier(ps)
    return final


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_checkpoint(path: str | Path) -> Path | None:
    """A step directory, or a checkpoint root whose `latest` names one; None if there is none."""
    p = Path(path)
    if (p / METADATA).is_file():
        return p
    latest = p / LATEST
    if latest.is_file():
        step_dir = p / latest.read_text().strip()
        if not (step_dir / METADATA).is_file():
            raise ConfigError(f"{latest} points to {step_dir}, which is not a complete checkpoint")
        return step_dir
    return None


def read_metadata(step_dir: Path) -> dict:
    path = step_dir / METADATA
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable checkpoint metadata ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    return meta


def saved_model_config(meta: dict, where: str) -> ModelConfig:
    """The checkpoint's `model` section, each field type-checked: a malformed one is a one-line
    ConfigError, not a traceback later."""
    config = meta.get("config")
    saved = config.get("model") if isinstance(config, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"{where}: no model config in the checkpoint metadata")
    return section_from_dict(ModelConfig, saved, "model.", where)


def _check_model(meta: dict, cfg: Config, path: Path) -> None:
    """Architecture fields must agree (derived ones compared, e.g. the effective FFN size)."""
    saved = saved_model_config(meta, str(path / METADATA))
    for f in MODEL_FIELDS:
        if getattr(saved, f) != getattr(cfg.model, f):
            raise ConfigError(f"{path / METADATA}: model.{f} is {getattr(saved, f)!r} in the checkpoint but "
                              f"{getattr(cfg.model, f)!r} in this run")


@torch.no_grad()
def load_checkpoint(path: str | Path, chunks, optimizer, ps: ParallelState, cfg: Config, tracker=None) -> dict:
    """Loads into this rank's chunks/optimizer whatever layout the checkpoint was saved with.
    Returns the metadata (step, consumed_samples, ...). RNG states are restored only when the
    layout is the same (they are per rank); otherwise the run keeps its fresh seeds."""
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ConfigError(f"no checkpoint found at {path}")
    meta = read_metadata(step_dir)
    _check_model(meta, cfg, step_dir)
    if "base" in meta:  # LoRA: the parameters not stored here come from the base checkpoint
        from megalite.checkpoint.lora import load_base_weights

        load_base_weights(meta["base"], chunks, ps, cfg, set(meta["params"]), step_dir)
    reader = ShardReader(step_dir)
    for c in chunks:
        for name, p in c.named_parameters():
            key = load_key(name, p, ps, meta)
            if "base" not in meta or key in meta["params"]:
                p.copy_(load_weight(reader, meta, key, p, ps).to(p.dtype))
    same_layout = {k: v for k, v in meta["layout"].items() if k != "distributed_optimizer"} == {
        k: v for k, v in _layout(ps, optimizer).items() if k != "distributed_optimizer"}
    if hasattr(optimizer, "pieces"):
        _load_buffer_optimizer(reader, meta, optimizer, ps)
    elif meta["optimizer"].get("weights_only"):
        pass  # e.g. converted from HF: the optimizer starts fresh
    elif meta["optimizer"]["reshardable"] or not same_layout:
        raise ConfigError(f"{step_dir}: this optimizer can only resume a checkpoint of its own kind and layout")
    else:
        optimizer.load_state_dict(reader.get(_rank_file(ps.rank))["optimizer_state"])
    if same_layout and "rng" in reader.get(_rank_file(ps.rank)):
        set_rng_state(reader.get(_rank_file(ps.rank))["rng"], tracker)
    return meta


def _load_buffer_optimizer(reader: ShardReader, meta: dict, optimizer, ps: ParallelState) -> None:
    optimizer.sync_master_from_params()
    if not meta["optimizer"]["reshardable"] or meta["optimizer"]["steps"] is None:
        return  # weights only (e.g. converted from HF): Adam starts fresh
    optimizer.steps = int(meta["optimizer"]["steps"])
    by_param: dict[int, list] = {}
    for pc in optimizer.pieces:
        by_param.setdefault(id(pc.slot.param), []).append(pc)
    for pcs in by_param.values():
        p, name = pcs[0].slot.param, pcs[0].name
        key = load_key(name, p, ps, meta)
        for state_name in OPTIM_KEYS:
            flat = load_optim_state(reader, meta, key, p, ps, state_name)
            if flat is None:
                continue
            for pc in pcs:
                views = optimizer.piece_state(pc)
                if state_name in views:
                    views[state_name].copy_(flat[pc.lo: pc.hi])
