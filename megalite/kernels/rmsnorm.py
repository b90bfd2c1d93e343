"""RMSNorm in Triton: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), optionally on h = x + residual.

Forward: one program per row, statistics in fp32, rstd saved (one float per row) for backward.
Rows up to FWD_MAX_BLOCK wide live in registers (at most 32 fp32 values per thread with 32 warps);
wider rows (64k and beyond) take two passes over LOOP_BLOCK column blocks instead of one giant
block: the register spill that makes very wide rows collapse elsewhere.

Backward: dW is a two-stage reduction without atomics. Each program accumulates its share of dW in
fp32 registers and writes it once into its own row of a [programs, hidden] buffer, which torch sums.
- Rows up to BWD_MAX_BLOCK (x, dy, w and the dW share per element fit in registers): a fixed number
  of persistent programs walk strided rows. Few rows get few programs, so small shapes do not pay
  a fixed launch floor.
- Wider rows: one kernel reduces each row's projection term, then a [programs, column blocks] grid
  sweeps the rows block by block. This reads x and dy twice, but never spills and never round-trips
  the dW share through memory per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalite.kernels._common import (
    FLOAT_DTYPES,
    as_rows,
    check_device,
    check_float,
    compile_boundary,
    num_programs,
    warps_for,
)

# Checked with `python -m megalite.kernels.compile_check` (ptxas, sm_90): the largest in-register
# rows that compile without spilling, and the column block of the wide-row loops.
FWD_MAX_BLOCK = 32768
BWD_MAX_BLOCK = 8192
LOOP_BLOCK = 4096


def _block(n_cols: int, limit: int) -> int:
    return min(triton.next_power_of_2(n_cols), limit)


@triton.jit
def _load_sum(X_ROW, R_ROW, H_ROW, cols, mask, HAS_RES: tl.constexpr):
    """A block of the row to normalize, in fp32: x, or h = x + residual stored in h's dtype first,
    so that the norm sees exactly the h that is returned."""
    x = tl.load(X_ROW + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R_ROW + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(H_ROW.dtype.element_ty)
        tl.store(H_ROW + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _rms_fwd_kernel(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, n_cols, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    y_row = Y + row * stride_y
    h_row = H + row * stride_h
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = _load_sum(x_row, r_row, h_row, cols, mask, HAS_RES)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = _load_sum(x_row, r_row, h_row, cols, mask, HAS_RES)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
        src = h_row if HAS_RES else x_row
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_dot_kernel(DY, X, W, RSTD, C, stride_dy, stride_x, n_cols, BLOCK: tl.constexpr):
    """Wide rows, pass 1 (before _rms_bwd_kernel): the per-row projection c = rstd * mean(dy * w * x), one program a row."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc += dy * w * x
    tl.store(C + row, tl.sum(acc, axis=0) * tl.load(RSTD + row) / n_cols)


@triton.jit
def _rms_bwd_kernel(DY, X, W, RSTD, C, DH, DX, DW_PART, stride_dy, stride_x, stride_dh, stride_dx,
                    n_rows, n_cols, n_progs, HAS_DH: tl.constexpr, WHOLE_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Program (p, b) takes column block b of rows p, p + n_progs, ...; its dW share for that block
    accumulates in registers and is written once. WHOLE_ROW: the block is the whole row (one column
    block), so the row's projection c is reduced here; otherwise pass 1 left it in C."""
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, tl.cdiv(n_rows - pid, n_progs)):
        row64 = pid64 + i * n_progs
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        xhat = x * rstd
        if WHOLE_ROW:
            c = tl.sum(dy * w * xhat, axis=0) / n_cols
        else:
            c = tl.load(C + row64)
        dx = (dy * w - xhat * c) * rstd
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    tl.store(DW_PART + pid64 * n_cols + cols, dw_acc, mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
           out_dtype: torch.dtype | None) -> None:
    check_float(x, "rms_norm: x")
    check_float(weight, "rms_norm: weight")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if residual is not None:
        check_float(residual, "rms_norm: residual")
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"rms_norm: out_dtype {out_dtype} is not supported (use float32, float16 or bfloat16)")
    check_device(x, weight)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float,
                out_dtype: torch.dtype | None):
        shape = x.shape
        x2 = as_rows(x, "rms_norm: x")
        n_rows, n_cols = x2.shape
        has_res = residual is not None
        r2 = as_rows(residual, "rms_norm: residual") if has_res else x2
        w = weight.contiguous()
        # h = x + residual keeps the wider dtype (a bf16 sublayer output added to an fp32 stream).
        h_dtype = torch.promote_types(x.dtype, residual.dtype) if has_res else x.dtype
        y = torch.empty((n_rows, n_cols), dtype=out_dtype or h_dtype, device=x.device)
        h = torch.empty((n_rows, n_cols), dtype=h_dtype, device=x.device) if has_res else y
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        single = n_cols <= FWD_MAX_BLOCK
        block = _block(n_cols, FWD_MAX_BLOCK) if single else LOOP_BLOCK
        if n_rows > 0:
            _rms_fwd_kernel[(n_rows,)](
                x2, r2, w, y, h, rstd, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
                n_cols, eps, HAS_RES=has_res, BLOCK=block, SINGLE=single,
                num_warps=warps_for(block))
        ctx.save_for_backward(h if has_res else x2, w, rstd)
        ctx.has_res = has_res
        ctx.shape = shape
        ctx.in_dtypes = (x.dtype, residual.dtype if has_res else None)
        if has_res:
            return y.view(shape), h.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dh: torch.Tensor | None = None):
        x2, w, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = as_rows(dy, "rms_norm: grad")
        has_dh = ctx.has_res and dh is not None
        dh2 = as_rows(dh, "rms_norm: grad") if has_dh else dy2
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        if n_cols <= BWD_MAX_BLOCK:
            # Enough resident programs per SM (up to 32 warps' worth) that while one waits on a row's
            # loads others compute: the row loop is latency-bound otherwise, a floor at small sizes.
            block, n_blocks = _block(n_cols, BWD_MAX_BLOCK), 1
            progs = num_programs(x2.device, n_rows, per_sm=max(1, 32 // warps_for(block)))
        else:
            # A wider row's x, dy, w and dW share no longer fit in registers (they spill): reduce
            # each row's projection first, then sweep column blocks with dW kept per block.
            block, n_blocks = LOOP_BLOCK, triton.cdiv(n_cols, LOOP_BLOCK)
            progs = max(1, num_programs(x2.device, n_rows, per_sm=32 // warps_for(block)) // n_blocks)
        dw_part = torch.empty((progs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows > 0:
            c = rstd  # not read when the kernel reduces whole rows itself
            if n_blocks > 1:
                c = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
                _rms_bwd_dot_kernel[(n_rows,)](dy2, x2, w, rstd, c, dy2.stride(0), x2.stride(0), n_cols,
                                               BLOCK=block, num_warps=warps_for(block))
            _rms_bwd_kernel[(progs, n_blocks)](dy2, x2, w, rstd, c, dh2, dx, dw_part, dy2.stride(0), x2.stride(0),
                                               dh2.stride(0), dx.stride(0), n_rows, n_cols, progs, HAS_DH=has_dh,
                                               WHOLE_ROW=n_blocks == 1, BLOCK=block, num_warps=warps_for(block))
        dw = dw_part.sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        dx = dx.view(ctx.shape)
        x_dtype, r_dtype = ctx.in_dtypes
        dr = dx.to(r_dtype) if ctx.has_res else None
        return dx.to(x_dtype), dw, dr, None, None


@compile_boundary
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
             residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
    """RMSNorm over the last dim. With `residual`, returns (norm(x + residual), x + residual).

    x + residual is kept in the wider of the two dtypes. The normalized output is written in
    `out_dtype` (default: that of its input), so a norm feeding a bf16 matmul can write bf16 directly.
    """
    _check(x, weight, residual, out_dtype)
    return _RMSNormFn.apply(x, weight, residual, float(eps), out_dtype)
