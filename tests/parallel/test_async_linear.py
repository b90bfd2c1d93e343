"""The overlapped column-parallel backward (parallel.tp_comm_overlap) gives the blocking path's
numbers bit for bit, and really has its collective in flight while the weight grad is computed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.config import ModelConfig, ParallelConfig
from megalite.model import LlamaModel
from megalite.parallel.finalize import finalize_grads
from megalite.parallel.layers import ColumnParallelLinear
from megalite.parallel.rng import seed_everything
from megalite.parallel.state import build_parallel_state
from megalite.testing import full_tensors, run_distributed

CFG = ModelConfig(vocab_size=1001, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, max_seq_len=64, norm_eps=1e-6)


def _layer_run(ps, overlap: bool, bias: bool, autocast: bool):
    ps.tp_comm_overlap = overlap
    torch.manual_seed(0)
    layer = ColumnParallelLinear(16, (8, 8), ps, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    g = torch.Generator().manual_seed(1 + ps.tp_rank)  # every rank holds different activations
    x = torch.randn(8 // (ps.tp if ps.sp else 1), 3, 16, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x * 1.0)  # a non-leaf input, as in the model
    y.backward(torch.randn(y.shape, generator=g, dtype=y.dtype))
    out = {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad}
    if bias:
        out["db"] = layer.bias.grad
    return out


def _model_run(par: ParallelConfig):
    ps = build_parallel_state(par)
    model = LlamaModel(CFG, ps, seed_everything(0, ps.tp_rank, 0, torch.device("cpu")))
    model.init_weights(7)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
    loss = model(tokens, labels=labels)
    loss.sum().backward()
    finalize_grads([model], ps)
    return loss.detach(), full_tensors(model, ps)


def _equal_worker(rank: int, world: int):
    out = {}
    for sp in (False, True):
        ps = build_parallel_state(ParallelConfig(tp=world, sp=sp))
        for bias in (False, True):
            for autocast in (False, True):
                out[("layer", sp, bias, autocast)] = [_layer_run(ps, flag, bias, autocast) for flag in (True, False)]
        out[("model", sp)] = [_model_run(ParallelConfig(tp=world, sp=sp, tp_comm_overlap=flag))
                              for flag in (True, False)]
    return out


@pytest.mark.slow
def test_overlap_is_bit_identical_to_blocking():
    for out in run_distributed(_equal_worker, 2):
        for key, (fast, slow) in out.items():
            if key[0] == "layer":
                assert fast.keys() == slow.keys()
                for name in fast:
                    assert fast[name].dtype == slow[name].dtype, (key, name)
                    assert torch.equal(fast[name], slow[name]), (key, name)
            else:
                assert torch.equal(fast[0], slow[0]), key
                assert fast[1].keys() == slow[1].keys()
                for name in fast[1]:
                    assert torch.equal(fast[1][name], slow[1][name]), (key, name)


class _Spy(TorchDispatchMode):
    """Logs each matmul that produces the weight's shape (the weight grad)."""

    def __init__(self, events: list[str], weight_shape: torch.Size) -> None:
        super().__init__()
        self.events, self.weight_shape = events, weight_shape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default and out.shape == self.weight_shape:
            self.events.append("wgrad")
        return out


def _spy_worker(rank: int, world: int):
    events: list[str] = []

    class Handle:
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append("wait")
            return self.work.wait()

    def spied(fn, name):
        def call(*args, **kw):
            events.append(f"launch {name}")
            work = fn(*args, **kw)
            return Handle(work) if kw.get("async_op") else work
        return call

    dist.all_reduce = spied(dist.all_reduce, "all_reduce")
    dist.reduce_scatter_single = spied(dist.reduce_scatter_single, "reduce_scatter")
    out = {}
    for sp in (False, True):
        ps = build_parallel_state(ParallelConfig(tp=world, sp=sp))
        for overlap in (True, False):
            ps.tp_comm_overlap = overlap
            layer = ColumnParallelLinear(16, 8, ps)
            with torch.no_grad():
                layer.weight.normal_()
            x = torch.randn(4, 2, 16, requires_grad=True)
            y = layer(x * 1.0)
            events.clear()
            with _Spy(events, layer.weight.shape):
                y.sum().backward()
            out[(sp, overlap)] = list(events)
    return out


@pytest.mark.slow
def test_collective_in_flight_during_weight_grad():
    for out in run_distributed(_spy_worker, 2):
        for sp in (False, True):
            launch = f"launch {'reduce_scatter' if sp else 'all_reduce'}"
            # Overlapped: the input grad's collective is launched, the weight grad computed, then waited.
            assert out[(sp, True)] == [launch, "wgrad", "wait"], out[(sp, True)]
            # Blocking: the weight grad comes first, the collective blocks after it (nothing waited).
            assert out[(sp, False)] == ["wgrad", launch], out[(sp, False)]


def test_blocking_flag_in_config():
    assert ParallelConfig().tp_comm_overlap is True
    assert build_parallel_state(dataclasses.replace(ParallelConfig(), tp_comm_overlap=False)).tp_comm_overlap is False
