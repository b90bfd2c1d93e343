"""How a rank behaves toward its launcher (torchrun, srun, a shell) at the edges of a run.

- A rank exits when its launcher dies: killing `torchrun` with SIGKILL must not leave orphan ranks
  that keep training and writing checkpoints. Linux delivers PR_SET_PDEATHSIG when the parent
  exits; elsewhere (or if the parent died before the call) a watchdog thread polls getppid().
- An error line always gets out: every rank prints nothing but rank 0, which prints at once. The
  other ranks wait a grace period, in which torchrun (seeing rank 0 fail) stops them; only if
  they are still alive after it, the error was theirs alone and they print it themselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
ERROR_GRACE_S = 10.0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def exit_with_parent() -> None:
    """SIGKILL this process when its parent exits."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog below covers it
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def print_error(message: str) -> None:
    """One `error: ...` line on stderr, in an order that always gets rank 0's line out."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    # Restore the default SIGTERM action: torchrun stops the other ranks with it once rank 0 failed.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(ERROR_GRACE_S)
    print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
