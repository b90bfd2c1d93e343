"""Exact LR values at the edges of warmup and decay, for every decay kind.

Steps are 0-based optimizer steps: warmup ramps lr*(s+1)/W, so step W-1 is the first at the peak and
no step ever exceeds it; decay progress is (s-W)/(T-W), reaching min_lr at s = T and staying there.
The expected values are written out by hand (peak 0.8, min 0.08, W=4, T=20)."""

from __future__ import annotations

import math

import pytest

from megalite.config import OptimConfig
from megalite.training.lr_schedule import DECAYS, lr_at

PEAK, MIN, W, T = 0.8, 0.08, 4, 20
WARMUP = {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8}
AFTER_WARMUP = {
    "cosine": {4: 0.8, 5: MIN + 0.36 * (1 + math.cos(math.pi / 16)), 12: 0.44,
               19: MIN + 0.36 * (1 + math.cos(math.pi * 15 / 16)), 20: MIN, 21: MIN, 40: MIN},
    "linear": {4: 0.8, 5: 0.8 - 0.72 / 16, 12: 0.44, 19: 0.8 - 0.72 * 15 / 16, 20: MIN, 21: MIN, 40: MIN},
    # 5 decay steps (25% of 20) start at step 15 and end on the last step, 19.
    "wsd": {4: 0.8, 14: 0.8, 15: 0.8 - 0.72 / 5, 16: 0.8 - 0.72 * 2 / 5, 18: 0.8 - 0.72 * 4 / 5, 19: MIN,
            20: MIN, 40: MIN},
    "constant": {4: 0.8, 12: 0.8, 19: 0.8, 20: 0.8, 40: 0.8},
}


def _cfg(decay: str, warmup: int = W) -> OptimConfig:
    return OptimConfig(lr=PEAK, min_lr=MIN, warmup_steps=warmup, decay=decay, wsd_decay_fraction=0.25)


@pytest.mark.parametrize("decay", DECAYS)
def test_exact_values_around_warmup_and_at_the_end_of_decay(decay: str):
    assert set(AFTER_WARMUP) == set(DECAYS)
    cfg = _cfg(decay)
    for step, want in {**WARMUP, **AFTER_WARMUP[decay]}.items():
        assert lr_at(step, T, cfg) == pytest.approx(want, rel=1e-12, abs=1e-15), (decay, step)
    lrs = [lr_at(s, T, cfg) for s in range(T + 5)]
    assert max(lrs) == pytest.approx(PEAK, rel=1e-12) and all(x <= PEAK * (1 + 1e-12) for x in lrs)
    assert lrs.index(max(lrs)) == W - 1  # the peak is reached exactly at the end of warmup
    assert all(a <= b for a, b in zip(lrs[:W], lrs[1:W]))
    assert all(a >= b for a, b in zip(lrs[W:], lrs[W + 1:]))  # never rises again after warmup


@pytest.mark.parametrize("decay", DECAYS)
def test_without_warmup_the_first_step_is_at_the_peak(decay: str):
    cfg = _cfg(decay, warmup=0)
    assert lr_at(0, T, cfg) == pytest.approx(PEAK, rel=1e-12)
    want_last = PEAK if decay == "constant" else (MIN if decay == "wsd" else None)
    if want_last is not None:
        assert lr_at(T - 1, T, cfg) == pytest.approx(want_last, rel=1e-12)
    assert lr_at(T, T, cfg) == pytest.approx(PEAK if decay == "constant" else MIN, rel=1e-12)


def test_single_step_warmup():
    assert lr_at(0, T, _cfg("cosine", warmup=1)) == pytest.approx(PEAK, rel=1e-12)
    assert lr_at(1, T, _cfg("cosine", warmup=1)) == pytest.approx(PEAK, rel=1e-12)
