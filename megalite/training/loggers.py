"""Metric sinks beside metrics.jsonl: TensorBoard event files and Weights & Biases.

`MetricsLogger` (metrics.py) hands every row it writes to metrics.jsonl to these sinks too, so
each stage's numbers are the same in all three: one scalar per numeric field, at the row's step.

    logging.tensorboard=true       event files in logging.tensorboard_dir (default <run_dir>/tensorboard)
    logging.wandb_project=NAME     a W&B run (logging.wandb_mode=offline writes it locally only)

Both packages are optional. Enabling one that is not installed is a one-line ConfigError on every
rank before any work starts (a check on rank 0 alone would leave the other ranks waiting).
"""

from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path
from typing import Any, Protocol

from megalite.atomic import atomic_write_text
from megalite.config import Config, ConfigError


class Sink(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers (booleans and nulls left out); `step` is the x-axis, not a scalar."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer = None  # opened at the first row, whose step drops any later events of a resumed run

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=step)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    def __init__(self, cfg: Config, stage: str) -> None:
        import wandb

        lg, run_dir = cfg.logging, Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # A stable id per run dir, so a resumed or requeued run continues the same W&B run.
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity or None,
                              name=lg.wandb_name or f"{run_dir.name}-{stage}", id=run_id, resume="allow",
                              dir=str(run_dir), mode=lg.wandb_mode or None, config=cfg.to_dict(),
                              job_type=stage)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def check_logging(cfg: Config) -> None:
    """Raises a one-line ConfigError when a requested sink's package is missing."""
    lg = cfg.logging
    if lg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package "
                          "(pip install tensorboard, or pip install -e '.[logging]')")
    if lg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb_project={lg.wandb_project} needs the wandb package "
                          "(pip install wandb, or pip install -e '.[logging]')")
    if lg.wandb_mode not in ("", "online", "offline", "disabled"):
        raise ConfigError(f"logging.wandb_mode must be online, offline or disabled, got '{lg.wandb_mode}'")


def build_sinks(cfg: Config, is_logger: bool, stage: str = "pretrain") -> list[Sink]:
    """The sinks the config asks for, on the logging rank (checked on every rank)."""
    check_logging(cfg)
    if not is_logger:
        return []
    lg, sinks = cfg.logging, []
    if lg.tensorboard:
        sinks.append(TensorBoardSink(Path(lg.tensorboard_dir or Path(cfg.train.run_dir) / "tensorboard")))
    if lg.wandb_project:
        sinks.append(WandbSink(cfg, stage))
    return sinks
