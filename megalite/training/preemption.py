"""SIGTERM / SIGUSR1 (Slurm preemption): finish the current step, checkpoint, exit cleanly.

The handler only sets a flag; ranks agree on it at the step boundary (a signal may reach only some
ranks), so every rank saves the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionGuard:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test harnesses)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, device: torch.device) -> bool:
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)
        return self.requested

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
