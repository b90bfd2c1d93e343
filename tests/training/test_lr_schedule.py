from __future__ import annotations

import math

import pytest

from megalite.config import ConfigError, OptimConfig
from megalite.training.lr_schedule import lr_at


def test_warmup_then_cosine():
    c = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="cosine")
    assert lr_at(0, 110, c) == pytest.approx(0.1) and lr_at(9, 110, c) == pytest.approx(1.0)
    assert lr_at(60, 110, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, 110, c) == pytest.approx(0.1)
    lrs = [lr_at(s, 110, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_is_flat_then_decays_to_min():
    c = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="wsd", wsd_decay_fraction=0.2)
    assert [lr_at(s, 100, c) for s in (0, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(80, 100, c) == pytest.approx(0.95) and lr_at(99, 100, c) == pytest.approx(0.0)


def test_unknown_decay():
    with pytest.raises(ConfigError, match="optim.decay"):
        lr_at(0, 10, OptimConfig(decay="step"))
