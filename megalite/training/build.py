"""Builds this rank's model chunks from the config (one chunk, or several virtual pipeline stages)."""

from __future__ import annotations

from megalite.config import Config
from megalite.model import LlamaModel
from megalite.model.compile import compile_layers
from megalite.model.lora import apply_lora
from megalite.model.recompute import apply_recompute
from megalite.parallel.pipeline import check_schedule, stage_specs
from megalite.parallel.rng import RNGTracker
from megalite.parallel.state import ParallelState


def check_step_schedule(cfg: Config, dp: int) -> int:
    """The step's micro-batch count per DP rank, after checking that the pipeline schedule and the
    layer split can run it (ConfigError otherwise)."""
    t = cfg.train
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    check_schedule(cfg.parallel, num_micro, cfg.model.num_layers)
    return num_micro


def build_model(cfg: Config, ps: ParallelState, rng: RNGTracker | None,
                schedule_checked: bool = False) -> list[LlamaModel]:
    """Chunk v of pipeline rank r holds virtual stage v*pp + r (its layers keep their global ids,
    and init is seeded by global name, so every layout starts from the same model).
    `schedule_checked`: the caller already ran `check_step_schedule` for this layout."""
    par, t = cfg.parallel, cfg.train
    if not schedule_checked:
        check_step_schedule(cfg, ps.dp)
    chunks = []
    for spec in stage_specs(cfg.model.num_layers, par, ps.pp_rank):
        model = LlamaModel(cfg.model, ps, rng, layer_ids=spec.layer_ids, pre_process=spec.pre_process,
                           post_process=spec.post_process, device=ps.device)
        model.init_weights(t.seed)
        if cfg.lora.rank > 0:  # adapters on the targeted projections; everything else frozen
            apply_lora(model, cfg.lora, t.seed)
        apply_recompute(model, par.recompute, par.recompute_every)
        if t.precision == "fp8" and t.fp8_backend == "torchao":
            from megalite.kernels.torchao_fp8 import convert_to_float8

            convert_to_float8(model, t.fp8_recipe)
        if t.compile:  # after the FP8 swap, so the float8 matmuls are traced into each layer's graph
            compile_layers(model)
        chunks.append(model)
    return chunks
