"""AdamW over the DataParallel buffers: replicated (`BufferOptimizer`) or ZeRO-1 (`DistributedOptimizer`).

Both step a set of "owned" contiguous ranges of the flat buffers with the same arithmetic as
torch.optim.AdamW, so they share one implementation:
  * replicated: grads are all-reduced and every rank owns (and steps) every element;
  * ZeRO-1: grads are reduce-scattered, each DP rank owns a 1/dp slice of every bucket, keeps the
    fp32 master weights and Adam moments of that slice only, steps it, and the updated parameters
    are all-gathered back into the full parameter buffer.

Master weights: parameters are fp32 in this codebase (mixed precision is autocast), so the
parameter buffer itself is the master copy. Lower-precision parameters get a separate fp32 master
of the owned ranges. No weight decay on 1-D parameters (norm weights, biases).

The grad norm counts every element of the model once: replicated-over-TP parameters (and the
replicated kv rows inside a TP-sharded weight) on TP rank 0 only, a tied head on the last
pipeline stage not at all (it duplicates the embedding), each DP slice on its owner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from megalite.config import OptimConfig
from megalite.parallel import comm
from megalite.parallel.data_parallel import DataParallel, ParamSlot
from megalite.parallel.sharding import get_tp_shard, is_tied_copy
from megalite.parallel.state import ParallelState


@dataclass
class Piece:
    """The part [lo, hi) of a parameter's flattened (TP-local) tensor that lies in an owned range."""

    slot: ParamSlot
    lo: int
    hi: int
    owned: int  # index of the owned range
    at: int  # offset of `lo` inside that owned range

    @property
    def name(self) -> str:
        return self.slot.name


def _norm_ranges(p: nn.Parameter, ps: ParallelState) -> list[tuple[int, int]]:
    """Flat element ranges of `p` whose grads this rank counts in the global norm."""
    n = p.numel()
    if is_tied_copy(p, ps):
        return []
    shard, sync = get_tp_shard(p), getattr(p, "sync_tp_grad", False)
    if shard is None or sync is True:  # replicated over TP
        return [(0, n)] if ps.tp_rank == 0 else []
    if isinstance(sync, tuple):  # sharded rows plus replicated rows [start, end) in dim 0
        row = n // p.shape[0]
        lo, hi = sync[0] * row, sync[1] * row
        return [(0, lo), (hi, n)] + ([(lo, hi)] if ps.tp_rank == 0 else [])
    return [(0, n)]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with touching ranges joined: [(0, 4), (4, 6), (8, 9)] -> [(0, 6), (8, 9)]."""
    out: list[tuple[int, int]] = []
    for a, z in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], z))
        else:
            out.append((a, z))
    return out


class BufferOptimizer:
    """Replicated AdamW; the interface (zero_grad, step(lr) -> grad norm, state_dict) is the
    training loop's, plus `no_sync` / `finish_grad_sync` for the schedules."""

    sharded = False

    def __init__(self, chunks: list[nn.Module], cfg: OptimConfig, ps: ParallelState,
                 bucket_size_mb: float = 25.0, overlap: bool = True) -> None:
        self.ps, self.cfg = ps, cfg
        self.ddp = DataParallel(chunks, ps, bucket_size_mb, overlap, shard=self.sharded)
        self.no_sync = self.ddp.no_sync
        self.finish_grad_sync = self.ddp.finish_grad_sync
        self.owned: list[tuple[int, int]] = [
            self.ddp.shard_range(b) if self.sharded else (b.start, b.end) for b in self.ddp.buckets]
        self.pieces: list[Piece] = []
        for k, (lo, hi) in enumerate(self.owned):
            for s in self.ddp.buckets[k].slots:
                a, z = max(lo, s.start), min(hi, s.end)
                if a < z:
                    self.pieces.append(Piece(s, a - s.start, z - s.start, k, a - lo))
        dev, sizes = self.ddp.param_data.device, [hi - lo for lo, hi in self.owned]
        self.exp_avg = [torch.zeros(n, dtype=torch.float32, device=dev) for n in sizes]
        self.exp_avg_sq = [torch.zeros(n, dtype=torch.float32, device=dev) for n in sizes]
        self.separate_master = self.ddp.dtype != torch.float32
        self.master = [self.ddp.param_data[lo:hi].float() for lo, hi in self.owned] if self.separate_master \
            else [self.ddp.param_data[lo:hi] for lo, hi in self.owned]
        self.steps = 0
        # The sub-ranges of each owned range that get weight decay, and the grad-buffer ranges
        # counted in the norm, both merged where contiguous: a few long runs instead of one per
        # parameter (or two or three per parameter for the norm), so a step launches few kernels.
        decay: list[list[tuple[int, int]]] = [[] for _ in self.owned]
        norm: list[tuple[int, int]] = []
        for pc in self.pieces:
            if pc.slot.param.dim() >= 2:
                decay[pc.owned].append((pc.at, pc.at + pc.hi - pc.lo))
            for a, z in _norm_ranges(pc.slot.param, ps):
                a, z = max(a, pc.lo), min(z, pc.hi)
                if a < z:
                    norm.append((pc.slot.start + a, pc.slot.start + z))
        self._decay = [_merge(r) for r in decay]
        self._norm = _merge(norm)

    # -- the training-loop interface ------------------------------------------------------------
    def zero_grad(self) -> None:
        self.ddp.zero_grad()

    def _grads(self) -> list[torch.Tensor]:
        return [self.ddp.grad_data[lo:hi] for lo, hi in self.owned]

    def grad_norm(self) -> float:
        g = self.ddp.grad_data
        sq = torch.zeros((), dtype=torch.float64, device=g.device)
        if self._norm:
            # One fp32 norm per merged range (a single multi-tensor kernel on GPU), squared and
            # summed in fp64: no fp64 copy of the grads.
            norms = torch._foreach_norm([g[a:z] for a, z in self._norm], dtype=torch.float32)
            sq = torch.stack(norms).double().square().sum()
        # Replicated: every DP rank holds the same grads, sum over the model-parallel ranks only.
        group = None if self.sharded else self.ps.mp_group
        if self.ps.world_size > 1 and (self.sharded or self.ps.tp * self.ps.pp > 1):
            comm.record("opt.all_reduce", sq)
            dist.all_reduce(sq, group=group)
        return float(sq.sqrt())

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """Clips to `clip_grad`, steps AdamW, returns the (pre-clip) global grad norm."""
        self.ddp.finish_grad_sync()
        norm = self.grad_norm()
        o = self.cfg
        clip = o.clip_grad / (norm + 1e-6) if o.clip_grad > 0 and norm > o.clip_grad else 1.0
        if not math.isfinite(norm):
            return norm  # never write NaN/inf into the weights
        self.steps += 1
        b1, b2 = o.beta1, o.beta2
        bc1, bc2_sqrt = 1 - b1**self.steps, math.sqrt(1 - b2**self.steps)
        if o.weight_decay:
            decayed = [p[a:z] for p, ranges in zip(self.master, self._decay, strict=True) for a, z in ranges]
            if decayed:
                torch._foreach_mul_(decayed, 1 - lr * o.weight_decay)
        for k, g in enumerate(self._grads()):
            p, m, v = self.master[k], self.exp_avg[k], self.exp_avg_sq[k]
            # The clip factor is folded into the moment updates (no clipped copy of g); a
            # lower-precision g is promoted to fp32 inside the fp32 moment updates.
            m.mul_(b1).add_(g, alpha=(1 - b1) * clip)
            v.mul_(b2).addcmul_(g, g, value=(1 - b2) * clip * clip)
            p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(o.eps), value=-lr / bc1)
            if self.separate_master:
                lo, hi = self.owned[k]
                self.ddp.param_data[lo:hi].copy_(p)
        self.ddp.all_gather_params()
        return norm

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Same-layout state (the checkpoint module saves per-parameter pieces instead)."""
        return {"steps": self.steps, "exp_avg": [t.clone() for t in self.exp_avg],
                "exp_avg_sq": [t.clone() for t in self.exp_avg_sq],
                "master": [t.clone() for t in self.master] if self.separate_master else None}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"], strict=True):
            dst.copy_(src)
        if self.separate_master and state.get("master") is not None:
            for dst, src in zip(self.master, state["master"], strict=True):
                dst.copy_(src)

    def piece_state(self, pc: Piece) -> dict[str, torch.Tensor]:
        """Views of one piece's optimizer state (writable), keyed as in checkpoints."""
        n = pc.hi - pc.lo
        out = {"exp_avg": self.exp_avg[pc.owned][pc.at: pc.at + n],
               "exp_avg_sq": self.exp_avg_sq[pc.owned][pc.at: pc.at + n]}
        if self.separate_master:
            out["master"] = self.master[pc.owned][pc.at: pc.at + n]
        return out

    def sync_master_from_params(self) -> None:
        """After loading weights into the parameters: refresh a separate fp32 master copy."""
        if self.separate_master:
            for k, (lo, hi) in enumerate(self.owned):
                self.master[k].copy_(self.ddp.param_data[lo:hi])

    # -- memory accounting ----------------------------------------------------------------------
    def memory_report(self) -> dict[str, float]:
        """Bytes this rank holds, measured from the allocated tensors, next to the ZeRO-1 formula
        (b + b + K / N_d) * psi, where psi counts this rank's parameters straight from the model,
        b is bytes per parameter/grad element and K the optimizer bytes per parameter: 8 for fp32
        Adam m and v (fp32 parameters double as master weights), 12 with a separate master copy.
        The buffers pad every bucket to a multiple of N_d, so measured may exceed the formula by
        at most (N_d - 1) elements per bucket."""
        d = self.ddp
        psi = sum(p.numel() for c in d.chunks for p in c.parameters() if p.requires_grad)
        b = d.param_data.element_size()
        nd = d.dp if self.sharded else 1
        k = 8 + (4 if self.separate_master else 0)
        state = self.exp_avg + self.exp_avg_sq + (self.master if self.separate_master else [])
        measured = {"params": d.param_data.numel() * b, "grads": d.grad_data.numel() * d.grad_data.element_size(),
                    "optimizer": sum(t.numel() * t.element_size() for t in state)}
        formula = {"params": psi * b, "grads": psi * b, "optimizer": psi * k / nd}
        slack = len(d.buckets) * (d.dp - 1) * (b + b + k / nd)
        return {"psi": psi, "bytes_per_param": b, "k": k, "nd": nd, "padding_slack": slack,
                **{f"measured_{n}": float(v) for n, v in measured.items()},
                **{f"formula_{n}": float(v) for n, v in formula.items()}}

    def describe_memory(self) -> str:
        r = self.memory_report()
        mib = 2.0**20
        meas = r["measured_params"] + r["measured_grads"] + r["measured_optimizer"]
        form = r["formula_params"] + r["formula_grads"] + r["formula_optimizer"]
        ok = 0 <= meas - form <= r["padding_slack"]
        kind = "ZeRO-1" if self.sharded else "replicated"
        b = r["bytes_per_param"]
        return (f"memory/rank ({kind}): params {r['measured_params'] / mib:.3f} MiB, grads "
                f"{r['measured_grads'] / mib:.3f} MiB, optimizer state {r['measured_optimizer'] / mib:.3f} MiB, "
                f"total {meas / mib:.3f} MiB | ZeRO-1 formula ({b}+{b}+{r['k']}/{r['nd']}) x psi, "
                f"psi={r['psi']:,}: {form / mib:.3f} MiB ({'match' if ok else 'MISMATCH'}, "
                f"+{meas - form:,.0f} B bucket padding)")


class DistributedOptimizer(BufferOptimizer):
    """ZeRO-1: reduce-scatter grads, step the owned 1/dp slice, all-gather the parameters."""

    sharded = True


def build_buffer_optimizer(chunks: list[nn.Module], optim: OptimConfig, ps: ParallelState, *,
                           distributed: bool, bucket_size_mb: float = 25.0,
                           overlap: bool = True) -> BufferOptimizer:
    cls = DistributedOptimizer if distributed else BufferOptimizer
    return cls(chunks, optim, ps, bucket_size_mb, overlap)
