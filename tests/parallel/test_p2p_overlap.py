"""Pipeline p2p: a sent activation gives up its storage but still backpropagates, and sends stay in
flight past the exchange until the next one (or flush). Whole-schedule PP vs PP=1 equality with
deallocation on is tests/parallel/test_pipeline.py."""

from __future__ import annotations

import pytest
import torch

from megalite.config import ParallelConfig
from megalite.parallel.pipeline.p2p import PipelineComm, backward_from, deallocate_output
from megalite.parallel.state import build_parallel_state
from megalite.testing import run_distributed

SHAPE = (4, 2, 8)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def test_deallocated_output_still_backpropagates():
    x0, w0 = _inputs()
    grad = torch.randn(SHAPE)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    (x * w + 1.0).backward(grad)
    want = x.grad, w.grad
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    out = x * w + 1.0
    deallocate_output(out)
    assert out.numel() == 1 and out.untyped_storage().nbytes() == 4
    backward_from(out, grad)
    assert torch.equal(x.grad, want[0]) and torch.equal(w.grad, want[1])


def test_views_and_leaves_keep_their_storage():
    x = torch.randn(SHAPE, requires_grad=True)
    view = (x * 2.0).view(-1)
    for t in (view, x):
        deallocate_output(t)
        assert t.numel() == x.numel()


def _worker(rank: int, world: int):
    ps = build_parallel_state(ParallelConfig(pp=2))
    comm = PipelineComm(ps, SHAPE, torch.float32, torch.device("cpu"), overlap_sends=True)
    if ps.is_first_stage:
        x0, w0 = _inputs()
        x, w = x0.requires_grad_(), w0.requires_grad_()
        out = x * w + 1.0
        comm.send_forward(out)
        freed, pending = out.numel(), len(comm.in_flight)
        grad = comm.recv_backward()
        backward_from(out, grad)
        comm.flush()
        return dict(dx=x.grad, dw=w.grad, freed=freed, pending=pending, left=len(comm.in_flight))
    inp = comm.recv_forward()
    inp.sin().sum().backward()
    comm.send_backward(inp.grad)
    pending = len(comm.in_flight)
    comm.flush()
    return dict(received=inp.detach(), pending=pending, left=len(comm.in_flight))


@pytest.mark.slow
def test_send_frees_the_output_and_pp2_grads_match():
    first, second = run_distributed(_worker, 2)
    x, w = (t.requires_grad_() for t in _inputs())
    out = x * w + 1.0
    out.sin().sum().backward()
    assert torch.equal(second["received"], out.detach())  # the buffer outlived the deallocation
    assert first["freed"] == 1  # the output's storage is gone right after the send was posted
    assert torch.equal(first["dx"], x.grad) and torch.equal(first["dw"], w.grad)
    # Each rank's send was still pending after its exchange returned; flush waited for it.
    assert (first["pending"], second["pending"]) == (1, 1)
    assert first["left"] == second["left"] == 0
