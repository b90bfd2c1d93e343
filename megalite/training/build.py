"""Builds this rank's model chunks from the config (one chunk, or several virtual pipeline stages)."""

from __future__ import annotations

from megalite.config import Config
from megalite.model import LlamaModel
from megalite.parallel.rng import RNGTracker
from megalite.parallel.state import ParallelState


def build_model(cfg: Config, ps: ParallelState, rng: RNGTracker | None) -> list[LlamaModel]:
    model = LlamaModel(cfg.model, ps, rng, device=ps.device)
    model.init_weights(cfg.train.seed)
    return [model]
