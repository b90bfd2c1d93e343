"""The process-group layout, kept in one small object that is passed around (no globals).

Rank order is TP innermost, then CP, then DP, then PP outermost, as in Megatron: TP ranks are
adjacent so that, on a GPU node, the most talkative group shares NVLink.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megalite.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    vpp: int = 1
    sp: bool = False
    tp_comm_overlap: bool = True  # ParallelConfig.tp_comm_overlap (read by the TP layers each call)
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None  # TP x PP: one model replica (for the grad norm)
    embedding_group: dist.ProcessGroup | None = None  # first + last PP stage (tied embeddings)
    tp_dp_group: dist.ProcessGroup | None = None  # all ranks of this pipeline stage (FP8 amax)
    pp_ranks: list[int] = field(default_factory=lambda: [0])  # global ranks of my pipeline
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def next_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank + 1) % self.pp]

    @property
    def prev_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp]

    def describe(self) -> str:
        return (f"world={self.world_size} tp={self.tp} pp={self.pp} dp={self.dp} cp={self.cp} "
                f"sp={self.sp} vpp={self.vpp}")


def rank_of(tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int, tp: int, cp: int, dp: int) -> int:
    return tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))


def data_parallel_size(par: ParallelConfig, world_size: int) -> int:
    """world_size / (tp * pp * cp): the model-parallel ranks of one replica divide the world."""
    mp = par.tp * par.pp * par.cp
    if world_size % mp != 0:
        raise ConfigError(f"world size {world_size} is not divisible by tp*pp*cp = "
                          f"{par.tp}*{par.pp}*{par.cp} = {mp}")
    return world_size // mp


def check_layout(model: ModelConfig, par: ParallelConfig, train: TrainConfig, world_size: int) -> int:
    """Validates the layout against the world size and the model; returns the DP size."""
    for name in ("tp", "pp", "cp", "vpp"):
        if getattr(par, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(par, name)}")
    if par.cp != 1:
        raise ConfigError("parallel.cp > 1 (context parallelism) is not supported yet; set parallel.cp=1")
    if model.hidden_size % model.num_heads != 0:
        raise ConfigError(f"model.hidden_size {model.hidden_size} is not divisible by "
                          f"model.num_heads {model.num_heads}")
    if model.num_heads % par.tp != 0:
        raise ConfigError(f"model.num_heads {model.num_heads} is not divisible by parallel.tp {par.tp}")
    kv = model.kv_heads
    if model.num_heads % kv != 0:
        raise ConfigError(f"model.num_heads {model.num_heads} is not divisible by model.num_kv_heads {kv}")
    if kv >= par.tp and kv % par.tp != 0:
        raise ConfigError(f"model.num_kv_heads {kv} is not divisible by parallel.tp {par.tp}")
    if kv < par.tp and par.tp % kv != 0:
        raise ConfigError(f"parallel.tp {par.tp} is not a multiple of model.num_kv_heads {kv} "
                          "(kv heads are replicated when there are fewer than tp)")
    if model.ffn_size % par.tp != 0:
        raise ConfigError(f"the MLP size {model.ffn_size} is not divisible by parallel.tp {par.tp}")
    if par.sp and par.tp > 1 and train.seq_len % par.tp != 0:
        raise ConfigError(f"train.seq_len {train.seq_len} is not divisible by parallel.tp {par.tp} "
                          "(required by sequence parallelism)")
    if train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len {train.seq_len} exceeds model.max_seq_len {model.max_seq_len}")
    dp = data_parallel_size(par, world_size)
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step != 0:
        raise ConfigError(f"train.global_batch_size {train.global_batch_size} is not divisible by "
                          f"micro_batch_size*dp = {train.micro_batch_size}*{dp}")
    if par.pp == 1 and par.vpp != 1:
        raise ConfigError("parallel.vpp > 1 needs parallel.pp > 1")
    return dp


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Initializes the default process group from torchrun's environment (no-op for world size 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return world, rank, local


def build_parallel_state(par: ParallelConfig, device: torch.device | None = None) -> ParallelState:
    """Creates the TP/PP/DP groups. Every rank must call this, in the same order."""
    device = device or torch.device("cpu")
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    tp, pp, cp = par.tp, par.pp, par.cp
    dp = data_parallel_size(par, world)
    ps = ParallelState(world_size=world, rank=rank, local_rank=local, tp=tp, pp=pp, dp=dp, cp=cp,
                       vpp=par.vpp, sp=par.sp and tp > 1, tp_comm_overlap=par.tp_comm_overlap,
                       device=device)
    ps.tp_rank = rank % tp
    ps.dp_rank = (rank // (tp * cp)) % dp
    ps.pp_rank = rank // (tp * cp * dp)
    if world == 1:
        return ps

    def make(ranks_list: list[list[int]]) -> dist.ProcessGroup | None:
        mine = None
        for ranks in ranks_list:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = g
        return mine

    R = lambda t, c, d, p: rank_of(t, c, d, p, tp, cp, dp)  # noqa: E731
    ps.tp_group = make([[R(t, c, d, p) for t in range(tp)]
                        for p in range(pp) for d in range(dp) for c in range(cp)])
    ps.dp_group = make([[R(t, c, d, p) for d in range(dp)]
                        for p in range(pp) for c in range(cp) for t in range(tp)])
    pp_lists = [[R(t, c, d, p) for p in range(pp)] for d in range(dp) for c in range(cp) for t in range(tp)]
    ps.pp_group = make(pp_lists)
    ps.pp_ranks = next(r for r in pp_lists if rank in r)
    if pp > 1:
        # NCCL requires every rank of a group in its first batched p2p call, and a pipeline's
        # first exchange (stage 0 -> 1) is not: meet once here, before any (see pipeline/p2p.py).
        dist.barrier(group=ps.pp_group, device_ids=[device.index] if device.type == "cuda" and device.index is not None else None)
    ps.mp_group = make([[R(t, c, d, p) for p in range(pp) for t in range(tp)]
                        for d in range(dp) for c in range(cp)])
    ps.tp_dp_group = make([[R(t, c, d, p) for d in range(dp) for c in range(cp) for t in range(tp)]
                           for p in range(pp)])
    emb_lists = [sorted({r[0], r[-1]}) for r in pp_lists]
    ps.embedding_group = make(emb_lists)
    return ps
