"""Preference-optimization losses on sequence log-probabilities: DPO (with cDPO smoothing), IPO, hinge
(SLiC) and the reference-free SimPO. Inputs are per-example sums of token log-probs of the response;
outputs are per-example losses, so the caller chooses how to average them over pairs and ranks.
Formulas: docs/alignment_losses.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megalite.config import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    # Sequence log-probs are sums over hundreds of tokens; bf16/fp16 would round away the small
    # chosen-vs-rejected differences the loss is about, so compute in at least float32.
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_shape(name: str, t: Tensor | None, like: Tensor) -> None:
    if t is not None and t.shape != like.shape:
        raise ConfigError(f"preference_loss: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example preference loss and the implicit rewards of both responses.

    All log-prob arguments are [N] sums over the response tokens. Returns `(losses [N], chosen_rewards,
    rejected_rewards)`; rewards are detached, `beta * (policy - ref)` (SimPO, which has no reference:
    `beta * policy / length`). The results are in float32, or float64 when an input is float64.

    - `sigmoid`: DPO, `-log sigmoid(beta * z)` with `z` the policy-minus-reference log-ratio margin;
      `label_smoothing = eps` mixes in the flipped label (cDPO: labels are wrong with probability eps).
    - `ipo`: `(z_avg - 1 / (2 beta))**2` where `z_avg` uses each response's log-ratio divided by its
      length (the length-averaged form the IPO authors recommend; pass lengths of 1 for the paper's
      sequence-sum form). Needs `chosen_lengths`/`rejected_lengths`.
    - `hinge`: SLiC, `relu(1 - beta * z)`.
    - `simpo`: `-log sigmoid(beta * (avg_c - avg_r) - gamma)` on length-averaged policy log-probs, no
      reference (`ref_*` may be None and are ignored); `label_smoothing` applies as in `sigmoid`.
      Needs the lengths.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown preference loss_type '{loss_type}' ({' | '.join(LOSS_TYPES)})")
    if not beta > 0:
        raise ConfigError(f"preference_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"preference_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "simpo"):
        raise ConfigError(f"preference_loss: label_smoothing applies to sigmoid and simpo, not {loss_type}")
    if gamma and loss_type != "simpo":
        raise ConfigError(f"preference_loss: gamma (the target margin) applies to simpo only, not {loss_type}")
    needs_ref = loss_type != "simpo"
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ConfigError(f"preference_loss: loss_type {loss_type} needs ref_chosen_logps and ref_rejected_logps")
    needs_lengths = loss_type in ("ipo", "simpo")
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ConfigError(f"preference_loss: loss_type {loss_type} needs chosen_lengths and rejected_lengths")
    _check_shape("policy_rejected_logps", policy_rejected_logps, policy_chosen_logps)
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
                    ("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if needs_ref or name.endswith("lengths"):
            _check_shape(name, t, policy_chosen_logps)

    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps,
                           *((ref_chosen_logps, ref_rejected_logps) if needs_ref else ()))
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if needs_lengths:
        # A length of 0 (empty response) would divide by zero; such a pair carries no signal anyway.
        lc = chosen_lengths.to(dtype).clamp(min=1)
        lr = rejected_lengths.to(dtype).clamp(min=1)

    if loss_type == "simpo":
        avg_c, avg_r = pc / lc, pr / lr
        logits = beta * (avg_c - avg_r) - gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        return losses, (beta * avg_c).detach(), (beta * avg_r).detach()

    rc, rr = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        margin = chosen_ratio / lc - rejected_ratio / lr
        losses = (margin - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def nll_term(chosen_logps_sum: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-example length-normalized NLL of the chosen response, `-logp_sum / length` ([N]).

    RPO adds `alpha * nll_term(...)` to the DPO loss so the chosen answer's likelihood does not sink
    while the margin grows. Empty responses (length 0) give 0."""
    if chosen_lengths.shape != chosen_logps_sum.shape:
        raise ConfigError(f"nll_term: chosen_lengths has shape {tuple(chosen_lengths.shape)}, "
                          f"expected {tuple(chosen_logps_sum.shape)}")
    dtype = _compute_dtype(chosen_logps_sum)
    return -chosen_logps_sum.to(dtype) / chosen_lengths.to(dtype).clamp(min=1)


def run(cfg) -> list[dict]:
    """`megalite dpo` (the stage lives in dpo_stage.py)."""
    from megalite.alignment.dpo_stage import DPOStage  # noqa: PLC0415 - the losses stay import-light
    from megalite.training.trainer import run_stage  # noqa: PLC0415

    if cfg.model.output_head != "lm":
        raise ConfigError(f"megalite dpo trains a language model: model.output_head must be lm, "
                          f"got '{cfg.model.output_head}'")
    return run_stage(cfg, DPOStage(cfg.dpo))
