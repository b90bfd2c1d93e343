"""GRPO: the stage's batch (group advantages, DAPO's filter), reward-function errors, log-prob
mismatch at TP1 and TP2, and a learning test on a verifiable toy reward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalite.alignment import rl as rlmath
from megalite.alignment.grpo import GRPOStage
from megalite.config import ConfigError
from megalite.testing import run_distributed
from megalite.training.trainer import Trainer
from tests.alignment.rl_helpers import constant_for_x, lower_frac, tiny_config, write_prompts


def _trainer(tmp_path, *ov) -> Trainer:
    return Trainer(tiny_config(tmp_path, *ov), GRPOStage())


def _decode_rows(trainer, mb):
    tok = trainer.tokenizer
    out = []
    for labels in mb["labels"]:
        ids = [int(t) for t in labels if t != -100]
        out.append(tok.decode([t for t in ids if t != tok.eos]))
    return out


def test_batch_carries_group_advantages_of_its_rewards(tmp_path):
    trainer = _trainer(tmp_path, "rl.temperature=0.7")  # the log-prob passes must divide by it too
    mbs = trainer.stage.batches(trainer, trainer.train_ds, 0)
    assert len(mbs) == trainer.num_micro == 4
    rewards = torch.cat([mb["rewards"] for mb in mbs])
    answers = [a for mb in mbs for a in _decode_rows(trainer, mb)]
    prompts = [p for p in "xyzw" for _ in range(8)]  # 8 answers per prompt, in prompt order
    assert rewards.tolist() == pytest.approx([lower_frac(p, a) for p, a in zip(prompts, answers)])
    adv = torch.cat([mb["advantages"] for mb in mbs]).double()
    assert torch.allclose(adv, rlmath.group_advantages(rewards, 8), atol=1e-6)
    assert rewards.std() > 0  # otherwise the comparison above is vacuous
    for mb in mbs:
        assert mb["num_units"] == 8 and mb["num_loss_tokens"] == int(mb["mask"].sum())
        # the generator's and the training forward's log-probs agree on CPU fp32
        m = mb["mask"]
        assert torch.allclose(mb["old_logps"][m], mb["rollout_logps"][m], atol=1e-4)
        assert not torch.equal(mb["old_logps"][m], mb["ref_logps"][m] + 1)  # reference pass ran


def test_dr_grpo_skips_std_and_dapo_drops_uniform_groups(tmp_path):
    trainer = _trainer(tmp_path, "reward.function=tests.alignment.rl_helpers:constant_for_x",
                       "rl.scale_by_std=false", "rl.drop_uniform_groups=true", "rl.aggregation=token_mean")
    mbs = trainer.stage.batches(trainer, trainer.train_ds, 0)
    rewards = torch.cat([mb["rewards"] for mb in mbs])
    adv = torch.cat([mb["advantages"] for mb in mbs]).double()
    assert torch.allclose(adv, rlmath.group_advantages(rewards, 8, scale_by_std=False), atol=1e-6)
    answers = [a for mb in mbs for a in _decode_rows(trainer, mb)]
    assert rewards[:8].tolist() == [0.5] * 8 and answers  # prompt "x": a uniform group
    mask = torch.cat([mb["mask"] for mb in mbs])
    assert not mask[:8].any(), "the uniform group must carry no loss"
    assert mask[8:].sum(1).gt(0).all()
    # token_mean: the loss units are the remaining real tokens
    assert sum(mb["num_units"] for mb in mbs) == int(mask.sum())
    assert constant_for_x("x", "anything") == 0.5


@pytest.mark.parametrize("fn,words", [("raises_on_z", ["raises_on_z raised ValueError: cannot score this", "prompt 2"]),
                                      ("nan_on_y", ["nan_on_y returned nan for prompt 1"])])
def test_bad_reward_function_is_one_line(tmp_path, fn, words):
    trainer = _trainer(tmp_path, f"reward.function=tests.alignment.rl_helpers:{fn}")
    with pytest.raises(ConfigError) as e:
        trainer.stage.batches(trainer, trainer.train_ds, 0)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unimportable_reward_function_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="reward.function 'nosuch.module:f' cannot be imported"):
        _trainer(tmp_path, "reward.function=nosuch.module:f")


def test_grpo_raises_the_mean_reward(tmp_path):
    trainer = _trainer(tmp_path, "train.train_steps=24", "rl.kl_coef=0.01")
    hist = trainer.train()
    rewards = [r["mean_reward"] for r in hist]
    assert max(rewards[:3]) < 0.3
    assert min(rewards[-3:]) > 0.8, rewards
    assert all(r["logprob_mismatch"] <= 1.001 for r in hist)
    assert all(r["kl"] >= 0 for r in hist) and hist[-1]["kl"] > 0
    for key in ("response_length", "clip_fraction", "time_rollout", "time_logprob", "time_train"):
        assert key in hist[-1]


def _tp_worker(rank: int, world: int, tmp: str) -> list[dict]:
    trainer = Trainer(tiny_config(Path(tmp), "parallel.tp=2", "train.train_steps=2", "rl.temperature=0.7"),
                      GRPOStage())
    return trainer.train()


@pytest.mark.slow
def test_tp2_matches_one_process_and_ranks_agree(tmp_path):
    results = run_distributed(_tp_worker, 2, str(tmp_path / "tp2"))
    for hist in results:
        assert all(r["logprob_mismatch"] <= 1.001 for r in hist)
    keys = ("mean_reward", "kl", "logprob_mismatch", "loss", "response_length")
    assert [[r[k] for k in keys] for r in results[0]] == [[r[k] for k in keys] for r in results[1]]
    # TP2 generates what TP1 does from the same weights and seed: the same first rollout, the same
    # loss, and (from nearly the same update) the same second rollout
    ref = Trainer(tiny_config(tmp_path / "tp1", "train.train_steps=2", "rl.temperature=0.7"), GRPOStage()).train()
    for mine, want in zip(results[0], ref):
        assert mine["mean_reward"] == pytest.approx(want["mean_reward"], abs=1e-9)
        assert mine["response_length"] == want["response_length"]
        assert mine["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert mine["kl"] == pytest.approx(want["kl"], abs=1e-5)


def test_mismatch_above_the_bound_warns_once(tmp_path):
    trainer = _trainer(tmp_path, "train.train_steps=2", "rl.mismatch_bound=0.5")  # exp(|d|) >= 1 > 0.5
    with pytest.warns(UserWarning, match="logprob_mismatch .* exceeds rl.mismatch_bound 0.5") as rec:
        trainer.train()
    assert sum("mismatch_bound" in str(w.message) for w in rec) == 1


def _dp_worker(rank: int, world: int, tmp: str) -> tuple[list[dict], list[list[int]]]:
    trainer = Trainer(tiny_config(Path(tmp), "train.train_steps=2", "train.global_batch_size=32",
                                  "train.micro_batch_size=4"), GRPOStage())
    mbs = trainer.stage.batches(trainer, trainer.train_ds, 0)
    return trainer.train(), [row.tolist() for mb in mbs for row in mb["tokens"]]


@pytest.mark.slow
def test_dp2_ranks_take_their_prompts_and_log_the_same(tmp_path):
    results = run_distributed(_dp_worker, 2, str(tmp_path))
    (h0, rows0), (h1, rows1) = results
    keys = ("mean_reward", "kl", "logprob_mismatch", "loss", "response_length", "clip_fraction")
    assert [[r[k] for k in keys] for r in h0] == [[r[k] for k in keys] for r in h1]
    # 16 answers per rank: rank 0 answers prompts x, y; rank 1 answers z, w (first token of each row)
    tok = {p: ord(p) for p in "xyzw"}
    assert {r[0] for r in rows0} == {tok["x"], tok["y"]} and {r[0] for r in rows1} == {tok["z"], tok["w"]}
    assert all(r["logprob_mismatch"] <= 1.001 for r in h0)


def test_cli_runs_the_example_and_reports_a_bad_reward_in_one_line(tmp_path, capsys):
    from megalite.cli import main

    base = ["grpo", "--config", "examples/configs/grpo_tiny.yaml", f"train.run_dir={tmp_path / 'run'}",
            "train.progress_bar=false"]
    assert main([*base, "train.train_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "grpo step 2 | reward" in out and "mismatch 1.0000" in out
    assert main([*base, "train.train_steps=1", f"train.run_dir={tmp_path / 'run2'}",
                 f"rl.prompts={write_prompts(tmp_path)}", "reward.function=tests.alignment.rl_helpers:nan_on_y"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "returned nan" in err[0], err


def test_toy_rewards():
    from megalite.alignment.toy_rewards import lowercase_fraction, python_parses

    assert python_parses("", "x = [1, 2]\n") == 1.0
    assert python_parses("", "def (:") == 0.0 and python_parses("", "  ") == 0.0
    assert lowercase_fraction("", "abC!") == 0.5 and lowercase_fraction("", "") == 0.0


def test_resume_continues_the_run_exactly(tmp_path):
    """Prompts by consumed samples, per-step seeds, and the reference from checkpoint.pretrained:
    a run stopped after 2 steps and relaunched logs what an uninterrupted run logs at step 3."""
    keys = ("mean_reward", "loss", "kl", "response_length", "logprob_mismatch")
    init = Trainer(tiny_config(tmp_path / "init", "train.train_steps=1", "checkpoint.save_on_exit=true"),
                   GRPOStage())
    init.train()
    pre = f"checkpoint.pretrained={init.ckpt_dir}"
    full = Trainer(tiny_config(tmp_path / "full", "train.train_steps=3", "rl.kl_coef=0.05", pre), GRPOStage()).train()
    part = tiny_config(tmp_path / "part", "train.train_steps=2", "rl.kl_coef=0.05", "checkpoint.save_on_exit=true",
                       "checkpoint.load=auto", pre)
    Trainer(part, GRPOStage()).train()
    part.train.train_steps = 3
    resumed = Trainer(part, GRPOStage())
    assert resumed.state.step == 2
    last = resumed.train()[-1]
    assert [last[k] for k in keys] == pytest.approx([full[-1][k] for k in keys], abs=1e-6)
    assert full[-1]["kl"] > 0  # the reference is the pretrained policy, not the resumed one

    # without checkpoint.pretrained a resumed run has no reference: one line
    bare = tiny_config(tmp_path / "part", "train.train_steps=3", "checkpoint.load=auto")
    trainer = Trainer(bare, GRPOStage())
    try:
        with pytest.raises(ConfigError, match="resuming needs checkpoint.pretrained"):
            trainer.stage.batches(trainer, trainer.train_ds, 0)
    finally:
        trainer.run_lock.release()


def test_prompt_files(tmp_path):
    from megalite.alignment.rollout import load_prompts
    from megalite.config import load_config
    from megalite.data.tokenizer import build_tokenizer

    tok = build_tokenizer("byte", "")
    f = tmp_path / "p.jsonl"

    def load(text: str):
        f.write_text(text)
        return load_prompts(load_config(None, [f"rl.prompts={f}"]), tok)

    assert load('{"tokens": [5, 6]}\n\n{"tokens": [7]}\n') == [[5, 6], [7]]
    assert load('{"prompt": "ab"}\n') == [tok.encode("ab")]
    chat = load('{"messages": [{"role": "user", "content": "hi"}]}\n')[0]
    assert tok.decode(chat).endswith("hiassistant\n\n") and len(chat) > len(tok.encode("hi"))  # template markers
    with pytest.raises(ConfigError, match=r"p.jsonl:2: \"tokens\" must be a non-empty list"):
        load('{"tokens": [1]}\n{"tokens": []}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:1: not valid JSON"):
        load("{nope\n")


def test_a_step_whose_groups_are_all_dropped_changes_nothing(tmp_path):
    trainer = _trainer(tmp_path, "reward.function=tests.alignment.rl_helpers:constant", "rl.drop_uniform_groups=true",
                       "train.train_steps=1")
    before = {k: v.clone() for k, v in trainer.chunks[0].state_dict().items()}
    (rec,) = trainer.train()
    assert rec["loss"] == 0.0 and rec["grad_norm"] == 0.0 and rec["mean_reward"] == 1.0
    # Adam's first step from zero grads and zero moments moves nothing (weight decay is 0 here)
    for k, v in trainer.chunks[0].state_dict().items():
        assert torch.equal(v, before[k]), k


def _pp_worker(rank: int, world: int, tmp: str) -> list[dict]:
    return Trainer(tiny_config(Path(tmp), "parallel.pp=2", "train.train_steps=2", "rl.temperature=0.7",
                               "rl.kl_coef=0.05"), GRPOStage()).train()


@pytest.mark.slow
def test_pp2_matches_one_process(tmp_path):
    results = run_distributed(_pp_worker, 2, str(tmp_path / "pp2"))
    ref = Trainer(tiny_config(tmp_path / "pp1", "train.train_steps=2", "rl.temperature=0.7", "rl.kl_coef=0.05"),
                  GRPOStage()).train()
    keys = ("mean_reward", "kl", "logprob_mismatch", "loss", "clip_fraction")
    assert [[r[k] for k in keys] for r in results[0]] == [[r[k] for k in keys] for r in results[1]]
    for mine, want in zip(results[0], ref):
        assert mine["mean_reward"] == pytest.approx(want["mean_reward"], abs=1e-9)
        assert mine["logprob_mismatch"] <= 1.001
        for k in ("loss", "kl"):
            assert mine[k] == pytest.approx(want[k], abs=1e-5), k
