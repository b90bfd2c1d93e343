"""Issue 12 items 9 and 10: one run per run dir; metrics.jsonl holds each step once, as JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from megalite.config import ConfigError
from megalite.training.metrics import MetricsLogger
from megalite.training.run_dir import LOCK, RunDirLock, drop_rows_after
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config


def _holder(run_dir) -> subprocess.Popen:
    """Another process holding the run dir's lock until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from megalite.training.run_dir import RunDirLock
        lock = RunDirLock({str(run_dir)!r})
        lock.acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_the_same_dir_is_refused_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError) as e:
            Trainer(tiny_config(str(tmp_path), "train.train_steps=1"))
        assert f"host {socket.gethostname()}, pid {holder.pid}" in str(e.value)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    holder = _holder(tmp_path)
    holder.kill()  # SIGKILL: the lock file still names it, but the kernel dropped its flock
    holder.wait()
    assert str(holder.pid) in (tmp_path / LOCK).read_text()
    Trainer(tiny_config(str(tmp_path), "train.train_steps=1")).train()
    out = capsys.readouterr().out
    assert f"took over the stale lock of run dir {tmp_path} (host {socket.gethostname()}, pid {holder.pid}" in out
    assert (tmp_path / LOCK).read_text() == ""  # released cleanly: the next run says nothing
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert lock.took_over is None
    lock.release()


def test_resume_after_a_crash_drops_the_redone_rows(tmp_path):
    # Checkpoint at step 2, then "crash" after logging steps 3 and 4 (no save at the end).
    Trainer(tiny_config(str(tmp_path), "train.train_steps=4", "checkpoint.save_interval=2")).train()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    # Roll back to the step-2 checkpoint, as if the process died after logging step 4 unsaved.
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a line cut short by the kill
    Trainer(tiny_config(str(tmp_path), "train.train_steps=5", "checkpoint.load=auto")).train()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_drop_rows_after_keeps_earlier_rows_byte_for_byte(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "loss": 2.3}\n')
    assert drop_rows_after(p, 2) == 1
    assert p.read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n'
    assert drop_rows_after(p, 2) == 0


def test_non_finite_values_are_written_as_null(tmp_path):
    m = MetricsLogger(str(tmp_path), 2, True, False)
    m.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    m.close()

    def strict(x):
        raise AssertionError(f"not JSON: {x}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict)
    assert row == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}
