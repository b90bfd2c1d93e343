"""The scalar score head (reward model, PPO critic) under TP and TP+SP equals one process: scores
and every gradient, for a loss that reads each row's last real token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megalite.config import ConfigError, ModelConfig, ParallelConfig
from megalite.model import LlamaModel
from megalite.parallel.finalize import finalize_grads
from megalite.parallel.rng import seed_everything
from megalite.parallel.state import ParallelState, build_parallel_state
from megalite.testing import full_tensors, run_distributed

CFG = ModelConfig(vocab_size=301, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, max_seq_len=64, norm_eps=1e-6, output_head="score", tie_embeddings=True)


def _run(model: LlamaModel, ps: ParallelState):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 301, (2, 16), generator=g)
    last = torch.tensor([15, 9])  # each row's last real token
    scores = model(tokens)
    assert scores.shape == (2, 16)
    picked = scores[torch.arange(2), last]
    # A pairwise loss, so the gradient differs per row and per position.
    torch.nn.functional.logsigmoid(picked[0] - picked[1]).neg().backward()
    finalize_grads([model], ps)
    return scores.detach(), full_tensors(model, ps)


def _worker(rank: int, world: int, sp: bool):
    ps = build_parallel_state(ParallelConfig(tp=world, sp=sp))
    seed_everything(1, ps.tp_rank, 0, ps.device)
    model = LlamaModel(CFG, ps)
    model.init_weights(7)
    return _run(model, ps)


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_score_head_tp2_matches_single_process(sp):
    ref_model = LlamaModel(CFG, ParallelState())
    ref_model.init_weights(7)
    ref_scores, ref_grads = _run(ref_model, ParallelState())
    assert ref_grads["score"].abs().sum() > 0 and "head" not in ref_grads
    for scores, grads in run_distributed(_worker, 2, sp):
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)


def test_unknown_output_head_is_one_line():
    with pytest.raises(ConfigError, match="model.output_head"):
        LlamaModel(dataclasses.replace(CFG, output_head="value"), ParallelState())
