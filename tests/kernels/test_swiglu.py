from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalite.kernels import swiglu, swiglu_linear, swiglu_ref
from tests.kernels.conftest import DEVICE, assert_close64


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * 2).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.parametrize("shape,dtype", [
    ((1, 4099), torch.float32),
    ((3, 5, 4099), torch.float32),
    ((3, 5, 4099), torch.bfloat16),
    ((9, 1000), torch.float16),
])
def test_swiglu_matches_float64(shape, dtype):
    gate, up, da = _inputs(shape, dtype, seed=shape[-1] + len(shape))
    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    a = swiglu(g1, u1)
    a.backward(da)
    g2, u2 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = swiglu_ref(g2, u2)
    ref.backward(da.double())
    assert a.dtype == dtype and a.shape == gate.shape
    assert_close64(a, ref, dtype, "a")
    assert_close64(g1.grad, g2.grad, dtype, "dgate")
    assert_close64(u1.grad, u2.grad, dtype, "dup")


def test_swiglu_on_halves_of_a_fused_projection():
    # gate/up as the two strided halves of one [s, b, 2F] tensor, as the MLP produces them.
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(4, 3, 2 * 777, generator=g).to(DEVICE).requires_grad_()
    gate, up = fused.chunk(2, dim=-1)
    swiglu(gate, up).sum().backward()
    ref_fused = fused.detach().double().requires_grad_()
    rg, ru = ref_fused.chunk(2, dim=-1)
    swiglu_ref(rg, ru).sum().backward()
    assert_close64(fused.grad, ref_fused.grad, torch.float32, "dfused")


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("recompute", [True, False])
def test_swiglu_linear_matches_and_recompute_saves_the_activation(recompute):
    gate, up, _ = _inputs((6, 257), torch.float32, seed=5)
    w = torch.randn(33, 257, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    dout = torch.randn(6, 33, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (gate, up, w)]
    out = swiglu_linear(*leaves, recompute=recompute)
    out.backward(dout)
    ref_leaves = [t.double().requires_grad_() for t in (gate, up, w)]
    ref = F.linear(swiglu_ref(ref_leaves[0], ref_leaves[1]), ref_leaves[2])
    ref.backward(dout.double())
    assert_close64(out, ref, torch.float32, "out", scale=10)
    for name, a, b in zip(("dgate", "dup", "dw"), leaves, ref_leaves):
        assert_close64(a.grad, b.grad, torch.float32, name, scale=10)

    gate_up_w = (gate.numel() + up.numel() + w.numel()) * 4
    saved = _saved_bytes(lambda: swiglu_linear(*[t.clone().requires_grad_() for t in (gate, up, w)],
                                               recompute=recompute))
    assert saved == gate_up_w + (0 if recompute else gate.numel() * 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="not supported"):
        swiglu(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not match ffn size"):
        swiglu_linear(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 5))
