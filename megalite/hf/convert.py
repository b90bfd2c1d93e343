"""HF Llama <-> megalite: the config fields and the tensor names, on whole-model (global) tensors.

megalite fuses q|k|v into `attn.qkv.weight` and gate|up into `mlp.gate_up.weight` (row blocks, in
that order); everything else maps one to one. RoPE uses the same rotate-half convention as HF's
LlamaModel, so q/k rows need no permutation. A tied head is stored only as the embedding on both
sides. File reading/writing lives in `files.py`; this module only maps names, shapes and config.
"""

from __future__ import annotations

from typing import Any

import torch

from megalite.checkpoint.names import canonical_names
from megalite.config import ConfigError, ModelConfig

# HF names of one layer -> megalite names; q/k/v and gate/up are fused (handled separately).
_LAYER_RENAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.o_proj.weight": "attn.out.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
# Buffers some older HF exports saved; recomputed from the config, so safe to drop.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# Config


def _field(cfg: dict, key: str, kind: type, where: str, default: Any = None) -> Any:
    value = cfg.get(key)
    value = default if value is None else value  # HF writes null for "use the default"
    if value is None:
        raise ConfigError(f"{where}: missing field '{key}'")
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}: field '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _rope(cfg: dict, where: str) -> dict[str, Any]:
    """ModelConfig rope fields from `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: field 'rope_scaling' must be a mapping, got {params!r}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    out: dict[str, Any] = {"rope_theta": _field({"rope_theta": theta}, "rope_theta", float, where)}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {**out, "rope_scaling": "none"}
    if kind != "llama3":
        raise ConfigError(f"{where}: rope type '{kind}' is not supported (default | llama3)")
    return {**out, "rope_scaling": "llama3",
            "rope_scaling_factor": _field(params, "factor", float, where),
            "rope_low_freq_factor": _field(params, "low_freq_factor", float, where),
            "rope_high_freq_factor": _field(params, "high_freq_factor", float, where),
            "rope_original_max_positions": _field(params, "original_max_position_embeddings", int, where)}


def model_config_from_hf(cfg: Any, where: str) -> ModelConfig:
    """ModelConfig of an HF LlamaForCausalLM config.json; anything megalite cannot express fails."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type") != "llama" or "LlamaForCausalLM" not in archs:
        raise ConfigError(f"{where}: not a Llama causal LM (model_type {cfg.get('model_type')!r}, "
                          f"architectures {archs!r})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: field 'hidden_act' is {cfg['hidden_act']!r}; megalite's MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConfigError(f"{where}: field '{key}' is true; megalite's projections have no bias")
    hidden = _field(cfg, "hidden_size", int, where)
    heads = _field(cfg, "num_attention_heads", int, where)
    kv = _field(cfg, "num_key_value_heads", int, where, heads)
    if hidden % heads or heads % kv:
        raise ConfigError(f"{where}: hidden_size {hidden}, num_attention_heads {heads} and num_key_value_heads "
                          f"{kv} must divide evenly")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConfigError(f"{where}: field 'head_dim' is {head_dim}; megalite needs hidden_size / "
                          f"num_attention_heads = {hidden // heads}")
    return ModelConfig(
        vocab_size=_field(cfg, "vocab_size", int, where), hidden_size=hidden,
        num_layers=_field(cfg, "num_hidden_layers", int, where), num_heads=heads, num_kv_heads=kv,
        ffn_hidden_size=_field(cfg, "intermediate_size", int, where),
        norm_eps=_field(cfg, "rms_norm_eps", float, where, 1e-6),
        max_seq_len=_field(cfg, "max_position_embeddings", int, where, 2048),
        tie_embeddings=_field(cfg, "tie_word_embeddings", bool, where, False),
        init_std=_field(cfg, "initializer_range", float, where, 0.02), **_rope(cfg, where))


def hf_config_from_model(m: ModelConfig, dtype: torch.dtype, where: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (transformers 4 keys, which transformers 5 also reads)."""
    if m.qk_norm:
        raise ConfigError(f"{where}: model.qk_norm is true; HF LlamaForCausalLM has no q/k norms")
    rope = None
    if m.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": m.rope_low_freq_factor,
                "high_freq_factor": m.rope_high_freq_factor,
                "original_max_position_embeddings": m.rope_original_max_positions}
    elif m.rope_scaling != "none":
        raise ConfigError(f"{where}: model.rope_scaling '{m.rope_scaling}' has no HF equivalent")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size, "intermediate_size": m.ffn_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta, "rope_scaling": rope, "max_position_embeddings": m.max_seq_len,
            "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
            "torch_dtype": str(dtype).removeprefix("torch.")}


def model_yaml_section(m: ModelConfig) -> dict[str, Any]:
    """The architecture fields a run needs to load the converted weights (`model:` of a config)."""
    keys = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "norm_eps",
            "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings"]
    if m.rope_scaling == "llama3":
        keys += ["rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max_positions"]
    out = {k: getattr(m, k) for k in keys}
    out["num_kv_heads"], out["ffn_hidden_size"] = m.kv_heads, m.ffn_size  # resolve the None defaults
    return {"model": out}


# ---------------------------------------------------------------------------------------------
# Tensors


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every global megalite tensor of `m` (tied: no `head`) and its shape."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (m.vocab_size, h), "final_norm.weight": (h,)}
    if not m.tie_embeddings:
        shapes["head"] = (m.vocab_size, h)
    for i in range(m.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (h,), p + "mlp_norm.weight": (h,),
                       p + "attn.qkv.weight": ((m.num_heads + 2 * m.kv_heads) * d, h),
                       p + "attn.out.weight": (h, m.num_heads * d), p + "mlp.gate_up.weight": (2 * f, h),
                       p + "mlp.down.weight": (h, f)})
        if m.qk_norm:
            shapes.update({p + "attn.q_norm.weight": (d,), p + "attn.k_norm.weight": (d,)})
    return shapes


def check_shapes(weights: dict[str, torch.Tensor], m: ModelConfig, where: str) -> None:
    expected = expected_shapes(m)
    for name in weights:
        if name not in expected:
            raise ConfigError(f"{where}: unexpected tensor '{name}' for this model config")
    for name, shape in expected.items():
        if name not in weights:
            raise ConfigError(f"{where}: tensor '{name}' is missing")
        if tuple(weights[name].shape) != shape:
            raise ConfigError(f"{where}: tensor '{name}' has shape {list(weights[name].shape)}, "
                              f"the config implies {list(shape)}")


def _hf_layer_key(name: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight')."""
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), parts[3]
    return None


def hf_to_megalite(hf: dict[str, torch.Tensor], m: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """HF state dict -> megalite global tensors (shapes checked against `m`)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], torch.Tensor] = {}
    for name, t in hf.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "model.embed_tokens.weight":
            out["embedding.weight"] = t
        elif name == "model.norm.weight":
            out["final_norm.weight"] = t
        elif name == "lm_head.weight":
            if not m.tie_embeddings:  # tied: HF may still store a copy of the embedding
                out["head"] = t
        elif (key := _hf_layer_key(name)) is not None and key[1] in _LAYER_RENAMES:
            out[f"layers.{key[0]}.{_LAYER_RENAMES[key[1]]}"] = t
        elif key is not None and key[1] in _QKV + _GATE_UP:
            fused[key] = t
        else:
            raise ConfigError(f"{where}: unknown tensor '{name}' (not a LlamaForCausalLM weight)")
    for i in range(m.num_layers):
        for parts, target in ((_QKV, "attn.qkv.weight"), (_GATE_UP, "mlp.gate_up.weight")):
            missing = [p for p in parts if (i, p) not in fused]
            if missing:
                raise ConfigError(f"{where}: tensor 'model.layers.{i}.{missing[0]}' is missing")
            _check_blocks([fused[(i, p)] for p in parts], parts, i, m, where)
            out[f"layers.{i}.{target}"] = torch.cat([fused[(i, p)] for p in parts], dim=0)
    if extra := sorted({i for i, _ in fused} - set(range(m.num_layers))):
        raise ConfigError(f"{where}: tensors of layer {extra[0]}, but num_hidden_layers is {m.num_layers}")
    check_shapes(out, m, where)
    return out


def _check_blocks(ts: list[torch.Tensor], parts: tuple[str, ...], i: int, m: ModelConfig, where: str) -> None:
    """Each block's own shape, so a wrong one is named by its HF name rather than the fused one."""
    d, h = m.head_dim, m.hidden_size
    rows = {_QKV[0]: m.num_heads * d, _QKV[1]: m.kv_heads * d, _QKV[2]: m.kv_heads * d,
            _GATE_UP[0]: m.ffn_size, _GATE_UP[1]: m.ffn_size}
    for t, p in zip(ts, parts, strict=True):
        if tuple(t.shape) != (rows[p], h):
            raise ConfigError(f"{where}: tensor 'model.layers.{i}.{p}' has shape {list(t.shape)}, "
                              f"the config implies {[rows[p], h]}")


def megalite_to_hf(w: dict[str, torch.Tensor], m: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """megalite global tensors -> HF state dict. Fused blocks are cloned: safetensors refuses
    tensors that share storage."""
    w = canonical_names(w)
    check_shapes(w, m, where)
    out = {"model.embed_tokens.weight": w["embedding.weight"], "model.norm.weight": w["final_norm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = w["head"]
    d, f = m.head_dim, m.ffn_size
    inverse = {v: k for k, v in _LAYER_RENAMES.items()}
    for i in range(m.num_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in inverse.items():
            out[hp + theirs] = w[p + ours]
        qkv = w[p + "attn.qkv.weight"].split([m.num_heads * d, m.kv_heads * d, m.kv_heads * d], dim=0)
        gate_up = w[p + "mlp.gate_up.weight"].split([f, f], dim=0)
        for name, t in zip(_QKV + _GATE_UP, qkv + gate_up, strict=True):
            out[hp + name] = t.clone()
    return {k: v.contiguous() for k, v in out.items()}
