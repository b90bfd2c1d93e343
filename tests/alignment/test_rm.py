"""`megalite rm`: the score at each row's last real token, Bradley-Terry with a margin, pairwise accuracy
at train and eval, `train.train_steps=0` evaluation, SFT-checkpoint start, and TP2+SP / PP2 vs one process."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from megalite import cli
from megalite.alignment.frozen import build_frozen_model
from megalite.alignment.rm import RMStage, last_token_index
from megalite.config import ConfigError
from megalite.data.sft import IGNORE_INDEX
from megalite.parallel.state import ParallelState
from megalite.testing import run_distributed
from megalite.training.trainer import Trainer
from tests.alignment.prefdata import preference_shard, sft_checkpoint
from tests.training.common import TINY, tiny_config

PREF = ["train.seq_len=64", "model.max_seq_len=64", "data.split=80,20,0", "train.eval_steps=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    return preference_shard(d, 96), sft_checkpoint(d, 1, "train.seq_len=64", "model.max_seq_len=64")


def _args(run_dir, shard: str, *extra: str) -> list[str]:
    return [f"train.run_dir={run_dir}", f"data.path={shard}", f"data.cache_dir={run_dir}/cache", *PREF, *extra]


def _rm(run_dir, shard: str, *extra: str) -> list[dict]:
    cfg = tiny_config(str(run_dir), *_args(run_dir, shard, "model.output_head=score", *extra))
    return Trainer(cfg, RMStage(cfg.rm.margin)).train()


def test_loss_reads_each_rows_last_real_token_and_applies_the_margin():
    torch.manual_seed(0)
    b, s = 3, 10
    labels = torch.full((2 * b, s), IGNORE_INDEX)
    ends = [4, 9, 6, 2, 7, 5]  # the last labelled position of each row (rows: c0 c1 c2 r0 r1 r2)
    for row, end in enumerate(ends):
        labels[row, end - 2 : end + 1] = 7
    scores = torch.randn(2 * b, s, requires_grad=True)
    mb = {"labels": labels, "is_chosen": torch.arange(2 * b) < b, "pair_ids": torch.arange(b)}
    assert last_token_index(labels).tolist() == ends
    loss, m = RMStage(margin=0.5).loss(scores, mb)
    r = torch.stack([scores[row, end] for row, end in enumerate(ends)])
    c, j = r[:b], r[b:]
    torch.testing.assert_close(loss, -F.logsigmoid(c - j - 0.5).sum())
    assert m["reward_accuracy"].item() == (c > j).sum().item()
    torch.testing.assert_close(m["margin"], (c - j).sum().detach())
    torch.testing.assert_close(m["chosen_reward"], c.sum().detach())
    loss.backward()  # only the read positions get a gradient
    read = torch.zeros_like(scores, dtype=torch.bool)
    read[torch.arange(2 * b), torch.tensor(ends)] = True
    assert (scores.grad[~read] == 0).all() and (scores.grad[read] != 0).all()


def test_starts_from_an_sft_checkpoint_with_a_fresh_score_head(tmp_path, data):
    shard, sft = data
    cfg = tiny_config(str(tmp_path), *_args(tmp_path, shard, "model.output_head=score", f"checkpoint.pretrained={sft}"))
    trainer = Trainer(cfg, RMStage())
    trainer.run_lock.release()
    lm = build_frozen_model(trainer.cfg, ParallelState(), sft)[0]
    loaded = dict(lm.named_parameters())
    (model,) = trainer.chunks
    for name, p in model.named_parameters():
        if name != "score":
            torch.testing.assert_close(p, loaded[name], rtol=0, atol=0, msg=name)
    assert "score" not in loaded and model.score.abs().sum() > 0  # initialized, not zeros
    # Evaluating needs a trained score head: an SFT checkpoint has none.
    with pytest.raises(ConfigError, match="tensor 'score'.*missing"):
        Trainer(cfg, RMStage(fresh_head=False))


def test_accuracy_rises_and_train_steps_0_evaluates_the_checkpoint(tmp_path, data, capsys, monkeypatch):
    shard, sft = data
    steps = 12
    hist = _rm(tmp_path / "a", shard, f"checkpoint.pretrained={sft}", f"train.train_steps={steps}",
               f"train.eval_interval={steps}", "checkpoint.save_on_exit=true")
    assert hist[0]["reward_accuracy"] < 0.9  # a fresh head does not already separate the pairs
    assert hist[-1]["reward_accuracy"] > 0.9 and hist[-1]["eval_reward_accuracy"] > 0.9
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["margin"] > 0
    assert hist[-1]["chosen_reward"] - hist[-1]["rejected_reward"] == pytest.approx(hist[-1]["margin"], abs=1e-5)
    capsys.readouterr()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ckpt = tmp_path / "a" / "checkpoints"
    assert cli.main(["rm", *TINY, *_args(tmp_path / "b", shard), "train.train_steps=0",
                     f"checkpoint.load={ckpt}"]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("rm eval")]
    acc = float(re.search(r"reward_accuracy ([0-9.]+)", line).group(1))
    loss = float(re.search(r"loss ([0-9.]+)", line).group(1))
    # The same weights on the same held-out pairs: what the training run measured at its last step.
    assert acc == pytest.approx(hist[-1]["eval_reward_accuracy"], abs=1e-4)
    assert loss == pytest.approx(hist[-1]["eval_loss"], abs=1e-4)
    assert (tmp_path / "b" / "metrics.jsonl").read_text().count("eval_reward_accuracy") == 1


def test_train_steps_0_without_a_checkpoint_is_one_line(tmp_path, data, capsys, monkeypatch):
    shard, _ = data
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["rm", *TINY, *_args(tmp_path, shard), "train.train_steps=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluates a reward model" in err[0] and "checkpoint.load" in err[0]


def _curve(h: list[dict]) -> list[tuple]:
    return [(r["loss"], r["grad_norm"], r["reward_accuracy"], r["margin"], r["chosen_reward"]) for r in h]


def _layouts(rank: int, world: int, root: str, shard: str, sft: str) -> dict:
    layouts = {"tp2-sp": ["parallel.tp=2", "parallel.sp=true"], "pp2": ["parallel.pp=2"]}
    return {name: _curve(_rm(f"{root}/{name}", shard, f"checkpoint.pretrained={sft}", "train.train_steps=3",
                             "rm.margin=0.25", *extra)) for name, extra in layouts.items()}


@pytest.mark.slow
def test_rm_layouts_match_one_process(tmp_path, data):
    shard, sft = data
    ref = _curve(_rm(tmp_path / "one", shard, f"checkpoint.pretrained={sft}", "train.train_steps=3", "rm.margin=0.25"))
    assert ref[-1][0] < ref[0][0]  # it learns
    for result in run_distributed(_layouts, 2, str(tmp_path), shard, sft):
        for name, curve in result.items():
            for step, (got, want) in enumerate(zip(curve, ref, strict=True)):
                assert got == pytest.approx(want, rel=2e-4, abs=2e-5), f"{name} step {step + 1}"
