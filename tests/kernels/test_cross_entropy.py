"""Triton cross-entropy (and fused linear CE) against float64 torch, single-process and over TP ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalite.kernels import cross_entropy, cross_entropy_ref
from tests.kernels.conftest import DEVICE, assert_close64

VOCAB = 50257  # GPT-2's: odd, divisible by neither 2 nor 4


def _case(n: int, v_local: int, vocab: int, seed: int, dtype=torch.float32, ignore: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v_local, generator=g) * 4).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    labels[:ignore] = -100
    grad = torch.randn(n, generator=g).to(DEVICE)  # non-uniform: the reduction='none' trap
    return logits, labels, grad


def _grads(fn, logits, labels, grad, reduction, **kw):
    x = logits.clone().requires_grad_()
    loss = fn(x, labels, reduction=reduction, **kw)
    up = grad if reduction == "none" else grad[0]
    (loss.double() * up.double()).sum().backward()
    return loss, x.grad


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smooth,z", [(0.0, 0.0), (0.1, 1e-3)])
def test_matches_float64_and_torch(reduction, smooth, z):
    logits, labels, grad = _case(9, 1031, 1031, seed=11)
    kw = dict(label_smoothing=smooth, z_loss=z)
    loss, dx = _grads(cross_entropy, logits, labels, grad, reduction, inplace_backward=False, **kw)
    ref, ref_dx = _grads(cross_entropy_ref, logits.double(), labels, grad, reduction, **kw)
    assert_close64(loss, ref, torch.float32, "loss")
    assert_close64(dx, ref_dx, torch.float32, "dlogits")
    if z == 0:  # and the reference is torch's own definition (mean over non-ignored tokens)
        torch_loss = F.cross_entropy(logits.double(), labels, reduction=reduction, label_smoothing=smooth)
        assert_close64(ref, torch_loss, torch.float32, "reference vs F.cross_entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_row_full_vocab(dtype):
    logits, labels, grad = _case(1, VOCAB, VOCAB, seed=12, dtype=dtype, ignore=0)
    loss, dx = _grads(cross_entropy, logits, labels, grad, "none", inplace_backward=False)
    ref, ref_dx = _grads(cross_entropy_ref, logits.double(), labels, grad, "none")
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    assert_close64(loss, ref, dtype, "loss")
    assert_close64(dx, ref_dx, dtype, "dlogits", scale=0.01)  # softmax entries are tiny


def test_padding_columns_are_excluded():
    # 1031 real ids in a 1152-wide shard; huge logits in the padding must change nothing.
    logits, labels, grad = _case(5, 1152, 1031, seed=13)
    logits[:, 1031:] = 1e4
    loss, dx = _grads(cross_entropy, logits, labels, grad, "none", vocab_size=1031, label_smoothing=0.1)
    ref, ref_dx = _grads(cross_entropy_ref, logits[:, :1031].double(), labels, grad, "none",
                         label_smoothing=0.1)
    assert_close64(loss, ref, torch.float32, "loss")
    assert_close64(dx[:, :1031], ref_dx, torch.float32, "dlogits")
    assert (dx[:, 1031:] == 0).all()


def test_gradient_is_written_into_the_logits_buffer():
    logits, labels, grad = _case(4, 700, 700, seed=14)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0  # a non-leaf buffer, like a matmul output
    (cross_entropy(x, labels) * grad).sum().backward()
    torch.testing.assert_close(x.detach(), leaf.grad)  # x now holds d loss / d x
    _, ref_dx = _grads(cross_entropy_ref, logits.double(), labels, grad, "none")
    assert_close64(leaf.grad, ref_dx, torch.float32, "dlogits")


def test_all_ignored_mean_is_zero_with_zero_grad():
    logits, labels, grad = _case(3, 300, 300, seed=15, ignore=3)
    loss, dx = _grads(cross_entropy, logits, labels, grad, "mean")
    assert loss.item() == 0.0 and (dx == 0).all()


def test_shapes_seq_batch():
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(5, 2, 333, generator=g).to(DEVICE)
    labels = torch.randint(0, 333, (5, 2), generator=g).to(DEVICE)
    out = cross_entropy(logits, labels)
    assert out.shape == (5, 2)
    assert_close64(out, cross_entropy_ref(logits.double(), labels), torch.float32, "loss")


def test_bad_inputs():
    x, lab = torch.randn(3, 10), torch.randint(0, 10, (3,))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(x, lab, reduction="avg")
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy(x, lab[:2])
    with pytest.raises(TypeError, match="labels must be int64"):
        cross_entropy(x, lab.float())
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(x, lab, label_smoothing=1.5)


# --------------------------------------------------------------------------------------------
# Vocab parallel over real gloo ranks: each rank holds 1/tp of a vocabulary padded to tp*128.

def _shard_bounds(vocab: int, tp: int, rank: int) -> tuple[int, int]:
    padded = -(-vocab // (tp * 128)) * tp * 128
    v_local = padded // tp
    return rank * v_local, v_local


def _tp_worker(rank: int, world: int, full: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor,
               hidden: torch.Tensor, weight: torch.Tensor):
    import torch.distributed as dist

    from megalite.kernels import fused_linear_cross_entropy
    from megalite.parallel.comm import count_comm

    group = dist.new_group(list(range(world)))
    start, v_local = _shard_bounds(VOCAB, world, rank)
    shard = torch.full((full.shape[0], v_local), 7.0)  # padding columns hold junk on purpose
    real = full[:, start:start + v_local]
    shard[:, :real.shape[1]] = real
    out = {}
    for red in ("none", "mean"):
        x = shard.clone().requires_grad_()
        with count_comm() as cc:
            loss = cross_entropy(x, labels, reduction=red, label_smoothing=0.1, z_loss=1e-4,
                                 vocab_start=start, vocab_size=VOCAB, tp_group=group)
        (loss * (grad if red == "none" else grad[0])).sum().backward()
        out[red] = (loss.detach(), x.grad[:, :real.shape[1]].clone(), x.grad[:, real.shape[1]:].clone(),
                    dict(cc.calls), dict(cc.bytes))
    # Fused linear CE with the same sharding of the output layer's rows.
    w_shard = torch.zeros(v_local, weight.shape[1])
    w_real = weight[start:start + v_local]
    w_shard[:w_real.shape[0]] = w_real
    h = hidden.clone().requires_grad_()
    w = w_shard.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, vocab_start=start, vocab_size=VOCAB, tp_group=group,
                                      chunk_size=2)
    (loss * grad).sum().backward()
    dist.all_reduce(h.grad, group=group)  # what the column-parallel input mapping does in backward
    out["fused"] = (loss.detach(), h.grad, w.grad[:w_real.shape[0]].clone())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_over_tp_ranks(tp):
    from megalite.testing import run_distributed

    g = torch.Generator().manual_seed(20 + tp)
    n, hsize = 3, 16
    full = torch.randn(n, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    labels[1] = -100
    # One label in the last rank's shard, to exercise the far end of the vocabulary.
    labels[2] = VOCAB - 1
    grad = torch.randn(n, generator=g)
    hidden = torch.randn(n, hsize, generator=g)
    weight = torch.randn(VOCAB, hsize, generator=g) * 0.3
    results = run_distributed(_tp_worker, tp, full, labels, grad, hidden, weight)

    for red in ("none", "mean"):
        ref, ref_dx = _grads(cross_entropy_ref, full.double(), labels, grad, red, label_smoothing=0.1,
                             z_loss=1e-4)
        dx = torch.cat([r[red][1] for r in results], dim=1)
        for r in results:
            assert_close64(r[red][0], ref, torch.float32, f"tp={tp} {red} loss")
            assert (r[red][2] == 0).all(), "padding columns must get zero gradient"
            # One collective per call: every rank's lse, target logit and (with smoothing) logit sum.
            assert r[red][3] == {"all_gather": 1}
            assert r[red][4] == {"all_gather": tp * n * 3 * 4}
        assert_close64(dx, ref_dx, torch.float32, f"tp={tp} {red} dlogits")

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = cross_entropy_ref(h64 @ w64.t(), labels)
    (ref * grad.double()).sum().backward()
    dw = torch.cat([r["fused"][2] for r in results], dim=0)
    for r in results:
        assert_close64(r["fused"][0], ref, torch.float32, f"tp={tp} fused loss")
        assert_close64(r["fused"][1], h64.grad, torch.float32, f"tp={tp} fused dhidden")
    assert_close64(dw, w64.grad, torch.float32, f"tp={tp} fused dweight")
