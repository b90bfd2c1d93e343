"""DPO step time against an SFT step on the same pairs (2x the sequences), side by side in one process.

    python benchmarks/dpo_step.py                                  # examples/configs/dpo_tiny.yaml, CPU
    python benchmarks/dpo_step.py --config CFG model.hidden_size=256 train.seq_len=512

Synthetic preference pairs (random words through the chat template) are tokenized into a temp dir;
the random-init model is saved as the "SFT" checkpoint that DPO starts from and uses as reference.
Three steps run on the same micro-batches of B pairs (2B rows):
- SFT: token cross-entropy on the 2B rows (what an SFT step on the same sequences costs);
- DPO, precomputed reference: the table is built once before the timed steps (its one-off cost is
  printed separately), so a step should cost about what the SFT step costs, not 2x;
- DPO, frozen-model reference: one extra forward of the reference per step.
Each is timed as building the step's batches (the reference pass happens there) plus the train step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.alignment.dpo_stage import DPOStage  # noqa: E402
from megalite.alignment.rm import PreferenceStage  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.data.preprocess import preprocess  # noqa: E402
from megalite.training.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a of to and in is it that for on with as was be by this are or from at an".split()


class SFTOnPairs(PreferenceStage):
    """The baseline: SFT's token cross-entropy on the same 2B rows (chosen and rejected answers)."""

    name = "sft-on-pairs"

    def loss_units(self, mb: dict) -> float:
        return float(mb["num_loss_tokens"])

    def reduce_metrics(self, sums: dict[str, float], num_units: float) -> dict[str, float]:
        return {}


def make_pairs(d: Path, n: int, seq_len: int) -> str:
    rnd = random.Random(0)
    words = max(4, seq_len // 12)  # prompt + answer take most of the row with the byte tokenizer

    def text(k: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(k))

    src = d / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": text(words), "chosen": text(words), "rejected": text(words)}) + "\n"
                           for _ in range(n)))
    preprocess([str(src)], str(d / "pairs"), "byte", mode="preference", workers=0, progress=False)
    return str(d / "pairs")


def build(cfg, stage) -> tuple[Trainer, float]:
    """The trainer, and the seconds its stage spends before the first step (the reference table)."""
    tr = Trainer(cfg, stage)
    t0 = time.perf_counter()
    if isinstance(stage, DPOStage):
        stage.prepare(tr)
    return tr, time.perf_counter() - t0


def timed_step(tr: Trainer, i: int) -> float:
    t0 = time.perf_counter()
    tr.train_step(tr._batches(tr.train_ds, i * tr.cfg.train.global_batch_size))
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples/configs/dpo_tiny.yaml"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = [f"train.run_dir={d}/run", f"data.cache_dir={d}/cache", "data.split=100,0,0", "checkpoint.load=",
                "checkpoint.save_on_exit=false", "train.eval_interval=0", "train.progress_bar=false",
                "train.log_interval=1000000", f"train.train_steps={args.steps + args.warmup}"]
        cfg0 = load_config(args.config, [*base, *args.overrides])
        shard = make_pairs(d, args.pairs, cfg0.train.seq_len)
        base.append(f"data.path={shard}")
        # The "SFT" checkpoint: the random-init model, saved once; DPO starts from it and uses it as reference.
        cfg = load_config(args.config, [*base, *args.overrides, "dpo.loss_type=simpo"])
        tr = Trainer(cfg, DPOStage(cfg.dpo))
        sft = tr.save()
        tr.run_lock.release()
        runs = []
        for label, extra in (("SFT step (2B sequences)", None),
                             ("DPO, precomputed reference", "precompute"),
                             ("DPO, frozen-model reference", "model")):
            over = [*base, *args.overrides, f"checkpoint.pretrained={sft}", f"train.run_dir={d}/{extra or 'sft'}"]
            if extra:
                over.append(f"dpo.reference={extra}")
            cfg = load_config(args.config, over)
            runs.append((label, *build(cfg, SFTOnPairs() if extra is None else DPOStage(cfg.dpo))))
        # Round-robin, so a noisy (shared) machine slows all three alike.
        times: list[list[float]] = [[] for _ in runs]
        for i in range(args.warmup + args.steps):
            for k, (_, tr, _) in enumerate(runs):
                dt = timed_step(tr, i)
                if i >= args.warmup:
                    times[k].append(dt)
        rows = [(label, statistics.median(ts), prep) for (label, tr, prep), ts in zip(runs, times)]
        for _, tr, _ in runs:
            if tr.run_lock is not None:
                tr.run_lock.release()
    if int(os.environ.get("RANK", "0")) == 0:
        t = cfg.train
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() and t.device != "cpu" else \
            f"CPU ({os.cpu_count()} cores)"
        print(f"DPO step vs SFT step | {dev} | hidden {cfg.model.hidden_size} layers {cfg.model.num_layers} | "
              f"{t.global_batch_size} pairs/step ({2 * t.global_batch_size} rows) x seq {t.seq_len}")
        print(f"{'':32s} {'step ms':>9s} {'vs SFT':>7s} {'one-off ms':>11s}")
        sft_s = rows[0][1]
        for label, step, prep in rows:
            print(f"{label:32s} {1e3 * step:9.1f} {step / sft_s:6.2f}x {1e3 * prep:11.1f}")
        print("target: DPO with a precomputed reference ~1.0x the SFT step (not 2x); a model reference adds "
              "one forward (~1.3x)")


if __name__ == "__main__":
    main()
