"""Spawn real gloo process groups on one machine (tests and CPU benchmarks).

`run_distributed(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in `world_size` fresh
processes joined in a gloo group and returns each rank's return value (via torch.save).
`fn` must be a module-level function so the spawned interpreters can import it.
`full_tensors(model, ps)` collects a TP-sharded model's grads (or values) as global tensors, to
compare with a single-process reference.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from megalite.parallel.sharding import gather_full, get_tp_shard
from megalite.parallel.state import ParallelState


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, env: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "OMP_NUM_THREADS": "1", **env})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        result = fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, env: dict | None = None) -> list[Any]:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, d, env or {}), nprocs=world_size, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def full_tensors(source: nn.Module | Iterable[nn.Module] | Iterable[tuple[str, torch.Tensor]], ps: ParallelState,
                 grad: bool = True) -> dict[str, torch.Tensor]:
    """Each parameter's global (TP=1) grad, or with `grad=False` its value, keyed by name: TP-sharded
    ones gathered over `ps.tp_group` (every TP rank must call this), replicated ones cloned.
    `source` is a model, a list of pipeline chunks, or (name, parameter) pairs."""
    if isinstance(source, nn.Module):
        source = [source]
    named = [pair for item in source
             for pair in (item.named_parameters() if isinstance(item, nn.Module) else [item])]
    out = {}
    for name, p in named:
        t = p.grad if grad else p.detach()
        shard = get_tp_shard(p)
        out[name] = gather_full(t, shard, ps.tp_group, ps.tp) if shard is not None else t.clone()
    return out
