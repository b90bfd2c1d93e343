"""LoRA: TP layouts agree with TP1 on losses and adapter grads, only adapters train and are saved,
an adapter checkpoint resumes exactly, a merged export gives the unmerged model's logits, and a bad
LoRA config is a one-line error."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import zlib
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import dist as ckpt
from megalite.checkpoint.global_weights import load_global_weights
from megalite.checkpoint.lora import load_lora_checkpoint
from megalite.config import (
    Config,
    ConfigError,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    load_config,
)
from megalite.data.tokenizer import build_tokenizer
from megalite.generation.loading import load_model
from megalite.model import LlamaModel
from megalite.model.lora import apply_lora, check_lora_config, lora_param_count
from megalite.parallel.comm import count_comm
from megalite.parallel.distributed_optimizer import BufferOptimizer
from megalite.parallel.finalize import finalize_grads
from megalite.parallel.lora import is_adapter
from megalite.parallel.sharding import get_tp_shard, split_for_rank
from megalite.parallel.state import ParallelState, build_parallel_state
from megalite.testing import full_tensors, run_distributed
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

STEPS = 3
LORA = ["lora.rank=4", "lora.alpha=8"]
ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_checkpoint.py"


# -- the sharded adapters, model level --------------------------------------------------------------

# One kv head at TP2: the qkv weight's kv rows (and B's) are replicated, their grads partial per rank.
MODEL = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1,
                    ffn_hidden_size=96, max_seq_len=64)


def _lora_model(ps: ParallelState, lora: LoraConfig | None = None) -> LlamaModel:
    """Base and adapters seeded by global name; B random too (it starts at zero, which would leave
    A's gradient zero and untested)."""
    model = LlamaModel(MODEL, ps)
    model.init_weights(5)
    apply_lora(model, lora or LoraConfig(rank=4, alpha=8.0), seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                shard, shape = get_tp_shard(p), list(p.shape)
                if shard is not None:
                    shape[shard.dim] = shard.global_size
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                full = torch.randn(shape, generator=g) * 0.1
                p.copy_(split_for_rank(full, shard, ps.tp_rank, ps.tp) if shard is not None else full)
    return model


def _forward_backward(model: LlamaModel) -> tuple[torch.Tensor, dict[str, int]]:
    """The loss, and the collectives its forward and backward issued (before any grad sync)."""
    tokens = torch.randint(0, MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with count_comm() as cc:
        loss = model(tokens, labels=tokens.roll(-1, dims=1)).sum()
        loss.backward()
    return loss, dict(cc.calls)


def _loss_and_adapter_grads(ps: ParallelState):
    """(loss, adapter grads, collectives of the LoRA model, collectives of its plain base)."""
    model = _lora_model(ps)
    loss, calls = _forward_backward(model)
    finalize_grads([model], ps)
    assert all(p.grad is None for p in model.parameters() if not is_adapter(p)), "the base must stay frozen"
    adapters = [(n, p) for n, p in model.named_parameters() if is_adapter(p)]
    base = LlamaModel(MODEL, ps)
    base.init_weights(5)
    return loss.item(), full_tensors(adapters, ps), calls, _forward_backward(base)[1]


def _model_tp_worker(rank: int, world: int):
    return [_loss_and_adapter_grads(build_parallel_state(ParallelConfig(tp=2, sp=sp))) for sp in (False, True)]


@pytest.mark.slow
def test_tp2_adapter_grads_match_tp1():
    ref_loss, ref_grads, _, _ = _loss_and_adapter_grads(ParallelState())
    assert len(ref_grads) == 4 * 2 * MODEL.num_layers and all(g.abs().sum() > 0 for g in ref_grads.values())
    for per_rank in run_distributed(_model_tp_worker, 2):
        for (loss, grads, calls, base_calls), name in zip(per_rank, ("tp2", "tp2-sp"), strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5), name
            # The adapters ride on the layers' own TP collectives: not one more in forward or backward
            # (one fewer: with the embedding frozen, no gradient flows back into the first layer's input).
            assert calls.keys() == base_calls.keys() and sum(calls.values()) > 0, name
            assert all(calls[k] <= base_calls[k] for k in calls), (name, calls, base_calls)
            assert grads.keys() == ref_grads.keys()
            for k in grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")


def test_adapters_start_as_the_base_and_shard_like_it():
    ps = ParallelState()
    base = LlamaModel(MODEL, ps)
    base.init_weights(5)
    model = LlamaModel(MODEL, ps)
    model.init_weights(5)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), seed=5)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 16))
    assert torch.equal(model.full_logits(tokens), base.full_logits(tokens))  # B = 0
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.qkv", "attn.out", "mlp.gate_up",
                                                                               "mlp.down") for ab in "ab"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_param_count(
        MODEL, LoraConfig(rank=4))
    assert {n for n, _ in model.named_parameters()} - names == {n for n, _ in base.named_parameters()}
    qkv, down = model.layers["0"].attn.qkv, model.layers["0"].mlp.down
    assert get_tp_shard(qkv.lora_b) == get_tp_shard(qkv.weight) and get_tp_shard(qkv.lora_a) is None
    assert get_tp_shard(down.lora_a).dim == 1 and get_tp_shard(down.lora_b) is None
    assert qkv.lora_a.abs().max() <= 1 / MODEL.hidden_size**0.5 and qkv.lora_a.std() > 0


def test_adapter_dropout_applies_in_training_only():
    model = _lora_model(ParallelState(), LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    tokens = torch.randint(0, MODEL.vocab_size, (2, 16))
    model.eval()
    a, b = model.full_logits(tokens), model.full_logits(tokens)
    assert torch.equal(a, b)
    model.train()
    assert not torch.allclose(model.full_logits(tokens), a)


# -- training through the Trainer -----------------------------------------------------------------


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    """A pretrained base (random, norms too) at step 5, saved by the real checkpoint code at TP1."""
    root = tmp_path_factory.mktemp("base")
    cfg = tiny_config(str(root))
    cfg.model.vocab_size = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).vocab_size
    model = LlamaModel(cfg.model, ParallelState())
    model.init_weights(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return ckpt.save_checkpoint(root / "checkpoints", 5, [model], opt, ParallelState(), cfg, {"consumed_samples": 0})


def _lora_cfg(run_dir: str, base: Path, *extra: str) -> Config:
    return tiny_config(run_dir, *LORA, f"checkpoint.pretrained={base}", *extra)


def _adapters(trainer: Trainer, grad: bool) -> dict[str, torch.Tensor]:
    pairs = [(n, p) for c in trainer.chunks for n, p in c.named_parameters() if is_adapter(p)]
    return full_tensors(pairs, trainer.ps, grad=grad)


def _run(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    history = trainer.train()
    opt = trainer.optimizer
    return {"loss": [r["loss"] for r in history], "norm": [r["grad_norm"] for r in history],
            "grads": _adapters(trainer, grad=True), "values": _adapters(trainer, grad=False),
            "slots": [s.name for s in opt.ddp.slots], "all_adapters": all(is_adapter(s.param) for s in opt.ddp.slots),
            "optim_numel": sum(t.numel() for t in opt.exp_avg + opt.exp_avg_sq),
            "local_adapter_numel": sum(p.numel() for c in trainer.chunks for p in c.parameters() if p.requires_grad),
            "base": {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters()
                     if not is_adapter(p)} if trainer.ps.world_size == 1 else None}


LAYOUTS = {"tp2": ["parallel.tp=2", "checkpoint.save_on_exit=true"], "tp2-sp": ["parallel.tp=2", "parallel.sp=true"],
           "dp2-zero1": ["parallel.distributed_optimizer=true"], "pp2": ["parallel.pp=2"]}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||. Adam moves an element whose grad is near zero by ~lr whatever the grad's
    size, so float noise between layouts can flip a single element by ~lr after a few steps; a
    layout bug (a missing TP sum, misplaced rows) moves whole tensors."""
    return float((a - b).norm() / b.norm())


def _layout_worker(rank: int, world: int, run_dir: str, base: str):
    return [_run(_lora_cfg(f"{run_dir}/{name}", Path(base), f"train.train_steps={STEPS}", *extra))
            for name, extra in LAYOUTS.items()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_ckpt):
    run_dir = tmp_path_factory.mktemp("ref")
    out = _run(_lora_cfg(str(run_dir), base_ckpt, f"train.train_steps={STEPS}", "checkpoint.save_on_exit=true"))
    out["run_dir"] = run_dir
    return out


def test_only_adapters_train_and_the_optimizer_holds_only_them(reference, base_ckpt):
    assert reference["loss"][-1] < reference["loss"][0]
    _, base = load_global_weights(base_ckpt)
    for name, p in reference["base"].items():
        p = p[: base[name].shape[0]] if p.shape != base[name].shape else p  # the padded vocab rows
        assert torch.equal(p, base[name]), f"{name} changed"
    assert reference["all_adapters"] and len(reference["slots"]) == 16
    assert reference["optim_numel"] == 2 * reference["local_adapter_numel"]  # exp_avg + exp_avg_sq, adapters only
    assert all(v.abs().sum() > 0 for k, v in reference["values"].items() if k.endswith("lora_b"))  # B moved off 0


@pytest.mark.slow
def test_tp2_pp2_and_zero1_training_match_tp1(tmp_path, reference, base_ckpt):
    per_rank = run_distributed(_layout_worker, 2, str(tmp_path), str(base_ckpt))
    pp_keys: set[str] = set()
    tp2_values = per_rank[0][0]["values"]
    for results in per_rank:
        for name, r in zip(LAYOUTS, results, strict=True):
            assert r["loss"] == pytest.approx(reference["loss"], rel=1e-5), name
            assert r["norm"] == pytest.approx(reference["norm"], rel=1e-4), name
            assert r["all_adapters"], name
            if name == "pp2":  # each stage holds its layers' adapters
                pp_keys |= r["grads"].keys()
            for k, g in reference["grads"].items():
                if k not in r["grads"] and name == "pp2":
                    continue
                if name != "dp2-zero1":  # ZeRO-1 reduce-scatters: a rank holds the summed grads of its slice only
                    assert _rel_err(r["grads"][k], g) < 1e-3, f"{name}: grad {k}"
                assert _rel_err(r["values"][k], reference["values"][k]) < 1e-3, f"{name}: value {k}"
            if name == "dp2-zero1":  # each DP rank keeps Adam state for its half of the adapters only
                assert r["optim_numel"] <= r["local_adapter_numel"] + 2 * 4 * len(r["slots"]), name
    assert pp_keys == reference["grads"].keys()
    # The TP2 adapter checkpoint reassembles to the TP2 run's global adapters (B's q|k|v and gate|up
    # blocks included), bit for bit.
    meta, tp2 = load_global_weights(tmp_path / "tp2" / "checkpoints")
    assert meta["layout"]["tp"] == 2 and tp2.keys() == tp2_values.keys() == reference["values"].keys()
    for k, v in tp2.items():
        assert torch.equal(v, tp2_values[k]), k


def test_adapter_checkpoint_is_small_and_points_to_the_base(reference, base_ckpt):
    step_dir = ckpt.resolve_checkpoint(reference["run_dir"] / "checkpoints")
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["base"] == {"path": str(base_ckpt.resolve()), "step": 5}
    shard = torch.load(step_dir / "rank_00000.pt", weights_only=False)
    assert set(shard["model"]) == set(meta["params"]) == set(reference["values"])
    assert set(shard["optim"]) == set(reference["values"])
    assert (step_dir / "rank_00000.pt").stat().st_size < (base_ckpt / "rank_00000.pt").stat().st_size / 2


def test_adapter_checkpoint_resumes_exactly(tmp_path, base_ckpt):
    straight = Trainer(_lora_cfg(str(tmp_path / "a"), base_ckpt, "train.train_steps=4")).train()
    first = Trainer(_lora_cfg(str(tmp_path / "b"), base_ckpt, "train.train_steps=4", "train.exit_interval=2")).train()
    assert len(first) == 2
    resumed = Trainer(_lora_cfg(str(tmp_path / "b"), base_ckpt, "train.train_steps=4", "checkpoint.load=auto"))
    assert resumed.lora_base == {"path": str(base_ckpt.resolve()), "step": 5}
    assert [r["loss"] for r in resumed.train()] == [r["loss"] for r in straight[2:]]  # bit-identical on CPU


def test_a_moved_base_is_a_one_line_error(tmp_path, reference, base_ckpt):
    lora_dir = ckpt.resolve_checkpoint(reference["run_dir"] / "checkpoints")
    meta = json.loads((lora_dir / "meta.json").read_text())
    meta["base"]["path"] = str(tmp_path / "gone")
    (lora_dir.parent / "moved").mkdir()
    moved = lora_dir.parent / "moved" / lora_dir.name
    moved.mkdir()
    (moved / "meta.json").write_text(json.dumps(meta))
    cfg, model, opt = _lora_model_of(meta)
    with pytest.raises(ConfigError, match=r"LoRA base\).*no checkpoint found at .*gone"):
        load_lora_checkpoint(moved, [model], opt, ParallelState(), cfg)


def _lora_model_of(meta: dict) -> tuple[Config, LlamaModel, BufferOptimizer]:
    """A TP1 LoRA model (and the trainer's optimizer, which a LoRA checkpoint's state loads into)
    for a checkpoint's saved config."""
    cfg = Config(model=ckpt.saved_model_config(meta, "lora"), lora=LoraConfig(**meta["config"]["lora"]))
    model = LlamaModel(cfg.model, ParallelState())
    apply_lora(model, cfg.lora, 0)
    return cfg, model, BufferOptimizer([model], OptimConfig(), ParallelState())


# -- merging ----------------------------------------------------------------------------------------


def _tool():
    if str(TOOL.parent) not in sys.path:
        sys.path.insert(0, str(TOOL.parent))
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def convert(monkeypatch, capsys, *args) -> tuple[int, str]:
    tool = _tool()
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        tool._common.run_main(tool.main)
    return int(e.value.code or 0), capsys.readouterr().err


def _unmerged_logits(lora_ckpt: Path, tokens: torch.Tensor) -> tuple[Config, torch.Tensor]:
    """The trained LoRA model at TP1 (base from the pointer, then the adapters) and its logits."""
    cfg, model, opt = _lora_model_of(ckpt.read_metadata(ckpt.resolve_checkpoint(lora_ckpt)))
    load_lora_checkpoint(lora_ckpt, [model], opt, ParallelState(), cfg)
    with torch.no_grad():
        return cfg, model.eval().full_logits(tokens)


def test_merged_export_gives_the_unmerged_logits(tmp_path, monkeypatch, capsys, reference):
    import transformers  # a declared test dependency

    lora_ckpt = reference["run_dir"] / "checkpoints"
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    cfg, want = _unmerged_logits(lora_ckpt, tokens)
    assert convert(monkeypatch, capsys, "--from", "megalite", "--to", "megalite", "--merge-lora",
                   "--input", lora_ckpt, "--output", tmp_path / "merged")[0] == 0
    merged_cfg = load_config(tmp_path / "merged" / "megalite_model.yaml")
    merged = LlamaModel(merged_cfg.model, ParallelState())
    ckpt.load_checkpoint(tmp_path / "merged", [merged], torch.optim.SGD(merged.parameters(), lr=0.0),
                         ParallelState(), merged_cfg)
    with torch.no_grad():
        got = merged.eval().full_logits(tokens)
        plain_cfg = dataclasses.replace(cfg, lora=LoraConfig())
        base = LlamaModel(plain_cfg.model, ParallelState())
        ckpt.load_checkpoint(ckpt.read_metadata(ckpt.resolve_checkpoint(lora_ckpt))["base"]["path"], [base],
                             torch.optim.SGD(base.parameters(), lr=0.0), ParallelState(), plain_cfg)
        assert not torch.allclose(base.eval().full_logits(tokens), want, atol=1e-4)  # the adapters matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # megalite.load_model (and so `megalite generate`) merges on load.
    with torch.no_grad():
        loaded = load_model(lora_ckpt, device="cpu").full_logits(tokens)
    torch.testing.assert_close(loaded, want, rtol=1e-5, atol=1e-5)
    # The HF export of the merged model, run by transformers.
    assert convert(monkeypatch, capsys, "--from", "megalite", "--to", "hf", "--merge-lora",
                   "--input", lora_ckpt, "--output", tmp_path / "hf")[0] == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, want, rtol=1e-4, atol=1e-4)


def test_merge_lora_of_a_plain_checkpoint_is_a_one_line_error(tmp_path, monkeypatch, capsys, base_ckpt):
    code, err = convert(monkeypatch, capsys, "--from", "megalite", "--to", "hf", "--merge-lora",
                        "--input", base_ckpt, "--output", tmp_path / "hf")
    assert code == 2 and err.startswith("error: --merge-lora: ") and "not a LoRA checkpoint" in err
    assert err.count("\n") == 1


# -- configuration errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("lora.targets=[qkv,mlp]", "lora.targets: unknown target 'mlp'"),
    ("lora.rank=-1", "lora.rank must be >= 0"),
    ("lora.dropout=1.0", "lora.dropout must be in [0, 1)"),
    ("checkpoint.pretrained=", "lora.rank > 0 needs checkpoint.pretrained"),
])
def test_bad_lora_config_is_a_one_line_error(tmp_path, capsys, override, message):
    from megalite import cli

    args = ["pretrain", "--config", str(ROOT / "examples/configs/tiny.yaml"), *LORA, "checkpoint.pretrained=somewhere",
            f"train.run_dir={tmp_path}", override]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "metrics.jsonl").exists()


def test_lora_off_skips_the_checks_and_te_projections_are_refused():
    check_lora_config(LoraConfig(rank=0, targets=["nonsense"]), MODEL, "")
    with pytest.raises(ConfigError, match="linear_impl=te"):
        check_lora_config(LoraConfig(rank=2), dataclasses.replace(MODEL, linear_impl="te"))
