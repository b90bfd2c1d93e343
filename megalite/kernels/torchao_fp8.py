"""torchao float8 training on megalite's own tensor-parallel linears (`train.fp8_backend=torchao`).

torchao's module swap (`convert_to_float8_training`) replaces `nn.Linear`s; our TP/SP projections
are not `nn.Linear`s, because they carry their own collectives. So we keep the modules and swap the
one matmul inside each: `linear_fn`, F.linear by default, becomes `Float8Matmul`, which runs
torchao's `matmul_with_hp_or_float8_args` (dynamic scaling, the same autograd function inside
torchao's Float8Linear). The TP/SP communication around it is unchanged and stays in BF16.

Recipes: `tensorwise` (one scale per tensor, cuBLAS; compute capability 8.9+) and `rowwise` (one
scale per row, e4m3 everywhere, power-of-2 scales; torch's CUTLASS rowwise kernel, 9.0+).
Master weights stay fp32 parameters: each forward casts the current weight to float8 inside the
matmul, and the optimizer never sees float8. The head, embedding and loss stay in BF16 (as in
torchtitan: the output projection is the most sensitive to FP8 error).

Nothing here imports torchao at module level; the checks raise `FP8Unavailable` with one line.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from megalite.config import ConfigError
from megalite.kernels.te import FP8Unavailable, fp8_gpu

RECIPES = ("tensorwise", "rowwise")
# tensorwise runs cuBLAS's FP8 GEMM (Ada/Hopper+); the rowwise kernel torch ships is Hopper's.
_MIN_CC = {"tensorwise": (8, 9), "rowwise": (9, 0)}
# torch._scaled_mm needs both GEMM dims of each operand to be multiples of 16.
_ALIGN = 16


def torchao_float8() -> ModuleType:
    """`torchao.float8`, or a one-line error if torchao is not installed."""
    try:
        return importlib.import_module("torchao.float8")
    except ImportError as e:
        raise FP8Unavailable(f"train.fp8_backend=torchao needs torchao, which is not installed ({e.msg}); "
                             "pip install --no-deps torchao==0.18.0 (the extra megalite[fp8-torchao])") from None


def torchao_available() -> bool:
    try:
        torchao_float8()
    except FP8Unavailable:
        return False
    return True


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        te_names = ("delayed", "current", "mxfp8")
        hint = (f"fp8_recipe={recipe} is a Transformer Engine recipe; " if recipe in te_names
                else f"unknown fp8_recipe {recipe!r}; ")
        raise FP8Unavailable(hint + f"with fp8_backend=torchao choose one of {', '.join(RECIPES)}")


def check_fp8(recipe: str, device: torch.device | str | None = None) -> None:
    """Everything the torchao path needs, checked before any work: recipe, torchao, GPU, capability."""
    check_recipe(recipe)
    torchao_float8()
    cc, name = fp8_gpu(device)
    need = _MIN_CC[recipe]
    if cc < need:
        alt = " or fp8_recipe=tensorwise" if recipe == "rowwise" and cc >= _MIN_CC["tensorwise"] else ""
        raise FP8Unavailable(f"fp8_backend=torchao fp8_recipe={recipe} needs compute capability "
                             f"{need[0]}.{need[1]}+, but {name} is {cc[0]}.{cc[1]}; use precision=bf16{alt}")


def float8_config(recipe: str, emulate: bool = False) -> Any:
    """torchao's Float8LinearConfig for the recipe. `emulate` runs the float8 casts and a
    high-precision matmul instead of FP8 GEMMs (torchao's own emulation), so CPU tests can run it."""
    check_recipe(recipe)
    config = torchao_float8().Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=True) if emulate else config


class Float8Matmul:
    """Drop-in for `F.linear(x, weight, bias)`: x @ weight.T through torchao's float8 matmul.

    Stateless (dynamic scaling), so one instance can serve every layer; under autocast the input is
    cast to the autocast dtype first, as torchao's Float8Linear does, and the output has that dtype."""

    def __init__(self, config: Any) -> None:
        linear_mod = importlib.import_module("torchao.float8.float8_linear")
        self.config = config
        self._matmul = linear_mod.matmul_with_hp_or_float8_args
        # torchao derives the per-GEMM settings (fast accumulation, emulation) in Float8Linear's
        # constructor; build one on the meta device to reuse exactly its derivation.
        self.mm_config = linear_mod.Float8Linear(_ALIGN, _ALIGN, bias=False, config=config,
                                                 device="meta").linear_mm_config

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        out = self._matmul.apply(x, weight.t(), self.mm_config, self.config)
        return out if bias is None else out + bias.to(out.dtype)

    def __repr__(self) -> str:
        return f"Float8Matmul({'emulated ' if self.config.emulate else ''}{self.config.cast_config_input.short_str()})"


def fp8_linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The projections that run in FP8: every tensor-parallel linear inside the decoder layers."""
    from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear

    return {name: m for name, m in model.named_modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and name.startswith("layers.")}


def convert_to_float8(model: nn.Module, recipe: str, emulate: bool = False) -> list[str]:
    """Swaps the matmul of every decoder-layer TP linear of a LlamaModel chunk for torchao's float8
    one, in place; returns the converted module names. A projection whose local shape cannot run an
    FP8 GEMM is refused by name (ConfigError; never left in BF16 silently)."""
    from megalite.parallel.lora import is_adapter

    if any(is_adapter(p) for p in model.parameters()):
        # The LoRA wrappers run their own F.linear around the base weight: no FP8 there.
        raise ConfigError("train.fp8_backend=torchao does not run LoRA adapters' projections in FP8; "
                          "use precision=bf16 with lora.rank > 0")
    matmul = Float8Matmul(float8_config(recipe, emulate))
    # torchao's own conversion entry point first works around a Triton miscompile of fp8 stores in
    # compiled kernels (an inductor codegen patch, applied once); we skip that entry point (our
    # linears are not nn.Linear), so apply the same patch here.
    try:
        patch = importlib.import_module("torchao.float8._inductor_patch")
    except ImportError:  # a torchao without it (the patch is private to torchao)
        patch = None
    if hasattr(patch, "_patch_inductor_min_max_codegen"):
        patch._patch_inductor_min_max_codegen()
    converted = fp8_linear_modules(model)
    for name, m in converted.items():
        out_f, in_f = m.weight.shape
        if out_f % _ALIGN or in_f % _ALIGN:
            raise ConfigError(f"{name}: local weight {out_f}x{in_f} is not a multiple of {_ALIGN} in both dims, "
                                 "which FP8 GEMMs need; change the model shape or parallel.tp, or use precision=bf16")
        m.linear_fn = matmul
    for mlp in (m for m in model.modules() if getattr(m, "fused_down", False)):
        # The fused Triton SwiGLU + down projection does its own BF16 matmul; with FP8 the down
        # projection goes through the float8 matmul instead (the Triton SwiGLU itself stays).
        mlp.fused_down = False
    return list(converted)
