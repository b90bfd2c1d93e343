"""Parameter names as checkpoints store them: the torch layer spec's, whatever spec trained.

Transformer Engine fuses the pre-norms into its LayerNormLinear / LayerNormMLP modules, so the
same weights carry other names under `linear_impl=te`. Storing the torch names lets a TE run and a
torch run resume each other's checkpoints, and gives the HF adapter one naming to map.
"""

from __future__ import annotations

import torch

# Transformer Engine layer-spec names (norms fused into LayerNormLinear / LayerNormMLP) -> ours.
_TE_RENAMES = {
    "attn.qkv.layer_norm_weight": "attn_norm.weight",
    "mlp.te.layer_norm_weight": "mlp_norm.weight",
    "mlp.te.fc1_weight": "mlp.gate_up.weight",
    "mlp.te.fc2_weight": "mlp.down.weight",
}


def canonical_name(name: str) -> str:
    """A parameter's name under the torch layer spec: TE's fused-module names mapped, others kept.
    Checkpoints store parameters under these names, so either spec resumes the other's."""
    if name.startswith("layers."):
        idx, _, tail = name.removeprefix("layers.").partition(".")
        if tail in _TE_RENAMES:
            return f"layers.{idx}.{_TE_RENAMES[tail]}"
    return name


def canonical_names(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint saved with the TE layer spec (before checkpoints stored canonical names), under
    the torch spec's names (same tensors)."""
    return {canonical_name(name): t for name, t in w.items()}
