"""`megalite dpo`: reward accuracy rises on separable pairs, precomputed and frozen-model references agree
(and the stored table is reused, and invalidated by another reference), the vocab-parallel sequence
log-probs under every loss_impl, the loss variants, bad references, and TP2+SP / PP2 vs one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megalite import cli
from megalite.alignment.dpo_stage import DPOStage
from megalite.alignment.frozen import build_frozen_model
from megalite.config import ConfigError
from megalite.parallel.state import ParallelState
from megalite.testing import run_distributed
from megalite.training.trainer import Trainer
from tests.alignment.prefdata import preference_shard, sft_checkpoint
from tests.training.common import TINY, tiny_config

PREF = ["train.seq_len=64", "model.max_seq_len=64", "data.split=80,20,0", "train.eval_steps=2"]
SFT_ARGS = ("train.seq_len=64", "model.max_seq_len=64")
METRICS = ("loss", "grad_norm", "reward_accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logp",
           "rejected_logp")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    return preference_shard(d, 96), sft_checkpoint(d / "a", 1, *SFT_ARGS)


def _args(run_dir, shard: str, cache, *extra: str) -> list[str]:
    return [f"train.run_dir={run_dir}", f"data.path={shard}", f"data.cache_dir={cache}", *PREF, *extra]


def _dpo(run_dir, shard: str, *extra: str, cache=None) -> list[dict]:
    cfg = tiny_config(str(run_dir), *_args(run_dir, shard, cache or f"{run_dir}/cache", *extra))
    return Trainer(cfg, DPOStage(cfg.dpo)).train()


def _curve(h: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in METRICS) for r in h]


def _same(got: list[tuple], want: list[tuple], rel: float = 1e-5, abs_: float = 1e-6, what: str = "") -> None:
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for k, a, b in zip(METRICS, g, w, strict=True):
            assert a == pytest.approx(b, rel=rel, abs=abs_), f"{what} {k} at step {step + 1}"


def test_reward_accuracy_rises_on_separable_pairs(tmp_path, data):
    shard, sft = data
    hist = _dpo(tmp_path, shard, f"checkpoint.pretrained={sft}", "train.train_steps=16", "train.eval_interval=16",
                "dpo.beta=0.1")
    # Step 1: the policy is the reference, so every implicit reward is 0 and no pair is won yet.
    assert hist[0]["reward_accuracy"] == 0.0 and hist[0]["margin"] == 0.0
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2
    last = hist[-1]
    assert last["reward_accuracy"] > 0.9 and last["eval_reward_accuracy"] > 0.9
    assert last["margin"] > 1.0 and last["loss"] < 0.3
    assert last["chosen_reward"] - last["rejected_reward"] == pytest.approx(last["margin"], abs=1e-5)


def test_precompute_and_model_reference_agree_and_the_table_is_reused(tmp_path, data, capsys):
    shard, sft = data
    cache = tmp_path / "cache"
    common = (f"checkpoint.pretrained={sft}", "train.train_steps=3", "train.eval_interval=3")
    pre = _dpo(tmp_path / "pre", shard, *common, "dpo.reference=precompute", cache=cache)
    files = sorted((cache / "ref_logps").glob("*.npy"))
    assert [f.name.split("-")[0] for f in files] == ["train", "valid"]
    stamps = [f.stat().st_mtime_ns for f in files]
    model = _dpo(tmp_path / "model", shard, *common, "dpo.reference=model", "dpo.offload_reference=true",
                 cache=cache)
    _same(_curve(pre), _curve(model), what="precompute vs model")
    assert pre[-1]["eval_loss"] == pytest.approx(model[-1]["eval_loss"], rel=1e-5)
    capsys.readouterr()
    again = _dpo(tmp_path / "again", shard, *common, cache=cache)
    assert "reused from" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == stamps and _curve(again) == _curve(pre)
    # Another reference checkpoint: a new table, matching that reference run as a model.
    sft2 = sft_checkpoint(tmp_path / "sft2", 3, *SFT_ARGS, "optim.lr=3e-3")
    common2 = (f"checkpoint.pretrained={sft}", f"dpo.ref_checkpoint={sft2}", "train.train_steps=2")
    pre2 = _dpo(tmp_path / "pre2", shard, *common2, cache=cache)
    assert len(list((cache / "ref_logps").glob("*.npy"))) == 4
    model2 = _dpo(tmp_path / "model2", shard, *common2, "dpo.reference=model", cache=cache)
    _same(_curve(pre2), _curve(model2), what="second reference")
    assert pre2[0]["margin"] != pytest.approx(0.0, abs=1e-3)  # the policy no longer equals the reference


def test_sequence_logps_are_the_same_under_every_loss_impl(tmp_path, data):
    shard, sft = data
    # One step of one micro-batch: the Triton interpreter runs fused_linear slowly on CPU.
    base = (f"checkpoint.pretrained={sft}", "train.train_steps=1", "train.global_batch_size=2", "dpo.reference=model")
    ref = _curve(_dpo(tmp_path / "torch", shard, *base))
    fused = _curve(_dpo(tmp_path / "fused", shard, *base, "model.loss_impl=fused_linear"))
    _same(fused, ref, rel=1e-4, abs_=1e-5, what="fused_linear")


@pytest.mark.parametrize("extra, present", [
    (("dpo.loss_type=ipo", "dpo.rpo_alpha=0.5"), "nll"),
    (("dpo.loss_type=hinge",), None),
    (("dpo.loss_type=sigmoid", "dpo.label_smoothing=0.1"), None),
])
def test_loss_variants_train(tmp_path, data, extra, present):
    shard, sft = data
    hist = _dpo(tmp_path, shard, f"checkpoint.pretrained={sft}", "train.train_steps=6", *extra)
    assert hist[-1]["margin"] > hist[0]["margin"]
    if present:
        assert present in hist[-1]


def test_simpo_needs_no_reference(tmp_path, data):
    shard, _ = data
    hist = _dpo(tmp_path, shard, "dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.gamma=0.5", "train.train_steps=6")
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["margin"] > hist[0]["margin"]


def _cli_error(capsys, monkeypatch, argv: list[str]) -> str:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_references_are_one_line(tmp_path, data, capsys, monkeypatch):
    shard, sft = data
    base = ["dpo", *TINY, *_args(tmp_path / "run", shard, tmp_path / "cache"), "train.train_steps=2"]
    assert "set dpo.ref_checkpoint or checkpoint.pretrained" in _cli_error(capsys, monkeypatch, base)
    other = sft_checkpoint(tmp_path / "other", 1, *SFT_ARGS, "model.vocab_size=300")
    line = _cli_error(capsys, monkeypatch, [*base, f"checkpoint.pretrained={sft}", f"dpo.ref_checkpoint={other}"])
    assert "dpo.ref_checkpoint" in line and "vocab_size 300" in line
    line = _cli_error(capsys, monkeypatch, [*base, f"checkpoint.pretrained={sft}", "dpo.reference=cached"])
    assert "dpo.reference 'cached'" in line
    line = _cli_error(capsys, monkeypatch, [*base, f"checkpoint.pretrained={sft}", "dpo.gamma=1"])
    assert "gamma" in line
    # A reward model (PPO's frozen scorer) over another vocabulary: the same check.
    cfg = tiny_config(str(tmp_path / "x"), "model.vocab_size=260")
    with pytest.raises(ConfigError, match="vocab_size 300 but the policy has 260"):
        build_frozen_model(cfg, ParallelState(), other, output_head="score", what="reward.model")


def test_frozen_reference_has_no_grads_and_no_dropout(tmp_path, data):
    _, sft = data
    cfg = tiny_config(str(tmp_path), *SFT_ARGS, "model.vocab_size=264", "model.hidden_dropout=0.5")
    (ref,) = build_frozen_model(cfg, ParallelState(), sft)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    tokens = torch.randint(0, 200, (2, 16))
    torch.testing.assert_close(ref(tokens=tokens, labels=tokens), ref(tokens=tokens, labels=tokens), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Layouts vs one process.

LAYOUTS = {"tp2-sp-model": ["parallel.tp=2", "parallel.sp=true", "dpo.reference=model"],
           "tp2-sp-precompute": ["parallel.tp=2", "parallel.sp=true", "dpo.reference=precompute"],
           "pp2-precompute": ["parallel.pp=2", "dpo.reference=precompute"],
           "pp2-model": ["parallel.pp=2", "dpo.reference=model"],
           "dp2-precompute": ["dpo.reference=precompute"]}  # each DP rank computes half of the table


def _layouts(rank: int, world: int, root: str, shard: str, sft: str) -> dict:
    # One run dir and one data cache per layout, shared by its ranks (each layout computes its own table).
    return {name: _curve(_dpo(f"{root}/{name}", shard, f"checkpoint.pretrained={sft}", "train.train_steps=3",
                              "dpo.rpo_alpha=0.2", *extra))
            for name, extra in LAYOUTS.items()}


@pytest.mark.slow
def test_dpo_layouts_match_one_process(tmp_path, data):
    shard, sft = data
    ref = _curve(_dpo(tmp_path / "one", shard, f"checkpoint.pretrained={sft}", "train.train_steps=3",
                      "dpo.rpo_alpha=0.2"))
    assert ref[-1][METRICS.index("margin")] > 0  # it moved off the reference
    for result in run_distributed(_layouts, 2, str(tmp_path), shard, sft):
        for name, curve in result.items():
            _same(curve, ref, rel=2e-4, abs_=2e-5, what=name)
    # The stored tables (written by rank 0: the first pipeline stage under PP2, one of two DP ranks
    # under DP2) hold every pair's reference log-probs, as one process computes them.
    (want,) = sorted((tmp_path / "one" / "cache" / "ref_logps").glob("train-*.npy"))
    for name in (n for n in LAYOUTS if n.endswith("precompute")):
        got = tmp_path / name / "cache" / "ref_logps" / want.name  # the key does not depend on the layout
        np.testing.assert_allclose(np.load(got), np.load(want), rtol=1e-5, atol=1e-4, err_msg=name)
