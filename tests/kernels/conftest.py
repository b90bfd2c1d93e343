"""Kernel tests: Triton through its CPU interpreter unless a GPU is present.

Every `torch.empty`/`empty_like` made during a test is filled with NaN (ints with a sentinel), so
an element a kernel forgets to write shows up as a NaN in the comparison instead of passing by luck.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from megalite.config import ModelConfig  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (rtol, atol) against float64, per input dtype.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _poison(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and t.numel():
            t.fill_(-(2 ** 30) if t.element_size() >= 4 else -1)
    return t


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    yield


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                   scale: float = 1.0) -> None:
    """Compares with a float64 reference; NaNs (unwritten outputs) always fail."""
    rtol, atol = TOL[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element was not written)"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


# The small model the spec-switch and TE tests build with every implementation.
TINY = ModelConfig(vocab_size=301, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_hidden_size=80, max_seq_len=32, norm_eps=1e-6)


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One fixed batch through `model`: the per-token losses and every parameter's gradient."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=g)
    labels = torch.randint(0, TINY.vocab_size, (2, 12), generator=g)
    labels[1, 4] = -100
    loss = model(tokens, labels=labels)
    (loss.sum() / (labels != -100).sum()).backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_grads_match(grads: dict, ref_grads: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Every reference gradient, compared on the real vocabulary rows (TP pads the vocab)."""
    for name, ref in ref_grads.items():
        got = grads[name]
        if name in ("head", "embedding.weight"):
            got, ref = got[:TINY.vocab_size], ref[:TINY.vocab_size]
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=name)
