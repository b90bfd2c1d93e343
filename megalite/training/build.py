"""Builds this rank's model chunks from the config (one chunk, or several virtual pipeline stages)."""

from __future__ import annotations

from megalite.config import Config
from megalite.model import LlamaModel
from megalite.model.recompute import apply_recompute
from megalite.parallel.pipeline import check_schedule, stage_specs
from megalite.parallel.rng import RNGTracker
from megalite.parallel.state import ParallelState


def build_model(cfg: Config, ps: ParallelState, rng: RNGTracker | None) -> list[LlamaModel]:
    """Chunk v of pipeline rank r holds virtual stage v*pp + r (its layers keep their global ids,
    and init is seeded by global name, so every layout starts from the same model)."""
    par, t = cfg.parallel, cfg.train
    check_schedule(par, t.global_batch_size // (t.micro_batch_size * ps.dp), cfg.model.num_layers)
    chunks = []
    for spec in stage_specs(cfg.model.num_layers, par, ps.pp_rank):
        model = LlamaModel(cfg.model, ps, rng, layer_ids=spec.layer_ids, pre_process=spec.pre_process,
                           post_process=spec.post_process, device=ps.device)
        model.init_weights(t.seed)
        apply_recompute(model, par.recompute, par.recompute_every)
        chunks.append(model)
    return chunks
