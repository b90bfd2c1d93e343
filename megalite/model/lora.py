"""LoRA on a LlamaModel: which projections get adapters, their init, and merging them into the base.

`lora.targets` names projections of every decoder layer:
    qkv     attn.qkv        fused q|k|v (column-parallel)
    o       attn.out        attention output (row-parallel)
    gate_up mlp.gate_up     fused gate|up (column-parallel)
    down    mlp.down        down projection (row-parallel)
`apply_lora` wraps them (megalite/parallel/lora.py), freezes every other parameter and initializes
the adapters from global tensors seeded by (seed, global name), like `LlamaModel.init_weights`:
A kaiming-uniform (PEFT's default, bound 1/sqrt(in)), B zeros, so the model starts unchanged and
any TP/PP layout starts from the same adapters.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn

from megalite.config import ConfigError, LoraConfig, ModelConfig
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalite.parallel.lora import LoRAColumnParallelLinear, LoRARowParallelLinear, is_adapter
from megalite.parallel.sharding import get_tp_shard, split_for_rank

# target -> (parent module path inside a decoder layer, attribute)
TARGETS: dict[str, tuple[str, str]] = {"qkv": ("attn", "qkv"), "o": ("attn", "out"),
                                       "gate_up": ("mlp", "gate_up"), "down": ("mlp", "down")}
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


def check_lora_config(lora: LoraConfig, model: ModelConfig | None = None, pretrained: str | None = None) -> None:
    """One-line ConfigErrors for a LoRA section that cannot run (before any work starts).
    `pretrained`: the run's checkpoint.pretrained, which a LoRA run needs as its frozen base."""
    if lora.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0 disables LoRA), got {lora.rank}")
    if lora.rank == 0:
        return
    unknown = [t for t in lora.targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"lora.targets: unknown target '{unknown[0]}' (expected some of: {', '.join(TARGETS)})")
    if not lora.targets:
        raise ConfigError("lora.targets is empty: name at least one of " + ", ".join(TARGETS))
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"lora.targets lists a target twice: {lora.targets}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    if lora.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {lora.alpha}")
    if pretrained is not None and not pretrained:
        raise ConfigError("lora.rank > 0 needs checkpoint.pretrained: the base weights the adapters train on")
    if model is not None:
        if model.linear_impl != "torch":
            raise ConfigError(f"LoRA wraps the torch projections; model.linear_impl={model.linear_impl} (also what "
                              "train.precision=fp8 selects) is not supported with lora.rank > 0")
        if model.mlp_impl == "te" and {"gate_up", "down"} & set(lora.targets):
            raise ConfigError("lora.targets gate_up/down need model.mlp_impl torch or triton (te fuses the MLP)")


def lora_scaling(lora: LoraConfig) -> float:
    return lora.alpha / lora.rank


def _shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each target's global weight."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_size
    return {"qkv": (h, (m.num_heads + 2 * m.kv_heads) * d), "o": (m.num_heads * d, h),
            "gate_up": (h, 2 * f), "down": (f, h)}


def lora_param_count(m: ModelConfig, lora: LoraConfig) -> int:
    """Global number of adapter parameters: r * (in + out) per targeted projection per layer."""
    shapes = _shapes(m)
    return m.num_layers * sum(lora.rank * sum(shapes[t]) for t in lora.targets)


def apply_lora(model: nn.Module, lora: LoraConfig, seed: int) -> None:
    """Wraps the targeted projections of a (weight-initialized) LlamaModel chunk with adapters,
    freezes everything else, and initializes the adapters from their global tensors."""
    check_lora_config(lora)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers.values():  # type: ignore[union-attr]
        for target in lora.targets:
            parent_name, attr = TARGETS[target]
            parent = getattr(layer, parent_name)
            base = getattr(parent, attr, None)
            if isinstance(base, ColumnParallelLinear):
                wrapped: nn.Module = LoRAColumnParallelLinear(base, lora.rank, lora.alpha, lora.dropout)
            elif isinstance(base, RowParallelLinear):
                wrapped = LoRARowParallelLinear(base, lora.rank, lora.alpha, lora.dropout, rng=layer.rng)
            else:
                raise ConfigError(f"lora.targets '{target}': {parent_name}.{attr} is "
                                  f"{type(base).__name__}, not a torch tensor-parallel linear")
            setattr(parent, attr, wrapped)
        # The fused Triton SwiGLU + down kernel computes x W^T itself; the adapter needs the plain path.
        if "down" in lora.targets and hasattr(layer.mlp, "fused_down"):
            layer.mlp.fused_down = False
    init_adapters(model, seed)


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    tp_rank, tp = model.ps.tp_rank, model.ps.tp  # type: ignore[union-attr]
    for name, p in model.named_parameters():
        if not is_adapter(p):
            continue
        if p.init == "zeros":  # type: ignore[attr-defined]
            p.zero_()
            continue
        shard = get_tp_shard(p)
        shape = list(p.shape)
        if shard is not None:
            shape[shard.dim] = shard.global_size
        bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.empty(shape, device=p.device, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        p.copy_(split_for_rank(full, shard, tp_rank, tp) if shard is not None else full)


def is_adapter_name(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def merge_lora(weights: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """Global tensors of a base model plus adapters -> the base with W += scale * B @ A folded in
    (adapters dropped). Global B rows follow W's global rows (q|k|v, gate|up blocks included), so
    the product lines up with the fused weight as is. Computed in fp32, stored in W's dtype."""
    scale = lora_scaling(lora)
    out = {k: v for k, v in weights.items() if not is_adapter_name(k)}
    for name in weights:
        if not name.endswith(".lora_a"):
            continue
        prefix = name.removesuffix(".lora_a")
        a, b, w = weights[name], weights.get(prefix + ".lora_b"), out.get(prefix + ".weight")
        if b is None or w is None:
            raise ConfigError(f"adapter '{name}' has no {'lora_b' if b is None else 'base weight'} to merge with")
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise ConfigError(f"adapter '{prefix}': B {list(b.shape)} @ A {list(a.shape)} does not fit the "
                              f"weight {list(w.shape)}")
        out[prefix + ".weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out
