"""Where a run starts: its own latest checkpoint, an explicit `checkpoint.load`, the weights of
`checkpoint.pretrained`, or scratch, in that order; the trainer prints which one happened.

A relaunch of a fine-tuning run (e.g. a Slurm requeue) must continue its own progress, so the
run's own `latest` always wins over `pretrained`. A corrupt checkpoint is reported together with
the older intact ones beside it, so the user knows what can still be resumed.
"""

from __future__ import annotations

from pathlib import Path

from megalite.checkpoint.dist import METADATA, load_checkpoint, resolve_checkpoint
from megalite.checkpoint.lora import load_pretrained_base
from megalite.checkpoint.pretrained import load_pretrained
from megalite.config import ConfigError


def intact_siblings(step_dir: Path) -> list[Path]:
    """Other complete step directories beside `step_dir` (newest first) whose metadata is present."""
    root = step_dir.parent
    return sorted((d for d in root.glob("step_*") if d != step_dir and (d / METADATA).is_file()),
                  key=lambda d: d.name, reverse=True)


def _with_siblings(e: ConfigError, path: Path) -> ConfigError:
    latest = path / "latest"
    bad = path / latest.read_text().strip() if latest.is_file() else path
    others = intact_siblings(bad) if bad.name.startswith("step_") else []
    if not others:
        return e
    return ConfigError(f"{e}; an older checkpoint is beside it: checkpoint.load={others[0]} resumes from it")


def resume_or_initialize(trainer) -> tuple[dict | None, str]:
    """Loads what the config asks for into the trainer's model/optimizer/RNG. Returns (the resumed
    checkpoint's metadata or None, a one-line description of where the run starts)."""
    ck = trainer.cfg.checkpoint
    own = Path(trainer.ckpt_dir)
    source = None
    if ck.load == "auto":
        try:
            source = own if resolve_checkpoint(own) is not None else None
        except ConfigError as e:
            raise _with_siblings(e, own) from None
    elif ck.load:
        source = Path(ck.load)
    if source is not None:
        try:
            meta = load_checkpoint(source, trainer.chunks, trainer.optimizer, trainer.ps, trainer.cfg, trainer.rng)
        except ConfigError as e:
            raise _with_siblings(e, source) from None
        return meta, f"resumed from {resolve_checkpoint(source)} at step {meta['step']}"
    if ck.pretrained and trainer.cfg.lora.rank:  # LoRA: the frozen base only; the adapters keep their init
        trainer.lora_base = load_pretrained_base(ck.pretrained, trainer.chunks, trainer.ps, trainer.cfg)
        return None, (f"initialized the LoRA base from {trainer.lora_base['path']} (adapters fresh, step 0; "
                      f"{own} has no checkpoint yet)")
    if ck.pretrained:
        step_dir = load_pretrained(ck.pretrained, trainer.chunks, trainer.optimizer, trainer.ps,
                                   fresh=trainer.stage.pretrained_fresh)
        return None, (f"initialized from pretrained weights {step_dir} (weights only: fresh optimizer, step 0; "
                      f"{own} has no checkpoint yet)")
    where = f"no checkpoint in {own}" if ck.load == "auto" else "checkpoint.load is empty"
    return None, f"starting from scratch ({where})"


def finished_message(step: int, train_steps: int, ckpt_dir: Path) -> str:
    """Said (instead of silently doing nothing) when a relaunched run has no steps left."""
    latest = resolve_checkpoint(ckpt_dir) if (Path(ckpt_dir) / "latest").is_file() else None
    return (f"nothing to train: the run is at step {step} and train.train_steps is {train_steps}"
            f"{f' (checkpoint {latest})' if latest else ''}; to train further raise train.train_steps, "
            f"to start fresh use another train.run_dir or checkpoint.load=")
