"""The optimizer the trainer uses: AdamW over contiguous param/grad buffers.

Grads are reduced over DP in buckets during the last micro-batch's backward; with
`parallel.distributed_optimizer` the fp32 master weights and Adam state are sharded over DP
(ZeRO-1). Both clip by the parallel-correct global norm and skip weight decay on 1-D parameters.
See megalite/parallel/{data_parallel,distributed_optimizer}.py.
"""

from __future__ import annotations

import torch.nn as nn

from megalite.config import Config
from megalite.parallel.distributed_optimizer import build_buffer_optimizer
from megalite.parallel.state import ParallelState


def build_optimizer(chunks: list[nn.Module], cfg: Config, ps: ParallelState):
    par = cfg.parallel
    opt = build_buffer_optimizer(chunks, cfg.optim, ps, distributed=par.distributed_optimizer,
                                 bucket_size_mb=par.bucket_size_mb, overlap=par.overlap_grad_reduce)
    if ps.dp_rank == 0 and ps.tp_rank == 0:  # one line per pipeline stage: stages differ in size
        print(f"[pp rank {ps.pp_rank}] {opt.describe_memory()}; {opt.ddp.describe()}", flush=True)
    return opt
