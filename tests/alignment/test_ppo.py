"""PPO: reward-model scoring at the last real token, the critic's init and training, a vocabulary
mismatch, log-prob mismatch at TP1/TP2 and a learning test on a verifiable toy reward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalite.alignment import rl as rlmath
from megalite.alignment.ppo import PPOStage
from megalite.config import ConfigError
from megalite.generation import load_model
from megalite.testing import run_distributed
from megalite.training.trainer import Trainer
from tests.alignment.rl_helpers import save_score_model, tiny_config

PPO = ("rl.group_size=1", "rl.aggregation=token_mean")


def _trainer(tmp_path, *ov) -> Trainer:
    return Trainer(tiny_config(tmp_path, *PPO, *ov), PPOStage())


def test_reward_model_is_read_at_the_last_real_token(tmp_path):
    rm_dir = save_score_model(tmp_path)
    trainer = _trainer(tmp_path, "reward.function=", f"reward.model={rm_dir}", "rl.kl_coef=0.1",
                       "rl.whiten_advantages=false", "rl.lam=1.0",
                       "optim.lr=1e-9", "optim.min_lr=1e-9")  # the critic's one step barely moves it
    mbs = trainer.stage.batches(trainer, trainer.train_ds, 0)
    rm = load_model(rm_dir, device="cpu")
    for mb in mbs:
        for i in range(mb["tokens"].shape[0]):
            end = int(mb["last_index"][i]) + 1
            with torch.no_grad():
                want = rm(tokens=mb["full_tokens"][i:i + 1, :end])[0, -1]
            assert float(mb["rewards"][i]) == pytest.approx(float(want), abs=1e-5)
        # gamma = lam = 1 without whitening: advantage + value at the first answer token is the
        # whole return: score - kl_coef * sum of KL over the answer
        m = mb["mask"]
        first = m.float().argmax(1)
        rows = torch.arange(m.shape[0])
        kl = torch.where(m, mb["old_logps"] - mb["ref_logps"], 0.0).sum(1)
        want_ret = mb["rewards"].float() - 0.1 * kl
        assert torch.allclose(mb["returns"][rows, first], want_ret, atol=1e-4)
    # the critic starts from the reward model (not from the policy: its trunk differs)
    critic, policy = trainer.stage.critic.state_dict(), trainer.chunks[0].state_dict()
    for k, v in rm.state_dict().items():
        assert torch.allclose(critic[k], v, atol=1e-6), k
    assert not torch.allclose(critic["embedding.weight"], policy["embedding.weight"], atol=1e-3)


def test_reward_model_vocab_mismatch_is_one_line(tmp_path):
    rm_dir = save_score_model(tmp_path, vocab_size=300)
    trainer = _trainer(tmp_path, "reward.function=", f"reward.model={rm_dir}")
    with pytest.raises(ConfigError) as e:
        trainer.stage.batches(trainer, trainer.train_ds, 0)
    assert "\n" not in str(e.value) and "vocab_size 300" in str(e.value) and "reward.model" in str(e.value)


def test_critic_trains_on_the_returns(tmp_path):
    trainer = _trainer(tmp_path, "rl.ppo_epochs=4", "rl.value_clip=0")
    stage = trainer.stage
    mbs = stage.batches(trainer, trainer.train_ds, 0)
    first = stage.critic_metrics["value_loss"]
    # the critic's loss after its 4 steps, on the same rollout
    with torch.no_grad():
        after = sum(float(rlmath.value_loss(stage.critic(tokens=mb["tokens"]).float(), mb["values"],
                                            mb["returns"], mb["mask"], None, reduction="sum")[0]) for mb in mbs)
    n = sum(int(mb["mask"].sum()) for mb in mbs)
    assert after / n < first
    whitened = torch.cat([mb["advantages"][mb["mask"]] for mb in mbs])
    assert abs(float(whitened.mean())) < 1e-5 and float(whitened.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


def test_ppo_raises_the_mean_reward(tmp_path):
    trainer = _trainer(tmp_path, "train.train_steps=24", "rl.kl_coef=0.01", "rl.no_eos_penalty=0.1")
    hist = trainer.train()
    rewards = [r["mean_reward"] for r in hist]
    assert max(rewards[:3]) < 0.3
    assert min(rewards[-3:]) > 0.8, rewards
    assert all(r["logprob_mismatch"] <= 1.001 for r in hist)
    for key in ("value_loss", "kl", "clip_fraction", "response_length", "time_rollout", "time_logprob", "time_train"):
        assert key in hist[-1]


def _tp_worker(rank: int, world: int, tmp: str, rm_dir: str) -> list[dict]:
    trainer = Trainer(tiny_config(Path(tmp), *PPO, "parallel.tp=2", "train.train_steps=2", "rl.temperature=0.7",
                                  "reward.function=", f"reward.model={rm_dir}"), PPOStage())
    return trainer.train()


@pytest.mark.slow
def test_tp2_matches_one_process_and_ranks_agree(tmp_path):
    rm_dir = save_score_model(tmp_path)  # scores and the critic's init, both sharded over TP2
    results = run_distributed(_tp_worker, 2, str(tmp_path / "tp2"), rm_dir)
    for hist in results:
        assert all(r["logprob_mismatch"] <= 1.001 for r in hist)
    keys = ("mean_reward", "kl", "logprob_mismatch", "loss", "value_loss")
    assert [[r[k] for k in keys] for r in results[0]] == [[r[k] for k in keys] for r in results[1]]
    ref = Trainer(tiny_config(tmp_path / "tp1", *PPO, "train.train_steps=2", "rl.temperature=0.7",
                              "reward.function=", f"reward.model={rm_dir}"), PPOStage()).train()
    for mine, want in zip(results[0], ref):
        assert mine["mean_reward"] == pytest.approx(want["mean_reward"], abs=1e-5)
        for k in ("loss", "value_loss", "kl"):
            assert mine[k] == pytest.approx(want[k], abs=1e-5), k


def _dp_worker(rank: int, world: int, tmp: str) -> tuple[list[dict], torch.Tensor]:
    trainer = Trainer(tiny_config(Path(tmp), *PPO, "train.train_steps=2", "train.micro_batch_size=4"), PPOStage())
    mbs = trainer.stage.batches(trainer, trainer.train_ds, 0)
    return trainer.train(), torch.cat([mb["advantages"][mb["mask"]] for mb in mbs])


@pytest.mark.slow
def test_dp2_whitens_over_both_ranks_and_logs_the_same(tmp_path):
    (h0, a0), (h1, a1) = run_distributed(_dp_worker, 2, str(tmp_path))
    keys = ("mean_reward", "kl", "logprob_mismatch", "loss", "value_loss", "critic_grad_norm")
    assert [[r[k] for k in keys] for r in h0] == [[r[k] for k in keys] for r in h1]
    both = torch.cat([a0, a1]).double()
    assert abs(float(both.mean())) < 1e-5 and float(both.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(a0.mean())) > 1e-3  # each rank alone is not whitened: the statistics were global


def test_resume_restores_the_critic_and_reward_moments(tmp_path):
    """A PPO run stopped after 2 steps and relaunched logs what an uninterrupted run logs at step 3:
    the critic's weights and optimizer and the reward-norm moments come back from `<ckpt>_critic`."""
    keys = ("mean_reward", "loss", "kl", "value_loss", "critic_grad_norm")
    init = Trainer(tiny_config(tmp_path / "init", *PPO, "train.train_steps=1", "checkpoint.save_on_exit=true"),
                   PPOStage())
    init.train()
    common = (*PPO, "rl.reward_norm=true", "rl.kl_coef=0.05", f"checkpoint.pretrained={init.ckpt_dir}")
    full = Trainer(tiny_config(tmp_path / "full", *common, "train.train_steps=3"), PPOStage()).train()
    part = tiny_config(tmp_path / "part", *common, "train.train_steps=2", "checkpoint.save_on_exit=true",
                       "checkpoint.load=auto")
    Trainer(part, PPOStage()).train()
    part.train.train_steps = 3
    resumed = Trainer(part, PPOStage())
    last = resumed.train()[-1]
    assert resumed.stage.moments.count == 3 * 32
    assert [last[k] for k in keys] == pytest.approx([full[-1][k] for k in keys], abs=1e-6)


def _pp_worker(rank: int, world: int, tmp: str, rm_dir: str) -> list[dict]:
    return Trainer(tiny_config(Path(tmp), *PPO, "parallel.pp=2", "train.train_steps=2", "rl.temperature=0.7",
                               "reward.function=", f"reward.model={rm_dir}", "rl.reward_norm=true"), PPOStage()).train()


@pytest.mark.slow
def test_pp2_with_a_reward_model_matches_one_process(tmp_path):
    rm_dir = save_score_model(tmp_path)  # scores, critic init and critic training split over 2 stages
    results = run_distributed(_pp_worker, 2, str(tmp_path / "pp2"), rm_dir)
    ref = Trainer(tiny_config(tmp_path / "pp1", *PPO, "train.train_steps=2", "rl.temperature=0.7",
                              "reward.function=", f"reward.model={rm_dir}", "rl.reward_norm=true"), PPOStage()).train()
    keys = ("mean_reward", "kl", "logprob_mismatch", "loss", "value_loss", "critic_grad_norm")
    assert [[r[k] for k in keys] for r in results[0]] == [[r[k] for k in keys] for r in results[1]]
    for mine, want in zip(results[0], ref):
        assert mine["mean_reward"] == pytest.approx(want["mean_reward"], abs=1e-5)
        assert mine["logprob_mismatch"] <= 1.001
        for k in ("loss", "value_loss", "kl", "critic_grad_norm"):
            assert mine[k] == pytest.approx(want[k], abs=1e-5), k
