"""`megalite ppo`: PPO with a critic, a frozen reference and a reward model or function (docs/rl.md).

One answer per prompt. The reward is per token: `-rl.kl_coef * KL_t` (estimator `rl.kl_estimator`,
old policy vs reference) on every answer token, plus the score (reward model at the last real
token, or `reward.function`; minus `rl.no_eos_penalty` without EOS; divided by a running std
merged over DP with `rl.reward_norm`) on the last one. GAE (`rl.gamma`, `rl.lam`) over the
critic's values gives advantages, whitened over the real tokens of the whole step on all DP
ranks (`rl.whiten_advantages`), and returns.

The critic is a second model of the policy's architecture with the score head (initialized from
`reward.model` when given, else from the initial policy's trunk with a fresh head) and its own
optimizer (same optim settings and lr schedule). It is trained inside the stage's data step, on the
rollout it just scored: `rl.ppo_epochs` passes of the clipped value loss (`rl.value_clip`),
each one optimizer step through the trainer's own forward/backward schedule. The policy then takes
the trainer's step on the clipped surrogate. The critic and the reward-norm moments are saved with
every checkpoint in `<checkpoint dir>_critic` and resumed from there.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from megalite.alignment import rl as rlmath
from megalite.alignment.rollout import RLStage, forward_pass, model_inputs
from megalite.checkpoint.dist import (
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    wait_for_pending_save,
)
from megalite.checkpoint.pretrained import load_pretrained
from megalite.config import Config, ConfigError
from megalite.parallel.comm import all_reduce, broadcast
from megalite.parallel.finalize import finalize_grads
from megalite.training.build import build_model
from megalite.training.lr_schedule import lr_at
from megalite.training.optimizer import build_optimizer
from megalite.training.trainer import run_stage


class CriticStep:
    """The critic's forward (scores [b, s]) and clipped value loss SUM over the micro-batch's tokens."""

    metric_names = ("vf_clip_fraction",)

    def __init__(self, clip: float | None) -> None:
        self.clip = clip

    def forward(self, model, mb: dict, hidden):
        model.eval()  # dropout off in every model
        return model(**model_inputs(model, mb, hidden, labels=False))

    def loss(self, output: torch.Tensor, mb: dict):
        m = mb["mask"]
        loss, cf = rlmath.value_loss(output.float(), mb["values"], mb["returns"], m, self.clip, "token_mean",
                                     reduction="sum")
        return loss, {"vf_clip_fraction": cf * m.sum()}


class PPOStage(RLStage):
    name = "ppo"
    group = 1

    def build_datasets(self, trainer) -> tuple[Any, Any | None]:
        rl = trainer.cfg.rl
        if rl.aggregation not in rlmath.AGGREGATIONS:
            raise ConfigError(f"rl.aggregation '{rl.aggregation}' is not one of {' | '.join(rlmath.AGGREGATIONS)}")
        rlmath.kl_estimator(torch.zeros(1), torch.zeros(1), rl.kl_estimator)  # rejects an unknown name now
        self.rl = rl
        self.moments = rlmath.RunningMoments()
        return super().build_datasets(trainer)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        cfg = trainer.cfg
        ccfg = copy.deepcopy(cfg)
        ccfg.model.output_head = "score"
        self.critic_cfg = ccfg
        (critic,) = build_model(ccfg, trainer.ps, None, schedule_checked=True)
        if cfg.reward.model:
            load_pretrained(cfg.reward.model, [critic], None, trainer.ps)
        else:  # the initial policy's trunk; the value head starts fresh
            trunk = {k: v for k, v in self.policy.state_dict().items() if not k.startswith("head")}
            missing = critic.load_state_dict(trunk, strict=False).missing_keys
            if any(not k.startswith("score") for k in missing):
                raise ConfigError(f"ppo: the critic could not take the policy's weights (missing {missing[:3]})")
        self.critic = critic
        self.critic_opt = build_optimizer([critic], ccfg, trainer.ps)
        self.critic_step = CriticStep(self.rl.value_clip or None)
        if trainer.state.step > 0:
            self.load_critic(trainer)

    def critic_dir(self, trainer) -> Path:
        return Path(f"{trainer.ckpt_dir}_critic")

    def on_save(self, trainer) -> None:
        """The critic (weights + optimizer) and the reward-norm moments, at the policy's step, in
        `<checkpoint dir>_critic` (the same retention and atomic commit as the policy's)."""
        if not self.ready:
            return
        save_checkpoint(self.critic_dir(trainer), trainer.state.step, [self.critic], self.critic_opt, trainer.ps,
                        self.critic_cfg, {"consumed_samples": trainer.state.consumed_samples,
                                          "reward_moments": self.moments.state_dict()})

    def load_critic(self, trainer) -> None:
        root, step = self.critic_dir(trainer), trainer.state.step
        wait_for_pending_save()
        if resolve_checkpoint(root) is None:
            raise ConfigError(f"ppo: resuming at step {step} needs the critic's checkpoint, not found in {root}")
        meta = load_checkpoint(root, [self.critic], self.critic_opt, trainer.ps, self.critic_cfg)
        if meta["step"] != step:
            raise ConfigError(f"ppo: the critic's latest checkpoint in {root} is at step {meta['step']}, "
                              f"the policy's at step {step}")
        self.moments.load_state_dict(meta["reward_moments"])

    def extra_passes(self, trainer, mbs: list[dict]) -> None:
        forward_pass(trainer, self.critic, mbs, lambda out, mb: mb.__setitem__("values", out), labels=False)

    @torch.no_grad()
    def advantages(self, trainer, mbs: list[dict], scores: torch.Tensor, lengths: torch.Tensor) -> None:
        rl, ps = self.rl, trainer.ps
        for mb in mbs:
            self.set_units(mb, rl.aggregation)
        if rl.reward_norm:  # scale only: shifting the score would change the KL/score balance per token
            self.moments.update(scores, group=ps.dp_group if ps.dp > 1 else None)  # on every stage: checkpointed
            scores = self.moments.normalize(scores, shift_mean=False)
        if not ps.is_last_stage:
            return  # log-probs and values live on the last pipeline stage, and so do the advantages
        start = 0
        for mb in mbs:
            b = mb["tokens"].shape[0]
            dev = mb["tokens"].device
            s = scores[start:start + b].to(dev)
            start += b
            mb["rewards"] = s
            r = rlmath.token_rewards(s, mb["old_logps"], mb["ref_logps"], mb["mask"], rl.kl_coef, rl.kl_estimator)
            mb["advantages"], mb["returns"] = rlmath.gae(r, mb["values"], mb["mask"], rl.gamma, rl.lam)
        if rl.whiten_advantages:  # over the real tokens of the whole step, on every DP rank
            stats = sum(rlmath.RunningMoments.moments(mb["advantages"], mb["mask"]) for mb in mbs)
            all_reduce(stats, ps.dp_group)
            n, total, sq = stats.tolist()
            mean = total / max(n, 1.0)
            inv = (max(sq / max(n, 1.0) - mean * mean, 0.0) + 1e-8) ** -0.5
            for mb in mbs:
                mb["advantages"] = torch.where(mb["mask"], (mb["advantages"] - mean) * inv, 0.0)

    def update_critic(self, trainer, mbs: list[dict]) -> None:
        """`rl.ppo_epochs` optimizer steps of the critic on this rollout (grads are per-token means
        over the whole step on all DP ranks, as the trainer does for the policy)."""
        ps, t = trainer.ps, trainer.cfg.train
        tokens = torch.tensor(float(sum(int(mb["mask"].sum()) for mb in mbs)), dtype=torch.float64,
                              device=trainer.device)
        all_reduce(tokens, ps.dp_group)
        n = max(float(tokens), 1.0)
        lr = lr_at(trainer.state.step, t.train_steps, self.critic_cfg.optim)
        losses = []
        for _ in range(self.rl.ppo_epochs):
            self.critic_opt.zero_grad()
            with torch.enable_grad(), trainer.autocast():
                sums = trainer.forward_backward([self.critic], mbs, ps, num_units=n, step=self.critic_step,
                                                no_sync=getattr(self.critic_opt, "no_sync", None))
            finalize_grads([self.critic], ps)
            grad_norm = self.critic_opt.step(lr)
            vals = torch.stack([sums["loss"].double(), sums["vf_clip_fraction"].double()])
            all_reduce(vals, ps.dp_group)
            broadcast(vals, src=ps.pp_ranks[-1], group=ps.pp_group)
            losses.append((vals / n).tolist() + [float(grad_norm)])
        self.critic_metrics = {"value_loss": losses[-1][0], "vf_clip_fraction": losses[-1][1],
                               "critic_grad_norm": losses[-1][2]}

    def loss(self, output: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rl, m = self.rl, mb["mask"]
        logp = -output.float()
        loss, clip_fraction, _ = rlmath.policy_loss(logp, mb["old_logps"], mb["advantages"], m, rl.clip_low,
                                                    rl.clip_high, rl.aggregation, rl.max_new_tokens, "sum")
        kl = rlmath.kl_estimator(logp.detach(), mb["ref_logps"], "k3")
        n = m.sum().float()
        return loss, {"kl": torch.where(m, kl, 0.0).sum(), "clip_fraction": clip_fraction * n, "tokens": n}

    def reduce_metrics(self, sums: dict[str, float], num_units: float) -> dict[str, float]:
        return {**super().reduce_metrics(sums, num_units), **self.critic_metrics}


def run(cfg: Config) -> list[dict]:
    return run_stage(cfg, PPOStage())
