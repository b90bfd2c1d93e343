"""Schedule analysis without processes: trace what each rank issues, then replay it on a clock.

The schedules are data-independent, so running the real schedule function once per rank, with
synthetic chunks that only record their compute time and a comm that only records its exchanges,
yields exactly the sequence of operations that rank issues in a real run. `critical_path` replays
those sequences with rendezvous point-to-point semantics (a batched exchange completes once every
matching operation on the peers has been posted, as with gloo/NCCL and no buffering) and returns
each rank's busy time and the makespan. It is how tests check that a schedule is really pipelined
(its idle fraction equals the theoretical bubble), and how benchmarks/pipeline_bubble.py separates
the schedule's own bubble from communication overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from megalite.parallel.pipeline.p2p import Op, PipelineComm
from megalite.parallel.pipeline.schedules import SCHEDULE_FNS
from megalite.parallel.state import ParallelState

SHAPE = (4, 1, 8)  # the synthetic activation: [seq, micro-batch, hidden]


@dataclass
class _Cfg:
    hidden_size: int = SHAPE[2]


class _Timed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, compute, t_fwd: float, t_bwd: float):
        ctx.compute, ctx.t_bwd = compute, t_bwd
        compute(t_fwd)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        ctx.compute(ctx.t_bwd)
        return grad, grad.sum(dim=(0, 1)), None, None, None


class SyntheticChunk(nn.Module):
    """Stands in for a LlamaModel chunk (same call signature and pipeline flags) whose forward and
    backward call `compute(seconds)`: sleep in a benchmark, record in a trace."""

    def __init__(self, pre_process: bool, post_process: bool, t_fwd: float, t_bwd: float,
                 compute: Callable[[float], None]) -> None:
        super().__init__()
        self.cfg = _Cfg()
        self.pre_process, self.post_process = pre_process, post_process
        self.t_fwd, self.t_bwd, self.compute = t_fwd, t_bwd, compute
        self.weight = nn.Parameter(torch.ones(SHAPE[2]))

    def forward(self, tokens=None, hidden=None, labels=None, position_ids=None, doc_ids=None):
        if self.pre_process:
            hidden = tokens.t().unsqueeze(-1).float().expand(*SHAPE).contiguous()
        x = _Timed.apply(hidden, self.weight, self.compute, self.t_fwd, self.t_bwd)
        return x.pow(2).mean(-1).t() if self.post_process else x


def synthetic_chunks(pp: int, vpp: int, pp_rank: int, t_fwd: float, t_bwd: float,
                     compute: Callable[[float], None]) -> list[SyntheticChunk]:
    """Rank `pp_rank`'s chunks (virtual stages v*pp + rank); a full stage takes t_fwd + t_bwd."""
    last = pp * vpp - 1
    return [SyntheticChunk(s == 0, s == last, t_fwd / vpp, t_bwd / vpp, compute)
            for s in (v * pp + pp_rank for v in range(vpp))]


def synthetic_micro_batches(m: int) -> list[dict[str, torch.Tensor]]:
    z = torch.zeros(SHAPE[1], SHAPE[0], dtype=torch.long)
    return [dict(tokens=z, labels=z) for _ in range(m)]


# A trace entry: ("compute", seconds) or ("exchange", [(kind "send" | "recv", peer rank, tag), ...]).


class _RecordingComm(PipelineComm):
    """The real exchange (shape checks, buffers, the message plan) with posting replaced by
    recording: receives read zeros."""

    def __init__(self, ps: ParallelState) -> None:
        super().__init__(ps, SHAPE, torch.float32, torch.device("cpu"))
        self.trace: list = []

    def _post(self, ops: list[Op]) -> None:
        self.trace.append(("exchange", [(kind, peer, tag) for kind, peer, tag, _ in ops]))
        for kind, _, _, t in ops:
            if kind == "recv":
                t.zero_()


def trace_schedule(schedule: str, pp: int, m: int, vpp: int = 1, t_fwd: float = 1.0,
                   t_bwd: float = 2.0, forward_only: bool = False) -> list[list]:
    """Each rank's sequence of compute and exchange entries for one step of `schedule`."""
    traces = []
    for rank in range(pp):
        ps = ParallelState(world_size=pp, rank=rank, pp=pp, pp_rank=rank, vpp=vpp, pp_ranks=list(range(pp)))
        comm = _RecordingComm(ps)
        chunks = synthetic_chunks(pp, vpp, rank, t_fwd, t_bwd, lambda s, c=comm: c.trace.append(("compute", s)))
        SCHEDULE_FNS[schedule](chunks, synthetic_micro_batches(m), ps, num_units=1.0,
                               forward_only=forward_only, comm=comm)
        traces.append(comm.trace)
    return traces


def critical_path(traces: list[list], latency: float = 0.0) -> tuple[float, list[float]]:
    """Replays traces with rendezvous p2p (each exchange also costs `latency`); returns
    (makespan, busy time per rank). Raises RuntimeError on a deadlock or unmatched messages."""
    n = len(traces)
    # The k-th send on a channel (src, dst, tag) meets the k-th receive on it.
    posted: dict[tuple, dict[str, list[float]]] = {}
    index: list[list[list[tuple]]] = []
    counts: dict[tuple, int] = {}
    for rank, trace in enumerate(traces):
        per_entry = []
        for kind, payload in trace:
            keys = []
            if kind == "exchange":
                for op, peer, tag in payload:
                    chan = (rank, peer, tag) if op == "send" else (peer, rank, tag)
                    k = counts.get((chan, op), 0)
                    counts[(chan, op)] = k + 1
                    keys.append((chan, op, k))
            per_entry.append(keys)
        index.append(per_entry)
    for (chan, op), k in counts.items():
        if counts.get((chan, "recv" if op == "send" else "send"), 0) != k:
            raise RuntimeError(f"channel {chan}: {k} {op}s but a different number of matching ops")
    pos, clock, busy = [0] * n, [0.0] * n, [0.0] * n
    posted_at: list[float | None] = [None] * n
    progress = True
    while progress:
        progress = False
        for r in range(n):
            while pos[r] < len(traces[r]):
                kind, payload = traces[r][pos[r]]
                if kind == "compute":
                    clock[r] += payload
                    busy[r] += payload
                    pos[r] += 1
                    progress = True
                    continue
                if posted_at[r] is None:  # post this exchange's ops
                    posted_at[r] = clock[r]
                    for chan, op, _ in index[r][pos[r]]:
                        posted.setdefault(chan, {"send": [], "recv": []})[op].append(clock[r])
                    progress = True
                done = posted_at[r]
                for chan, op, k in index[r][pos[r]]:
                    other = posted.get(chan, {}).get("recv" if op == "send" else "send", [])
                    if len(other) <= k:
                        break  # the peer has not posted its side yet
                    done = max(done, other[k])
                else:
                    clock[r] = done + latency
                    posted_at[r] = None
                    pos[r] += 1
                    progress = True
                    continue
                break
    stuck = [r for r in range(n) if pos[r] < len(traces[r])]
    if stuck:
        raise RuntimeError(f"deadlock: ranks {stuck} wait forever")
    return max(clock), busy


def idle_fraction(makespan: float, busy: list[float]) -> float:
    return 1.0 - sum(busy) / len(busy) / makespan


def theoretical_idle(schedule: str, pp: int, m: int, vpp: int = 1) -> float:
    """Bubble share of the step: (p-1)/(m+p-1), and (p-1)/(v*m+p-1) interleaved (the bubble
    (p-1)(t_f+t_b) is divided by v while the compute m(t_f+t_b) stays)."""
    return (pp - 1) / ((vpp if schedule == "interleaved" else 1) * m + pp - 1)
