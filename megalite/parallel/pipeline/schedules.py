"""Pipeline schedules: all-forward-all-backward, 1F1B and interleaved 1F1B.

All three share one signature with the no-pipelining version in megalite/training:

    forward_backward(chunks, micro_batches, ps, *, num_units, step=TokenLoss(), forward_only=False,
                     loss_scale=1.0, no_sync=None) -> {"loss": sum, <metric>: sum, ...}

`chunks` are this rank's model chunks (one, or `vpp` with interleaving), each with `pre_process`
/ `post_process` flags. `step` (pipeline/step.py) runs a chunk's forward and, on the last stage,
the stage's loss: a sum over the micro-batch's units (loss tokens, preference pairs, ...). Each
micro-batch backprops `loss_sum * loss_scale / num_units`, where `num_units` counts the units of
the whole step on all DP ranks, so accumulated grads equal those of the step's global mean for
any split into micro-batches and ranks. The return value holds the detached sums this rank
computed (the last stage's; zeros elsewhere).

Activation shapes come from the config ([seq/tp under SP, micro_batch, hidden]), so the
receiving side allocates its buffer without first asking the sender for a shape.

`comm` replaces the p2p exchange (simulate.py passes one that records instead of sending).

`no_sync` is an optional context-manager factory (the data-parallel grad reducer's): every
backward but the rank's last runs inside it, so gradient all-reduces start only during the last
micro-batch's backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn

from megalite.config import ConfigError, ParallelConfig
from megalite.parallel.pipeline.p2p import PipelineComm, activation_shape, backward_from
from megalite.parallel.pipeline.stages import check_schedule, resolve_schedule
from megalite.parallel.pipeline.step import ForwardStep, TokenLoss, add_sums, new_sums
from megalite.parallel.state import ParallelState

MicroBatch = dict[str, torch.Tensor]
NoSync = Callable[[], AbstractContextManager[Any]] | None


class _Steps:
    """Forward and backward of one (chunk, micro-batch); keeps the loss sum and grad-sync gating."""

    def __init__(self, chunks: list[nn.Module], micro_batches: list[MicroBatch], ps: ParallelState,
                 num_units: float, step: ForwardStep | None, forward_only: bool, loss_scale: float,
                 no_sync: NoSync, comm: PipelineComm | None) -> None:
        self.chunks, self.micro_batches, self.ps = chunks, micro_batches, ps
        self.step = step if step is not None else TokenLoss()
        self.forward_only, self.no_sync = forward_only, no_sync
        self.loss_factor = loss_scale / num_units
        self.backwards_left = len(chunks) * len(micro_batches)
        self.sums = new_sums(self.step, ps.device)
        if comm is None:
            first = micro_batches[0]["tokens"]
            param = next(chunks[0].parameters())
            hidden = chunks[0].cfg.hidden_size  # type: ignore[union-attr]
            comm = PipelineComm(ps, activation_shape(first.shape[1], first.shape[0], hidden, ps),
                                param.dtype, param.device, overlap_sends=True)
        self.comm = comm

    def forward(self, chunk_id: int, mb_id: int, input_tensor: torch.Tensor | None) -> torch.Tensor:
        model, mb = self.chunks[chunk_id], self.micro_batches[mb_id]
        with torch.set_grad_enabled(not self.forward_only):
            out = self.step.forward(model, mb, None if model.pre_process else input_tensor)
            if model.post_process:  # the stage's loss sum -> this micro-batch's share of the step's loss
                loss, metrics = self.step.loss(out, mb)
                add_sums(self.sums, loss, metrics)
                out = loss * self.loss_factor
        return out

    def backward(self, input_tensor: torch.Tensor | None, output: torch.Tensor,
                 output_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backpropagates one (chunk, micro-batch); returns the grad of its input activation."""
        self.backwards_left -= 1
        sync_off = self.no_sync is not None and self.backwards_left > 0
        with self.no_sync() if sync_off else contextlib.nullcontext():  # type: ignore[misc]
            if output_grad is None:  # the loss, on the last stage
                output.backward()
            else:
                backward_from(output, output_grad)  # the output may be deallocated (p2p.py)
        return None if input_tensor is None else input_tensor.grad


def forward_backward_afab(chunks: list[nn.Module], micro_batches: list[MicroBatch], ps: ParallelState, *,
                          num_units: float, step: ForwardStep | None = None, forward_only: bool = False,
                          loss_scale: float = 1.0, no_sync: NoSync = None,
                          comm: PipelineComm | None = None) -> dict[str, torch.Tensor]:
    """All forwards, then all backwards (GPipe). The reference schedule: simplest, but it keeps the
    activations of every micro-batch alive at once."""
    (model,) = chunks
    steps = _Steps(chunks, micro_batches, ps, num_units, step, forward_only, loss_scale, no_sync, comm)
    comm = steps.comm
    saved = []
    for i in range(len(micro_batches)):
        inp = comm.recv_forward()
        out = steps.forward(0, i, inp)
        comm.send_forward(out)
        if not forward_only:
            saved.append((inp, out))
    for inp, out in saved:  # first in, first out: the order in which the last stage finished them
        grad = comm.recv_backward()
        comm.send_backward(steps.backward(inp, out, grad))
    comm.flush()  # sends still in flight (p2p.py)
    return steps.sums


def forward_backward_1f1b(chunks: list[nn.Module], micro_batches: list[MicroBatch], ps: ParallelState, *,
                          num_units: float, step: ForwardStep | None = None, forward_only: bool = False,
                          loss_scale: float = 1.0, no_sync: NoSync = None,
                          comm: PipelineComm | None = None) -> dict[str, torch.Tensor]:
    """1F1B (PipeDream-flush): stage r runs pp-r-1 warm-up forwards, then alternates one forward
    and one backward, then drains. Same bubble as AFAB, but at most pp micro-batches in flight."""
    (model,) = chunks
    steps = _Steps(chunks, micro_batches, ps, num_units, step, forward_only, loss_scale, no_sync, comm)
    comm = steps.comm
    m = len(micro_batches)
    warmup = min(ps.pp - ps.pp_rank - 1, m)
    remaining = m - warmup
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []

    for i in range(warmup):
        inp = comm.recv_forward()
        out = steps.forward(0, i, inp)
        comm.send_forward(out)
        if not forward_only:
            inputs.append(inp)
            outputs.append(out)

    inp = comm.recv_forward() if remaining > 0 else None
    for i in range(remaining):
        last = i == remaining - 1
        out = steps.forward(0, warmup + i, inp)
        if forward_only:
            comm.send_forward(out)
            if not last:
                inp = comm.recv_forward()
            continue
        # Send this output and wait for the gradient of the oldest in-flight micro-batch.
        grad = comm.send_forward_recv_backward(out)
        inputs.append(inp)
        outputs.append(out)
        input_grad = steps.backward(inputs.pop(0), outputs.pop(0), grad)
        if last:
            comm.send_backward(input_grad)
        else:
            inp = comm.send_backward_recv_forward(input_grad)

    if not forward_only:
        for _ in range(warmup):
            grad = comm.recv_backward()
            comm.send_backward(steps.backward(inputs.pop(0), outputs.pop(0), grad))
    comm.flush()  # sends still in flight (p2p.py)
    return steps.sums


def forward_backward_interleaved(chunks: list[nn.Module], micro_batches: list[MicroBatch], ps: ParallelState, *,
                                 num_units: float, step: ForwardStep | None = None, forward_only: bool = False,
                                 loss_scale: float = 1.0, no_sync: NoSync = None,
                                 comm: PipelineComm | None = None) -> dict[str, torch.Tensor]:
    """Interleaved 1F1B (Megatron): each rank holds v chunks, so a micro-batch crosses it v times
    and the warm-up/drain bubble shrinks by v. Micro-batches go in groups of pp: the rank runs
    chunk 0 for pp of them, then chunk 1 for the same pp, ..., so the count must be a multiple of pp.
    Every step below is one batched exchange that both neighbours post at the same point."""
    v, pp, rank = len(chunks), ps.pp, ps.pp_rank
    m = len(micro_batches)
    if m % pp != 0:
        raise ValueError(f"interleaved schedule: {m} micro-batches is not a multiple of pp={pp}")
    steps = _Steps(chunks, micro_batches, ps, num_units, step, forward_only, loss_scale, no_sync, comm)
    comm = steps.comm
    total = m * v
    first_rank, last_rank = rank == 0, rank == pp - 1

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * v)) // pp
        return c if forward else v - 1 - c

    def micro_batch_of(k: int) -> int:
        return (k // (pp * v)) * pp + k % pp

    inputs: list[list[torch.Tensor | None]] = [[] for _ in range(v)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(v)]
    grads: list[list[torch.Tensor | None]] = [[] for _ in range(v)]

    def forward_k(k: int) -> torch.Tensor:
        c = chunk_of(k, True)
        if chunks[c].pre_process and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)  # the first virtual stage reads tokens, not a received input
        out = steps.forward(c, micro_batch_of(k), inputs[c][-1])
        outputs[c].append(out)
        if forward_only:  # nothing to keep for a backward
            inputs[c].pop()
            outputs[c].pop()
        return out

    def backward_k(k: int) -> torch.Tensor | None:
        c = chunk_of(k, False)
        if chunks[c].post_process and not grads[c]:
            grads[c].append(None)  # the loss needs no incoming gradient
        return steps.backward(inputs[c].pop(0), outputs[c].pop(0), grads[c].pop(0))

    if forward_only:
        warmup = total
    elif m == pp:
        warmup = total  # too few micro-batches for a steady state: all forwards, then all backwards
    else:
        warmup = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    remaining = total - warmup

    inputs[0].append(comm.exchange(recv_prev=not first_rank)[0])
    for k in range(warmup):
        c = chunk_of(k, True)
        out: torch.Tensor | None = forward_k(k)
        if chunks[c].post_process:
            out = None  # the loss stays here
        next_c = chunk_of(k + 1, True)
        recv_prev = not (first_rank and next_c == 0) and k != total - 1
        if k == warmup - 1 and remaining > 0:
            # The first backward's gradient arrives with the last warm-up exchange.
            inp, grad = comm.exchange(send_next=out, recv_prev=recv_prev, recv_next=not last_rank)
            grads[v - 1].append(grad)
        else:
            inp, _ = comm.exchange(send_next=out, recv_prev=recv_prev)
        if recv_prev:
            inputs[next_c].append(inp)

    for i in range(remaining):
        kf, kb = warmup + i, i
        out = forward_k(kf)
        input_grad = backward_k(kb)
        if chunks[chunk_of(kf, True)].post_process:
            out = None
        if chunks[chunk_of(kb, False)].pre_process:
            input_grad = None
        # Which chunk the next received activation / gradient belongs to. The first rank receives
        # from the last rank the activation of a micro-batch pp-1 forwards behind; symmetrically
        # for gradients on the last rank.
        recv_prev = True
        if first_rank:
            next_fc = chunk_of(kf - (pp - 1), True)
            recv_prev = next_fc != v - 1
            next_fc += 1
        else:
            next_fc = chunk_of(kf + 1, True)
        recv_next = True
        if last_rank:
            next_bc = chunk_of(kb - (pp - 1), False)
            recv_next = next_bc != 0
            next_bc -= 1
        else:
            next_bc = chunk_of(kb + 1, False)
        if i == remaining - 1:
            recv_prev = False
        inp, grad = comm.exchange(send_next=out, send_prev=input_grad, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[next_fc].append(inp)
        if recv_next:
            grads[next_bc].append(grad)

    if not forward_only:
        if remaining == 0:
            grads[v - 1].append(comm.exchange(recv_next=not last_rank)[1])
        for kb in range(remaining, total):
            input_grad = backward_k(kb)
            if chunks[chunk_of(kb, False)].pre_process:
                input_grad = None
            next_bc = chunk_of(kb + 1, False)
            recv_next = not (last_rank and next_bc == v - 1) and kb != total - 1
            _, grad = comm.exchange(send_prev=input_grad, recv_next=recv_next)
            if recv_next:
                grads[next_bc].append(grad)
    comm.flush()  # sends still in flight (p2p.py)
    return steps.sums


SCHEDULE_FNS = {
    "afab": forward_backward_afab,
    "1f1b": forward_backward_1f1b,
    "interleaved": forward_backward_interleaved,
}


def get_pipeline_schedule(ps: ParallelState, par: ParallelConfig) -> Callable[..., dict[str, torch.Tensor]]:
    """The configured schedule for pp > 1 (the trainer's `get_forward_backward` hook)."""
    check_schedule(par, num_micro=None)
    if ps.pp != par.pp or ps.vpp != par.vpp:
        raise ConfigError(f"pipeline layout mismatch: state pp={ps.pp} vpp={ps.vpp}, config pp={par.pp} vpp={par.vpp}")
    return SCHEDULE_FNS[resolve_schedule(par)]
