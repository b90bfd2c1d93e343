"""Point-to-point exchange of activations and gradients between neighbouring pipeline stages.

Each exchange posts all its sends and receives as one batch (`batch_isend_irecv`) and waits for
them together, so a rank that sends its output while receiving the next input never blocks on
the order in which its peer posts them. Shapes are fixed by the config, so receivers allocate
their buffers without a metadata round trip: [seq (/tp under SP), micro_batch, hidden].

With pp=2 the next and the previous rank are the same peer, and activations and gradients travel
between the same two ranks in one batch. Forward-direction messages are always posted before
backward-direction ones (on both ends), and they carry different tags, so they cannot be swapped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.parallel.comm import record
from megalite.parallel.state import ParallelState

FORWARD_TAG = 1  # activations: stage s -> s+1
BACKWARD_TAG = 2  # gradients: stage s+1 -> s

# Groups whose ranks have all met once. NCCL requires the first batched p2p call in a group to
# involve every rank of it, which a pipeline's first exchange (stage 0 -> 1 only) does not.
_met: set[int] = set()


def activation_shape(seq_len: int, micro_batch_size: int, hidden_size: int, ps: ParallelState) -> tuple[int, ...]:
    """The hidden-state shape that crosses stage boundaries (sequence-sharded under SP)."""
    return (seq_len // ps.tp if ps.sp else seq_len, micro_batch_size, hidden_size)


class PipelineComm:
    def __init__(self, ps: ParallelState, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.ps, self.shape, self.dtype, self.device = ps, shape, dtype, device

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
        ps, group = self.ps, self.ps.pp_group
        ops: list[dist.P2POp] = []
        from_prev = self._buffer() if recv_prev else None
        from_next = self._buffer() if recv_next else None
        if send_next is not None:
            t = self._check(send_next)
            record("p2p", t)
            ops.append(dist.P2POp(dist.isend, t, ps.next_rank, group, FORWARD_TAG))
        if from_prev is not None:
            ops.append(dist.P2POp(dist.irecv, from_prev, ps.prev_rank, group, FORWARD_TAG))
        if send_prev is not None:
            t = self._check(send_prev)
            record("p2p", t)
            ops.append(dist.P2POp(dist.isend, t, ps.prev_rank, group, BACKWARD_TAG))
        if from_next is not None:
            ops.append(dist.P2POp(dist.irecv, from_next, ps.next_rank, group, BACKWARD_TAG))
        if ops:
            if id(group) not in _met:
                dist.barrier(group=group)
                _met.add(id(group))
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if from_prev is not None:
            from_prev.requires_grad_()
        return from_prev, from_next

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
