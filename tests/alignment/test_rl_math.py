"""PPO/GRPO/DAPO math against plain float64 references (per-row loops over numpy arrays), hand-worked
GAE and penalty numbers, and the reward normalizer merged over two real gloo ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megalite.alignment.rl import (
    RunningMoments,
    aggregate,
    filter_uniform_groups,
    gae,
    group_advantages,
    kl_estimator,
    masked_mean,
    masked_whiten,
    overlong_penalty,
    policy_loss,
    token_rewards,
    value_loss,
)
from megalite.config import ConfigError
from megalite.testing import run_distributed

GARBAGE = 1e4  # written into padded positions: any leak into a result shows up at once


def _batch(b: int = 6, t: int = 12, seed: int = 0, offsets: bool = False):
    """Random [b, t] values and a mask whose rows are one contiguous span of varied length (some rows
    start late, like a masked prompt, when `offsets`), with garbage outside the span."""
    g = np.random.default_rng(seed)
    mask = np.zeros((b, t), dtype=bool)
    spans = []
    for i in range(b):
        n = int(g.integers(1, t + 1)) if i else t  # row 0 is full length
        start = int(g.integers(0, t - n + 1)) if offsets else 0
        mask[i, start:start + n] = True
        spans.append((start, start + n))
    return g, mask, spans


def _fill(g, mask, scale=1.0, loc=0.0):
    x = g.normal(loc, scale, mask.shape)
    x[~mask] = GARBAGE
    return x


T64 = lambda a, grad=False: torch.tensor(a, dtype=torch.float64, requires_grad=grad)


# ---- masked statistics ----------------------------------------------------------------------------

@pytest.mark.parametrize("float_mask", [False, True])
def test_masked_mean_and_whiten(float_mask):
    g, mask, _ = _batch(seed=1)
    x = _fill(g, mask, 2.0, 1.5)
    x[~mask] = np.nan  # never read
    m = T64(mask.astype(np.float64)) if float_mask else torch.tensor(mask)
    real = x[mask]
    assert masked_mean(T64(x), m).item() == pytest.approx(real.mean(), rel=1e-12)
    rows = [x[i][mask[i]].mean() for i in range(len(x))]
    np.testing.assert_allclose(masked_mean(T64(x), m, dim=1).numpy(), rows, rtol=1e-12)

    w = masked_whiten(T64(x), m).numpy()
    ref = (x - real.mean()) / np.sqrt(real.var(ddof=0) + 1e-8)  # biased (population) variance
    np.testing.assert_allclose(w[mask], ref[mask], rtol=1e-10)
    assert (w[~mask] == 0).all()
    # The Bessel-corrected version would differ measurably on this many tokens.
    assert not np.allclose(w[mask], ((x - real.mean()) / real.std(ddof=1))[mask], rtol=1e-4)
    w = masked_whiten(T64(x), m, shift_mean=False).numpy()
    np.testing.assert_allclose(w[mask], (ref + real.mean())[mask], rtol=1e-10)


def test_masked_whiten_small_hand_example():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    m = torch.tensor([[True, True, True, False]])
    # mean 2, population variance 2/3.
    np.testing.assert_allclose(masked_whiten(x, m).numpy(), [[-math.sqrt(1.5), 0, math.sqrt(1.5), 0]], rtol=1e-5)


# ---- GAE ------------------------------------------------------------------------------------------

def ref_gae(r, v, spans, gamma, lam):
    adv = np.zeros_like(r)
    for i, (s, e) in enumerate(spans):
        nxt_a = 0.0
        for t in reversed(range(s, e)):
            nxt_v = v[i, t + 1] if t + 1 < e else 0.0
            delta = r[i, t] + gamma * nxt_v - v[i, t]
            nxt_a = delta + gamma * lam * nxt_a
            adv[i, t] = nxt_a
    ret = np.zeros_like(r)
    for i, (s, e) in enumerate(spans):
        ret[i, s:e] = adv[i, s:e] + v[i, s:e]
    return adv, ret


def test_gae_hand_example():
    nan = float("nan")
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [2.0, 7.0, 7.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 100.0], [0.5, nan, nan, nan]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0 by hand: d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03; d0 = .9*.6 - .5 = .04;
    # A2 = .3, A1 = .03 + .72*.3 = .246, A0 = .04 + .72*.246 = .21712. Row 1: A0 = 2 - .5.
    np.testing.assert_allclose(adv.numpy(), [[0.21712, 0.246, 0.3, 0], [1.5, 0, 0, 0]], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ret.numpy(), [[0.71712, 0.846, 1.0, 0], [2.0, 0, 0, 0]], rtol=1e-12, atol=1e-15)
    # gamma = lam = 1: advantage = reward-to-go minus value; returns = reward-to-go.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv[0, :3].numpy(), [0.5, 0.4, 0.3], rtol=1e-12)
    np.testing.assert_allclose(ret[0, :3].numpy(), [1.0, 1.0, 1.0], rtol=1e-12)
    # lam = 0: one-step TD errors.
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    np.testing.assert_allclose(adv[0, :3].numpy(), [0.04, 0.03, 0.3], rtol=1e-12)


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.7, 0.3)])
def test_gae_matches_reference(gamma, lam, offsets):
    g, mask, spans = _batch(b=7, t=15, seed=2, offsets=offsets)
    r, v = _fill(g, mask), _fill(g, mask)
    adv, ret = gae(T64(r), T64(v), torch.tensor(mask), gamma, lam)
    ref_adv, ref_ret = ref_gae(r, v, spans, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), ref_ret, rtol=1e-10, atol=1e-12)
    assert not adv.requires_grad


def test_gae_rejects_gaps_and_keeps_dtype():
    x = torch.zeros(2, 4)
    with pytest.raises(ConfigError, match="gap inside a response"):
        gae(x, x, torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0]]), 1.0, 1.0)
    adv, _ = gae(x.bfloat16(), x.bfloat16(), torch.ones(2, 4, dtype=torch.bool), 1.0, 1.0)
    assert adv.dtype == torch.float32


# ---- KL estimators and token rewards --------------------------------------------------------------

def test_kl_estimators_formulas():
    g = np.random.default_rng(3)
    lp, rp = g.normal(-2, 1, (4, 9)), g.normal(-2, 1, (4, 9))
    d = rp - lp
    for kind, ref in (("k1", lp - rp), ("k2", 0.5 * (lp - rp) ** 2), ("k3", np.exp(d) - d - 1)):
        np.testing.assert_allclose(kl_estimator(T64(lp), T64(rp), kind).numpy(), ref, rtol=1e-12)
    with pytest.raises(ConfigError, match="unknown KL estimator 'k4'"):
        kl_estimator(T64(lp), T64(rp), "k4")


def test_kl_estimators_estimate_kl_of_sampled_policy():
    """Tokens drawn from p: k1 and k3 average to the exact KL(p || q); k3 with the ratio inverted
    (or with the arguments swapped) would not."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    exact = float((p * (p / q).log()).sum())
    reverse = float((q * (q / p).log()).sum())
    assert abs(exact - reverse) > 0.05
    tok = torch.multinomial(p, 400_000, replacement=True, generator=gen)
    lp, lq = p.log()[tok], q.log()[tok]
    for kind in ("k1", "k3"):
        assert kl_estimator(lp, lq, kind).mean().item() == pytest.approx(exact, abs=0.01)
    assert abs(kl_estimator(lq, lp, "k3").mean().item() - exact) > 0.05


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_token_rewards_matches_reference(kind):
    g, mask, spans = _batch(b=6, t=10, seed=4, offsets=True)
    lp, rp = _fill(g, mask, 1, -2), _fill(g, mask, 1, -2)
    score = g.normal(0, 3, 6)
    out = token_rewards(T64(score), T64(lp), T64(rp), torch.tensor(mask), kl_coef=0.05, kl_kind=kind).numpy()
    ref = np.zeros_like(lp)
    for i, (s, e) in enumerate(spans):
        for t in range(s, e):
            d = rp[i, t] - lp[i, t]
            kl = -d if kind == "k1" else math.exp(d) - d - 1
            ref[i, t] = -0.05 * kl + (score[i] if t == e - 1 else 0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


def test_token_rewards_hand_example():
    lp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    rp = torch.tensor([[-1.5, -2.0, -2.0, 9.0], [-1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    out = token_rewards(torch.tensor([2.0, 4.0]), lp, rp, mask, kl_coef=0.1)
    # KL_t = logp - ref = [.5, 0, -1]; score 2 on the third token; the empty row gets nothing.
    np.testing.assert_allclose(out.numpy(), [[-0.05, 0, 0.1 + 2.0, 0], [0, 0, 0, 0]], rtol=1e-6)


# ---- policy and value losses ----------------------------------------------------------------------

def ref_policy(lp, old, adv, mask, spans, cl, ch, aggregation, norm_length):
    """Per token: the clipped surrogate, and its derivative in logp by cases (clip inactive inside
    [1 - cl, 1 + ch]; outside, only the side that limits the update's benefit is clipped)."""
    b, t = lp.shape
    per, grad = np.zeros((b, t)), np.zeros((b, t))
    clipped = np.zeros((b, t), dtype=bool)
    for i, (s, e) in enumerate(spans):
        for j in range(s, e):
            a, ratio = adv[i, j], math.exp(lp[i, j] - old[i, j])
            per[i, j] = max(-a * ratio, -a * min(max(ratio, 1 - cl), 1 + ch))
            clipped[i, j] = (a > 0 and ratio > 1 + ch) or (a < 0 and ratio < 1 - cl)
            grad[i, j] = 0.0 if clipped[i, j] else -a * ratio
    n_tok = mask.sum()
    if aggregation == "token_mean":
        weight = mask / n_tok
    else:
        denom = mask.sum(1, keepdims=True) if aggregation == "seq_mean_token_mean" else norm_length
        weight = mask / denom / len(spans)
    kl = sum(math.expm1(lp[i, j] - old[i, j]) - (lp[i, j] - old[i, j]) for i, (s, e) in enumerate(spans)
             for j in range(s, e)) / n_tok
    return (per * weight).sum(), grad * weight, clipped[mask].mean(), kl


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("cl,ch", [(0.2, 0.2), (0.1, 0.3)])
@pytest.mark.parametrize("per_sequence_adv", [False, True])
def test_policy_loss_matches_reference(aggregation, cl, ch, per_sequence_adv):
    g, mask, spans = _batch(b=6, t=14, seed=5)
    lp = _fill(g, mask, 1.0, -2.0)
    old = np.where(mask, lp + g.normal(0, 0.3, mask.shape), GARBAGE)
    adv = g.normal(0, 1, (6, 1)) * np.ones((1, 14)) if per_sequence_adv else _fill(g, mask)
    adv_arg = T64(adv[:, 0]) if per_sequence_adv else T64(adv)
    tlp = T64(lp, True)
    loss, clipfrac, kl = policy_loss(tlp, T64(old), adv_arg, torch.tensor(mask), cl, ch, aggregation, norm_length=20)
    ref_loss, ref_grad, ref_cf, ref_kl = ref_policy(lp, old, adv, mask, spans, cl, ch, aggregation, 20)
    assert 0.1 < ref_cf < 0.9  # both branches exercised
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    assert clipfrac.item() == pytest.approx(ref_cf, rel=1e-12)
    assert kl.item() == pytest.approx(ref_kl, rel=1e-10)
    loss.backward()
    np.testing.assert_allclose(tlp.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-14)


def test_policy_loss_asymmetric_clip_sides():
    # ratio 1.25 with A > 0: inside clip_high = 0.3 (gradient flows), outside clip_high = 0.2.
    # ratio 0.85 with A < 0: outside clip_low = 0.1 (clipped), inside clip_low = 0.2.
    lp = torch.log(torch.tensor([[1.25, 0.85]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, clipfrac, _ = policy_loss(lp, old, adv, m, clip_low=0.1, clip_high=0.3)
    loss.backward()
    assert loss.item() == pytest.approx((-1.25 + 0.9) / 2)
    np.testing.assert_allclose(lp.grad.numpy(), [[-1.25 / 2, 0.0]])
    assert clipfrac.item() == 0.5
    lp.grad = None
    loss, clipfrac, _ = policy_loss(lp, old, adv, m, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 0.85) / 2)
    np.testing.assert_allclose(lp.grad.numpy(), [[0.0, 0.85 / 2]])
    assert clipfrac.item() == 0.5


def test_aggregations_by_hand_and_sum_reduction():
    per = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert aggregate(per, m, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(per, m, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(per, m, "seq_mean_token_sum_norm", norm_length=8).item() == pytest.approx((6 / 8 + 4 / 8) / 2)
    assert aggregate(per, m, "seq_mean_token_sum_norm").item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate(per, m, "token_mean", reduction="sum").item() == pytest.approx(10)
    assert aggregate(per, m, "seq_mean_token_mean", reduction="sum").item() == pytest.approx(6)
    with pytest.raises(ConfigError, match="unknown loss aggregation 'seq_sum'"):
        aggregate(per, m, "seq_sum")


def ref_value(v, old, ret, mask, clip):
    per = np.zeros_like(v)
    for i, j in zip(*np.nonzero(mask)):
        vc = old[i, j] + min(max(v[i, j] - old[i, j], -clip), clip)
        per[i, j] = 0.5 * max((v[i, j] - ret[i, j]) ** 2, (vc - ret[i, j]) ** 2)
    return per


def test_value_loss_matches_reference():
    g, mask, spans = _batch(b=5, t=11, seed=6)
    v, ret = _fill(g, mask), _fill(g, mask)
    old = np.where(mask, v + g.normal(0, 0.4, mask.shape), GARBAGE)
    tv = T64(v, True)
    loss, clipfrac = value_loss(tv, T64(old), T64(ret), torch.tensor(mask), clip=0.2)
    per = ref_value(v, old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(per[mask].mean(), rel=1e-12)
    loss.backward()
    h, fd = 1e-6, np.zeros_like(v)
    fd[mask] = ((ref_value(v + h, old, ret, mask, 0.2) - ref_value(v - h, old, ret, mask, 0.2)) / (2 * h))[mask]
    np.testing.assert_allclose(tv.grad.numpy(), fd / mask.sum(), rtol=1e-6, atol=1e-10)
    assert 0.1 < clipfrac.item() < 0.9
    vc = old + np.clip(v - old, -0.2, 0.2)
    assert clipfrac.item() == pytest.approx(((vc - ret) ** 2 > (v - ret) ** 2)[mask].mean())
    # No clipping: plain half squared error.
    loss, _ = value_loss(T64(v), T64(old), T64(ret), torch.tensor(mask), clip=None)
    assert loss.item() == pytest.approx((0.5 * (v - ret) ** 2)[mask].mean(), rel=1e-12)


def test_value_loss_hand_example():
    # V_old 0, V 1, R 2, clip .5: unclipped error 1, clipped (0.5 - 2)^2 = 2.25 wins -> no gradient.
    v = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss, cf = value_loss(v, torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), clip=0.5)
    # Second token: R 0, unclipped 1, clipped 0.25 -> unclipped, gradient (V - R) = 1.
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    loss.backward()
    np.testing.assert_allclose(v.grad.numpy(), [[0.0, 0.5]])
    assert cf.item() == 0.5


# ---- GRPO / DAPO ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_matches_reference(scale_by_std):
    g = np.random.default_rng(8)
    r = g.normal(0, 1, 3 * 5)  # 3 prompts x 5 answers, consecutive
    r[5:10] = 0.5  # a uniform group
    out = group_advantages(T64(r), 5, scale_by_std=scale_by_std).numpy()
    ref = np.zeros_like(r)
    for p in range(3):
        grp = r[p * 5:(p + 1) * 5]
        ref[p * 5:(p + 1) * 5] = (grp - grp.mean()) / ((grp.std(ddof=1) + 1e-6) if scale_by_std else 1.0)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15)
    assert (out[5:10] == 0).all()


def test_group_advantages_hand_and_errors():
    # Group [1, 0, 0, 0]: mean .25, sample std .5 -> [1.5, -.5, -.5, -.5].
    out = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, eps=0.0)
    np.testing.assert_allclose(out.numpy(), [1.5, -0.5, -0.5, -0.5], rtol=1e-6)
    with pytest.raises(ConfigError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ConfigError, match="group_size >= 2"):
        group_advantages(torch.zeros(6), 1)


def test_filter_uniform_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.7])
    assert filter_uniform_groups(r, 3).tolist() == [False, True, False, True]
    r = torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 1.0])
    assert filter_uniform_groups(r, 4).tolist() == [False, True]
    assert filter_uniform_groups(r, 2).tolist() == [False, False, False, True]


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 15, 16, 18, 20, 25])
    np.testing.assert_allclose(overlong_penalty(lengths, 20, 5).numpy(), [0, 0, -0.2, -0.6, -1, -1], atol=1e-7)
    np.testing.assert_allclose(overlong_penalty(lengths, 20, 5, penalty=0.5).numpy(),
                               [0, 0, -0.1, -0.3, -0.5, -0.5], atol=1e-7)
    with pytest.raises(ConfigError, match="buffer <= max_len"):
        overlong_penalty(lengths, 20, 0)


# ---- reward normalization -------------------------------------------------------------------------

def test_running_moments_single_process():
    g = np.random.default_rng(9)
    batches = [g.normal(3, 2, 7), g.normal(-1, 0.5, 11), g.normal(0, 4, 5)]
    rm = RunningMoments()
    assert rm.normalize(torch.tensor([2.0])).item() == pytest.approx(2.0)  # identity before data
    for b in batches:
        rm.update(T64(b))
    allx = np.concatenate(batches)
    assert rm.mean == pytest.approx(allx.mean(), rel=1e-12)
    assert rm.std == pytest.approx(allx.std(ddof=0), rel=1e-12)
    x = T64([1.0, 2.0])
    np.testing.assert_allclose(rm.normalize(x).numpy(), (x.numpy() - allx.mean()) / (allx.std() + 1e-8))
    np.testing.assert_allclose(rm.normalize(x, shift_mean=False).numpy(), x.numpy() / (allx.std() + 1e-8))
    again = RunningMoments()
    again.load_state_dict(rm.state_dict())
    assert (again.mean, again.std) == (rm.mean, rm.std)
    # With a mask only the real entries count.
    rm = RunningMoments()
    rm.update(T64([[1.0, 3.0, 100.0]]), mask=torch.tensor([[True, True, False]]))
    assert (rm.count, rm.mean, rm.var) == (2, 2.0, 1.0)


def _moments_worker(rank, world, batches):
    rm = RunningMoments()
    for b in batches[rank::world]:
        rm.update(torch.tensor(b), group=dist.group.WORLD)
    return rm.state_dict()


@pytest.mark.slow
def test_running_moments_merge_over_ranks():
    g = np.random.default_rng(10)
    batches = [g.normal(i, 1 + i, 4 + i) for i in range(4)]  # rank 0 gets 0, 2; rank 1 gets 1, 3
    states = run_distributed(_moments_worker, 2, batches)
    assert states[0] == states[1]
    rm = RunningMoments()
    rm.load_state_dict(states[0])
    allx = np.concatenate(batches)
    assert rm.count == len(allx)
    assert rm.mean == pytest.approx(allx.mean(), rel=1e-12)
    assert rm.std == pytest.approx(allx.std(), rel=1e-12)


# ---- devices and dtypes ---------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_inputs_on_device_match_float64(device):
    """bf16 inputs and float masks on `device`: results stay on it, come out in float32 and agree with
    the float64 CPU results on the same (bf16-rounded) numbers."""
    g, mask, _ = _batch(b=5, t=9, seed=11)
    lp = _fill(g, mask, 0.5, -2.0)
    old = np.where(mask, lp + g.normal(0, 0.2, mask.shape), GARBAGE)
    adv, v, ret = _fill(g, mask), _fill(g, mask), _fill(g, mask)
    score = g.normal(0, 1, 5)
    args64 = [torch.tensor(a).bfloat16().double() for a in (lp, old, adv, v, ret, score)]
    argsdev = [a.bfloat16().to(device) for a in args64]
    m64, mdev = torch.tensor(mask), torch.tensor(mask, dtype=torch.float32, device=device)

    def run(a, m):
        lp_, old_, adv_, v_, ret_, score_ = a
        return [policy_loss(lp_, old_, adv_, m, 0.2, 0.28, "seq_mean_token_mean")[0],
                value_loss(v_, old_, ret_, m, 0.2)[0], *gae(ret_, v_, m, 0.99, 0.95),
                token_rewards(score_, lp_, old_, m, 0.1, "k3"), masked_whiten(adv_, m),
                group_advantages(score_[:4], 2)]

    for want, got in zip(run(args64, m64), run(argsdev, mdev)):
        assert got.device.type == device and got.dtype == torch.float32
        np.testing.assert_allclose(got.cpu().double().numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
