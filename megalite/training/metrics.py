"""Throughput/MFU accounting, metrics.jsonl (contract 2) and the one-line console progress."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

# Dense peak TFLOP/s per GPU (no sparsity), from the vendors' datasheets.
PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "fp32": 51.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp8": None, "fp32": 19.5},
}


def gpu_kind(name: str) -> str | None:
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIe" in name else "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    kind = gpu_kind(torch.cuda.get_device_name(device))
    tf = PEAK_TFLOPS.get(kind, {}).get(precision) if kind else None
    return tf * 1e12 if tf else None


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class MetricsLogger:
    """Rank 0 writes metrics.jsonl and the console; other ranks only compute."""

    def __init__(self, run_dir: str, total_steps: int, enabled: bool, progress_bar: bool = True,
                 sinks: list | None = None) -> None:
        self.enabled, self.total, self.bar = enabled, total_steps, progress_bar
        self.sinks = sinks or []  # TensorBoard / W&B (loggers.py): the same rows as metrics.jsonl
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start_time, self.start_step = time.time(), None
        self.file = None  # opened at the first row: a resume first drops the rows it will redo
        self.failed: str | None = None  # why a row could not be written (the trainer stops the run)
        self._rates: list[float] = []

    def log(self, record: dict) -> None:
        """Each line is flushed to the OS at once (a crashed or killed process loses none); it is
        fsynced to disk once, at `close`, not per step. Non-finite numbers are written as null
        (a bare NaN is not JSON). A write error (disk full, read-only) is kept in `failed`."""
        if not self.enabled or self.failed:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", buffering=1)
            self.file.write(json.dumps(clean, allow_nan=False) + "\n")
            self.file.flush()
            if self.sinks:
                from megalite.training.loggers import scalars_of

                for sink in self.sinks:
                    sink.log(int(record["step"]), scalars_of(clean))
        except OSError as e:
            self.failed = f"cannot write {self.path}: {e.strerror or e}"

    def smoothed_rate(self, tokens_per_sec: float) -> float:
        """The console's tok/s: the mean over the last 10 steps (one step alone jumps with GC,
        eval and saves)."""
        if not tokens_per_sec > 0:
            return tokens_per_sec
        self._rates = (self._rates + [tokens_per_sec])[-10:]
        return len(self._rates) / sum(1.0 / r for r in self._rates)  # steps hold equal tokens: harmonic mean

    def console(self, step: int, r: dict) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.start_time = step - 1, time.time() - r.get("step_time", 0.0)
        done = step - self.start_step
        eta = (time.time() - self.start_time) / max(done, 1) * (self.total - step)
        frac = step / max(self.total, 1)
        bar = ("[" + "#" * int(20 * frac) + "-" * (20 - int(20 * frac)) + "] ") if self.bar else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        line = (f"step {step}/{self.total} {bar}{100 * frac:3.0f}% | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                f"gnorm {r['grad_norm']:.3f} | {_fmt_rate(self.smoothed_rate(r['tokens_per_sec']))} tok/s | mfu {mfu} | "
                f"ETA {_fmt_duration(eta)}")
        if "eval_loss" in r:  # (a stage whose loss is no token CE has no perplexity)
            line += f" | eval {r['eval_loss']:.4f}" + (f" (ppl {r['eval_ppl']:.1f})" if "eval_ppl" in r else "")
        for k in ("reward_accuracy", "eval_reward_accuracy"):
            if k in r:
                line += f" | {k.replace('reward_', '')} {r[k]:.3f}"
        print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except OSError as e:
                self.failed = self.failed or f"cannot close a metrics sink: {e.strerror or e}"
        if self.file is not None and not self.file.closed:
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
            except OSError as e:
                self.failed = self.failed or f"cannot write {self.path}: {e.strerror or e}"
            finally:
                try:
                    self.file.close()
                except OSError:
                    pass
