"""Which layers each pipeline stage holds, and which schedules fit a micro-batch count.

Virtual stages are numbered in pipeline order, s = 0 .. pp*vpp - 1. With interleaving (vpp > 1)
rank r holds the chunks of virtual stages r, pp + r, 2*pp + r, ... (Megatron's layout), so an
activation visits every rank once per chunk "lap" and wraps from the last rank back to rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalite.config import ConfigError, ParallelConfig

SCHEDULES = ("afab", "1f1b", "interleaved")


def resolve_schedule(par: ParallelConfig) -> str:
    """The schedule that runs. With virtual stages (vpp > 1) 1F1B means its interleaved form, as in
    Megatron, so `parallel.vpp=2` alone is enough; only AFAB has no interleaved variant."""
    if par.vpp > 1 and par.pipeline_schedule == "1f1b":
        return "interleaved"
    return par.pipeline_schedule


@dataclass(frozen=True)
class StageSpec:
    """One model chunk of this rank: its global layer ids and whether it holds the ends."""

    virtual_stage: int
    layer_ids: list[int]
    pre_process: bool  # embedding (the first virtual stage)
    post_process: bool  # final norm, head and loss (the last virtual stage)


def split_layers(num_layers: int, pp: int, vpp: int = 1, split: list[int] | None = None) -> list[list[int]]:
    """Global layer ids of every virtual stage, in pipeline order.

    `split` gives the layer count of each virtual stage (uneven splits, e.g. fewer layers on the
    stages that also carry the embedding or the head). Without it layers are spread evenly; any
    remainder goes to the interior stages first, since the first and last also hold the
    embedding and the head."""
    n = pp * vpp
    if split is None:
        if num_layers < n:
            raise ConfigError(f"model.num_layers {num_layers} is fewer than pp*vpp = {n} stages")
        base, extra = divmod(num_layers, n)
        order = list(range(1, n - 1)) + [0, n - 1] if n > 2 else list(range(n))
        counts = [base] * n
        for s in order[:extra]:
            counts[s] += 1
    else:
        counts = list(split)
        if len(counts) != n:
            raise ConfigError(f"parallel.pp_layer_split has {len(counts)} entries but pp*vpp = {n} stages")
        if any(c < 1 for c in counts):
            raise ConfigError(f"parallel.pp_layer_split {counts} must give every stage at least one layer")
        if sum(counts) != num_layers:
            raise ConfigError(f"parallel.pp_layer_split {counts} sums to {sum(counts)}, "
                              f"not model.num_layers {num_layers}")
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def stage_specs(num_layers: int, par: ParallelConfig, pp_rank: int) -> list[StageSpec]:
    """The model chunks of one pipeline rank, chunk v holding virtual stage v*pp + pp_rank."""
    stages = split_layers(num_layers, par.pp, par.vpp, par.pp_layer_split)
    last = par.pp * par.vpp - 1
    return [StageSpec(s, stages[s], s == 0, s == last)
            for s in (v * par.pp + pp_rank for v in range(par.vpp))]


def check_schedule(par: ParallelConfig, num_micro: int | None, num_layers: int | None = None) -> None:
    """Raises ConfigError (one line) when the schedule cannot run `num_micro` micro-batches per
    step on this layout, or when the layer split does not fit (if `num_layers` is given).
    `num_micro=None` checks only the schedule's own settings."""
    if par.pipeline_schedule not in SCHEDULES:
        raise ConfigError(f"unknown parallel.pipeline_schedule '{par.pipeline_schedule}' "
                          f"(expected one of: {', '.join(SCHEDULES)})")
    if num_micro is not None and num_micro < 1:
        raise ConfigError(f"the step has {num_micro} micro-batches; it needs at least one")
    if num_layers is not None:
        split_layers(num_layers, par.pp, par.vpp, par.pp_layer_split)
    if par.pp == 1:
        return
    interleaved = resolve_schedule(par) == "interleaved"
    if interleaved and par.vpp < 2:
        raise ConfigError("parallel.pipeline_schedule=interleaved needs parallel.vpp >= 2")
    if par.vpp > 1 and not interleaved:
        raise ConfigError(f"parallel.vpp={par.vpp} needs the interleaved schedule (parallel.pipeline_schedule="
                          f"1f1b or interleaved), not '{par.pipeline_schedule}'")
    if interleaved and num_micro is not None and num_micro % par.pp != 0:
        raise ConfigError(f"the interleaved schedule needs the micro-batch count per step ({num_micro} = "
                          f"global_batch_size / (micro_batch_size*dp)) to be a multiple of parallel.pp {par.pp}")
