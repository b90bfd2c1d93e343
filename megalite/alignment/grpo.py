"""`megalite grpo`: critic-free RL with group-normalized outcome advantages (docs/rl.md).

Each prompt gets `rl.group_size` answers; an answer's advantage is its reward minus its group's
mean, divided by the group's std (`rl.scale_by_std=false`: Dr. GRPO), on every token of the
answer. The loss is PPO's clipped surrogate (`rl.clip_low` / `rl.clip_high`: DAPO's clip-higher)
plus `rl.kl_coef` (beta, may be 0) times the k3 KL to the frozen reference, both aggregated by
`rl.aggregation`: `seq_mean_token_mean` (GRPO), `token_mean` (DAPO), `seq_mean_token_sum_norm`
(Dr. GRPO, normalized by `rl.max_new_tokens`). DAPO's other options: `rl.drop_uniform_groups`
(groups whose rewards are all equal carry no loss; they are not resampled) and the soft overlong
penalty `rl.overlong_buffer` / `rl.overlong_penalty`.
"""

from __future__ import annotations

from typing import Any

import torch

from megalite.alignment import rl as rlmath
from megalite.alignment.rollout import RLStage
from megalite.config import Config, ConfigError
from megalite.training.trainer import run_stage


class GRPOStage(RLStage):
    name = "grpo"

    def build_datasets(self, trainer) -> tuple[Any, Any | None]:
        rl = trainer.cfg.rl
        self.group = rl.group_size
        if rl.scale_by_std and self.group < 2:
            raise ConfigError("rl.group_size must be >= 2 for GRPO with rl.scale_by_std")
        if rl.aggregation not in rlmath.AGGREGATIONS:
            raise ConfigError(f"rl.aggregation '{rl.aggregation}' is not one of {' | '.join(rlmath.AGGREGATIONS)}")
        self.rl = rl
        return super().build_datasets(trainer)

    @torch.no_grad()
    def advantages(self, trainer, mbs: list[dict], scores: torch.Tensor, lengths: torch.Tensor) -> None:
        rl, G = self.rl, self.group
        rewards = scores.clone()
        if rl.overlong_buffer:
            rewards += rlmath.overlong_penalty(lengths, rl.max_new_tokens, rl.overlong_buffer, rl.overlong_penalty)
        adv = rlmath.group_advantages(rewards, G, rl.scale_by_std)
        keep = torch.ones(len(rewards), dtype=torch.bool)
        if rl.drop_uniform_groups:
            keep = rlmath.filter_uniform_groups(rewards, G).repeat_interleave(G)
        start = 0
        for mb in mbs:
            b = mb["tokens"].shape[0]
            rows = slice(start, start + b)
            start += b
            dev = mb["tokens"].device
            mb["rewards"] = rewards[rows].to(dev)
            mb["advantages"] = adv[rows].float().to(dev)
            drop = ~keep[rows].to(dev)
            mb["mask"] = mb["mask"] & ~drop[:, None]
            mb["labels"] = mb["labels"].masked_fill(drop[:, None], -100)
            self.set_units(mb, rl.aggregation)

    def loss(self, output: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rl, m = self.rl, mb["mask"]
        logp = -output.float()
        loss, clip_fraction, _ = rlmath.policy_loss(logp, mb["old_logps"], mb["advantages"], m, rl.clip_low,
                                                    rl.clip_high, rl.aggregation, rl.max_new_tokens, "sum")
        kl = rlmath.kl_estimator(logp, mb["ref_logps"], "k3")
        if rl.kl_coef:
            loss = loss + rl.kl_coef * rlmath.aggregate(kl, m, rl.aggregation, rl.max_new_tokens, "sum")
        n = m.sum().float()
        return loss, {"kl": torch.where(m, kl, 0.0).sum().detach(), "clip_fraction": clip_fraction * n, "tokens": n}


def run(cfg: Config) -> list[dict]:
    return run_stage(cfg, GRPOStage())
