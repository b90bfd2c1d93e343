"""A model for inference from a checkpoint of any layout: its saved architecture, this process's
TP rank's slice of every weight (resharded on the fly), eval mode.

The layer spec (norm/MLP/linear kernels) is not part of the architecture: `load_model` uses the
torch spec unless told otherwise, since a checkpoint trained with Triton or TE kernels stores the
same tensors under the same names (megalite/checkpoint/names.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megalite.checkpoint.dist import read_metadata, resolve_checkpoint, saved_model_config
from megalite.checkpoint.reshard import ShardReader, load_key, load_weight
from megalite.config import ConfigError, ModelConfig, ParallelConfig
from megalite.model import LlamaModel
from megalite.model.rope import inv_frequencies
from megalite.model.spec import check_impls
from megalite.parallel.pipeline import stage_specs
from megalite.parallel.state import ParallelState, resolve_device

# ModelConfig fields that choose implementations, not the architecture.
SPEC_FIELDS = ("norm_impl", "mlp_impl", "linear_impl", "loss_impl", "attention_backend")


def read_checkpoint(path: str | Path) -> tuple[Path, dict, ModelConfig]:
    """(step directory, metadata, saved model config) of a step directory or a checkpoint root."""
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ConfigError(f"no checkpoint found at {path}")
    meta = read_metadata(step_dir)
    return step_dir, meta, saved_model_config(meta, str(step_dir / "meta.json"))


@torch.no_grad()
def load_weights(model: LlamaModel, step_dir: Path, meta: dict, ps: ParallelState) -> None:
    """Copies this rank's slice of every saved weight into `model` (shapes checked, one-line errors).
    A LoRA checkpoint gives its base with the adapters merged in."""
    if "base" in meta:
        from megalite.checkpoint.lora import load_merged_weights

        load_merged_weights(model, step_dir, meta, ps)
        return
    reader = ShardReader(step_dir)
    for name, p in model.named_parameters():
        p.copy_(load_weight(reader, meta, load_key(name, p, ps, meta), p, ps).to(p.dtype))


def cast_model(model: LlamaModel, dtype: torch.dtype | None) -> LlamaModel:
    """Parameters to `dtype`; the RoPE frequencies stay fp32 (bf16 would blur the positions)."""
    if dtype is not None and dtype != torch.float32:
        device = model.inv_freq.device
        model.to(dtype)
        model.inv_freq = inv_frequencies(model.cfg).to(device)
    return model


def build_inference_model(model_cfg: ModelConfig, step_dir: Path, meta: dict, ps: ParallelState,
                          dtype: torch.dtype | None = None, par: ParallelConfig | None = None) -> LlamaModel:
    """This rank's part of the model (its pipeline stage's layers under `par.pp` > 1), loaded."""
    check_impls(model_cfg, ps.device)
    (spec,) = stage_specs(model_cfg.num_layers, par or ParallelConfig(), ps.pp_rank)
    model = LlamaModel(model_cfg, ps, layer_ids=spec.layer_ids, pre_process=spec.pre_process,
                       post_process=spec.post_process, device=ps.device)
    load_weights(model, step_dir, meta, ps)
    return cast_model(model, dtype).eval()


def load_model(checkpoint_dir: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, **model_overrides) -> LlamaModel:
    """The checkpoint's model at world size 1, in eval mode (DESIGN.md contract 6).

    `checkpoint_dir`: a step directory or a checkpoint root (its `latest`), of any TP/PP/DP layout.
    `device`: default cuda when available, else cpu. `dtype`: the parameters' (default fp32).
    `model_overrides`: ModelConfig fields, e.g. the kernels (`norm_impl="triton"`), default torch.
    `model(ids)` returns logits [batch, seq, padded vocab]; `model.full_logits(ids)` the real vocab."""
    step_dir, meta, model_cfg = read_checkpoint(checkpoint_dir)
    spec = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in SPEC_FIELDS}
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in {**spec, **model_overrides}.items():
        if key not in names:
            raise ConfigError(f"load_model: unknown model field '{key}'")
        setattr(model_cfg, key, value)
    dev = device if isinstance(device, torch.device) else resolve_device(device or "auto")
    return build_inference_model(model_cfg, step_dir, meta, ParallelState(device=dev), dtype)
