"""Thin wrappers over the collectives we use, so that every byte moved can be counted.

`CommCounter` is how benchmarks/comm_volume.py audits traffic against the analytical model: each
wrapper reports (op, group size, payload bytes) to the active counter, if any.
`CommTimer` is how benchmarks/comm_overlap.py measures the time a rank spends blocked on
communication: inside a blocking collective, or in `wait()` on an asynchronous one.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.distributed as dist

_counter: CommCounter | None = None
_timer: CommTimer | None = None


class CommCounter:
    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, op: str, nbytes: int) -> None:
        self.bytes[op] += nbytes
        self.calls[op] += 1


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    global _counter
    prev, _counter = _counter, CommCounter()
    try:
        yield _counter
    finally:
        _counter = prev


class CommTimer:
    """Seconds blocked per kind: "blocking" (inside a synchronous collective) or "wait" (in
    wait() on an asynchronous one); `calls` per kind; `done_at_wait`: asynchronous ops that had
    already completed when waited for, i.e. whose transfer was entirely hidden behind compute."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.done_at_wait = 0
        self.backward_s = 0.0  # the part blocked inside an autograd backward pass

    @property
    def blocked_s(self) -> float:
        return sum(self.seconds.values())


@contextlib.contextmanager
def time_comm() -> Iterator[CommTimer]:
    global _timer
    prev, _timer = _timer, CommTimer()
    try:
        yield _timer
    finally:
        _timer = prev


@contextlib.contextmanager
def _blocked(kind: str = "blocking") -> Iterator[None]:
    if _timer is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        _timer.seconds[kind] += dt
        _timer.calls[kind] += 1
        if torch._C._current_graph_task_id() != -1:  # -1: not inside a backward pass
            _timer.backward_s += dt


def wait(work) -> None:
    """Waits for an asynchronous collective or p2p op (None: nothing pending), counting the time
    blocked in the active timer."""
    if work is None:
        return
    if _timer is not None and work.is_completed():
        _timer.done_at_wait += 1
    with _blocked("wait"):
        work.wait()


def group_size(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def record(op: str, t: torch.Tensor) -> None:
    """Counts `t`'s payload under `op` in the active counter, if any. Collectives issued outside
    these wrappers (DP buckets, pipeline p2p, the optimizer) report here under their own names."""
    if _counter is not None:
        _counter.add(op, t.numel() * t.element_size())


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM,
               async_op: bool = False):
    if group_size(group) == 1:
        return None
    record("all_reduce", t)
    if async_op:
        return dist.all_reduce(t, op=op, group=group, async_op=True)
    with _blocked():
        return dist.all_reduce(t, op=op, group=group)


def start_all_gather_dim0(t: torch.Tensor, group: dist.ProcessGroup | None):
    """Launches the all-gather of `all_gather_dim0` asynchronously: returns (output, work), the
    output valid only after `wait(work)`. work is None when there is nothing to communicate."""
    n = group_size(group)
    if n == 1:
        return t, None
    t = t.contiguous()
    out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    record("all_gather", out)
    return out, dist.all_gather_single(out, t, group=group, async_op=True)


def all_gather_dim0(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenates every rank's `t` along dim 0 (one contiguous collective, no list of tensors)."""
    n = group_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    record("all_gather", out)
    with _blocked():
        dist.all_gather_single(out, t, group=group)
    return out


def _scatter_output(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] % n != 0:
        raise ValueError(f"reduce_scatter: dim 0 ({t.shape[0]}) is not divisible by the group size {n}")
    return torch.empty((t.shape[0] // n, *t.shape[1:]), dtype=t.dtype, device=t.device)


def start_reduce_scatter_dim0(t: torch.Tensor, group: dist.ProcessGroup | None):
    """Launches `reduce_scatter_dim0` asynchronously: returns (output, work) as above. `t` must stay
    untouched until the wait."""
    n = group_size(group)
    if n == 1:
        return t, None
    out = _scatter_output(t, n)
    t = t.contiguous()
    record("reduce_scatter", t)
    return out, dist.reduce_scatter_single(out, t, group=group, async_op=True)


def reduce_scatter_dim0(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sums `t` over the group and returns this rank's 1/n slice along dim 0."""
    n = group_size(group)
    if n == 1:
        return t
    out = _scatter_output(t, n)
    t = t.contiguous()
    record("reduce_scatter", t)
    with _blocked():
        dist.reduce_scatter_single(out, t, group=group)
    return out


def broadcast(t: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> None:
    if group_size(group) == 1:
        return
    record("broadcast", t)
    with _blocked():
        dist.broadcast(t, src=src, group=group)
