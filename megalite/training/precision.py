"""Mixed precision: fp32 master weights and grads always; the forward runs in the chosen dtype.

bf16 and fp16 use autocast over fp32 parameters, so optimizer state and gradient accumulation stay
fp32. fp16 adds dynamic loss scaling. fp8 goes through Transformer Engine (fp8_backend=te) or torchao's
float8 matmuls (fp8_backend=torchao) and never silently downgrades: without the backend or an
FP8-capable GPU the run stops with one line.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch

from megalite.config import ConfigError, ModelConfig, TrainConfig


def resolve_precision(train: TrainConfig, device: torch.device, model: ModelConfig | None = None) -> str:
    """Pass `model` so that fp8 is also refused when no layer would run through TE (silently BF16)."""
    p = train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p not in ("fp32", "bf16", "fp16", "fp8"):
        raise ConfigError(f"unknown train.precision '{p}' (auto | fp32 | bf16 | fp16 | fp8)")
    if p == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    if p == "fp8":
        check_fp8_backend(train, device, model)
    return p


FP8_BACKENDS = ("te", "torchao")


def check_fp8_backend(train: TrainConfig, device: torch.device, model: ModelConfig | None = None) -> None:
    """`precision=fp8` under the chosen backend can run here, or one line (ConfigError) says why.
    te: Transformer Engine modules (model.*_impl=te); torchao: float8 matmuls inside megalite's
    own TP linears (model.linear_impl=torch). Never a silent downgrade to BF16."""
    from megalite.kernels import te, torchao_fp8
    from megalite.kernels.te import FP8Unavailable

    backend, recipe = train.fp8_backend, train.fp8_recipe
    if backend not in FP8_BACKENDS:
        raise ConfigError(f"unknown train.fp8_backend '{backend}' (expected one of: {', '.join(FP8_BACKENDS)})")
    try:
        if backend == "torchao":
            if model is not None and "te" in (model.linear_impl, model.mlp_impl, model.norm_impl):
                raise ConfigError("train.fp8_backend=torchao runs FP8 inside megalite's own linears; set "
                                  "model.linear_impl=torch, model.mlp_impl=torch|triton and model.norm_impl=torch|triton")
            torchao_fp8.check_fp8(recipe, device)
            return
        if recipe in torchao_fp8.RECIPES:
            raise ConfigError(f"train.fp8_recipe={recipe} is a torchao recipe; set train.fp8_backend=torchao, "
                              f"or choose one of {', '.join(te.RECIPES)} for Transformer Engine")
        if model is not None and "te" not in (model.linear_impl, model.mlp_impl):
            raise ConfigError("train.precision=fp8 needs model.linear_impl=te and/or model.mlp_impl=te "
                              "(FP8 runs only inside Transformer Engine modules)")
        if not te.te_available() and torchao_fp8.torchao_available():
            raise ConfigError("train.precision=fp8: Transformer Engine is not installed (fp8_backend=te, the default) "
                              "but torchao is; set train.fp8_backend=torchao train.fp8_recipe=tensorwise|rowwise")
        te.check_fp8(recipe, device)
    except FP8Unavailable as e:
        raise ConfigError(str(e)) from None


def make_autocast(precision: str, device: torch.device, fp8_recipe: str = "delayed", amax_group=None,
                  fp8_backend: str = "te"):
    """A zero-argument factory of the context every forward runs under (built once: the FP8 recipe
    is created a single time and reused). `amax_group` is the TP x DP group of this pipeline stage,
    over which delayed scaling reduces amax histories. torchao's float8 needs no context: its
    matmuls are swapped into the model (build_model), around BF16 autocast."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    if precision != "fp8" or fp8_backend == "torchao":
        return lambda: torch.autocast(device.type, dtype=dtype)
    from megalite.kernels.te import fp8_autocast_factory

    fp8 = fp8_autocast_factory("fp8", fp8_recipe, amax_group)

    def both() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
        stack.enter_context(fp8())
        return stack

    return both


class LossScaler:
    """Dynamic loss scaling for fp16: grow after `interval` clean steps, halve on overflow."""

    def __init__(self, precision: str, initial: float = 0.0, interval: int = 1000) -> None:
        self.enabled = precision == "fp16"
        self.dynamic = initial == 0.0
        self.scale = (initial or 2.0**16) if self.enabled else 1.0
        self.interval, self.good_steps = interval, 0

    def unscale_and_check(self, params: Iterable[torch.nn.Parameter], group=None) -> bool:
        """Divides grads by the scale; returns False (skip the step) if any is inf/nan on any rank."""
        if not self.enabled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        found = torch.zeros(1, device=grads[0].device if grads else "cpu")
        for g in grads:
            g.div_(self.scale)
            found += (~torch.isfinite(g)).any().float()
        if group is not None and torch.distributed.is_initialized():
            torch.distributed.all_reduce(found, group=group)
        ok = bool(found.item() == 0)
        if self.dynamic:
            if not ok:
                self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
            else:
                self.good_steps += 1
                if self.good_steps % self.interval == 0 and math.isfinite(self.scale * 2):
                    self.scale *= 2
        return ok

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, s: dict) -> None:
        self.scale, self.good_steps = s["scale"], s["good_steps"]
