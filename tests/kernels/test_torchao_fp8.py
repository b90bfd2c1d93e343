"""torchao float8 (train.fp8_backend=torchao): refusals and backend choice as one line, the matmul
swap on exactly the decoder-layer TP linears, emulated FP8 numerics on CPU, real FP8 on a GPU."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalite.config import ConfigError, ModelConfig, TrainConfig
from megalite.kernels import torchao_fp8
from megalite.kernels.te import FP8Unavailable
from megalite.model import LlamaModel
from megalite.parallel.state import ParallelState
from megalite.training.precision import make_autocast, resolve_precision
from tests.training.common import tiny_config

# Every local GEMM dim is a multiple of 16 (head_dim 16, qkv 128, ffn 96).
CFG = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, max_seq_len=64)
PROJECTIONS = ("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down")


def _fp8(recipe: str = "tensorwise", backend: str = "torchao") -> TrainConfig:
    return TrainConfig(precision="fp8", fp8_backend=backend, fp8_recipe=recipe)


def _refusal(train: TrainConfig, model: ModelConfig | None = CFG, device: str = "cpu") -> str:
    with pytest.raises(ConfigError) as e:
        resolve_precision(train, torch.device(device), model)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, as far as the checks can tell."""
    def install(cc: tuple[int, int], name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: cc)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
    return install


@pytest.fixture
def no_te(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)


# ---------------------------------------------------------------------------------------------
# Configuration: each impossible request is refused in one line naming the reason.

def test_backend_and_recipe_names():
    assert "unknown train.fp8_backend 'apex'" in _refusal(_fp8(backend="apex"))
    assert "Transformer Engine recipe" in _refusal(_fp8("delayed"))  # the TE default, under torchao
    assert "choose one of tensorwise, rowwise" in _refusal(_fp8("blockwise"))
    assert "is a torchao recipe; set train.fp8_backend=torchao" in _refusal(_fp8("rowwise", backend="te"))


def test_torchao_refuses_te_layers():
    msg = _refusal(_fp8(), dataclasses.replace(CFG, linear_impl="te"))
    assert "fp8_backend=torchao runs FP8 inside megalite's own linears" in msg


def test_missing_torchao_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    assert not torchao_fp8.torchao_available()
    assert "needs torchao, which is not installed" in _refusal(_fp8())


def test_no_gpu_and_old_gpus_are_refused(fake_gpu):
    assert "needs a CUDA GPU (this run has none)" in _refusal(_fp8())
    fake_gpu((8, 0), "NVIDIA A100")
    msg = _refusal(_fp8(), device="cuda")
    assert "needs compute capability 8.9+, but NVIDIA A100 is 8.0" in msg
    fake_gpu((8, 9), "NVIDIA L4")
    assert resolve_precision(_fp8("tensorwise"), torch.device("cuda"), CFG) == "fp8"
    msg = _refusal(_fp8("rowwise"), device="cuda")
    assert "fp8_recipe=rowwise needs compute capability 9.0+" in msg and "or fp8_recipe=tensorwise" in msg
    fake_gpu((9, 0), "NVIDIA H200")
    for recipe in torchao_fp8.RECIPES:
        assert resolve_precision(_fp8(recipe), torch.device("cuda"), CFG) == "fp8"


def test_te_missing_but_torchao_present_names_the_switch(no_te, fake_gpu):
    fake_gpu((9, 0))
    te_cfg = dataclasses.replace(CFG, linear_impl="te", mlp_impl="te")
    msg = _refusal(TrainConfig(precision="fp8"), te_cfg, device="cuda")  # the default backend: te
    assert "Transformer Engine is not installed" in msg
    assert "set train.fp8_backend=torchao train.fp8_recipe=tensorwise|rowwise" in msg


def test_trainer_refuses_before_any_work(tmp_path):
    cfg = tiny_config(str(tmp_path), "train.precision=fp8", "train.fp8_backend=torchao",
                      "train.fp8_recipe=rowwise", "train.device=cpu")
    from megalite.training.trainer import Trainer

    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        Trainer(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_torchao_autocast_is_plain_bf16():
    ctx = make_autocast("fp8", torch.device("cpu"), "tensorwise", fp8_backend="torchao")
    with ctx():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The swap: torchao's float8 matmul inside exactly the decoder layers' TP linears.

def _model(cfg: ModelConfig = CFG) -> LlamaModel:
    m = LlamaModel(cfg, ParallelState())
    m.init_weights(3)
    return m


@pytest.mark.parametrize("recipe", torchao_fp8.RECIPES)
def test_swap_converts_exactly_the_layer_projections(recipe):
    model = _model()
    converted = torchao_fp8.convert_to_float8(model, recipe, emulate=True)
    assert converted == [f"layers.{i}.{p}" for i in range(CFG.num_layers) for p in PROJECTIONS]
    for name, m in model.named_modules():
        fn = getattr(m, "linear_fn", None)
        if fn is not None:
            assert isinstance(fn, torchao_fp8.Float8Matmul) == (name in converted), name
    fn = model.layers["0"].attn.qkv.linear_fn
    assert fn.config.cast_config_weight.scaling_granularity.value == ("axiswise" if recipe == "rowwise" else "tensorwise")
    # The embedding and the head are not projections of this kind: they keep plain BF16 matmuls.
    assert type(model.embedding).__name__ == "VocabParallelEmbedding" and not hasattr(model.embedding, "linear_fn")
    # Master weights stay fp32 parameters under the same names.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # torchao's inductor workaround for fp8 stores, which its own conversion applies, is applied too.
    import torchao.float8._inductor_patch as patch

    assert patch._PATCHED


def test_swap_unfuses_the_triton_down_projection():
    model = _model(dataclasses.replace(CFG, mlp_impl="triton"))
    assert model.layers["0"].mlp.fused_down
    torchao_fp8.convert_to_float8(model, "tensorwise", emulate=True)
    assert not any(layer.mlp.fused_down for layer in model.layers.values())


def test_lora_is_refused():
    from megalite.config import LoraConfig
    from megalite.model.lora import apply_lora

    model = _model()
    apply_lora(model, LoraConfig(rank=4), seed=1)
    with pytest.raises(ConfigError, match="does not run LoRA adapters' projections in FP8"):
        torchao_fp8.convert_to_float8(model, "tensorwise", emulate=True)


def test_unaligned_projection_is_refused_by_name():
    model = _model(dataclasses.replace(CFG, ffn_hidden_size=72))
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.down: local weight 64x72 is not a multiple of 16"):
        torchao_fp8.convert_to_float8(model, "tensorwise")


@pytest.mark.parametrize("recipe", torchao_fp8.RECIPES)
def test_emulated_fp8_step_tracks_fp32(recipe):
    """torchao's emulation does the float8 casts on CPU: the loss and grads move by FP8 rounding
    (so the swap is live) but stay close to the plain model's (so it computes the same thing)."""
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g)
    out = []
    for fp8 in (False, True):
        model = _model()
        if fp8:
            torchao_fp8.convert_to_float8(model, recipe, emulate=True)
        loss = model(tokens, labels=labels)
        loss.mean().backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = out
    assert not torch.equal(got, ref)
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02)
    for name, grad in ref_grads.items():
        assert grads[name].dtype == torch.float32
        rel = ((grads[name] - grad).norm() / grad.norm()).item()
        assert rel < 0.2, (name, rel)


def test_float8_matmul_matches_linear_signature():
    fn = torchao_fp8.Float8Matmul(torchao_fp8.float8_config("tensorwise", emulate=True))
    x, w, b = torch.randn(4, 32), torch.randn(16, 32), torch.randn(16)
    got, ref = fn(x, w, b), F.linear(x, w, b)
    assert got.shape == ref.shape and 0 < ((got - ref).norm() / ref.norm()).item() < 0.1
    torch.testing.assert_close(fn(x, w, b) - fn(x, w), b.expand(4, 16))


# ---------------------------------------------------------------------------------------------
# Real FP8 GEMMs (H100/H200): the converted model against BF16, and a trainer step.

def _fp8_gpu_missing(recipe: str) -> str | None:
    try:
        torchao_fp8.check_fp8(recipe, "cuda")
    except FP8Unavailable as e:
        return str(e)
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", torchao_fp8.RECIPES)
def test_fp8_gpu_step_tracks_bf16(recipe, tmp_path):
    why = "no CUDA GPU" if not torch.cuda.is_available() else _fp8_gpu_missing(recipe)
    if why is not None:
        pytest.skip(why)
    cfg = dataclasses.replace(CFG, hidden_size=256, num_heads=8, ffn_hidden_size=512)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (4, 128), generator=g).cuda()
    labels = torch.randint(0, 300, (4, 128), generator=g).cuda()
    out = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = LlamaModel(cfg, ParallelState(device=torch.device("cuda")), device="cuda")
        model.init_weights(3)
        if fp8:
            torchao_fp8.convert_to_float8(model, recipe)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=labels)
        loss.float().mean().backward()
        out.append((loss.detach().float(), model.layers["0"].mlp.down.weight.grad.clone()))
    (ref, ref_g), (got, got_g) = out
    assert not torch.equal(got, ref)
    torch.testing.assert_close(got.mean(), ref.mean(), rtol=0.02, atol=0.02)
    assert ((got_g - ref_g).norm() / ref_g.norm()).item() < 0.2
    # The trainer path: config -> swap -> steps, loss going down.
    from megalite.training.trainer import Trainer

    cfg = tiny_config(str(tmp_path), "train.precision=fp8", "train.fp8_backend=torchao", f"train.fp8_recipe={recipe}",
                      "model.vocab_size=512", "model.hidden_size=128", "model.ffn_hidden_size=256",
                      "train.train_steps=6", "train.device=cuda")
    window = (np.arange(cfg.train.seq_len + 1) % 7).astype(np.int64)  # learnable; no corpus to build
    hist = Trainer(cfg, datasets=([window] * 64, None)).train()
    assert hist[-1]["loss"] < hist[0]["loss"]


def _tp_fp8_worker(rank: int, world: int, recipe: str):
    from megalite.config import ParallelConfig
    from megalite.parallel.state import build_parallel_state

    ps = build_parallel_state(ParallelConfig(tp=2, sp=True))
    out = []
    for fp8 in (False, True):
        model = LlamaModel(CFG, ps)
        model.init_weights(3)
        if fp8:
            assert len(torchao_fp8.convert_to_float8(model, recipe, emulate=True)) == 4 * CFG.num_layers
        out.append(_emulated_loss(model))
    return out


def _emulated_loss(model: LlamaModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g)
    loss = model(tokens, labels=labels)
    loss.mean().backward()
    return loss.detach()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", torchao_fp8.RECIPES)
def test_emulated_fp8_under_tp2_sp_tracks_fp32(recipe):
    """The float8 matmuls sit inside the TP/SP linears: with the sequence gathered and the partial
    products reduce-scattered around them, the loss stays within FP8 rounding of the fp32 model."""
    from megalite.testing import run_distributed

    ref = _emulated_loss(_model())
    for plain, loss in run_distributed(_tp_fp8_worker, 2, recipe):
        torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)  # TP2+SP itself is exact
        assert (loss - plain).abs().max() > 1e-3  # FP8 rounding is visible: the swap is live under TP
        torch.testing.assert_close(loss, ref, rtol=0.02, atol=0.02)
