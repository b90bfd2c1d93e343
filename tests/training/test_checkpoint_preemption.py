"""SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary. (That every rank agrees when
only one is signalled is tested end to end in test_checkpoint.py, with an exact resume.)"""

from __future__ import annotations

import os
import signal

import pytest
import torch

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
