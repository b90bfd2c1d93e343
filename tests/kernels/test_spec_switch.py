"""The layer-spec switch: the same model gives the same outputs and gradients with every implementation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megalite.config import ConfigError, ModelConfig, ParallelConfig
from megalite.model import LlamaModel
from megalite.model.spec import loss_fn, rms_norm_fn, swiglu_fn
from megalite.parallel.state import ParallelState, build_parallel_state
from tests.kernels.conftest import TINY as BASE
from tests.kernels.conftest import assert_grads_match, loss_and_grads


def _run(cfg: ModelConfig, autocast: bool = False, ps: ParallelState | None = None):
    torch.manual_seed(0)
    ps = ps or ParallelState()
    model = LlamaModel(cfg, ps)
    model.init_weights(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(torch.randint(0, BASE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)))
        loss, grads = loss_and_grads(model)
    if ps.tp > 1:
        from megalite.parallel.finalize import finalize_grads
        from megalite.testing import full_tensors

        finalize_grads([model], ps)
        return None, loss, full_tensors(model, ps)
    return logits.detach(), loss, {n: g.clone() for n, g in grads.items()}


@pytest.mark.parametrize("impls", [
    dict(norm_impl="triton"),
    dict(mlp_impl="triton"),
    dict(loss_impl="triton"),
    dict(norm_impl="triton", mlp_impl="triton", loss_impl="fused_linear"),
])
def test_triton_model_matches_torch_model(impls):
    ref_logits, ref_loss, ref_grads = _run(BASE)
    logits, loss, grads = _run(dataclasses.replace(BASE, **impls))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_triton_mlp_recomputes_its_activation():
    model = LlamaModel(dataclasses.replace(BASE, mlp_impl="triton"), ParallelState())
    assert model.layers["0"].mlp.fused_down
    assert not LlamaModel(BASE, ParallelState()).layers["0"].mlp.fused_down


ALL_TRITON = dataclasses.replace(BASE, norm_impl="triton", mlp_impl="triton", loss_impl="fused_linear")


def _tp_worker(rank: int, world: int):
    return _run(ALL_TRITON, ps=build_parallel_state(ParallelConfig(tp=world, sp=True)))


@pytest.mark.slow
def test_triton_model_under_tp2_sp_matches_torch_single_process():
    from megalite.testing import run_distributed

    _, ref_loss, ref_grads = _run(BASE)
    for _, loss, grads in run_distributed(_tp_worker, 2):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert_grads_match(grads, ref_grads)


def test_bf16_autocast_over_fp32_master_weights():
    ref_logits, ref_loss, ref_grads = _run(BASE, autocast=True)
    cfg = dataclasses.replace(BASE, norm_impl="triton", mlp_impl="triton", loss_impl="fused_linear")
    logits, loss, grads = _run(cfg, autocast=True)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=3e-2, atol=3e-2)
    for name in grads:
        assert grads[name].dtype == torch.float32, name  # master weights and their grads stay fp32
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=5e-2, atol=2e-3, msg=name)


def test_triton_norms_fuse_every_residual_add(monkeypatch):
    """With Triton norms every residual add happens inside the norm that follows it: the attention
    add in the MLP pre-norm, the MLP add in the next layer's attention pre-norm (or the final norm)."""
    from megalite.kernels import rmsnorm as mod

    calls = []
    real = mod._RMSNormFn.apply
    monkeypatch.setattr(mod._RMSNormFn, "apply", lambda *a: calls.append(a[2] is not None) or real(*a))
    cfg = dataclasses.replace(BASE, norm_impl="triton")
    _run(cfg)
    # Per forward (two: logits, then the loss): 2 norms per layer and the final one; all but the
    # first layer's attention pre-norm take a residual.
    assert len(calls) == 2 * (2 * cfg.num_layers + 1)
    assert calls.count(False) == 2


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_norm_writes_the_autocast_dtype_with_identical_matmul_inputs(impl):
    from megalite.model.norm import RMSNorm

    g = torch.Generator().manual_seed(3)
    x, w_lin = torch.randn(5, 2, 48, generator=g), torch.randn(32, 48, generator=g)
    norm = RMSNorm(48, 1e-6, impl)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(48, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
        got = torch.nn.functional.linear(y, w_lin)
        # What the matmul saw before: the fp32 norm output, cast by autocast inside F.linear.
        want = torch.nn.functional.linear(rms_norm_fn("torch")(x, norm.weight, 1e-6), w_lin)
    assert y.dtype == torch.bfloat16
    if impl == "torch":
        assert torch.equal(got, want)
    else:  # the kernel sums in another order: equal up to one bf16 rounding of the norm output
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)
    assert norm(x).dtype == torch.float32  # no autocast, no cast


def test_selectors_return_the_kernels_and_reject_unknown_names():
    from megalite import kernels

    assert rms_norm_fn("triton") is kernels.rms_norm
    assert swiglu_fn("triton") is kernels.swiglu
    assert loss_fn("fused_linear") is not loss_fn("torch")
    with pytest.raises(ConfigError, match="norm_impl 'cuda'"):
        rms_norm_fn("cuda")
    with pytest.raises(ConfigError, match="loss_impl 'liger'"):
        loss_fn("liger")
