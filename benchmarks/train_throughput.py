"""Training throughput: tokens/s, achieved TFLOP/s and MFU per device for a config and a layout.

    python benchmarks/train_throughput.py --config examples/configs/tiny.yaml
    torchrun --nproc_per_node 8 benchmarks/train_throughput.py --config examples/configs/llama3_8b.yaml
    python benchmarks/train_throughput.py --config examples/configs/llama3_1b.yaml train.micro_batch_size=2
    python benchmarks/train_throughput.py --config examples/configs/tiny.yaml --compare-compile
    python benchmarks/train_throughput.py --config examples/configs/llama3_1b.yaml --base-name bf16 \
        --variant fp8:train.precision=fp8,train.fp8_backend=torchao,train.fp8_recipe=tensorwise

Data is synthetic (uniform random tokens), so the number measures the model and the parallel
machinery, not the input pipeline. The baseline printed next to MFU is torchtitan's published
Llama-3-8B BF16 figure on H100 (33-39% MFU, no Float8); our target on one H100 is >= 45% for the
1B shape at seq 4096.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.config import load_config  # noqa: E402
from megalite.model.flops import flops_per_token, param_count  # noqa: E402
from megalite.training.trainer import Trainer  # noqa: E402

TORCHTITAN_8B_MFU = (0.33, 0.39)


class SyntheticTokens:
    def __init__(self, vocab: int, seq_len: int, seed: int = 0) -> None:
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, i: int) -> np.ndarray:
        return np.random.default_rng(self.seed + i).integers(0, self.vocab, self.seq_len + 1, dtype=np.int64)


# Each trainer gets its own run dir (a run dir is locked by the run using it), removed at exit.
_RUN_DIRS = tempfile.TemporaryDirectory(prefix="megalite_bench_")


def build(args: argparse.Namespace, extra: list[str], name: str = "run") -> tuple[Trainer, SyntheticTokens]:
    base = ["data.tokenizer_type=byte", "data.reset_at_eod=false", "checkpoint.load=",
            "checkpoint.save_on_exit=false", "train.eval_interval=0", "train.progress_bar=false",
            f"train.train_steps={args.steps + args.warmup}", "train.log_interval=1000000",
            f"train.run_dir={_RUN_DIRS.name}/{name}"]
    cfg = load_config(args.config, [*base, *args.overrides, *extra])
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 512
    ds = SyntheticTokens(cfg.model.vocab_size, cfg.train.seq_len)
    return Trainer(cfg, datasets=(ds, None)), ds


def timed_step(tr: Trainer, ds: SyntheticTokens, i: int) -> tuple[float, float]:
    """(seconds, transient peak GiB above the memory held before the step; nan on a CPU)."""
    batches = tr._batches(ds, i * tr.cfg.train.global_batch_size)
    cuda = tr.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    tr.train_step(batches)
    tr.state.step += 1
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dt, (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else float("nan")


def report(tr: Trainer, label: str, times: list[float], first: float, mem: float) -> dict:
    cfg = tr.cfg
    step = statistics.median(times)
    world = tr.ps.world_size
    tps = cfg.train.global_batch_size * cfg.train.seq_len / step
    tflops_dev = flops_per_token(cfg.model, cfg.train.seq_len) * tps / world / 1e12
    mfu = tflops_dev * 1e12 / tr.peak if tr.peak else None
    if tr.ps.rank == 0:
        achieved = f"{tflops_dev:.1f} TFLOP/s" if tflops_dev >= 1 else f"{tflops_dev * 1e3:.2f} GFLOP/s"
        print(f"[{label}] precision {tr.precision} | step {step * 1e3:.1f} ms (median of {len(times)}; first step "
              f"{first:.1f} s) | tokens/s {tps:,.0f} total, {tps / world:,.0f} per device | achieved {achieved} "
              f"per device" + (f" | peak mem {mem:.1f} GiB" if mem == mem else ""))
        if mfu is not None:
            print(f"[{label}] MFU {100 * mfu:.1f}%  (baseline: torchtitan Llama-3-8B bf16 on H100, published "
                  f"{100 * TORCHTITAN_8B_MFU[0]:.0f}-{100 * TORCHTITAN_8B_MFU[1]:.0f}%; target >= 45%)")
        else:
            print(f"[{label}] MFU n/a (no known peak FLOP/s for this device)")
    return {"label": label, "precision": tr.precision, "step_ms": step * 1e3, "first_step_s": first,
            "tokens_per_sec": tps, "tflops_per_device": tflops_dev, "mfu": mfu,
            "peak_mem_gib": mem if mem == mem else None}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise SystemExit(f"error: --variant {text!r} is not NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, [o for o in rest.split(",") if o]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="train.compile=true (regional torch.compile)")
    ap.add_argument("--compare-compile", action="store_true",
                    help="eager and compiled trainers side by side (same as --variant compiled:train.compile=true)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="another trainer with these overrides, run side by side with the first one, "
                         "alternating steps (repeatable); ratios are against the first")
    ap.add_argument("--base-name", default="", help="the first trainer's label (default: eager or compiled)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    variants = {args.base_name or ("compiled" if args.compile else "eager"):
                ["train.compile=true"] if args.compile else []}
    if args.compare_compile:
        variants["compiled"] = ["train.compile=true"]
    variants.update(parse_variant(v) for v in args.variant)
    cuda = torch.cuda.is_available()
    trainers, resident = {}, {}
    for name, extra in variants.items():
        held = torch.cuda.memory_allocated() if cuda else 0
        trainers[name] = build(args, extra, name)
        resident[name] = (torch.cuda.memory_allocated() - held) / 2**30 if cuda else float("nan")
    times: dict[str, list[float]] = {name: [] for name in trainers}
    first: dict[str, float] = {}
    peak: dict[str, float] = {name: 0.0 if cuda else float("nan") for name in trainers}
    for i in range(args.steps + args.warmup):
        # Alternate the variants step by step, so that load from other processes hits all alike.
        for name, (tr, ds) in trainers.items():
            held = torch.cuda.memory_allocated() if cuda else 0
            dt, transient = timed_step(tr, ds, i)
            if name not in first:
                first[name] = dt
                if cuda:  # the optimizer's state appears during the first step
                    resident[name] += (torch.cuda.memory_allocated() - held) / 2**30
            if i >= args.warmup:
                times[name].append(dt)
                if cuda:
                    peak[name] = max(peak[name], transient)
    tr0 = next(iter(trainers.values()))[0]
    if tr0.ps.rank == 0:
        cfg = tr0.cfg
        dev = torch.cuda.get_device_name() if tr0.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        print(f"config {args.config} {' '.join(args.overrides)}")
        shown = ", ".join(f"{k} ({' '.join(v) or 'base'})" for k, v in variants.items())
        print(f"device {dev} | {tr0.ps.describe()} | params {param_count(cfg.model) / 1e9:.3f}B | "
              f"seq {cfg.train.seq_len} | global batch {cfg.train.global_batch_size}"
              + (f" | variants side by side: {shown}" if len(variants) > 1 else ""))
    # Peak memory of a variant: what it holds (weights, grads, optimizer state) plus its step's transient peak.
    results = [report(tr, name, times[name], first[name], resident[name] + peak[name])
               for name, (tr, _) in trainers.items()]
    if len(results) > 1 and tr0.ps.rank == 0:
        for r in results[1:]:
            print(f"{r['label']} / {results[0]['label']} speed-up: {results[0]['step_ms'] / r['step_ms']:.2f}x")
    if args.json and tr0.ps.rank == 0:
        Path(args.json).write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                               "variants": variants, "results": results}, indent=1))
    for tr, _ in trainers.values():
        tr.metrics.close()


if __name__ == "__main__":
    from megalite.config import ConfigError

    try:
        main()
    except ConfigError as e:  # a refused configuration (e.g. FP8 without a GPU): one line, as the CLI does
        sys.exit(f"error: {e}")
