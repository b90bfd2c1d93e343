from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.kernels import cross_entropy_ref, fused_linear_cross_entropy, fused_linear_logprobs
from megalite.kernels.fused_linear_ce import default_chunk_size
from tests.kernels.conftest import DEVICE, assert_close64


def _case(n, h, v, vocab, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    labels[0] = -100
    grad = torch.randn(n, generator=g).to(DEVICE)
    return hidden, weight, labels, grad


def _run(fn, hidden, weight, labels, grad, reduction, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels, reduction=reduction, **kw)
    (loss.double() * (grad if reduction == "none" else grad[0]).double()).sum().backward()
    return loss, h.grad, w.grad


def _ref(h, w, labels, reduction="none", **kw):
    return cross_entropy_ref(h @ w.t(), labels, reduction=reduction, **kw)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_matches_float64(reduction, chunk):
    hidden, weight, labels, grad = _case(11, 24, 400, 389, seed=30)
    kw = dict(vocab_size=389, label_smoothing=0.05, z_loss=1e-3)
    loss, dh, dw = _run(fused_linear_cross_entropy, hidden, weight, labels, grad, reduction, chunk_size=chunk,
                        **kw)
    ref, rdh, rdw = _run(_ref, hidden.double(), weight.double(), labels, grad, reduction, **kw)
    assert_close64(loss, ref, torch.float32, "loss")
    assert_close64(dh, rdh, torch.float32, "dhidden")
    assert_close64(dw, rdw, torch.float32, "dweight")


def test_bf16_seq_batch_shapes():
    hidden, weight, labels, grad = _case(12, 32, 515, 515, seed=31, dtype=torch.bfloat16)
    hidden, labels, grad = hidden.view(4, 3, 32), labels.view(4, 3), grad.view(4, 3)
    loss, dh, dw = _run(fused_linear_cross_entropy, hidden, weight, labels, grad, "none", chunk_size=5)
    ref, rdh, rdw = _run(_ref, hidden.double(), weight.double(), labels, grad, "none")
    assert loss.shape == (4, 3) and dh.shape == hidden.shape and dh.dtype == torch.bfloat16
    assert_close64(loss, ref, torch.bfloat16, "loss")
    assert_close64(dh, rdh, torch.bfloat16, "dhidden")
    assert_close64(dw, rdw, torch.bfloat16, "dweight", scale=4)


def test_logprobs_for_preference_training():
    hidden, weight, labels, grad = _case(7, 16, 300, 300, seed=32)
    lp = fused_linear_logprobs(hidden, weight, labels, chunk_size=3)
    logp = torch.log_softmax((hidden @ weight.t()).double(), -1)
    ref = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    assert_close64(lp, ref, torch.float32, "logprobs")


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (in-place ops such as the interpreter's copy_/set_
    into existing storage are not allocations, so they are skipped)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.endswith("_"):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_full_logits_never_exist(reduction):
    n, h, v = 64, 16, 600
    hidden, weight, labels, grad = _case(n, h, v, v, seed=33)
    for fn, fused in ((fused_linear_cross_entropy, True), (_ref, False)):
        mode = _LargestTensor()
        with mode:
            kw = dict(chunk_size=8) if fused else {}
            _run(fn, hidden, weight, labels, grad, reduction, **kw)
        if fused:
            assert mode.largest <= max(8 * v, v * h), mode.largest  # one chunk of logits, or dW
        else:
            assert mode.largest >= n * v  # the check sees the unfused path's full logits


def test_default_chunk_size_tracks_hidden_size():
    assert default_chunk_size(32768, 128256, 4096) == 1024  # 1024 x 128256 ~ 32768 x 4096
    assert default_chunk_size(5, 100, 4096) == 5
    assert default_chunk_size(1, 128256, 16) == 1


def test_fp16_gradients_see_the_loss_scale_before_rounding():
    # Confident logits: many softmax entries are so small that their gradients, unscaled, fall below
    # fp16's smallest subnormal; multiplied by the loss scale first, they are representable.
    g = torch.Generator().manual_seed(36)
    n, h, v = 6, 16, 40
    hidden = torch.randn(n, h, generator=g).to(DEVICE, torch.float16)
    weight = (torch.randn(v, h, generator=g) * 3.0).to(DEVICE, torch.float16)
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    scale = 2.0 ** 16  # what fp16 dynamic loss scaling starts at

    def w_grad(loss_scale: float) -> torch.Tensor:
        w = weight.clone().requires_grad_()
        (fused_linear_cross_entropy(hidden, w, labels, reduction="mean", chunk_size=4) * loss_scale).backward()
        return w.grad.double()

    w64 = weight.double().requires_grad_()
    (_ref(hidden.double(), w64, labels, "mean") * scale).backward()
    ref = w64.grad
    cold = ref.abs().amax(1) < 1e-2 * scale / n  # rows fed only by tiny probabilities
    assert cold.any()
    # The premise: scaling after the fact (what a kernel that rounds before scaling amounts to) loses
    # these gradients to underflow.
    late = w_grad(1.0) * scale
    assert ((late == 0) & (ref != 0))[cold].any()
    got = w_grad(scale)
    assert not ((got == 0) & (ref != 0))[cold].any()
    torch.testing.assert_close(got[cold], ref[cold], rtol=0.15, atol=2e-3)


def test_second_backward_through_precomputed_grads_is_refused():
    hidden, weight, labels, _ = _case(6, 8, 50, 50, seed=35)
    loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs():
    h, w, lab = torch.randn(3, 8), torch.randn(20, 8), torch.randint(0, 20, (3,))
    with pytest.raises(ValueError, match="does not match hidden size"):
        fused_linear_cross_entropy(h, torch.randn(20, 9), lab)
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(h, w.double(), lab)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, w, lab, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_cross_entropy(h, w, lab[:2])


def test_under_autocast_with_fp32_master_weights():
    hidden, weight, labels, grad = _case(10, 32, 260, 250, seed=34)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, dh, dw = _run(fused_linear_cross_entropy, hidden, weight, labels, grad, "mean", chunk_size=3,
                            vocab_size=250)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    # The reference sees the bf16-rounded operands the autocast matmul sees.
    hb, wb = hidden.bfloat16().double(), weight.bfloat16().double()
    ref, rdh, rdw = _run(_ref, hb, wb, labels, grad, "mean", vocab_size=250)
    assert_close64(loss, ref, torch.bfloat16, "loss")
    assert_close64(dh, rdh, torch.bfloat16, "dhidden")
    assert_close64(dw, rdw, torch.bfloat16, "dweight")
