"""`megalite sft`: packed chat data through the shared trainer under every layout, the global
loss-token normalization, and packing that never leaks between samples (losses and gradients)."""

from __future__ import annotations

import pytest
import torch

from megalite.alignment.sft import SFTStage
from megalite.config import ModelConfig
from megalite.data.preprocess import preprocess
from megalite.data.sft import IGNORE_INDEX, build_sft_datasets
from megalite.data.tokenizer import build_tokenizer
from megalite.model.llama import LlamaModel
from megalite.parallel.state import ParallelState
from megalite.testing import run_distributed
from megalite.training.trainer import Trainer
from tests.data.test_sft_data import _cfg, make_records, write_jsonl
from tests.training.common import tiny_config

STEPS = 5


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("sft")
    src = write_jsonl(d / "chat.jsonl", make_records(120, seed=1))
    preprocess([str(src)], str(d / "sft"), "byte", mode="chat", workers=0, progress=False)
    return str(d / "sft")


def _sft(run_dir: str, shard: str, *extra: str) -> list[dict]:
    # One data cache for all ranks (one rank builds the index, the others wait for it), next to the shard.
    cfg = tiny_config(run_dir, f"train.train_steps={STEPS}", f"data.path={shard}", "data.split=100,0,0",
                      f"data.cache_dir={shard}_cache", "train.seq_len=64", "model.max_seq_len=64", *extra)
    return Trainer(cfg, SFTStage()).train()


def _curve(history: list[dict]) -> list[tuple[float, float]]:
    return [(h["loss"], h["grad_norm"]) for h in history]


def _layouts(rank: int, world: int, run_dir: str, shard: str) -> dict:
    layouts = {"tp2-sp": ["parallel.tp=2", "parallel.sp=true"], "pp2": ["parallel.pp=2"],
               "dp2-zero1": ["parallel.distributed_optimizer=true"]}
    return {name: _curve(_sft(f"{run_dir}/{name}/r{rank}", shard, *o)) for name, o in layouts.items()}


@pytest.mark.slow
def test_sft_layouts_match_single_process(tmp_path, shard):
    ref = _curve(_sft(str(tmp_path / "ref"), shard))
    assert ref[-1][0] < ref[0][0]  # it learns
    for rank_result in run_distributed(_layouts, 2, str(tmp_path), shard):
        for name, curve in rank_result.items():
            for step, ((loss, norm), (rloss, rnorm)) in enumerate(zip(curve, ref, strict=True)):
                assert loss == pytest.approx(rloss, rel=2e-5, abs=2e-5), f"{name} loss at step {step + 1}"
                assert norm == pytest.approx(rnorm, rel=2e-4, abs=1e-5), f"{name} grad norm at step {step + 1}"


def test_micro_batch_split_does_not_change_gradients(tmp_path, shard):
    """Rows carry very different loss-token counts; 1, 2 or 4 micro-batches per step must give the
    same step (grad norm before clipping, and the losses that follow from the updates)."""
    curves = {m: _curve(_sft(str(tmp_path / f"m{m}"), shard, f"train.micro_batch_size={m}",
                             "optim.clip_grad=0"))[:3] for m in (1, 2, 4)}
    for m in (2, 4):
        for (loss, norm), (rloss, rnorm) in zip(curves[m], curves[1], strict=True):
            assert loss == pytest.approx(rloss, rel=1e-5) and norm == pytest.approx(rnorm, rel=1e-5), m


def test_packed_row_gives_each_samples_gradients(tmp_path, shard):
    tok = build_tokenizer("byte")
    train, _ = build_sft_datasets(_cfg(shard, tmp_path), 160, 3, tok, log=None)
    row = next(k for k in range(len(train)) if len(train.units_of_row(k)) >= 3)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, max_seq_len=160, attention_backend="sdpa")
    model = LlamaModel(cfg, ParallelState())
    model.init_weights(0)
    packed = train.get_batch([row])
    model(tokens=packed["tokens"], labels=packed["labels"], position_ids=packed["position_ids"],
          doc_ids=packed["doc_ids"]).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    at, alone_losses = 0, 0
    for u in train.units_of_row(row).tolist():
        n = int(train.unit_len[u, 0]) - 1
        tokens, labels = packed["tokens"][:, at : at + n], packed["labels"][:, at : at + n]
        assert (labels != IGNORE_INDEX).any()
        model(tokens=tokens, labels=labels).sum().backward()  # the sample alone, from position 0
        alone_losses += 1
        at += n
    assert alone_losses >= 3
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
