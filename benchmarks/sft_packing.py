"""SFT real tokens/s with best-fit packing against one sample per row padded to the longest in its
micro-batch, on the same conversations, side by side in one process (steps interleaved).

    python benchmarks/sft_packing.py                      # examples/configs/tiny.yaml, CPU
    python benchmarks/sft_packing.py --samples 4000 train.seq_len=1024 model.max_seq_len=1024

The conversations have a realistic, long-tailed length mix (log-normal lengths, 1-3 turns),
tokenized with the byte tokenizer into a temp dir. "Real tokens" are the samples' own input tokens
(padding excluded), the same count for both runs over the same data. Target: packed >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.alignment.sft import SFTStage  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.data.preprocess import preprocess  # noqa: E402
from megalite.training.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a of to and in is it that for on with as was be by this are or from at an def return".split()


def make_conversations(path: Path, n: int, seq_len: int) -> None:
    """Conversation lengths log-normal (sigma 1, median seq_len/5 tokens), the long tail cut at
    seq_len: the shape of public chat SFT sets, where most samples are short and a few fill the row."""
    rnd = random.Random(0)

    def text(chars: int) -> str:
        out: list[str] = []
        while sum(len(w) + 1 for w in out) < chars:
            out.append(rnd.choice(WORDS))
        return " ".join(out)

    with path.open("w") as f:
        for _ in range(n):
            total = int(min(seq_len - 16, max(24, rnd.lognormvariate(0, 1.0) * seq_len / 5)))
            turns = rnd.choice((1, 1, 2, 3))
            per_turn = max(4, total // turns - 24)  # ~24 tokens of template per user+assistant turn
            msgs = []
            for _ in range(turns):
                msgs += [{"role": "user", "content": text(per_turn // 3)},
                         {"role": "assistant", "content": text(per_turn - per_turn // 3)}]
            f.write(json.dumps({"messages": msgs}) + "\n")


class PaddedToLongest(SFTStage):
    """One sample per row, each micro-batch cut to its longest sample (no padding to seq_len)."""

    name = "sft-unpacked"

    def batches(self, trainer, dataset, consumed):
        out = []
        for mb in super().batches(trainer, dataset, consumed):
            real = (mb["labels"] != -100).any(0).nonzero()
            longest = int(real.max()) + 1 if len(real) else 1
            out.append({k: v[:, :longest].contiguous() if k in ("tokens", "labels") else v for k, v in mb.items()})
        return out


def real_tokens(trainer, consumed: int) -> int:
    """The samples' own tokens in this step's rows (inputs: each sample's length - 1)."""
    ds, t = trainer.train_ds, trainer.cfg.train
    return sum(int(ds.unit_len[u, 0]) - 1 for k in range(consumed, consumed + t.global_batch_size)
               for u in ds.units_of_row(k).tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "configs" / "tiny.yaml"))
    ap.add_argument("--samples", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        base = ["checkpoint.load=", "checkpoint.save_on_exit=false", "train.progress_bar=false",
                f"data.path={d}/sft", "data.split=100,0,0", f"data.cache_dir={d}/cache",
                "train.train_steps=1000", "train.eval_interval=0", *a.overrides]
        seq_len = load_config(a.config, base).train.seq_len
        make_conversations(d / "chat.jsonl", a.samples, seq_len)
        preprocess([str(d / "chat.jsonl")], str(d / "sft"), "byte", mode="chat", workers=0, progress=False)
        runs = {
            "packed (best-fit)": Trainer(load_config(a.config, [*base, f"train.run_dir={d}/p", "data.packing=true"]),
                                         SFTStage()),
            "unpacked (pad to longest)": Trainer(load_config(a.config, [*base, f"train.run_dir={d}/u",
                                                                        "data.packing=false"]), PaddedToLongest()),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        tokens: dict[str, list[int]] = {k: [] for k in runs}
        for i in range(a.warmup + a.steps):
            for name, tr in runs.items():  # interleaved: machine noise hits both alike
                consumed = i * tr.cfg.train.global_batch_size
                t0 = time.perf_counter()
                tr.train_step(tr._batches(tr.train_ds, consumed))
                tr.state.step += 1
                if i >= a.warmup:
                    times[name].append(time.perf_counter() - t0)
                    tokens[name].append(real_tokens(tr, consumed))
        print(f"SFT packing, {a.samples} conversations, seq_len {seq_len}, config {Path(a.config).name}, "
              f"{a.steps} steps after {a.warmup} warm-up, interleaved")
        print("| run | packing efficiency | real tokens/step | step s (median) | real tokens/s |")
        print("|---|---|---|---|---|")
        rate = {}
        for name, tr in runs.items():
            med = statistics.median(times[name])
            rate[name] = sum(tokens[name]) / sum(times[name])
            print(f"| {name} | {tr.train_ds.packing_efficiency:.1%} | {statistics.mean(tokens[name]):,.0f} | "
                  f"{med:.3f} | {rate[name]:,.0f} |")
        packed, unpacked = rate.values()
        print(f"packed / unpacked real tokens/s: {packed / unpacked:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
