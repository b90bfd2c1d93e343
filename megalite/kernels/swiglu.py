"""SwiGLU in Triton: a = silu(gate) * up, and its backward.

Gate and up may be strided views (for example the two halves of a fused [tokens, 2F] projection):
the kernels take a row stride per tensor, so no copy is made. Forward saves gate and up only, the
two tensors backward cannot do without; silu and sigmoid are recomputed from them.

`swiglu_linear(gate, up, w_down)` goes one step further for the MLP: a plain `F.linear(swiglu(...))`
makes autograd keep the activation `a` for the down projection's weight gradient, a third [tokens, F]
tensor. With `recompute=True` it is dropped after the forward and rebuilt in the backward kernel,
in the same pass that computes d(gate) and d(up), so it costs no extra memory traffic pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megalite.kernels._common import as_rows, check_device, check_float, compile_boundary

_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, A, stride_g, stride_u, stride_a, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    tl.store(A + row * stride_a + cols, a.to(A.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DA, G, U, DG, DU, A, stride_da, stride_g, stride_u, stride_dg, stride_du, stride_a,
                       n_cols, STORE_A: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    da = tl.load(DA + row * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    # d silu / dg = s + g s (1 - s) = s (1 + g (1 - s))
    dg = da * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (da * silu).to(DU.dtype.element_ty), mask=mask)
    if STORE_A:
        tl.store(A + row * stride_a + cols, (silu * u).to(A.dtype.element_ty), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float(gate, "swiglu: gate")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)}/{gate.dtype} and up {tuple(up.shape)}/{up.dtype} "
                         "must have the same shape and dtype")
    check_device(gate, up)


def _forward(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    n_rows, n_cols = g2.shape
    a = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
    if a.numel():
        grid = (n_rows, triton.cdiv(n_cols, _BLOCK))
        _swiglu_fwd_kernel[grid](g2, u2, a, g2.stride(0), u2.stride(0), a.stride(0), n_cols, BLOCK=_BLOCK)
    return a


def _backward(da2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, want_a: bool):
    n_rows, n_cols = g2.shape
    dg = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
    du = torch.empty_like(dg)
    a = torch.empty_like(dg) if want_a else dg
    if dg.numel():
        grid = (n_rows, triton.cdiv(n_cols, _BLOCK))
        _swiglu_bwd_kernel[grid](da2, g2, u2, dg, du, a, da2.stride(0), g2.stride(0), u2.stride(0),
                                 dg.stride(0), du.stride(0), a.stride(0), n_cols, STORE_A=want_a,
                                 BLOCK=_BLOCK)
    return dg, du, (a if want_a else None)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g2, u2 = as_rows(gate, "swiglu: gate"), as_rows(up, "swiglu: up")
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return _forward(g2, u2).view(gate.shape)

    @staticmethod
    def backward(ctx, da: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        dg, du, _ = _backward(as_rows(da, "swiglu: grad"), g2, u2, want_a=False)
        return dg.view(ctx.shape), du.view(ctx.shape)


class _SwiGLULinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, recompute: bool):
        # Under autocast the activations already carry the autocast dtype (they come out of a linear);
        # the weight is cast to it, as F.linear would, and the body runs with autocast off.
        with torch.autocast(gate.device.type, enabled=False):
            return _SwiGLULinearFn._forward(ctx, gate, up, weight.to(gate.dtype), recompute)

    @staticmethod
    def _forward(ctx, gate, up, weight, recompute):
        g2, u2 = as_rows(gate, "swiglu: gate"), as_rows(up, "swiglu: up")
        a = _forward(g2, u2)
        out = F.linear(a, weight)
        ctx.recompute = recompute
        ctx.shape = gate.shape
        if recompute:
            ctx.save_for_backward(g2, u2, weight)
        else:
            ctx.save_for_backward(g2, u2, weight, a)
        return out.view(*gate.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        with torch.autocast(dout.device.type, enabled=False):
            return _SwiGLULinearFn._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        g2, u2, weight, *saved_a = ctx.saved_tensors
        dout2 = as_rows(dout, "swiglu_linear: grad").to(weight.dtype)
        da = dout2 @ weight
        dg, du, a = _backward(da, g2, u2, want_a=ctx.recompute)
        a = a if ctx.recompute else saved_a[0]
        dw = dout2.t() @ a if ctx.needs_input_grad[2] else None
        return dg.view(ctx.shape), du.view(ctx.shape), dw, None


@compile_boundary
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; fp32 math, output in the input dtype."""
    _check(gate, up)
    return _SwiGLUFn.apply(gate, up)


@compile_boundary
def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                  recompute: bool = True) -> torch.Tensor:
    """F.linear(swiglu(gate, up), weight) (the MLP's down projection, no bias).

    recompute=True keeps only gate and up for backward and rebuilds the activation there.
    """
    _check(gate, up)
    if weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"swiglu_linear: weight {tuple(weight.shape)} does not match ffn size {gate.shape[-1]}")
    if weight.dtype != gate.dtype and not torch.is_autocast_enabled(gate.device.type):
        raise ValueError(f"swiglu_linear: weight dtype {weight.dtype} differs from activations {gate.dtype}")
    return _SwiGLULinearFn.apply(gate, up, weight, recompute)
