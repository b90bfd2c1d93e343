"""The run directory's two invariants across crashes and concurrent launches.

Lock: one run per run dir. Rank 0 holds an exclusive `flock` on `<run_dir>/.lock` for the run's
lifetime (the kernel drops it when the process dies, even on SIGKILL) and writes its host and pid
into it, so a second run is refused with one line naming the holder. A lock file whose holder is
gone is taken over with a message; a clean exit empties it, so only a crash leaves a stale one.

Metrics: a crash after step k is resumed from the last checkpoint j <= k, so steps j+1..k run
again; their first rows are dropped from metrics.jsonl when the run resumes (it is rewritten
atomically), so the file holds each step once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megalite.atomic import atomic_write_text
from megalite.config import ConfigError, RunError

LOCK = ".lock"


class RunDirLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.took_over: str | None = None  # "host pid" of a dead previous holder

    def acquire(self) -> None:
        """Raises ConfigError if another live process holds the lock, RunError if it cannot be made."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot create the run directory lock {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise ConfigError(f"run dir {self.path.parent} is in use by another run ({holder}); wait for it, "
                              f"or use another train.run_dir") from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            self.took_over = _describe(previous)
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd

    def __del__(self) -> None:  # a trainer that failed half-built must not keep its run dir locked
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # empty: the next run knows this one ended cleanly
            except OSError:
                pass
            os.close(self.fd)  # drops the flock
            self.fd = None


def _describe(raw: bytes) -> str:
    try:
        d = json.loads(raw.decode())
        return f"host {d['host']}, pid {d['pid']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown"


def lock_run_dir(run_dir: str | Path, rank: int, world_size: int, device: torch.device) -> RunDirLock | None:
    """Rank 0 takes the lock; every rank learns whether it did, so all of them stop together."""
    lock, error = None, None
    if rank == 0:
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
        except (ConfigError, RunError) as e:
            error = e
    if world_size > 1:
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and error is None:
            raise ConfigError(f"run dir {run_dir} could not be locked (rank 0 reports why)")
    if error is not None:
        raise error
    if lock is not None and lock.took_over:
        print(f"took over the stale lock of run dir {run_dir} ({lock.took_over}, no longer running)", flush=True)
    return lock


def drop_rows_after(metrics_path: str | Path, step: int) -> int:
    """Removes rows with `step` > step (left by a crashed run past its last checkpoint) and any
    partial last line; returns how many were dropped."""
    path = Path(metrics_path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            late = int(row["step"]) > step
        except (ValueError, KeyError, TypeError):
            late = True  # a line cut short by the crash
        if late:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in kept))
    return dropped
