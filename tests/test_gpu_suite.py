"""benchmarks/gpu_suite.sh --dry-run: the GPU suite's own script, on a CPU with tiny shapes, writes a
results file with every part, each run to completion (or refused where only a GPU can run it)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["C++ extension", "gpu-marked tests", "kernels vs Liger", "fused linear CE",
         "training throughput: eager vs compiled", "FP8 (torchao) vs BF16 step", "megalite vs megatron-core"]


@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (tmp_path / "gpu_suite_results.md").read_text()
    assert (tmp_path / "gpu_suite.log").stat().st_size > 0
    assert re.search(r"^### \d{4}-\d\d-\d\d \d\d:\d\d UTC, CPU \(\d+ cores\), dry run.*, commit \S+", text, re.M), text[:500]
    status = dict(re.findall(r"^\| \d\. (.+?) \| (.+?) \| \d+ \|$", text, re.M))
    assert list(status) == PARTS, status
    for i, name in enumerate(PARTS, 1):
        assert f"#### {i}. {name}" in text
    has_megatron = importlib.util.find_spec("megatron.core") is not None  # installed by hand, --no-deps
    expected_ok = PARTS[:5] + ([PARTS[6]] if has_megatron else [])
    for name in expected_ok:
        assert status[name] == "ok", (name, text)
    # FP8 needs a GPU: the one-line refusal, not a traceback.
    assert status["FP8 (torchao) vs BF16 step"].startswith("refused as expected")
    assert "error: precision=fp8 needs a CUDA GPU (this run has none)" in text and "Traceback" not in text
    assert re.search(r"compiled / eager speed-up: [\d.]+x", text)
    if has_megatron:
        assert text.count("ratio (megatron step / megalite step)") == 2  # TP1 and TP2+SP
    else:
        assert status["megalite vs megatron-core"].startswith("refused as expected")
