"""SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary; every rank agrees on it."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from megalite.testing import run_distributed
from megalite.training.preemption import PreemptionGuard


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_restore_puts_back_the_handler(sig):
    before = signal.getsignal(sig)
    guard = PreemptionGuard()
    try:
        assert not guard.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), sig)  # delivered to the main thread before os.kill returns
        assert guard.should_stop(torch.device("cpu"))
    finally:
        guard.restore()
    assert signal.getsignal(sig) == before


def _agree_worker(rank: int, world: int):
    guard = PreemptionGuard()
    try:
        first = guard.should_stop(torch.device("cpu"))
        if rank == 1:  # Slurm may signal only some ranks
            os.kill(os.getpid(), signal.SIGUSR1)
        return first, guard.should_stop(torch.device("cpu"))
    finally:
        guard.restore()


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank():
    assert run_distributed(_agree_worker, 2) == [(False, True), (False, True)]
