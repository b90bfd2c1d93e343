"""The TP all-reduce mappings work in place where autograd allows it and stay correct where not."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.parallel.mappings import copy_to_tp, reduce_from_tp
from megalite.testing import run_distributed


class _ViewOut(torch.autograd.Function):
    """Like the fused SwiGLU + down projection: a custom Function whose output is a view."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def _worker(rank: int, world: int):
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, generator=gen)
    ws = [torch.randn(5, 4, generator=gen) for _ in range(world)]  # rank r's weight shard
    out = {}
    for name, fn in (("linear", F.linear), ("custom_view", _ViewOut.apply)):
        xr, w = x.clone().requires_grad_(), ws[rank].clone().requires_grad_()
        h = xr * 2.0  # a second consumer of h (below) must keep its own gradient
        y = fn(copy_to_tp(h, group), w)
        z = reduce_from_tp(y, group)
        out[name] = {"in_place": z.data_ptr() == y.data_ptr()}
        (z * torch.arange(5.0)).sum().add(h.sum()).backward()
        out[name].update(z=z.detach(), dx=xr.grad, dw=w.grad)
    return out, x, ws


@pytest.mark.slow
def test_reduce_from_tp_in_place_and_on_custom_views():
    for out, x, ws in run_distributed(_worker, 2):
        want_z = sum(F.linear(2.0 * x, w) for w in ws)
        c = torch.arange(5.0)
        for name, r in out.items():
            torch.testing.assert_close(r["z"], want_z, msg=name)
            # dL/dh = sum over ranks of (c @ w_r), plus 1 from h.sum(); dL/dx = 2 dL/dh.
            want_dx = 2.0 * (sum(c @ w for w in ws) + 1.0).expand_as(x)
            torch.testing.assert_close(r["dx"], want_dx, msg=name)
            torch.testing.assert_close(r["dw"], c[:, None] * (2.0 * x).reshape(-1, 4).sum(0)[None, :], msg=name)
        assert out["linear"]["in_place"]  # a matmul's fresh output is reduced without a copy
        assert not out["custom_view"]["in_place"]  # autograd forbids it there: reduced in a copy
