"""Point-to-point exchange of activations and gradients between neighbouring pipeline stages.

Each exchange posts all its sends and receives as one batch (`batch_isend_irecv`) and waits for
them together, so a rank that sends its output while receiving the next input never blocks on
the order in which its peer posts them. Shapes are fixed by the config, so receivers allocate
their buffers without a metadata round trip: [seq (/tp under SP), micro_batch, hidden].

With pp=2 the next and the previous rank are the same peer, and activations and gradients travel
between the same two ranks in one batch. Forward-direction messages are always posted before
backward-direction ones (on both ends), and they carry different tags, so they cannot be swapped.

Receives are waited at once (every schedule consumes them next), sends need not be: with
`overlap_sends` (the schedules' comm) a send's wait is deferred to the next exchange (or
`flush()`, at the end of a schedule), so the transfer overlaps the compute in between.
Once an activation is posted, the stage's output tensor gives up its storage (Megatron's output
deallocation): its `.data` becomes one element while its autograd graph stays, and the detached
alias handed to the send keeps the buffer alive only until the send completes. Its backward then goes through `backward_from`, which does not compare the
gradient's shape with the (now one-element) output's.

`_plan` is that batch as data; simulate.py traces the same plan (by overriding `_post`) to check
the schedules without processes. NCCL wants every rank of a group in its first batched p2p call,
which a pipeline's first exchange (stage 0 -> 1 only) is not: build_parallel_state meets the
pipeline group once with a barrier right after creating it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.parallel.comm import record, wait
from megalite.parallel.state import ParallelState

FORWARD_TAG = 1  # activations: stage s -> s+1
BACKWARD_TAG = 2  # gradients: stage s+1 -> s

# One message of an exchange: (kind "send" | "recv", peer rank, tag, tensor).
Op = tuple[str, int, int, torch.Tensor]


def activation_shape(seq_len: int, micro_batch_size: int, hidden_size: int, ps: ParallelState) -> tuple[int, ...]:
    """The hidden-state shape that crosses stage boundaries (sequence-sharded under SP)."""
    return (seq_len // ps.tp if ps.sp else seq_len, micro_batch_size, hidden_size)


def _plan(ps: ParallelState, send_next: torch.Tensor | None, send_prev: torch.Tensor | None,
          from_prev: torch.Tensor | None, from_next: torch.Tensor | None) -> list[Op]:
    """The messages of one exchange, in posting order (forward direction first)."""
    ops: list[Op] = []
    if send_next is not None:
        ops.append(("send", ps.next_rank, FORWARD_TAG, send_next))
    if from_prev is not None:
        ops.append(("recv", ps.prev_rank, FORWARD_TAG, from_prev))
    if send_prev is not None:
        ops.append(("send", ps.prev_rank, BACKWARD_TAG, send_prev))
    if from_next is not None:
        ops.append(("recv", ps.next_rank, BACKWARD_TAG, from_next))
    return ops


def deallocate_output(out: torch.Tensor) -> None:
    """Frees a sent activation's storage but keeps its autograd graph (see the module docstring).
    Only a stage's fresh output qualifies: a view shares its base's storage, and a leaf has no
    graph to keep."""
    if out._base is None and out.grad_fn is not None:
        out.data = torch.empty((1,), dtype=out.dtype, device=out.device)


def backward_from(output: torch.Tensor, grad: torch.Tensor) -> None:
    """torch.autograd.backward(output, grad) without the check that grad has output's shape
    (a deallocated output has one element); the engine still checks it against the graph."""
    torch.autograd.Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
        (output,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True)


class PipelineComm:
    def __init__(self, ps: ParallelState, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, overlap_sends: bool = False) -> None:
        """`overlap_sends`: leave sends in flight past their exchange; the owner then calls
        `flush()` when done (the schedules do). Otherwise each exchange waits for all of it."""
        self.ps, self.shape, self.dtype, self.device = ps, shape, dtype, device
        self.overlap_sends = overlap_sends
        self.in_flight: list[tuple[object, torch.Tensor]] = []  # posted sends: (work, buffer)

    def _buffer(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _check(self, t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise RuntimeError(f"pipeline send of {tuple(t.shape)} {t.dtype}, but the receiver "
                               f"expects {self.shape} {self.dtype}")
        return t.detach().contiguous()

    def exchange(self, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                 recv_prev: bool = False, recv_next: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Sends activations to the next rank / gradients to the previous one, receives an
        activation from the previous rank / a gradient from the next one; returns
        (from_prev, from_next). Received activations require grad: they are the stage's input."""
        from_prev = self._buffer() if recv_prev else None
        from_next = self._buffer() if recv_next else None
        ops = _plan(self.ps, None if send_next is None else self._check(send_next),
                    None if send_prev is None else self._check(send_prev), from_prev, from_next)
        if ops:
            self._post(ops)
        if send_next is not None:
            deallocate_output(send_next)
        if from_prev is not None:
            from_prev.requires_grad_()
        return from_prev, from_next

    def _post(self, ops: list[Op]) -> None:
        """Posts the plan as one batch; waits for the sends of earlier exchanges, then for this
        one's receives. This one's sends stay in flight."""
        group = self.ps.pp_group
        p2p = []
        for kind, peer, tag, t in ops:
            if kind == "send":
                record("p2p", t)
            p2p.append(dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, group, tag))
        works = dist.batch_isend_irecv(p2p)
        self.flush()
        if len(works) != len(ops):  # a coalescing backend (NCCL): one handle for the batch
            for work in works:
                wait(work)
            return
        for (kind, _, _, t), work in zip(ops, works):
            if kind == "send" and self.overlap_sends:
                self.in_flight.append((work, t))
            else:
                wait(work)

    def flush(self) -> None:
        """Waits for the sends still in flight and drops their buffers (end of a schedule)."""
        while self.in_flight:
            wait(self.in_flight.pop(0)[0])

    # Stage-level helpers for the non-interleaved schedules: the ends skip what they lack.
    def recv_forward(self) -> torch.Tensor | None:
        return None if self.ps.is_first_stage else self.exchange(recv_prev=True)[0]

    def send_forward(self, output: torch.Tensor) -> None:
        if not self.ps.is_last_stage:
            self.exchange(send_next=output)

    def recv_backward(self) -> torch.Tensor | None:
        return None if self.ps.is_last_stage else self.exchange(recv_next=True)[1]

    def send_backward(self, input_grad: torch.Tensor | None) -> None:
        if not self.ps.is_first_stage:
            self.exchange(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor | None:
        if self.ps.is_last_stage:
            return None
        return self.exchange(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None) -> torch.Tensor | None:
        if self.ps.is_first_stage:
            return None
        return self.exchange(send_prev=input_grad, recv_prev=True)[0]
