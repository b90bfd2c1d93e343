"""A full disk and a read-only run dir, on real (tiny tmpfs) file systems: one `error:` line naming
the path and the OS reason, no traceback, and whatever fits is still written. Needs root and a
working `mount -t tmpfs`; elsewhere it skips with the reason (tests/training/test_fault_messages.py
covers the same paths with a size-limited file)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.faults.common import Launcher


def _mount(where: Path, size_kb: int, *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size_kb}k", *options]), "tmpfs",
                        str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")


@pytest.fixture
def mounts():
    done: list[Path] = []

    def mount(where: Path, size_kb: int, *options: str) -> Path:
        _mount(where, size_kb, *options)
        done.append(where)
        return where

    yield mount
    for m in reversed(done):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _error_line(log: str) -> str:
    assert "Traceback" not in log, log
    errors = [x for x in log.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, log
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_checkpoint_on_a_full_disk(tmp_path, mounts, async_save):
    disk = mounts(tmp_path / "disk", 256)  # the run's metrics fit, its ~600 KB checkpoint does not
    launcher = Launcher(tmp_path / "logs")
    code, log = launcher.run(disk / "run", "train.train_steps=2", "checkpoint.save_on_exit=true",
                             f"checkpoint.async_save={async_save}")
    assert code == 1
    line = _error_line(log)
    assert line.startswith(f"error: checkpoint of step 2 ({disk / 'run' / 'checkpoints' / 'step_00000002'}) "
                           f"was not saved on rank 0: No space left on device")
    assert not (disk / "run" / "checkpoints" / "latest").exists()
    # The partial rank file was removed (the space is free again); the next save clears the empty temp dir.
    assert [x for x in (disk / "run" / "checkpoints").rglob("*") if x.is_file()] == []


@pytest.mark.slow
def test_metrics_on_a_full_disk_still_save_the_checkpoint(tmp_path, mounts):
    disk = mounts(tmp_path / "disk", 64)
    run = disk / "run"
    run.mkdir()
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 4096))  # room for a few metrics rows only
    ckpt = tmp_path / "ckpt"  # elsewhere, with room
    launcher = Launcher(tmp_path / "logs")
    code, log = launcher.run(run, "train.train_steps=100", f"checkpoint.dir={ckpt}")
    assert code == 1
    line = _error_line(log)
    assert line.startswith(f"error: cannot write {run / 'metrics.jsonl'}: No space left on device (checkpoint of "
                           f"step ")
    step = int(line.split("(checkpoint of step ")[1].split()[0])
    assert 0 < step < 100 and (ckpt / "latest").read_text() == f"step_{step:08d}"


@pytest.mark.slow
def test_a_read_only_run_dir(tmp_path, mounts):
    ro = mounts(tmp_path / "ro", 64, "ro")
    launcher = Launcher(tmp_path / "logs")
    code, log = launcher.run(ro / "run", "train.train_steps=1")
    assert code == 1
    line = _error_line(log)
    assert str(ro / "run") in line and "Read-only file system" in line
