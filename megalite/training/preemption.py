"""SIGTERM / SIGUSR1 (Slurm preemption): finish the current step, checkpoint, exit cleanly.

The handler only sets a flag; ranks agree on it at the step boundary (a signal may reach only some
ranks), so every rank saves the same step. A fault that must end the run after one last checkpoint
(e.g. metrics.jsonl could not be written) goes through the same agreement via `fail`.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megalite.config import RunError


class PreemptionGuard:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False  # a signal reached this rank, or (after should_stop) any rank
        self.fault: str | None = None  # this rank's reason to stop with an error after saving
        self.fault_elsewhere = False
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test harnesses)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def fail(self, reason: str) -> None:
        self.fault = self.fault or reason

    def should_stop(self, device: torch.device) -> bool:
        code = 2 if self.fault else 1 if self.requested else 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(code)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        self.requested = self.requested or code == 1
        self.fault_elsewhere = code == 2 and not self.fault
        return code > 0

    def stop_line(self, step: int) -> str:
        """After the last checkpoint: the clean-stop line, or the fault raised as a RunError."""
        if self.fault:
            raise RunError(f"{self.fault} (checkpoint of step {step} saved; resume with the same command)")
        if self.fault_elsewhere:
            raise RunError(f"stopped after step {step}: another rank failed (its error is on rank 0's output)")
        return f"stopped cleanly after step {step} ({'preemption signal' if self.requested else 'exit_interval'})"

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
