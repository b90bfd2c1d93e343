"""RL step time split: rollout (generation), log-prob passes (policy + reference, and the critic's
values for PPO), scoring + advantages, the critic update (PPO) and the policy update, plus rollout
tokens/s, for GRPO and PPO on the same tiny model and prompts, in one process.

Each row is the median over the measured steps (the first step is a warm-up and dropped). The
figures come from the stage's own per-step metrics (`time_*`, `rollout_tokens_per_sec`), so they
are what `megalite grpo|ppo` logs.

  python benchmarks/rl_step.py               # CPU, fp32, tiny model
  python benchmarks/rl_step.py --steps 6 --hidden 128 --layers 4 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.alignment.grpo import GRPOStage  # noqa: E402
from megalite.alignment.ppo import PPOStage  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.training.trainer import Trainer  # noqa: E402

# NeMo-RL's published on-policy GRPO figure (Llama-3.1-8B, H100): a GPU reference, not a CPU baseline.
NEMO_RL_GRPO_TOKENS_PER_GPU = 1562

COLUMNS = ("time_rollout", "time_logprob", "time_score_adv", "time_critic", "time_train")


def run(stage_cls, args, tmp: Path, group: int, responses: int) -> dict[str, float]:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}:"}) + "\n" for i in range(64)))
    ov = ["model.vocab_size=0", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
          f"model.num_heads={max(args.hidden // 32, 1)}", f"model.ffn_hidden_size={args.hidden * 3}",
          f"model.max_seq_len={args.new_tokens + 32}", f"train.seq_len={args.new_tokens + 16}",
          f"train.micro_batch_size={args.micro}", f"train.global_batch_size={responses}",
          f"train.train_steps={args.steps}", f"train.run_dir={tmp / stage_cls.name}", "train.progress_bar=false",
          f"train.device={args.device}", "checkpoint.load=", "checkpoint.save_on_exit=false", "optim.lr=1e-3",
          "optim.warmup_steps=0", f"rl.prompts={prompts}", f"rl.group_size={group}",
          f"rl.max_new_tokens={args.new_tokens}", "rl.eos_id=0",  # byte 0 as eos: (nearly) full-length answers
          "reward.function=megalite.alignment.toy_rewards:lowercase_fraction", "rl.kl_coef=0.01",
          "train.log_interval=1000"]
    hist = Trainer(load_config(None, ov), stage_cls()).train()[1:]
    out = {k: statistics.median(r.get(k, 0.0) for r in hist) for k in (*COLUMNS, "rollout_tokens_per_sec",
                                                                         "response_length")}
    out["step"] = statistics.median(sum(r.get(k, 0.0) for k in COLUMNS) for r in hist)
    out["responses"] = responses
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step (PPO: prompts x group)")
    ap.add_argument("--group", type=int, default=4, help="GRPO answers per prompt")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        answers = args.prompts * args.group  # the same answers per step for both: PPO takes more prompts
        rows["grpo"] = run(GRPOStage, args, Path(d), args.group, answers)
        rows["ppo"] = run(PPOStage, args, Path(d), 1, answers)
    print(f"device {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}, model h{args.hidden} "
          f"L{args.layers}, {args.new_tokens} new tokens per answer, micro-batch {args.micro}, "
          f"median of {args.steps - 1} steps")
    print("| algo | answers/step | rollout s | log-prob s | score+adv s | critic s | policy train s | step s | "
          "rollout share | rollout tok/s | step tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        tokens = r["responses"] * r["response_length"]
        print(f"| {name} | {r['responses']} | {r['time_rollout']:.3f} | {r['time_logprob']:.3f} | "
              f"{r['time_score_adv']:.3f} | {r['time_critic']:.3f} | {r['time_train']:.3f} | {r['step']:.3f} | "
              f"{r['time_rollout'] / r['step']:.0%} | {r['rollout_tokens_per_sec']:.0f} | {tokens / r['step']:.0f} |")
    print(f"reference (GPU only, not comparable here): NeMo-RL GRPO Llama-3.1-8B on H100, "
          f"{NEMO_RL_GRPO_TOKENS_PER_GPU} tokens/s/GPU on-policy")


if __name__ == "__main__":
    main()
