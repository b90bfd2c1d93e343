from __future__ import annotations

import zlib

import pytest
import torch

from megalite.kernels import rms_norm, rms_norm_ref
from tests.kernels.conftest import DEVICE, assert_close64


def test_empty_is_poisoned():
    # The NaN-fill fixture is what makes "unwritten element" bugs visible; make sure it is active.
    assert torch.isnan(torch.empty(4)).all() and torch.isnan(torch.empty_like(torch.ones(2))).all()


def _run(x, w, r, dy, dh):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((r,) if r is not None else ())]
    out = rms_norm(leaves[0], leaves[1], 1e-5, leaves[2] if r is not None else None)
    outs = out if isinstance(out, tuple) else (out,)
    loss = (outs[0].double() * dy).sum() + ((outs[1].double() * dh).sum() if r is not None else 0)
    loss.backward()
    return outs, [t.grad for t in leaves]


def _ref(x, w, r, dy, dh):
    leaves = [t.detach().double().requires_grad_() for t in (x, w) + ((r,) if r is not None else ())]
    # The reference sees the same rounded h the kernel normalizes: x + r in the input dtype.
    if r is not None:
        h = (x + r).double().requires_grad_()
        y = rms_norm_ref(h, leaves[1], 1e-5)
        ((y * dy).sum() + (h * dh).sum()).backward()
        return (y, h), [h.grad, leaves[1].grad, h.grad]
    y = rms_norm_ref(leaves[0], leaves[1], 1e-5)
    (y * dy).sum().backward()
    return (y,), [t.grad for t in leaves]


@pytest.fixture(params=["registers", "looped"])
def block_path(request, monkeypatch):
    """Runs each case twice: as shipped, and with tiny in-register limits so that every row takes
    the looped (wide-row) paths, which otherwise need 64k-wide rows."""
    if request.param == "looped":
        from megalite.kernels import rmsnorm as mod

        monkeypatch.setattr(mod, "FWD_MAX_BLOCK", 512)
        monkeypatch.setattr(mod, "BWD_MAX_BLOCK", 256)
        monkeypatch.setattr(mod, "LOOP_BLOCK", 256)  # several column blocks even at modest widths
    return request.param


@pytest.mark.parametrize("shape,dtype,residual", [
    ((1, 4099), torch.float32, False),          # a single row, odd hidden
    ((3, 5, 4099), torch.float32, True),        # [s, b, h] with the residual fused
    ((3, 5, 4099), torch.bfloat16, True),
    ((7, 1024), torch.bfloat16, False),
    ((6, 1000), torch.float16, True),
    ((2, 3, 20011), torch.float32, True),
    ((3, 20011), torch.bfloat16, False),
])
def test_rms_norm_matches_float64(shape, dtype, residual, block_path):
    # crc32, not hash(): str hashes change per process, and a failure must be reproducible.
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, residual)).encode()))
    h = shape[-1]
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    x = (mk(*shape) * 3 + 1).to(dtype)
    w = (1 + 0.1 * mk(h)).to(dtype)
    r = mk(*shape).to(dtype) if residual else None
    dy, dh = mk(*shape).double(), mk(*shape).double()
    outs, grads = _run(x, w, r, dy, dh)
    ref_outs, ref_grads = _ref(x, w, r, dy, dh)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert a.dtype == dtype and a.shape == x.shape
        assert_close64(a, b, dtype, f"output {i}")
    n_rows = x.numel() // h
    for name, a, b in zip(("dx", "dw", "dresidual"), grads, ref_grads):
        # dw sums over rows: its tolerance grows with the row count in low precision.
        scale = (n_rows ** 0.5) * 4 if name == "dw" and dtype != torch.float32 else 1.0
        assert_close64(a, b, dtype, name, scale=scale)


def test_64k_hidden_takes_the_looped_path():
    from megalite.kernels import rmsnorm as mod

    x = torch.randn(2, 65536, generator=torch.Generator().manual_seed(9)).to(DEVICE).requires_grad_()
    w = torch.rand(65536, generator=torch.Generator().manual_seed(10)).to(DEVICE).requires_grad_()
    assert 65536 > mod.FWD_MAX_BLOCK and 65536 > mod.BWD_MAX_BLOCK
    y = rms_norm(x, w, 1e-5)
    y.sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm_ref(x64, w64, 1e-5).sum().backward()
    assert_close64(y, rms_norm_ref(x64, w64, 1e-5), torch.float32, "y")
    assert_close64(x.grad, x64.grad, torch.float32, "dx")
    assert_close64(w.grad, w64.grad, torch.float32, "dw")


def test_strided_rows_and_fp32_weight_with_bf16_input():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 2 * 513, generator=g).to(DEVICE)
    x = base[:, :513]  # row stride 1026: no copy expected
    w = torch.randn(513, generator=g).to(DEVICE)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    xb = x.bfloat16()
    y = rms_norm(xb, w, 1e-6)
    assert y.dtype == torch.bfloat16
    assert_close64(y, rms_norm_ref(xb.double(), w.double(), 1e-6), torch.bfloat16, "y")


@pytest.mark.parametrize("hidden", [4099, 600])
def test_bf16_sublayer_output_into_fp32_stream(hidden, block_path):
    """The decoder layer's case under autocast: a bf16 attention output added to the fp32 residual
    stream, the sum kept in fp32, the norm written in bf16 for the next matmul."""
    g = torch.Generator().manual_seed(hidden)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    a = mk(3, 2, hidden).bfloat16().requires_grad_()
    r = (mk(3, 2, hidden) * 2).requires_grad_()
    w = (1 + 0.1 * mk(hidden)).requires_grad_()
    # y is bf16, so its incoming gradient is too: the reference gets the same rounded dy.
    dy, dh = mk(3, 2, hidden).bfloat16().double(), mk(3, 2, hidden).double()
    y, h = rms_norm(a, w, 1e-5, residual=r, out_dtype=torch.bfloat16)
    assert (y.dtype, h.dtype) == (torch.bfloat16, torch.float32)
    ((y.double() * dy).sum() + (h.double() * dh).sum()).backward()
    assert (a.grad.dtype, r.grad.dtype, w.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)

    h64 = (r.detach() + a.detach()).double().requires_grad_()  # exact: fp32 + bf16 fits in fp32 math
    w64 = w.detach().double().requires_grad_()
    y64 = rms_norm_ref(h64, w64, 1e-5)
    ((y64 * dy).sum() + (h64 * dh).sum()).backward()
    assert_close64(h, h64, torch.float32, "h")
    assert_close64(y, y64, torch.bfloat16, "y")
    assert_close64(r.grad, h64.grad, torch.float32, "dresidual")
    assert_close64(a.grad, h64.grad, torch.bfloat16, "dx")
    assert_close64(w.grad, w64.grad, torch.float32, "dw")


def test_bad_inputs_give_one_line_errors(monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight .* does not match hidden size 8"):
        rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(TypeError, match="not supported"):
        rms_norm(x.long(), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8), 1e-5, residual=torch.randn(2, 9))
    with pytest.raises(TypeError, match="out_dtype"):
        rms_norm(x, torch.ones(8), 1e-5, out_dtype=torch.int32)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="need a GPU"):
            rms_norm(x, torch.ones(8), 1e-5)
