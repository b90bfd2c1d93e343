"""Fault-injection plumbing: launch `megalite pretrain` as a user would, kill it, inspect the run dir.

Every launch's stdout/stderr goes to a log file under the test's log dir; the suite asserts that no
log holds a traceback (set MEGALITE_FAULT_LOGS=DIR to keep them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megalite.config import ConfigError
from megalite.training.run_dir import RunDirLock
from tests.training.common import TINY

ROOT = Path(__file__).resolve().parents[2]


class Launcher:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def env(self) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TRITON_INTERPRET", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        return env

    def start(self, run_dir: Path, *overrides: str, nproc: int = 1, preexec=None) -> subprocess.Popen:
        self.count += 1
        log = open(self.log_dir / f"{self.count:03d}-{run_dir.name}.log", "w")
        cli = ["-m", "megalite.cli", "pretrain", *TINY, f"train.run_dir={run_dir}", *overrides]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(_free_port()), *cli]
        else:
            cmd = [sys.executable, *cli]
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                             preexec_fn=preexec)
        p.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        return p

    def run(self, run_dir: Path, *overrides: str, nproc: int = 1, timeout: float = 300, preexec=None):
        p = self.start(run_dir, *overrides, nproc=nproc, preexec=preexec)
        p.wait(timeout=timeout)
        return p.returncode, Path(p.log_path).read_text()  # type: ignore[attr-defined]

    def tracebacks(self) -> list[str]:
        return [f.name for f in sorted(self.log_dir.glob("*.log")) if "Traceback" in f.read_text()]

    def keep(self, name: str) -> None:
        keep = os.environ.get("MEGALITE_FAULT_LOGS")
        if keep:
            shutil.copytree(self.log_dir, Path(keep) / name, dirs_exist_ok=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the line being written when the process was killed
    return out


def wait_for_lock(run_dir: Path, timeout: float = 20.0) -> None:
    """Every rank of a killed run must be gone (its flock dropped) before the next launch."""
    deadline = time.time() + timeout
    while True:
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
            lock.release()
            return
        except ConfigError:
            if time.time() > deadline:
                raise AssertionError(f"a rank of the killed run still holds {run_dir} after {timeout}s") from None
            time.sleep(0.1)
