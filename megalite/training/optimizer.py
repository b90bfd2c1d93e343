"""AdamW over fp32 parameters, with parallel-correct global-norm clipping.

No weight decay on 1-D parameters (norm weights, biases). `step(lr)` clips and steps and returns
the pre-clip global grad norm; the ZeRO-1 optimizer offers the same interface.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megalite.config import Config
from megalite.parallel.grad_norm import global_grad_norm
from megalite.parallel.state import ParallelState


def param_groups(chunks: list[nn.Module], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for m in chunks:
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Optimizer:
    def __init__(self, chunks: list[nn.Module], cfg: Config, ps: ParallelState) -> None:
        o = cfg.optim
        self.ps, self.clip = ps, o.clip_grad
        self.params = [p for m in chunks for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(param_groups(chunks, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                     eps=o.eps, foreach=True)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def clip_and_norm(self) -> float:
        norm = global_grad_norm(self.params, self.ps)
        if self.clip > 0 and norm > self.clip:
            factor = self.clip / (norm + 1e-6)
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], factor)
        return norm

    def step(self, lr: float) -> float:
        norm = self.clip_and_norm()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        return norm

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


def build_optimizer(chunks: list[nn.Module], cfg: Config, ps: ParallelState):
    """AdamW over contiguous param/grad buffers with bucketed, overlapped DP grad reduction;
    ZeRO-1 (sharded master weights and Adam state) with `parallel.distributed_optimizer`.
    `Optimizer` above is the plain torch version, kept as the reference the tests compare with."""
    from megalite.parallel.distributed_optimizer import build_buffer_optimizer  # noqa: PLC0415

    par = cfg.parallel
    opt = build_buffer_optimizer(chunks, cfg.optim, ps, distributed=par.distributed_optimizer,
                                 bucket_size_mb=par.bucket_size_mb, overlap=par.overlap_grad_reduce)
    if ps.dp_rank == 0 and ps.tp_rank == 0:  # one line per pipeline stage: stages differ in size
        print(f"[pp rank {ps.pp_rank}] {opt.describe_memory()}; {opt.ddp.describe()}", flush=True)
    return opt
