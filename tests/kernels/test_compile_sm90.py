"""The GPU build of every kernel launch variant, checked without a GPU: Triton compiles each one for
sm_90 (H100/H200) down to a cubin with its bundled ptxas, which must report no register spills.
The interpreter tests check the numbers; this catches what only the compiler rejects, and the
spill cliffs of wide rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except ImportError:  # a Triton without the NVIDIA backend
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build has no bundled ptxas for sm_90")
def test_every_kernel_variant_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "variants.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "megalite.kernels.compile_check", "--arch", "90",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["variants"]
    # Every kernel appears, including both wide-row backward passes.
    for kernel in ("rmsnorm fwd", "rmsnorm bwd", "rmsnorm bwd dot", "rmsnorm bwd cols"):
        assert any(r["name"].startswith(kernel + " h=") for r in rows), kernel
    for prefix in ("swiglu fwd", "swiglu bwd", "ce stats", "ce grad"):
        assert any(r["name"].startswith(prefix) for r in rows), prefix
    assert any("h=65536" in r["name"] for r in rows)
    problems = [r for r in rows if "error" in r or r["spill_stores"] or r["spill_loads"]]
    assert not problems, problems
    # Row data moves in 128-bit accesses in every kernel (with 16-aligned rows, as Llama shapes are).
    scalar_rows = [r["name"] for r in rows if not r["v4_loads"]]
    assert not scalar_rows, scalar_rows
    assert all(r["v4_stores"] for r in rows if "stats" not in r["name"] and " dot " not in r["name"])
    assert proc.returncode == 0, proc.stdout[-2000:]
