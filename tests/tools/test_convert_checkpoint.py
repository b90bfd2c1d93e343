"""tools/convert_checkpoint.py: bit-exact round trips, logits equal to transformers' LlamaForCausalLM
in both directions, training resumed from an import under TP=2, and one-line errors on bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megalite.checkpoint import dist as ckpt
from megalite.checkpoint.global_weights import load_global_weights, save_global_weights
from megalite.config import Config, ModelConfig, load_config
from megalite.hf.convert import megalite_to_hf
from megalite.model import LlamaModel
from megalite.parallel.state import ParallelState
from megalite.testing import run_distributed
from megalite.training.trainer import Trainer
from tests.training.common import TINY

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
LLAMA3 = {"rope_scaling": "llama3", "rope_scaling_factor": 4.0, "rope_original_max_positions": 16,
          "rope_theta": 500000.0}


def _model_cfg(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=128, max_seq_len=64, tie_embeddings=tied, **LLAMA3)


def _tool():
    """The tool as a module, so error cases run in-process (a subprocess costs a torch import)."""
    if str(TOOL.parent) not in sys.path:  # once: the tool imports its sibling tools._common
        sys.path.insert(0, str(TOOL.parent))
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def convert(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of the tool run in-process on `args`."""
    tool = _tool()
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        tool._common.run_main(tool.main)
    return int(e.value.code or 0), capsys.readouterr().err


def _megalite_checkpoint(path: Path, tied: bool) -> LlamaModel:
    """A random tiny model saved by the real checkpoint code (padded vocab, TP1)."""
    m = _model_cfg(tied)
    model = LlamaModel(m, ParallelState())
    model.init_weights(7)
    with torch.no_grad():  # norms start at 1; make them random so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ckpt.save_checkpoint(path, 3, [model], opt, ParallelState(), Config(model=m), {"consumed_samples": 0})
    return model.eval()


def _load_megalite(ckpt_dir: Path) -> LlamaModel:
    """A TP1 model built from the converter's megalite_model.yaml and loaded from its checkpoint."""
    cfg = load_config(ckpt_dir / "megalite_model.yaml")
    model = LlamaModel(cfg.model, ParallelState())
    ckpt.load_checkpoint(ckpt_dir, [model], torch.optim.SGD(model.parameters(), lr=0.0), ParallelState(), cfg)
    return model.eval()


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_megalite_hf_megalite_round_trip_is_bit_exact(tmp_path, monkeypatch, capsys, tied):
    _megalite_checkpoint(tmp_path / "a", tied)
    # A small shard size forces the sharded HF layout (index + several files) both ways.
    assert convert(monkeypatch, capsys, "--from", "megalite", "--to", "hf", "--input", tmp_path / "a",
                   "--output", tmp_path / "hf", "--max-shard-size", "40KB")[0] == 0
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) != tied
    assert convert(monkeypatch, capsys, "--from", "hf", "--to", "megalite", "--input", tmp_path / "hf",
                   "--output", tmp_path / "b")[0] == 0
    meta_a, a = load_global_weights(tmp_path / "a")
    meta_b, b = load_global_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert meta_b["step"] == 0 and meta_b["optimizer"]["weights_only"]
    cfg_a, cfg_b = (ModelConfig(**m["config"]["model"]) for m in (meta_a, meta_b))
    for key in ckpt.MODEL_FIELDS + ("rope_theta", "rope_scaling", "rope_scaling_factor", "max_seq_len", "norm_eps"):
        assert getattr(cfg_a, key) == getattr(cfg_b, key), key
    # And back to HF once more: the same safetensors tensors, in one file this time.
    assert convert(monkeypatch, capsys, "--from", "megalite", "--to", "hf", "--input", tmp_path / "b",
                   "--output", tmp_path / "hf2")[0] == 0
    first = {k: v for f in sorted((tmp_path / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
    second = load_file(tmp_path / "hf2/model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_transformer_engine_names_export_like_torch_names(tmp_path):
    _megalite_checkpoint(tmp_path / "a", tied=False)
    meta, w = load_global_weights(tmp_path / "a")
    m = ModelConfig(**meta["config"]["model"])
    te_names = {"attn_norm.weight": "attn.qkv.layer_norm_weight", "mlp_norm.weight": "mlp.te.layer_norm_weight",
                "mlp.gate_up.weight": "mlp.te.fc1_weight", "mlp.down.weight": "mlp.te.fc2_weight"}
    te = {}
    for name, t in w.items():
        tail = name.split(".", 2)[-1]
        te[name.replace(tail, te_names[tail]) if name.startswith("layers.") and tail in te_names else name] = t
    assert te.keys() != w.keys()
    ours, theirs = megalite_to_hf(w, m, "a"), megalite_to_hf(te, m, "te")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_dtype_flag_and_the_real_command_line(tmp_path):
    _megalite_checkpoint(tmp_path / "a", tied=True)
    r = subprocess.run([sys.executable, str(TOOL), "--from", "megalite", "--to", "hf", "--input", str(tmp_path / "a"),
                        "--output", str(tmp_path / "hf"), "--dtype", "bfloat16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "hf/model.safetensors").values()} == {torch.bfloat16}


# -- the same logits as transformers ---------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_exported_model_matches_transformers_logits(tmp_path, monkeypatch, capsys, tied):
    import transformers  # a declared test dependency: its absence must fail, not skip
    model = _megalite_checkpoint(tmp_path / "a", tied)
    assert convert(monkeypatch, capsys, "--from", "megalite", "--to", "hf", "--input", tmp_path / "a",
                   "--output", tmp_path / "hf")[0] == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.full_logits(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_imported_transformers_model_matches_its_logits(tmp_path, monkeypatch, capsys, tied):
    import transformers  # a declared test dependency: its absence must fail, not skip
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500000.0, rope_scaling=rope, tie_word_embeddings=tied,
                                      initializer_range=0.2, rms_norm_eps=1e-5)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    assert convert(monkeypatch, capsys, "--from", "hf", "--to", "megalite", "--input", tmp_path / "hf",
                   "--output", tmp_path / "ml")[0] == 0
    model = _load_megalite(tmp_path / "ml")
    assert model.cfg.tie_embeddings == tied and model.cfg.rope_scaling == "llama3"
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.full_logits(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


# -- training from an import -----------------------------------------------------------------------

def _train_worker(rank: int, world: int, ml_dir: str, run_dir: str, overrides: list[str]) -> list[float]:
    # The model section is the converter's YAML; the tiny run settings come from the trainer tests.
    run = [o for o in TINY if not o.startswith("model.")]
    cfg = load_config(Path(ml_dir) / "megalite_model.yaml",
                      [*run, f"train.run_dir={run_dir}/r{rank}", f"checkpoint.load={ml_dir}", "train.train_steps=2",
                       *overrides])
    return [r["loss"] for r in Trainer(cfg).train()]


@pytest.mark.slow
def test_imported_checkpoint_trains_under_tp2(tmp_path, monkeypatch, capsys):
    _megalite_checkpoint(tmp_path / "a", tied=False)
    for src, dst, fmt in (("a", "hf", "hf"), ("hf", "ml", "megalite")):
        assert convert(monkeypatch, capsys, "--from", "megalite" if fmt == "hf" else "hf", "--to", fmt,
                       "--input", tmp_path / src, "--output", tmp_path / dst)[0] == 0
    ml = str(tmp_path / "ml")
    single = _train_worker(0, 1, ml, str(tmp_path / "tp1"), [])
    tp2 = run_distributed(_train_worker, 2, ml, str(tmp_path / "tp2"), ["parallel.tp=2", "parallel.sp=true"])
    assert len(single) == 2 and all(loss == pytest.approx(single, rel=1e-5) for loss in tp2)
    # Loaded, not freshly initialized: a run without the checkpoint starts elsewhere.
    fresh = _train_worker(0, 1, ml, str(tmp_path / "fresh"), ["checkpoint.load="])
    assert fresh[0] != pytest.approx(single[0], rel=1e-3)


# -- bad input ------------------------------------------------------------------------------------

def _hf_dir(tmp_path: Path, monkeypatch, capsys) -> Path:
    _megalite_checkpoint(tmp_path / "a", tied=False)
    assert convert(monkeypatch, capsys, "--from", "megalite", "--to", "hf", "--input", tmp_path / "a",
                   "--output", tmp_path / "hf")[0] == 0
    return tmp_path / "hf"


def _edit_weights(hf: Path, edit) -> None:
    tensors = load_file(hf / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})


def test_bad_inputs_fail_with_one_line_naming_the_problem(tmp_path, monkeypatch, capsys):
    hf = _hf_dir(tmp_path, monkeypatch, capsys)
    out = tmp_path / "out"

    def fails(pattern: str, *args) -> None:
        code, err = convert(monkeypatch, capsys, *args, "--output", out)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert pattern in err, err
        assert not out.exists()  # nothing half-written

    to_ml = ("--from", "hf", "--to", "megalite", "--input")
    fails("missing: input directory not found", *to_ml, tmp_path / "missing")
    fails(f"no checkpoint found at {tmp_path / 'missing'}", "--from", "megalite", "--to", "hf", "--input",
          tmp_path / "missing")
    fails("nothing to convert", "--from", "hf", "--to", "hf", "--input", hf)

    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    fails("config.json: not a Llama causal LM (model_type 'mistral'", *to_ml, hf)
    (hf / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    fails("config.json: missing field 'hidden_size'", *to_ml, hf)
    (hf / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    fails("config.json: rope type 'yarn' is not supported", *to_ml, hf)
    (hf / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    fails("tensor 'model.layers.0.mlp.gate_proj.weight' has shape [128, 64], the config implies [96, 64]", *to_ml, hf)
    (hf / "config.json").write_text(json.dumps(cfg))

    weights = (hf / "model.safetensors").read_bytes()
    _edit_weights(hf, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    fails("unknown tensor 'model.layers.0.self_attn.q_proj.bias'", *to_ml, hf)
    _edit_weights(hf, lambda t: [t.pop(k) for k in ("model.layers.0.self_attn.q_proj.bias", "model.norm.weight")])
    fails("tensor 'final_norm.weight' is missing", *to_ml, hf)
    _edit_weights(hf, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    fails("tensor 'final_norm.weight' has shape [65], the config implies [64]", *to_ml, hf)
    (hf / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    fails("model.safetensors: cannot read safetensors", *to_ml, hf)
    (hf / "model.safetensors").unlink()
    fails("neither model.safetensors nor model.safetensors.index.json found", *to_ml, hf)

    # A megalite model HF Llama cannot express.
    meta, w = load_global_weights(tmp_path / "a")
    qk = ModelConfig(**{**meta["config"]["model"], "qk_norm": True})
    w.update({f"layers.{i}.attn.{n}_norm.weight": torch.ones(16) for i in range(2) for n in "qk"})
    save_global_weights(tmp_path / "qk", 1, w, Config(model=qk))
    fails("model.qk_norm is true; HF LlamaForCausalLM has no q/k norms", "--from", "megalite", "--to", "hf",
          "--input", tmp_path / "qk")

    (out / "keep").mkdir(parents=True)
    code, err = convert(monkeypatch, capsys, "--from", "megalite", "--to", "hf", "--input", tmp_path / "a",
                        "--output", out)
    assert code == 2 and "output exists and is not empty (pass --overwrite" in err
    assert convert(monkeypatch, capsys, "--from", "megalite", "--to", "hf", "--input", tmp_path / "a",
                   "--output", out, "--overwrite")[0] == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # no temp dirs left behind
