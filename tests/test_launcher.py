"""Issue 12 items 7 and 10: under torchrun the error line always gets out, once; ranks die with
their launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.training.common import TINY

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its new parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_rank_exits_when_its_launcher_is_killed(tmp_path):
    child = textwrap.dedent("""
        import time
        from megalite.launcher import exit_with_parent
        exit_with_parent()
        print("ready", flush=True)
        time.sleep(120)
    """)
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, env=env)
    rank_pid = int(parent.stdout.readline())
    assert _alive(rank_pid)
    parent.send_signal(signal.SIGKILL)  # as `kill -9 <torchrun>`
    parent.wait()
    deadline = time.time() + 10
    while _alive(rank_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(rank_pid), "the rank outlived its launcher"


SLOW_RANK0 = """
import os, sys, time
if os.environ.get("RANK") == "0":
    time.sleep(3)  # rank 0 reaches the error last: without the ordering its line was lost
from megalite.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_a_config_error_under_torchrun_prints_its_line_once(tmp_path):
    script = tmp_path / "slow_rank0.py"
    script.write_text(SLOW_RANK0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        "pretrain", *TINY, f"train.run_dir={tmp_path}", "optim.lr=-1"],
                       capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "error: optim.lr must be > 0, got -1.0" in x]
    assert len(lines) == 1, r.stderr
