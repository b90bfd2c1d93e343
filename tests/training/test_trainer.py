"""The pretraining loop: layouts agree on losses and grad norms; resume is exact; logs are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalite.checkpoint import dist as ckpt
from megalite.testing import run_distributed
from megalite.training import trainer as trainer_mod
from megalite.training.precision import LossScaler
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

STEPS = 3


def _losses(history):
    return [r["loss"] for r in history], [r["grad_norm"] for r in history]


LAYOUTS = {"tp2-sp": ["parallel.tp=2", "parallel.sp=true"], "tp2": ["parallel.tp=2"], "dp2": []}


def _layout_worker(rank: int, world: int, run_dir: str, layouts: list[list[str]]):
    """Every layout in turn on the same 2 processes (one spawn for all of them)."""
    return [_losses(Trainer(tiny_config(f"{run_dir}/{i}/r{rank}", f"train.train_steps={STEPS}", *overrides)).train())
            for i, overrides in enumerate(layouts)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run every layout must reproduce (computed once for the module)."""
    ref_loss, ref_norm = _losses(Trainer(tiny_config(str(tmp_path_factory.mktemp("ref")),
                                                     f"train.train_steps={STEPS}")).train())
    assert ref_loss[-1] < ref_loss[0]
    return ref_loss, ref_norm


@pytest.mark.slow
def test_optimizer_steps_match_single_process(tmp_path, reference):
    ref_loss, ref_norm = reference
    per_rank = run_distributed(_layout_worker, 2, str(tmp_path), list(LAYOUTS.values()))
    for i, name in enumerate(LAYOUTS):
        for loss, norm in (r[i] for r in per_rank):
            assert loss == pytest.approx(ref_loss, rel=1e-5), name
            assert norm == pytest.approx(ref_norm, rel=1e-4), name


def test_resume_is_exact(tmp_path):
    straight = Trainer(tiny_config(str(tmp_path / "a"), "train.train_steps=10")).train()
    # Stop after step 5 (checkpoint + clean exit), as a preempted job does.
    first = Trainer(tiny_config(str(tmp_path / "b"), "train.train_steps=10", "train.exit_interval=5")).train()
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    resumed = Trainer(tiny_config(str(tmp_path / "b"), "train.train_steps=10", "checkpoint.load=auto")).train()
    assert [r["step"] for r in resumed] == list(range(6, 11))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[5:]]  # bit-identical on CPU


def test_relaunching_a_finished_run_does_not_save_again(tmp_path, monkeypatch):
    cfg = ("train.train_steps=2", "checkpoint.save_on_exit=true", "checkpoint.load=auto")
    Trainer(tiny_config(str(tmp_path), *cfg)).train()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    saves = []
    monkeypatch.setattr(trainer_mod, "save_checkpoint", lambda *a, **k: saves.append(a[1]))
    assert Trainer(tiny_config(str(tmp_path), *cfg)).train() == []  # resumed at the last step
    assert saves == []


def test_a_failed_async_save_fails_the_run(tmp_path, monkeypatch):
    def disk_full(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_write", disk_full)
    trainer = Trainer(tiny_config(str(tmp_path), "train.train_steps=1", "checkpoint.save_on_exit=true",
                                  "checkpoint.async_save=true"))
    with pytest.raises(ckpt.CheckpointSaveError, match="step 1 .* was not saved on rank 0: No space left on device"):
        trainer.train()


def test_resume_restores_the_loss_scaler(tmp_path, monkeypatch):
    # fp16 needs a GPU; on a CPU the trainer gets an fp16 (dynamic) scaler that doubles every 2 clean steps.
    monkeypatch.setattr(trainer_mod, "LossScaler", lambda precision, initial: LossScaler("fp16", initial, 2))
    first = Trainer(tiny_config(str(tmp_path), "train.train_steps=4", "train.exit_interval=2"))
    first.train()
    assert first.scaler.state_dict() == {"scale": 2.0**17, "good_steps": 2}
    resumed = Trainer(tiny_config(str(tmp_path), "train.train_steps=4", "checkpoint.load=auto"))
    assert resumed.state.step == 2 and resumed.scaler.state_dict() == first.scaler.state_dict()


def test_metrics_jsonl_has_contract_fields(tmp_path):
    Trainer(tiny_config(str(tmp_path), "train.train_steps=2", "train.eval_interval=2", "train.eval_steps=1")).train()
    rows = [json.loads(x) for x in Path(tmp_path, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
            assert key in r
        assert r["mfu"] is None  # no known peak on a CPU
        assert r["tokens_per_sec"] > 0
    assert rows[-1]["eval_loss"] > 0 and rows[-1]["eval_ppl"] > 1
