"""Recomputation must give the gradients of the plain model, dropout included, and must actually
recompute (the recomputed regions run twice)."""

from __future__ import annotations

import pytest
import torch

from megalite.config import ConfigError, ModelConfig
from megalite.model import LlamaModel
from megalite.model.recompute import apply_recompute
from megalite.parallel.rng import seed_everything
from megalite.parallel.state import ParallelState

CFG = ModelConfig(vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, ffn_hidden_size=64,
                  max_seq_len=16, attention_dropout=0.2, hidden_dropout=0.1)


def _run(mode: str, every: int = 1):
    ps = ParallelState()
    rng = seed_everything(5, 0, 0, ps.device)  # attention dropout draws from the tracker's stream
    model = LlamaModel(CFG, ps, rng)
    model.init_weights(3)
    apply_recompute(model, mode, every)
    calls = {"layer": 0, "core": 0}
    for layer in model.layers.values():
        layer.attn.register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
        core = layer.attn._core

        def counted(*a, _core=core):
            calls["core"] += 1
            return _core(*a)

        layer.attn._core = counted
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (2, 12), generator=g)
    labels = torch.randint(0, 97, (2, 12), generator=g)
    losses = []
    for _ in range(2):  # two micro-batches: the tracker must move on between them, not rewind
        loss = model(tokens, labels=labels)
        loss.mean().backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return losses, grads, calls


@pytest.mark.parametrize("mode,every,layer_calls,core_calls", [
    ("selective", 1, 8, 16),  # 4 layers x 2 micro-batches; the core runs again in backward
    ("full", 1, 16, 16),      # every layer runs twice
    ("full", 2, 12, 12),      # layers 0 and 2 run twice
])
def test_recompute_matches_plain(mode: str, every: int, layer_calls: int, core_calls: int):
    ref_losses, ref_grads, ref_calls = _run("none")
    assert ref_calls == {"layer": 8, "core": 8}
    losses, grads, calls = _run(mode, every)
    assert calls == {"layer": layer_calls, "core": core_calls}
    # Dropout was active: the two micro-batches (same tokens) drew different masks.
    assert not torch.equal(ref_losses[0], ref_losses[1])
    for a, b in zip(losses, ref_losses):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_bad_config():
    model = LlamaModel(CFG, ParallelState())
    with pytest.raises(ConfigError):
        apply_recompute(model, "sometimes")
    with pytest.raises(ConfigError):
        apply_recompute(model, "full", 0)
