"""Preference (DPO family) and Bradley-Terry losses against plain float64 references written here with
math/numpy, values and gradients (central finite differences of the reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megalite.alignment.dpo import nll_term, preference_loss
from megalite.alignment.reward import bradley_terry_loss, pairwise_accuracy
from megalite.config import ConfigError


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_pref(pc, pr, rc, rr, lc, lr, beta, kind, ls=0.0, gamma=0.0) -> np.ndarray:
    """One pair at a time, straight from the papers' formulas."""
    out = []
    for i in range(len(pc)):
        if kind == "simpo":
            x = beta * pc[i] / lc[i] - beta * pr[i] / lr[i] - gamma
            out.append(-(1 - ls) * _logsig(x) - ls * _logsig(-x))
            continue
        log_ratio_chosen = pc[i] - rc[i]
        log_ratio_rejected = pr[i] - rr[i]
        z = log_ratio_chosen - log_ratio_rejected
        if kind == "sigmoid":
            out.append(-(1 - ls) * _logsig(beta * z) - ls * _logsig(-beta * z))
        elif kind == "ipo":
            h = log_ratio_chosen / lc[i] - log_ratio_rejected / lr[i]
            out.append((h - 1 / (2 * beta)) ** 2)
        elif kind == "hinge":
            out.append(max(0.0, 1 - beta * z))
    return np.array(out)


def _inputs(n: int = 16, seed: int = 0):
    g = np.random.default_rng(seed)
    lc = g.integers(1, 60, n).astype(np.float64)
    lr = g.integers(1, 60, n).astype(np.float64)
    pc = -lc * g.uniform(0.5, 2.0, n)
    pr = -lr * g.uniform(0.5, 2.0, n)
    rc = pc + g.normal(0, 3.0, n)
    rr = pr + g.normal(0, 3.0, n)
    return pc, pr, rc, rr, lc, lr


def _fd_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d(sum f)/dx by central differences, one coordinate at a time."""
    g = np.zeros_like(x)
    for i in range(len(x)):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp).sum() - f(xm).sum()) / (2 * h)
    return g


CASES = [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.0), ("ipo", 0.1, 0.0, 0.0), ("ipo", 0.7, 0.0, 0.0),
         ("hinge", 0.1, 0.0, 0.0), ("hinge", 0.3, 0.0, 0.0), ("simpo", 2.0, 0.0, 0.5), ("simpo", 2.5, 0.1, 1.2)]


@pytest.mark.parametrize("kind,beta,ls,gamma", CASES)
def test_preference_loss_matches_reference(kind, beta, ls, gamma):
    pc, pr, rc, rr, lc, lr = _inputs(seed=int(beta * 10))
    t = lambda a, grad=False: torch.tensor(a, dtype=torch.float64, requires_grad=grad)
    tpc, tpr = t(pc, True), t(pr, True)
    simpo = kind == "simpo"
    losses, cr, rj = preference_loss(tpc, tpr, None if simpo else t(rc), None if simpo else t(rr), beta, kind,
                                     label_smoothing=ls, gamma=gamma, chosen_lengths=t(lc), rejected_lengths=t(lr))
    ref = ref_pref(pc, pr, rc, rr, lc, lr, beta, kind, ls, gamma)
    np.testing.assert_allclose(losses.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    # Mixed losses so the test means something: some pairs won, some lost.
    assert ref.std() > 1e-3
    if simpo:
        np.testing.assert_allclose(cr.numpy(), beta * pc / lc, rtol=1e-12)
        np.testing.assert_allclose(rj.numpy(), beta * pr / lr, rtol=1e-12)
    else:
        np.testing.assert_allclose(cr.numpy(), beta * (pc - rc), rtol=1e-12)
        np.testing.assert_allclose(rj.numpy(), beta * (pr - rr), rtol=1e-12)
    assert not cr.requires_grad and not rj.requires_grad

    losses.sum().backward()
    g_pc = _fd_grad(lambda x: ref_pref(x, pr, rc, rr, lc, lr, beta, kind, ls, gamma), pc)
    g_pr = _fd_grad(lambda x: ref_pref(pc, x, rc, rr, lc, lr, beta, kind, ls, gamma), pr)
    np.testing.assert_allclose(tpc.grad.numpy(), g_pc, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(tpr.grad.numpy(), g_pr, rtol=1e-5, atol=1e-8)


def test_preference_loss_hand_values():
    one = lambda v: torch.tensor([v], dtype=torch.float64)
    # Equal policy and reference: the DPO loss is log 2, the hinge loss 1, the rewards 0.
    loss, cr, rj = preference_loss(one(-5.0), one(-7.0), one(-5.0), one(-7.0), 0.1, "sigmoid")
    assert loss.item() == pytest.approx(math.log(2)) and cr.item() == 0 and rj.item() == 0
    assert preference_loss(one(-5.0), one(-7.0), one(-5.0), one(-7.0), 0.1, "hinge")[0].item() == pytest.approx(1.0)
    # Chosen log-ratio +2, rejected -3, beta 0.5: z = 5, DPO loss -log sigmoid(2.5).
    loss, cr, rj = preference_loss(one(-3.0), one(-13.0), one(-5.0), one(-10.0), 0.5, "sigmoid")
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.5)))
    assert (cr.item(), rj.item()) == (pytest.approx(1.0), pytest.approx(-1.5))
    # IPO hits its minimum 0 when the per-token margin equals 1 / (2 beta) = 2.5 (beta 0.2):
    # chosen ratio +4 over 2 tokens (2/token), rejected ratio -2 over 4 tokens (-0.5/token).
    loss = preference_loss(one(-6.0), one(-12.0), one(-10.0), one(-10.0), 0.2, "ipo",
                           chosen_lengths=one(2), rejected_lengths=one(4))[0]
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    # SimPO: averages -1 and -2 per token, beta 2, gamma 1 -> logits 2*1 - 1 = 1.
    loss = preference_loss(one(-4.0), one(-6.0), None, None, 2.0, "simpo", gamma=1.0,
                           chosen_lengths=one(4), rejected_lengths=one(3))[0]
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))


def test_preference_loss_low_precision_inputs_compute_in_float32():
    pc, pr, rc, rr, lc, lr = _inputs(seed=3)
    bf = lambda a: torch.tensor(a, dtype=torch.bfloat16)
    losses, cr, _ = preference_loss(bf(pc), bf(pr), bf(rc), bf(rr), 0.1, "sigmoid")
    assert losses.dtype == torch.float32 and cr.dtype == torch.float32
    # Reference on the bf16-rounded inputs: only the input rounding may differ, not the arithmetic.
    r = lambda a: bf(a).double().numpy()
    ref = ref_pref(r(pc), r(pr), r(rc), r(rr), lc, lr, 0.1, "sigmoid")
    np.testing.assert_allclose(losses.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_preference_loss_errors_are_one_line():
    x = torch.zeros(3)
    with pytest.raises(ConfigError, match="unknown preference loss_type 'dpo'") as e:
        preference_loss(x, x, x, x, 0.1, "dpo")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs ref_chosen_logps"):
        preference_loss(x, x, None, None, 0.1, "sigmoid")
    with pytest.raises(ConfigError, match="needs chosen_lengths"):
        preference_loss(x, x, None, None, 0.1, "simpo")
    with pytest.raises(ConfigError, match="needs chosen_lengths"):
        preference_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ConfigError, match="beta must be > 0"):
        preference_loss(x, x, x, x, 0.0, "sigmoid")
    with pytest.raises(ConfigError, match="label_smoothing applies"):
        preference_loss(x, x, x, x, 0.1, "hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="ref_rejected_logps has shape"):
        preference_loss(x, x, x, torch.zeros(4), 0.1, "sigmoid")


def test_nll_term():
    s = torch.tensor([-12.0, -3.0, 0.0], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([4, 1, 0])
    out = nll_term(s, n)
    np.testing.assert_allclose(out.detach().numpy(), [3.0, 3.0, 0.0])
    out.sum().backward()
    np.testing.assert_allclose(s.grad.numpy(), [-0.25, -1.0, -1.0])


def ref_bt(c, r, m) -> np.ndarray:
    return np.array([-_logsig(c[i] - r[i] - m[i]) for i in range(len(c))])


@pytest.mark.parametrize("margin_kind", ["none", "scalar", "tensor"])
def test_bradley_terry_matches_reference(margin_kind):
    g = np.random.default_rng(7)
    c, r = g.normal(0, 2, 20), g.normal(0, 2, 20)
    m = {"none": np.zeros(20), "scalar": np.full(20, 0.7), "tensor": g.uniform(0, 2, 20)}[margin_kind]
    margin = {"none": None, "scalar": 0.7, "tensor": torch.tensor(m)}[margin_kind]
    tc = torch.tensor(c, requires_grad=True)
    tr = torch.tensor(r, requires_grad=True)
    loss = bradley_terry_loss(tc, tr, margin)
    np.testing.assert_allclose(loss.detach().numpy(), ref_bt(c, r, m), rtol=1e-12)
    loss.sum().backward()
    np.testing.assert_allclose(tc.grad.numpy(), _fd_grad(lambda x: ref_bt(x, r, m), c), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(tr.grad.numpy(), _fd_grad(lambda x: ref_bt(c, x, m), r), rtol=1e-6, atol=1e-9)


def test_bradley_terry_hand_values_and_accuracy():
    c = torch.tensor([2.0, 0.0, 1.0, -1.0])
    r = torch.tensor([0.0, 0.0, 3.0, -1.5])
    np.testing.assert_allclose(bradley_terry_loss(c, r).numpy(),
                               [math.log1p(math.exp(-2)), math.log(2), math.log1p(math.exp(2)),
                                math.log1p(math.exp(-0.5))], rtol=1e-6)
    # Margin 2 turns the first pair's win into a tie.
    assert bradley_terry_loss(c[:1], r[:1], 2.0).item() == pytest.approx(math.log(2))
    acc = pairwise_accuracy(c, r)
    assert acc.tolist() == [1.0, 0.0, 0.0, 1.0]  # the tie counts as wrong
    assert pairwise_accuracy(r, c).tolist() == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="rejected_scores has shape"):
        bradley_terry_loss(c, r[:2])
