"""PPO and GRPO math on per-token [B, T] tensors with a mask of real response tokens: masked statistics,
GAE, KL-shaped token rewards, the clipped policy and value losses with their aggregations, GRPO group
advantages, DAPO's dynamic-sampling filter and overlong penalty, and a DP-mergeable reward normalizer.
Masks are bool or 0/1 float tensors of the values' shape; values at masked positions are never read
(they may hold garbage, even NaN). Formulas: docs/alignment_losses.md."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.config import ConfigError

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")


def _check(fn: str, name: str, t: Tensor, like: Tensor) -> None:
    if t.shape != like.shape:
        raise ConfigError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")


def _dtype(*tensors: Tensor) -> torch.dtype:
    # Reductions over a whole batch of tokens lose too much in bf16; compute in >= float32.
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _masked(values: Tensor, mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(values with masked positions set to 0, mask as 0/1 floats), both in `dtype`."""
    m = mask.to(torch.bool)
    return torch.where(m, values.to(dtype), 0.0), m.to(dtype)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the real tokens (all of them, or along `dim`); 0 where there are none."""
    _check("masked_mean", "mask", mask, values)
    v, m = _masked(values, mask, _dtype(values))
    if dim is None:
        return v.sum() / m.sum().clamp(min=1)
    return v.sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Population (biased, divide-by-n) variance over all real tokens. Biased because whitening
    normalizes this exact set of tokens rather than estimating a wider population, and because it
    is what count/sum/sumsq sums merged over DP ranks give."""
    mean = masked_mean(values, mask)
    return masked_mean((values.to(mean.dtype) - mean) ** 2, mask)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """`(values - mean) / sqrt(var + eps)` with mean and biased variance over the real tokens; with
    `shift_mean=False` the mean is added back (scale only). Masked positions come out 0."""
    _check("masked_whiten", "mask", mask, values)
    values, _ = _masked(values, mask, _dtype(values))
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.to(torch.bool), out, 0.0)


def _check_contiguous(fn: str, mask: Tensor) -> Tensor:
    m = mask.to(torch.bool)
    if m.dim() != 2:
        raise ConfigError(f"{fn}: expected [batch, tokens] tensors, got mask of shape {tuple(m.shape)}")
    starts = m[:, :1].sum(1) + (m[:, 1:] & ~m[:, :-1]).sum(1)
    if bool((starts > 1).any()):
        raise ConfigError(f"{fn}: mask has a gap inside a response; each row's real tokens must be one "
                          f"contiguous span (right padding)")
    return m


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over [B, T] responses: returns `(advantages, returns)`.

    `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lam * A_{t+1}`, with `V` and `A`
    taken as 0 after the last real token (the episode ends there; no bootstrap). `returns = A + V`.
    The real tokens of a row must be one contiguous span (right padding; a masked prompt before the
    response is fine). Outputs are 0 at masked positions and carry no gradient."""
    _check("gae", "values", values, rewards)
    _check("gae", "mask", mask, rewards)
    m = _check_contiguous("gae", mask)
    dtype = _dtype(rewards, values)
    r = torch.where(m, rewards.to(dtype), 0.0)
    v = torch.where(m, values.to(dtype), 0.0)
    adv = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    next_v = torch.zeros_like(r[:, 0])
    # Pads after the response have r = V = 0, so `running` stays 0 until the last real token.
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * running
        adv[:, t] = running
        next_v = v[:, t]
    adv = torch.where(m, adv, 0.0)
    return adv, torch.where(m, adv + v, 0.0)


def kl_estimator(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled from the policy (Schulman 2020).

    With `log_ratio = logp - ref_logp`: k1 = `log_ratio` (unbiased, high variance, can be negative),
    k2 = `log_ratio**2 / 2` (biased, low variance), k3 = `exp(-log_ratio) + log_ratio - 1`
    (unbiased and never negative). Differentiable; no masking."""
    if kind not in KL_KINDS:
        raise ConfigError(f"unknown KL estimator '{kind}' ({' | '.join(KL_KINDS)})")
    _check("kl_estimator", "ref_logp", ref_logp, logp)
    log_ratio = logp.to(_dtype(logp, ref_logp)) - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(-log_ratio) + log_ratio - 1


def _last_real_index(m: Tensor) -> Tensor:
    """Index of each row's last real token, -1 for rows without any."""
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, -1).max(dim=1).values


@torch.no_grad()
def token_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float,
                  kl_kind: str = "k1") -> Tensor:
    """PPO's per-token rewards [B, T]: `-kl_coef * KL_t` on every real token, plus the reward model's
    scalar `score` [B] on each row's last real token (the EOS, or the last token of a truncated answer).

    A penalty for answers that never emitted EOS is the caller's business: replace or lower their
    `score` before calling. Rows without real tokens get no score. 0 at masked positions; no grad."""
    _check("token_rewards", "ref_logp", ref_logp, logp)
    _check("token_rewards", "mask", mask, logp)
    if score.shape != logp.shape[:1]:
        raise ConfigError(f"token_rewards: score has shape {tuple(score.shape)}, expected ({logp.shape[0]},)")
    m = _check_contiguous("token_rewards", mask)
    kl = kl_estimator(logp, ref_logp, kl_kind)
    rewards = torch.where(m, -kl_coef * kl, 0.0)
    last = _last_real_index(m)
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += score.to(rewards.dtype)[rows]
    return rewards


def aggregate(per_token: Tensor, mask: Tensor, aggregation: str, norm_length: int | None = None,
              reduction: str = "mean") -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    - `token_mean`: sum over all real tokens of the batch / their count (DAPO: long answers weigh
      in proportion to their tokens).
    - `seq_mean_token_mean`: each response's token mean, averaged over responses (GRPO).
    - `seq_mean_token_sum_norm`: each response's token sum / `norm_length`, averaged over responses
      (Dr. GRPO; `norm_length` should be the fixed generation budget, default T).
    Responses without real tokens are not counted. `reduction="sum"` returns the numerator only (the
    caller divides by its global count of units: real tokens for `token_mean`, non-empty responses
    otherwise), so the mean can be taken across micro-batches and DP ranks."""
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"unknown loss aggregation '{aggregation}' ({' | '.join(AGGREGATIONS)})")
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"unknown reduction '{reduction}' (mean | sum)")
    _check("aggregate", "mask", mask, per_token)
    v, m = _masked(per_token, mask, _dtype(per_token))
    if aggregation == "token_mean":
        total, units = v.sum(), m.sum()
    else:
        tokens = m.sum(-1)
        if aggregation == "seq_mean_token_mean":
            per_seq = v.sum(-1) / tokens.clamp(min=1)
        else:
            length = per_token.shape[-1] if norm_length is None else norm_length
            if length <= 0:
                raise ConfigError(f"aggregate: norm_length must be > 0, got {length}")
            per_seq = v.sum(-1) / length
        total, units = per_seq.sum(), (tokens > 0).sum().to(v.dtype)
    return total if reduction == "sum" else total / units.clamp(min=1)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 0.2,
                clip_high: float | None = None, aggregation: str = "token_mean", norm_length: int | None = None,
                reduction: str = "mean") -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate: returns `(loss, clip_fraction, approx_kl)`.

    Per token, with `ratio = exp(logp - old_logp)`: `max(-A * ratio, -A * clamp(ratio, 1 - clip_low,
    1 + clip_high))`, reduced by `aggregate`. `clip_high` defaults to `clip_low` (symmetric PPO);
    DAPO's clip-higher sets it larger. `advantages` is per token [B, T] or per response [B] (GRPO).
    `clip_fraction` (share of real tokens whose clipped term was the active one) and `approx_kl`
    (k3 estimate of KL(old || new)) are detached token means over this call."""
    _check("policy_loss", "old_logp", old_logp, logp)
    _check("policy_loss", "mask", mask, logp)
    if clip_high is None:
        clip_high = clip_low
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ConfigError(f"policy_loss: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    if advantages.shape != logp.shape and advantages.shape != (*logp.shape[:-1], 1):
        raise ConfigError(f"policy_loss: advantages has shape {tuple(advantages.shape)}, expected "
                          f"{tuple(logp.shape)} or {tuple(logp.shape[:-1])}")
    dtype = _dtype(logp, old_logp, advantages)
    m = mask.to(torch.bool)
    # Zero the pads before exp(): garbage there would otherwise turn into inf/NaN gradients.
    adv = torch.where(m, advantages.to(dtype).detach(), 0.0)
    log_ratio = torch.where(m, logp.to(dtype) - old_logp.to(dtype).detach(), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, norm_length, reduction)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2,
               aggregation: str = "token_mean", norm_length: int | None = None,
               reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss: returns `(loss, clip_fraction)`.

    Per token `0.5 * max((V - R)**2, (V_clip - R)**2)` with `V_clip = V_old + clamp(V - V_old, -clip,
    clip)`, so a step that moves the value more than `clip` away from the rollout's gets no credit for
    it. `clip=None` gives the plain `0.5 * (V - R)**2`. Reduced by `aggregate`; `clip_fraction` is the
    detached share of real tokens where the clipped error was the larger."""
    _check("value_loss", "old_values", old_values, values)
    _check("value_loss", "returns", returns, values)
    _check("value_loss", "mask", mask, values)
    dtype = _dtype(values, old_values, returns)
    m = mask.to(torch.bool)
    v, ret = torch.where(m, values.to(dtype), 0.0), torch.where(m, returns.to(dtype).detach(), 0.0)
    unclipped = (v - ret) ** 2
    if clip is None:
        per_token, clip_fraction = unclipped, torch.zeros((), dtype=dtype, device=values.device)
    else:
        if clip <= 0:
            raise ConfigError(f"value_loss: clip must be > 0 or None, got {clip}")
        old = torch.where(m, old_values.to(dtype).detach(), 0.0)
        clipped = (old + torch.clamp(v - old, -clip, clip) - ret) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clip_fraction = masked_mean((clipped > unclipped).to(dtype), mask).detach()
    return 0.5 * aggregate(per_token, mask, aggregation, norm_length, reduction), clip_fraction


def _groups(fn: str, rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ConfigError(f"{fn}: rewards must be 1-D [num_prompts * group_size], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ConfigError(f"{fn}: {rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.to(_dtype(rewards)).reshape(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's outcome advantages: each reward minus its group's mean, divided by the group's sample
    std (Bessel-corrected, as common GRPO implementations do) plus `eps`; `scale_by_std=False` skips
    the division (Dr. GRPO). `rewards` holds `group_size` consecutive answers per prompt; the result
    has its shape. A group whose rewards are all equal gets advantages 0."""
    r = _groups("group_advantages", rewards, group_size)
    if scale_by_std and group_size < 2:
        raise ConfigError("group_advantages: scale_by_std needs group_size >= 2")
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def filter_uniform_groups(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic sampling: a bool keep-mask [num_prompts], False for groups whose rewards are all
    equal (their group advantages are 0, so they add no gradient, only dilute the batch)."""
    r = _groups("filter_uniform_groups", rewards, group_size)
    return r.amax(dim=1) != r.amin(dim=1)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, to add to the rewards: 0 up to `max_len - buffer` tokens, then
    falling linearly to `-penalty` at `max_len`, and `-penalty` beyond."""
    if not 0 < buffer <= max_len:
        raise ConfigError(f"overlong_penalty: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    lengths = lengths.to(_dtype(lengths))
    return penalty * torch.clamp((max_len - buffer - lengths) / buffer, min=-1.0, max=0.0)


class RunningMoments:
    """Running mean/std of rewards for PPO reward normalization.

    Keeps float64 count, sum and sum of squares, so per-rank statistics merge by plain summation: pass
    the DP group (or `dist.group.WORLD`) to `update` and every rank ends with identical moments. The
    variance is the population one (divide by n), like `masked_var`. Before any update the tracker is
    the identity (mean 0, std 1)."""

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.count = 0.0
        self.sum = 0.0
        self.sumsq = 0.0

    @staticmethod
    def moments(x: Tensor, mask: Tensor | None = None) -> Tensor:
        """This batch's float64 [count, sum, sumsq], over the real entries when `mask` is given."""
        x = x.detach().to(torch.float64)
        if mask is not None:
            _check("RunningMoments", "mask", mask, x)
            x, m = _masked(x, mask, torch.float64)
        else:
            m = torch.ones_like(x)
        return torch.stack([m.sum(), x.sum(), (x * x).sum()])

    def update(self, x: Tensor, mask: Tensor | None = None, group: dist.ProcessGroup | None = None) -> None:
        """Add a batch; with `group`, the batch moments are first summed over that group's ranks."""
        stats = self.moments(x, mask)
        if group is not None:
            dist.all_reduce(stats, group=group)
        count, total, total_sq = stats.tolist()
        self.count += count
        self.sum += total
        self.sumsq += total_sq

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def var(self) -> float:
        if not self.count:
            return 1.0
        return max(self.sumsq / self.count - self.mean**2, 0.0)

    @property
    def std(self) -> float:
        return self.var**0.5

    def normalize(self, x: Tensor, shift_mean: bool = True) -> Tensor:
        """`(x - mean) / (std + eps)`, or `x / (std + eps)` with `shift_mean=False`."""
        out = x - self.mean if shift_mean else x
        return out / (self.std + self.eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.sum, self.sumsq = float(state["count"]), float(state["sum"]), float(state["sumsq"])
