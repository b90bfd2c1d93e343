"""SIGKILL at random points (saves included), then resume: the losses and metrics.jsonl equal an
uninterrupted run's, for one process and for TP=2 under torchrun (there the launcher itself is
killed, and its ranks must exit with it)."""

from __future__ import annotations

import random
import signal
import time

import pytest

from tests.faults.common import Launcher, rows, wait_for_lock

STEPS = 40
KILLS = 10
# Saving every step puts many kill points inside a save (rank files written, meta.json, the rename,
# `latest`); the delays are seeded, so a failure reproduces.
CONFIG = (f"train.train_steps={STEPS}", "checkpoint.save_interval=1", "checkpoint.load=auto",
          "checkpoint.keep_last=2", "checkpoint.keep_pow2=false")


def _chain(launcher: Launcher, run_dir, nproc: int, seed: int, extra: tuple[str, ...]) -> int:
    rng = random.Random(seed)
    kills = 0
    while kills < KILLS:
        done = max((r["step"] for r in rows(run_dir)), default=0)
        # Kill 1-2 steps into this launch, at a random moment within about a step and its save
        # (scaled by the measured step time, so the points spread the same on any machine).
        target = done + 1 + rng.randint(0, 1)
        p = launcher.start(run_dir, *CONFIG, *extra, nproc=nproc)
        deadline = time.time() + 120
        while p.poll() is None and max((r["step"] for r in rows(run_dir)), default=0) < target:
            assert time.time() < deadline, "no progress"
            time.sleep(0.01)
        if p.poll() is not None:  # finished before it could be killed
            break
        step_time = rows(run_dir)[-1].get("step_time", 0.1)
        time.sleep(rng.uniform(0.0, 2.5 * step_time))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        wait_for_lock(run_dir)
    code, log = launcher.run(run_dir, *CONFIG, *extra, nproc=nproc)
    assert code == 0, log
    return kills


@pytest.mark.slow
@pytest.mark.parametrize("nproc, extra", [(1, ()), (2, ("parallel.tp=2",))], ids=["single", "tp2"])
def test_sigkill_anywhere_then_resume_matches_the_uninterrupted_run(tmp_path, nproc, extra):
    launcher = Launcher(tmp_path / "logs")
    code, log = launcher.run(tmp_path / "straight", *CONFIG, *extra, nproc=nproc)
    assert code == 0, log
    reference = rows(tmp_path / "straight")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    kills = _chain(launcher, tmp_path / "killed", nproc, seed=1234 + nproc, extra=extra)
    assert kills == KILLS, f"only {kills} kills landed before the run finished"
    resumed = rows(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # each step once, none missing
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]
    launcher.keep(f"kill-{nproc}")
    assert launcher.tracebacks() == []
