"""The real trainer under pipeline parallelism: 5 optimizer steps (and a forward-only eval after
them) give the single-process losses.

One run combines everything (TP2 x PP2 x DP2 with SP, the interleaved schedule and the distributed
optimizer, 8 processes); the others check each schedule alone, with recomputation switched on,
and that a tied embedding split over the pipeline stays identical on the first and last stage.
"""

from __future__ import annotations

import pytest
import torch

from megalite.testing import full_tensors, run_distributed
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

STEPS = 5
COMMON = [f"train.train_steps={STEPS}", "train.global_batch_size=16", "model.num_layers=4",
          "model.tie_embeddings=true", f"train.eval_interval={STEPS}", "train.eval_steps=1"]
SCHEDULES = {
    "afab": ["parallel.pp=2", "parallel.pipeline_schedule=afab", "parallel.pp_layer_split=[1,3]"],
    "1f1b": ["parallel.pp=2", "parallel.pipeline_schedule=1f1b", "parallel.recompute=full"],
    "interleaved": ["parallel.pp=2", "parallel.vpp=2", "parallel.pipeline_schedule=interleaved",
                    "parallel.recompute=selective"],
}
FULL_3D = ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.vpp=2",
           "parallel.pipeline_schedule=interleaved", "parallel.distributed_optimizer=true"]


def _tied_weight(trainer: Trainer) -> torch.Tensor | None:
    """The full embedding (first stage) or tied head (last stage) after training."""
    tied = [(n, p) for c in trainer.chunks for n, p in c.named_parameters() if n in ("embedding.weight", "head")]
    full = full_tensors(tied, trainer.ps, grad=False)
    return full.get("embedding.weight", full.get("head"))


def _train(run_dir: str, overrides: list[str]) -> dict:
    trainer = Trainer(tiny_config(run_dir, *COMMON, *overrides))
    history = trainer.train()
    # The final eval runs the schedule forward-only.
    return {"loss": [r["loss"] for r in history] + [history[-1]["eval_loss"]], "tied": _tied_weight(trainer), "pp_rank": trainer.ps.pp_rank,
            "sharded": getattr(trainer.optimizer, "sharded", False)}


def _worker(rank: int, world: int, run_dir: str, runs: list[list[str]]) -> list[dict]:
    return [_train(f"{run_dir}/{i}/r{rank}", overrides) for i, overrides in enumerate(runs)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    losses = _train(str(tmp_path_factory.mktemp("ref")), [])["loss"]
    assert losses[-1] < losses[0]
    return losses


def _check(results: list[dict], ref: list[float], what: str) -> None:
    for res in results:
        assert res["loss"] == pytest.approx(ref, rel=1e-5), what  # every rank logs the global loss
    first = [r["tied"] for r in results if r["pp_rank"] == 0]
    last = [r["tied"] for r in results if r["pp_rank"] == 1]
    assert first and len(first) == len(last) and all(t is not None for t in first + last)
    for a, b in zip(first, last):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_each_schedule_matches_single_process(tmp_path, reference):
    runs = list(SCHEDULES.values())
    per_rank = run_distributed(_worker, 2, str(tmp_path), runs)
    for i, name in enumerate(SCHEDULES):
        _check([r[i] for r in per_rank], reference, name)


@pytest.mark.slow
def test_tp2_pp2_dp2_sp_interleaved_distopt_matches_single_process(tmp_path, reference):
    per_rank = run_distributed(_worker, 8, str(tmp_path), [FULL_3D])
    assert all(r[0]["sharded"] for r in per_rank)  # ZeRO-1 really ran
    _check([r[0] for r in per_rank], reference, "tp2 pp2 dp2")
