"""Transformer Engine glue for `precision: fp8`: checks, recipes, the autocast context, and modules.

TE is imported lazily, on first use, so everything else runs without it. There is no silent
downgrade: asking for FP8 without TE, without a CUDA GPU, or without an FP8-capable one (compute
capability 8.9+; MXFP8 needs 10.0+) raises `FP8Unavailable` with one line saying what is missing.

Master weights: the TE modules are built in `params_dtype` (the model dtype); the fp32 master copy
is the optimizer's, exactly as with the torch layers. FP8 exists only inside the GEMMs.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

Group = torch.distributed.ProcessGroup | None
RECIPES = ("delayed", "current", "mxfp8")
# Minimum compute capability for each recipe (Ada/Hopper FP8 tensor cores; Blackwell for MXFP8).
_MIN_CC = {"delayed": (8, 9), "current": (8, 9), "mxfp8": (10, 0)}


class FP8Unavailable(RuntimeError):
    """FP8 (or a TE module) was requested where it cannot run; the message is one line."""


def fp8_gpu(device: torch.device | str | None) -> tuple[tuple[int, int], str]:
    """(compute capability, name) of the CUDA GPU an FP8 run would use; a one-line error without one.
    Both FP8 backends (TE here, torchao in torchao_fp8.py) start their checks with it."""
    dev = torch.device(device) if device is not None else None
    if (dev is not None and dev.type != "cuda") or not torch.cuda.is_available():
        raise FP8Unavailable("precision=fp8 needs a CUDA GPU (this run has none); use precision=bf16 or fp32")
    index = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index)


def te_pytorch() -> ModuleType:
    """`transformer_engine.pytorch`, or a one-line error if TE is not installed."""
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except ImportError as e:
        raise FP8Unavailable(
            f"Transformer Engine is not installed ({e.msg}); precision=fp8 and *_impl=te need it "
            "(pip install transformer-engine[pytorch] on a CUDA machine), or use precision=bf16 with "
            "*_impl=torch|triton") from None


def te_available() -> bool:
    try:
        te_pytorch()
    except FP8Unavailable:
        return False
    return True


def check_fp8(recipe: str, device: torch.device | str | None = None) -> None:
    """Everything `precision=fp8` needs, checked up front: recipe name, TE, GPU and its capability."""
    if recipe not in RECIPES:
        raise FP8Unavailable(f"unknown fp8_recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    te = te_pytorch()
    cc, name = fp8_gpu(device)
    need = _MIN_CC[recipe]
    if cc < need:
        raise FP8Unavailable(f"fp8_recipe={recipe} needs compute capability {need[0]}.{need[1]}+, but "
                             f"{name} is {cc[0]}.{cc[1]}; use precision=bf16"
                             + (" or fp8_recipe=delayed|current" if recipe == "mxfp8" and cc >= (8, 9) else ""))
    # TE's own check knows about driver/cuBLAS requirements we cannot see from torch.
    fp8_mod = getattr(te, "fp8", None)
    checker = getattr(fp8_mod, "check_mxfp8_support" if recipe == "mxfp8" else "check_fp8_support", None)
    if checker is not None:
        ok, reason = checker()
        if not ok:
            raise FP8Unavailable(f"Transformer Engine reports FP8 ({recipe}) unavailable: {reason}")


def build_recipe(name: str, amax_history_len: int = 1024, margin: int = 0) -> Any:
    """The TE recipe object: E4M3 forward / E5M2 backward (HYBRID) for the per-tensor recipes."""
    if name not in RECIPES:
        raise FP8Unavailable(f"unknown fp8_recipe {name!r}; choose one of {', '.join(RECIPES)}")
    te_pytorch()  # the one-line error if TE is missing, before touching its submodules
    recipe = importlib.import_module("transformer_engine.common.recipe")
    fmt = recipe.Format.HYBRID
    if name == "delayed":
        return recipe.DelayedScaling(fp8_format=fmt, amax_history_len=amax_history_len,
                                     amax_compute_algo="max", margin=margin)
    if name == "current":
        return recipe.Float8CurrentScaling(fp8_format=fmt)
    return recipe.MXFP8BlockScaling(fp8_format=recipe.Format.E4M3)


def fp8_autocast_factory(precision: str, recipe_name: str = "delayed",
                         amax_group: Group = None) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the context each forward pass runs under.

    For non-fp8 precisions it makes null contexts and never imports TE. `amax_group` is the group
    over which delayed scaling reduces amax histories (Megatron uses TP x DP).
    """
    if precision != "fp8":
        return contextlib.nullcontext
    te = te_pytorch()
    recipe = build_recipe(recipe_name)
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast
        return lambda: te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)


def _device(device: torch.device | str | None) -> dict[str, Any]:
    # TE builds its parameters on "cuda" unless told otherwise.
    return {} if device is None else {"device": torch.device(device)}


def _tp_kwargs(tp_group: Group, sequence_parallel: bool) -> dict[str, Any]:
    tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    if sequence_parallel and tp == 1:
        sequence_parallel = False  # SP is meaningless without a TP group; TE would reject it
    return {"tp_group": tp_group, "tp_size": tp, "sequence_parallel": sequence_parallel}


def te_linear(in_features: int, out_features: int, parallel_mode: str | None, tp_group: Group = None,
              sequence_parallel: bool = False, bias: bool = False, params_dtype: torch.dtype | None = None,
              init_method: Callable[[torch.Tensor], None] | None = None,
              device: torch.device | str | None = None) -> torch.nn.Module:
    """te.Linear; parallel_mode 'column' | 'row' | None, with full (unsharded) feature sizes."""
    if parallel_mode not in ("column", "row", None):
        raise ValueError(f"te_linear: parallel_mode must be 'column', 'row' or None, got {parallel_mode!r}")
    te = te_pytorch()
    return te.Linear(in_features, out_features, bias=bias, parallel_mode=parallel_mode,
                     params_dtype=params_dtype, init_method=init_method, **_device(device),
                     **_tp_kwargs(tp_group, sequence_parallel))


def te_layernorm_linear(in_features: int, out_features: int, eps: float, tp_group: Group = None,
                        sequence_parallel: bool = False, bias: bool = False,
                        params_dtype: torch.dtype | None = None,
                        init_method: Callable[[torch.Tensor], None] | None = None,
                        device: torch.device | str | None = None) -> torch.nn.Module:
    """te.LayerNormLinear with RMSNorm, column-parallel (the attention's norm + QKV projection)."""
    te = te_pytorch()
    return te.LayerNormLinear(in_features, out_features, eps=eps, bias=bias, normalization="RMSNorm",
                              parallel_mode="column", params_dtype=params_dtype, init_method=init_method,
                              **_device(device), **_tp_kwargs(tp_group, sequence_parallel))


def te_layernorm_mlp(hidden_size: int, ffn_hidden_size: int, eps: float, tp_group: Group = None,
                     sequence_parallel: bool = False, bias: bool = False,
                     params_dtype: torch.dtype | None = None,
                     init_method: Callable[[torch.Tensor], None] | None = None,
                     output_layer_init_method: Callable[[torch.Tensor], None] | None = None,
                     device: torch.device | str | None = None) -> torch.nn.Module:
    """te.LayerNormMLP: RMSNorm + gate/up (column) + SwiGLU + down (row), all in one module."""
    te = te_pytorch()
    return te.LayerNormMLP(hidden_size, ffn_hidden_size, eps=eps, bias=bias, normalization="RMSNorm",
                           activation="swiglu", set_parallel_mode=True, params_dtype=params_dtype,
                           init_method=init_method, output_layer_init_method=output_layer_init_method,
                           **_device(device), **_tp_kwargs(tp_group, sequence_parallel))


def te_rmsnorm(hidden_size: int, eps: float, sequence_parallel: bool = False,
               params_dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.nn.Module:
    te = te_pytorch()
    return te.RMSNorm(hidden_size, eps=eps, sequence_parallel=sequence_parallel, params_dtype=params_dtype,
                      **_device(device))
