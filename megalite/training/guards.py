"""Stops a run that can no longer make progress, instead of letting it run on silently.

bf16/fp32: a non-finite loss or grad norm means the run diverged (every later update would be
skipped and the loss would sit flat). The run stops at that step with one line that names it, and
saves nothing new, so the last checkpoint on disk is the last good one. fp16 skips an overflowing
step by design (the loss scaler backs off), but a long run of skipped steps is divergence too.
"""

from __future__ import annotations

import math
from pathlib import Path

from megalite.config import ConfigError, RunError

# fp16: consecutive skipped steps after which the run counts as diverged. The dynamic scaler halves
# its scale on each skip, so by then it is below 2^16 / 2^MAX: no finite-gradient step is coming.
MAX_FP16_SKIPPED = 40


class DivergenceError(RunError):
    """The loss or grad norm stopped being finite; raised on every rank (both are global values)."""


class DivergenceGuard:
    def __init__(self, precision: str, ckpt_dir: str | Path, max_skipped: int = MAX_FP16_SKIPPED) -> None:
        self.fp16, self.ckpt_dir, self.max_skipped = precision == "fp16", Path(ckpt_dir), max_skipped
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad norm", grad_norm))
               if not math.isfinite(value)]
        if not bad:
            self.skipped = 0
            return
        if self.fp16:
            self.skipped += 1
            if self.skipped <= self.max_skipped:
                return  # the scaler backs off and the next step retries
            what = f"{self.skipped} fp16 steps in a row were skipped ({', '.join(bad)})"
        else:
            what = f"{' and '.join(bad)}"
        raise DivergenceError(f"step {step}: training diverged ({what}); stopped without saving, "
                              f"{self._last_good()}; lower optim.lr or raise optim.warmup_steps")

    def _last_good(self) -> str:
        from megalite.checkpoint.dist import resolve_checkpoint

        try:
            latest = resolve_checkpoint(self.ckpt_dir)
        except ConfigError:
            latest = None
        return f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved before it"


def check_train_split(train_ds, cfg) -> None:
    """An empty train split (an empty shard, a split weight of 0, or fewer tokens than one sample)
    is one line saying which and why, not a TypeError at the first batch."""
    if train_ds is not None and (not hasattr(train_ds, "__len__") or len(train_ds) > 0):
        return  # (a stage's streaming dataset has no length to check)
    d, seq = cfg.data, cfg.train.seq_len
    path = d.path or "the default corpus"
    detail = ""
    if isinstance(d.path, str) and d.path:
        from megalite.data.indexed import IndexedDataset

        try:
            shard = IndexedDataset(d.path)
            detail = f"the shard holds {shard.num_documents} documents, {shard.num_tokens} tokens; "
        except Exception:  # noqa: BLE001 - the dataset builder has already reported unreadable shards
            pass
    raise ConfigError(f"data.path {path}: the train split is empty ({detail}data.split '{d.split}' must leave "
                      f"it at least one sample of train.seq_len+1 = {seq + 1} tokens)")
