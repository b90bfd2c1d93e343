"""Measures the peak memory of CPU training steps in a fresh process, to check megalite.plan.

    python -m megalite.plan_measure --config F [key=value ...]   -> one JSON line

The peak is the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
after imports and a warm-up) minus the resident set at that point, with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_, set by `measure`) so every tensor of any size is mapped on
allocation and unmapped on free: RSS then follows torch's live tensors instead of the allocator's
cached heap. Synthetic tokens, fp32, no document masking, two optimizer steps (Adam state exists).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import numpy as np

    from megalite.config import load_config
    from megalite.training.trainer import Trainer

    class Tokens:  # uniform random windows, like benchmarks/train_throughput.py
        def __init__(self, vocab: int, seq: int) -> None:
            self.vocab, self.seq = vocab, seq

        def __len__(self) -> int:
            return 1 << 30

        def __getitem__(self, i: int) -> np.ndarray:
            return np.random.default_rng(i).integers(0, self.vocab, self.seq + 1, dtype=np.int64)

    def steps(overrides: list[str]) -> Trainer:
        cfg = load_config(args.config, ["train.device=cpu", "train.precision=fp32", "data.tokenizer_type=byte",
                                        "data.reset_at_eod=false", "checkpoint.load=", "checkpoint.save_on_exit=false",
                                        "train.eval_interval=0", "train.progress_bar=false", "train.train_steps=2",
                                        f"train.run_dir={tempfile.mkdtemp(prefix='megalite_plan_')}", *overrides])
        ds = Tokens(cfg.model.vocab_size or 256, cfg.train.seq_len)
        tr = Trainer(cfg, datasets=(ds, None))
        for i in range(2):
            tr.train_step(tr._batches(ds, i * cfg.train.global_batch_size))
            tr.state.step += 1
        if tr.run_lock is not None:
            tr.run_lock.release()
        return tr

    # Warm-up: a toy run of the same code path imports every module and starts the kernels and
    # thread pools, outside the measured window.
    steps([*args.overrides, "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
           "model.ffn_hidden_size=64", "train.seq_len=16", "train.micro_batch_size=1", "train.global_batch_size=1"])
    gc.collect()
    base = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    tr = steps(args.overrides)
    print(json.dumps({"peak_bytes": _hwm() - base, "vocab_size": tr.cfg.model.vocab_size,
                      "num_micro": tr.num_micro}), flush=True)


def measure(config: str, overrides: list[str] = ()) -> dict:
    """Runs the measurement in a fresh single-process interpreter; returns its JSON record."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-m", "megalite.plan_measure", "--config", config, *overrides],
                         env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    _main()
