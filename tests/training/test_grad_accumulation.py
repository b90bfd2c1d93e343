"""Gradient accumulation divides by the STEP's loss-token count, not each micro-batch's.

The same global batch of 4 rows, whose rows have very different numbers of `-100` labels, is split
into 1, 2 or 4 micro-batches; the trainer's step must leave exactly the gradient of
sum(token losses) / total loss tokens, computed here straight from the model (no schedule code),
without pipelining and under PP=2 (1F1B, and interleaved through the default schedule with vpp=2)
on real gloo ranks. Dividing each micro-batch by its own count only passes the 1-micro-batch case.
"""

from __future__ import annotations

import pytest
import torch

from megalite.parallel.cross_entropy import IGNORE_INDEX
from megalite.testing import full_tensors, run_distributed
from megalite.training.batch import make_micro_batch
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

ROWS, SEQ = 4, 32
MASKED = [29, 0, 16, 5]  # labels set to -100 in each row: every split gets uneven micro-batches
COMMON = ["train.train_steps=1", f"train.global_batch_size={ROWS}", "model.num_layers=4",
          "model.tie_embeddings=true", "optim.warmup_steps=0"]


def _trainer(run_dir: str, *overrides: str) -> Trainer:
    """The one place that builds a trainer (adapt here if its constructor changes)."""
    return Trainer(tiny_config(run_dir, *COMMON, *overrides))


def _micro_batches(trainer: Trainer, mbs: int) -> list[dict]:
    """The fixed global batch cut into micro-batches of `mbs` rows, with the masked labels."""
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 250, (ROWS, SEQ + 1), generator=g)
    masks = [torch.randperm(SEQ, generator=g)[:k] for k in MASKED]
    out = []
    for start in range(0, ROWS, mbs):
        mb = make_micro_batch(rows[start:start + mbs], trainer.tokenizer.eod, True, False, trainer.device)
        for r in range(mbs):
            mb["labels"][r, masks[start + r]] = IGNORE_INDEX
        mb["num_loss_tokens"] = int((mb["labels"] != IGNORE_INDEX).sum())
        out.append(mb)
    assert len({mb["num_loss_tokens"] for mb in out}) == len(out)  # really uneven
    return out


def _step_grads(trainer: Trainer, mbs: int) -> dict[str, torch.Tensor]:
    """One trainer step on the batch; its grads (the optimizer step does not touch them)."""
    batches = _micro_batches(trainer, mbs)
    assert trainer.num_micro == len(batches) == ROWS // mbs
    trainer.train_step(batches)
    return full_tensors(trainer.chunks, trainer.ps)


def _reference_grads(run_dir: str) -> dict[str, torch.Tensor]:
    """d/dθ [sum of token losses / loss tokens] of the whole batch, from a one-process model."""
    trainer = _trainer(run_dir)
    (model,) = trainer.chunks
    batches = _micro_batches(trainer, 1)
    total = sum(mb["num_loss_tokens"] for mb in batches)
    assert total == ROWS * SEQ - sum(MASKED)
    with trainer.autocast():
        loss = sum(model(tokens=mb["tokens"], labels=mb["labels"], position_ids=mb["position_ids"],
                         doc_ids=mb["doc_ids"]).float().sum() for mb in batches) / total
    trainer.optimizer.zero_grad()
    loss.backward()
    return full_tensors(trainer.chunks, trainer.ps)  # as the runs report theirs (vocab padding cut)


def _assert_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    assert got, what
    for name, g in got.items():
        want = ref[name if name in ref else "embedding.weight"]  # a pipeline's tied head copy
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{what} {n}: {m}")
    assert set(ref) <= set(got) | {"embedding.weight"}, what


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    return _reference_grads(str(tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("mbs", [4, 2, 1])
def test_no_pipelining_any_split_gives_the_global_mean_gradient(tmp_path, reference, mbs):
    _assert_grads(_step_grads(_trainer(str(tmp_path), f"train.micro_batch_size={mbs}"), mbs), reference,
                  f"{ROWS // mbs} micro-batches")


PP_RUNS = [(["parallel.pp=2", "parallel.pipeline_schedule=1f1b"], mbs) for mbs in (4, 2, 1)] + [
    (["parallel.pp=2", "parallel.vpp=2"], mbs) for mbs in (2, 1)]  # default schedule: interleaved


def _pp_worker(rank: int, world: int, run_dir: str) -> list[dict]:
    out = []
    for i, (overrides, mbs) in enumerate(PP_RUNS):
        trainer = _trainer(f"{run_dir}/{i}/r{rank}", *overrides, f"train.micro_batch_size={mbs}")
        out.append({"grads": _step_grads(trainer, mbs), "chunks": len(trainer.chunks)})
    return out


@pytest.mark.slow
def test_pp2_any_split_gives_the_global_mean_gradient(tmp_path, reference):
    per_rank = run_distributed(_pp_worker, 2, str(tmp_path))
    for i, (overrides, mbs) in enumerate(PP_RUNS):
        what = f"{' '.join(overrides)}, {ROWS // mbs} micro-batches"
        assert all(r[i]["chunks"] == (2 if "parallel.vpp=2" in overrides else 1) for r in per_rank), what
        names = [n for r in per_rank for n in r[i]["grads"]]
        assert len(names) == len(set(names)) and "head" in names, what  # each stage its own layers
        # The last stage's tied head copy must hold the embedding's summed grad, like the embedding.
        _assert_grads({n: g for r in per_rank for n, g in r[i]["grads"].items()}, reference, what)
