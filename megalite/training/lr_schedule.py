"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay), linear or constant."""

from __future__ import annotations

import math

from megalite.config import ConfigError, OptimConfig

DECAYS = ("cosine", "wsd", "linear", "constant")


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR for optimizer step `step` (0-based)."""
    if cfg.decay not in DECAYS:
        raise ConfigError(f"unknown optim.decay '{cfg.decay}' ({' | '.join(DECAYS)})")
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    if cfg.decay == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    if cfg.decay == "wsd":
        # Stable at the peak, then a linear cool-down over the last `wsd_decay_fraction` of steps.
        decay_steps = max(1, round(total_steps * cfg.wsd_decay_fraction))
        start = total_steps - decay_steps
        if step < start:
            return cfg.lr
        return cfg.lr - (cfg.lr - cfg.min_lr) * min(1.0, (step - start + 1) / decay_steps)
    raise AssertionError(cfg.decay)
