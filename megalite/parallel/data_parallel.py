"""Data parallelism over contiguous parameter/gradient buffers, reduced bucket by bucket.

Every trainable parameter of this rank's model chunks becomes a view into one flat parameter buffer,
and its `.grad` a view into a matching flat gradient buffer, so autograd accumulates micro-batches
in place and a bucket (a contiguous slice of the buffer) is one collective, with no copies.

Buckets follow the reverse parameter order, which is roughly the order backward produces grads.
During the backward of the *last* micro-batch, a post-accumulate-grad hook marks each parameter
ready; when all of a bucket's parameters are ready its reduction starts asynchronously and overlaps
the rest of backward. Earlier micro-batches run under `no_sync()` and only accumulate locally.
`finish_grad_sync()` launches whatever has not started and waits for everything.

Grads are SUMMED over DP: the loss is already divided by the global token count (see
training/forward_backward.py). With `shard=True` (the distributed optimizer) a bucket is
reduce-scattered instead of all-reduced: each rank ends up with the DP-summed grads of its 1/dp
slice of every bucket only (`shard_range`).

Parameters whose grads must first be summed over another group (TP-partial grads such as norm
weights under SP, a tied embedding split over the pipeline) go into separate "late" buckets: their
local grads are summed over that group first and reduced over DP last. Sums commute, but only on
full buffers, and a reduce-scatter leaves each rank a different slice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from megalite.parallel import comm
from megalite.parallel.finalize import group_syncs
from megalite.parallel.state import ParallelState


@dataclass
class ParamSlot:
    name: str  # global parameter name (layer numbers are global, so it is layout independent)
    param: nn.Parameter
    start: int  # offset in the flat buffers
    numel: int

    @property
    def end(self) -> int:
        return self.start + self.numel


@dataclass
class Bucket:
    index: int
    start: int
    end: int  # [start, end) in the flat buffers; the size is a multiple of dp
    slots: list[ParamSlot]
    late: bool
    ready: set[int] = field(default_factory=set)
    launched: bool = False
    handle: dist.Work | None = None


class DataParallel:
    def __init__(self, chunks: list[nn.Module], ps: ParallelState, bucket_size_mb: float = 25.0,
                 overlap: bool = True, shard: bool = False) -> None:
        self.chunks, self.ps = chunks, ps
        self.dp, self.overlap, self.shard = ps.dp, overlap, shard
        named = [(m, n, p) for m in chunks for n, p in m.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("DataParallel: the model has no trainable parameters")
        dtypes = {p.dtype for _, _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"DataParallel needs one parameter dtype, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        device = named[0][2].device
        # Reverse order approximates the order in which backward produces the grads.
        order = list(reversed(named))
        regular = [(n, p) for _, n, p in order if not group_syncs(p, ps)]
        late = [(n, p) for _, n, p in order if group_syncs(p, ps)]
        # Late buckets are reduced after backward, so their order is free: whole TP-partial grads
        # first, then partial rows, then the tied embedding, which keeps each group's ranges together.
        late.sort(key=lambda e: [(g is not ps.tp_group, rows is not None) for rows, g in group_syncs(e[1], ps)])
        cap = max(1, int(bucket_size_mb * 2**20) // torch.empty((), dtype=self.dtype).element_size())
        self.buckets: list[Bucket] = []
        self.slots: list[ParamSlot] = []
        offset = 0
        for group, is_late in ((regular, False), (late, True)):
            current: list[ParamSlot] = []
            start = offset
            for i, (name, p) in enumerate(group):
                current.append(ParamSlot(name, p, offset, p.numel()))
                offset += p.numel()
                if offset - start >= cap or i == len(group) - 1:
                    offset = start + self._padded(offset - start)
                    self.buckets.append(Bucket(len(self.buckets), start, offset, current, is_late))
                    self.slots += current
                    current, start = [], offset
        self.numel = offset
        self.num_params = sum(s.numel for s in self.slots)
        self.param_data = torch.zeros(self.numel, dtype=self.dtype, device=device)
        self.grad_data = torch.zeros(self.numel, dtype=self.dtype, device=device)
        self._bucket_of: dict[int, Bucket] = {}
        self._grad_view: dict[int, torch.Tensor] = {}
        for b in self.buckets:
            for s in b.slots:
                p = s.param
                view = self.param_data[s.start: s.end].view_as(p)
                view.copy_(p.detach())
                p.data = view
                self._grad_view[id(p)] = self.grad_data[s.start: s.end].view_as(p)
                p.grad = self._grad_view[id(p)]
                self._bucket_of[id(p)] = b
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._group_syncs = self._plan_group_syncs()
        self._sync_enabled = True
        self._finished = False
        for m in chunks:
            m.grad_sync = self  # lets finalize_grads find us without a new call site

    def _padded(self, n: int) -> int:
        return -(-n // self.dp) * self.dp

    def _plan_group_syncs(self) -> list[tuple[torch.Tensor, dist.ProcessGroup | None]]:
        """The late buckets' group sums (finalize.group_syncs) as (grad-buffer view, group), in the
        order every rank issues them (TP, then the embedding group). Late parameters sit next to
        each other in the buffer, so ranges of one group that touch are merged: one in-place
        all-reduce per run of parameters, no copies."""
        order = [self.ps.tp_group, self.ps.embedding_group]
        ranges: dict[int, list[list[int]]] = {}
        for b in self.buckets:
            for s in b.slots if b.late else ():
                for rows, group in group_syncs(s.param, self.ps):
                    if comm.group_size(group) == 1:
                        continue
                    lo, hi = s.start, s.end
                    if rows is not None:
                        row = s.numel // s.param.shape[0]
                        lo, hi = s.start + rows[0] * row, s.start + rows[1] * row
                    runs = ranges.setdefault(order.index(group), [])
                    if runs and runs[-1][1] == lo:
                        runs[-1][1] = hi
                    else:
                        runs.append([lo, hi])
        return [(self.grad_data[lo:hi], order[k]) for k in sorted(ranges) for lo, hi in ranges[k] if lo < hi]

    # -- the per-step protocol ----------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate; wrap every micro-batch but the last one."""
        prev, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = prev

    def zero_grad(self) -> None:
        self.grad_data.zero_()
        for b in self.buckets:
            b.ready.clear()
            b.launched, b.handle = False, None
        for s in self.slots:
            s.param.grad = self._grad_view[id(s.param)]  # in case someone set it to None
        self._finished = False

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        view = self._grad_view[id(p)]
        if p.grad is None or p.grad.data_ptr() != view.data_ptr():
            # `.grad` was replaced (e.g. zero_grad(set_to_none=True) from outside): fold it back in.
            if p.grad is not None:
                view.add_(p.grad)
            p.grad = view
        if self.dp == 1:
            return  # nothing to reduce: any micro-batch loop is fine, no_sync or not
        b = self._bucket_of[id(p)]
        if b.launched:
            raise RuntimeError(f"a gradient for '{self._name(p)}' arrived after its bucket was reduced: "
                               "run every micro-batch but the last under no_sync()")
        if not self._sync_enabled or not self.overlap or b.late:
            return
        b.ready.add(id(p))
        if len(b.ready) == len(b.slots):
            self._launch(b)

    def _name(self, p: torch.Tensor) -> str:
        return next((s.name for s in self.slots if s.param is p), "?")

    def shard_range(self, b: Bucket, dp_rank: int | None = None) -> tuple[int, int]:
        """The slice of bucket `b` (in buffer offsets) that DP rank `dp_rank` owns when sharded."""
        r = self.ps.dp_rank if dp_rank is None else dp_rank
        n = (b.end - b.start) // self.dp
        return b.start + r * n, b.start + (r + 1) * n

    def _launch(self, b: Bucket) -> None:
        if b.launched:
            return
        b.launched = True
        if self.dp == 1:
            return
        g = self.grad_data[b.start: b.end]
        if self.shard:
            # In place: this rank's output slice is its own chunk of the input, the aliasing
            # NCCL documents as in-place reduce-scatter (gloo reduces a copy of the input).
            lo, hi = self.shard_range(b)
            comm.record("dp.reduce_scatter", g)
            b.handle = dist.reduce_scatter_single(self.grad_data[lo:hi], g, group=self.ps.dp_group,
                                                  async_op=True)
        else:
            comm.record("dp.all_reduce", g)
            b.handle = dist.all_reduce(g, group=self.ps.dp_group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Completes the step's gradient reduction (idempotent until the next zero_grad)."""
        if self._finished:
            return
        for b in self.buckets:
            if not b.late:
                self._launch(b)  # buckets whose grads were not all produced in the last backward
        # Late buckets: sum their local grads over TP / the embedding group first (see module doc).
        for view, group in self._group_syncs:
            comm.all_reduce(view, group)
        for b in self.buckets:
            if b.late:
                self._launch(b)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
        self._finished = True

    # -- after the optimizer step ---------------------------------------------------------------
    def all_gather_params(self) -> None:
        """Sharded mode: every rank updated its slice of each bucket; collect the full buffer."""
        if not self.shard or self.dp == 1:
            return
        for b in self.buckets:
            # In place: the input is this rank's own chunk of the output (NCCL's in-place
            # all-gather; gloo gathers into a separate buffer and copies out).
            lo, hi = self.shard_range(b)
            out = self.param_data[b.start: b.end]
            comm.record("dp.all_gather", out)
            dist.all_gather_single(out, self.param_data[lo:hi], group=self.ps.dp_group)

    def describe(self) -> str:
        mb = self.numel * self.param_data.element_size() / 2**20
        return (f"{len(self.buckets)} buckets over {self.num_params:,} params ({mb:.1f} MiB), "
                f"{'reduce-scatter' if self.shard else 'all-reduce'}, overlap={'on' if self.overlap else 'off'}")
