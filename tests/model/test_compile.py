"""train.compile: each decoder layer is compiled (inductor, C++ on a CPU) and trains exactly as eager.

Compiled losses must equal eager ones over 3 optimizer steps at TP1, TP2+SP, TP2 and PP2, with
both recompute modes, and the layers must really have been compiled (dynamo made graphs), so a config
flag that compiled nothing would fail. Compile is slow on 2 cores (~30 s a layout), hence `slow`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from megalite.config import ModelConfig
from megalite.model import LlamaModel
from megalite.model.compile import compile_layers
from megalite.parallel.state import ParallelState
from megalite.testing import run_distributed
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

STEPS = 3
CFG = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, max_seq_len=64)


def _losses(run_dir: str, *overrides: str) -> tuple[list[float], int]:
    """(the losses of a 3-step run, how many graphs dynamo compiled during it)."""
    before = counters["stats"]["unique_graphs"]
    history = Trainer(tiny_config(run_dir, f"train.train_steps={STEPS}", *overrides)).train()
    return [r["loss"] for r in history], counters["stats"]["unique_graphs"] - before


def test_compile_keeps_parameter_names_and_compiles_every_layer():
    model = LlamaModel(CFG, ParallelState())
    names = [n for n, _ in model.named_parameters()]
    assert compile_layers(model) == CFG.num_layers
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
    for layer in model.layers.values():
        assert "_forward" in vars(layer) and vars(layer)["_forward"] is not type(layer)._forward


@pytest.mark.slow
def test_generation_from_a_compiled_model_matches_eager():
    """Decoding with a KV cache stays eager in a compiled model: same tokens and log-probs."""
    from megalite.generation import generate

    out = []
    for compiled in (False, True):
        model = LlamaModel(CFG, ParallelState())
        model.init_weights(3)
        if compiled:
            compile_layers(model)
        out.append(generate(model, [[5, 6, 7], [9, 10]], max_new_tokens=4))
    for a, b in zip(*out):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.slow
def test_compiled_matches_eager_tp1(tmp_path):
    eager, graphs = _losses(str(tmp_path / "eager"))
    assert graphs == 0
    compiled, graphs = _losses(str(tmp_path / "compiled"), "train.compile=true")
    assert graphs > 0
    assert compiled == pytest.approx(eager, rel=1e-5)


# Selective recompute puts a checkpoint inside the compiled body (traced); full recompute wraps
# the compiled body in an eager checkpoint that reruns it in backward.
# Without comm overlap the SP collectives are traced into the graph; plain TP's in-place all-reduce
# and the overlapped column Function (tp_comm_overlap, the default) run eagerly behind graph breaks.
LAYOUTS = {"tp2-sp-selective": ["parallel.tp=2", "parallel.sp=true", "parallel.recompute=selective",
                                "parallel.tp_comm_overlap=false"],
           "tp2-sp-overlap": ["parallel.tp=2", "parallel.sp=true"],
           "tp2": ["parallel.tp=2"],
           "pp2-full": ["parallel.pp=2", "parallel.recompute=full"]}


def _layout_worker(rank: int, world: int, run_dir: str, layouts: list[list[str]]):
    out = []
    for i, overrides in enumerate(layouts):
        eager, _ = _losses(f"{run_dir}/{i}/eager{rank}", *overrides)
        compiled, graphs = _losses(f"{run_dir}/{i}/compiled{rank}", "train.compile=true", *overrides)
        out.append((eager, compiled, graphs))
    return out


@pytest.mark.slow
def test_compiled_matches_eager_tp2_and_pp2(tmp_path):
    per_rank = run_distributed(_layout_worker, 2, str(tmp_path), list(LAYOUTS.values()))
    for i, name in enumerate(LAYOUTS):
        for eager, compiled, graphs in (r[i] for r in per_rank):
            assert graphs > 0, name
            assert compiled == pytest.approx(eager, rel=1e-5), name


@pytest.mark.slow
def test_compiled_layers_around_triton_kernels():
    """norm_impl/mlp_impl=triton inside compiled layers (interpreted here: eager behind a graph break)."""
    cfg = dataclasses.replace(CFG, norm_impl="triton", mlp_impl="triton")
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 300, (2, 12), generator=g), torch.randint(0, 300, (2, 12), generator=g)
    results = []
    for compiled in (False, True):
        model = LlamaModel(cfg, ParallelState())
        model.init_weights(3)
        if compiled:
            compile_layers(model)
        loss = model(tokens, labels=labels)
        loss.mean().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_compiled_triton_layers_on_gpu():
    """On a GPU dynamo traces the Triton kernels' launches into the layer graph (no interpreter)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cfg = dataclasses.replace(CFG, hidden_size=256, num_heads=8, ffn_hidden_size=512, norm_impl="triton",
                              mlp_impl="triton", loss_impl="fused_linear")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (2, 128), generator=g).cuda()
    labels = torch.randint(0, 300, (2, 128), generator=g).cuda()
    results = []
    for compiled in (False, True):
        model = LlamaModel(cfg, ParallelState(device=torch.device("cuda")), device="cuda")
        model.init_weights(3)
        if compiled:
            compile_layers(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=labels)
        loss.float().mean().backward()
        results.append((loss.detach().float(), model.layers["1"].mlp.down.weight.grad.clone()))
    (ref, ref_g), (got, got_g) = results
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_g, ref_g, rtol=5e-2, atol=1e-3)
