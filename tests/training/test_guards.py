"""Issue 12 item 6: divergence stops the run at the step it happened, saving nothing new."""

from __future__ import annotations

import json
import math

import pytest

from megalite.training.guards import DivergenceError, DivergenceGuard
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config


def test_a_huge_lr_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # A finite first step is checkpointed (save_interval=1); then the loss is poisoned to inf, as a
    # diverged bf16/fp32 run's (the grad norm goes NaN and every later update would be skipped).
    t = Trainer(tiny_config(str(tmp_path), "train.train_steps=6", "checkpoint.save_interval=1",
                            "checkpoint.save_on_exit=true"))
    real_step = t.train_step
    calls = []

    def step(batches):
        loss, norm, *rest = real_step(batches)
        calls.append(1)
        return (loss, norm if len(calls) < 3 else float("nan"), *rest)

    t.train_step = step
    with pytest.raises(DivergenceError) as e:
        t.train()
    msg = str(e.value)
    assert msg.startswith("step 3: training diverged (grad norm nan)") and "\n" not in msg
    assert str(tmp_path / "checkpoints" / "step_00000002") in msg
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"  # nothing new saved
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["grad_norm"] is None  # null, not a bare NaN


def test_a_real_divergence_with_a_huge_lr(tmp_path):
    t = Trainer(tiny_config(str(tmp_path), "train.train_steps=30", "optim.lr=1e6", "optim.min_lr=0",
                            "optim.warmup_steps=0", "optim.clip_grad=0"))
    with pytest.raises(DivergenceError, match=r"^step \d+: training diverged"):
        t.train()


def test_fp16_skips_are_allowed_up_to_the_bound():
    g = DivergenceGuard("fp16", "/nonexistent", max_skipped=3)
    for step in range(1, 4):
        g.check(step, 2.0, math.inf)  # skipped by the loss scaler: fine
    g.check(4, 2.0, 1.0)  # a good step resets the count
    for step in range(5, 8):
        g.check(step, 2.0, math.inf)
    with pytest.raises(DivergenceError, match="step 8: .*4 fp16 steps in a row were skipped"):
        g.check(8, 2.0, math.inf)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_and_fp32_stop_at_the_first_non_finite_value(precision):
    g = DivergenceGuard(precision, "/nonexistent")
    g.check(1, 2.0, 1.0)
    with pytest.raises(DivergenceError, match="step 2: training diverged \\(loss inf\\).*no checkpoint was saved"):
        g.check(2, math.inf, 1.0)
