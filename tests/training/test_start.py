"""Issue 12 items 1 and 2: where a run starts, and a relaunch of a finished run says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalite.config import ConfigError
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters()}


def test_pretrained_initializes_once_then_the_run_resumes_itself(tmp_path, capsys):
    base = Trainer(tiny_config(str(tmp_path / "base"), "train.train_steps=2", "checkpoint.save_on_exit=true"))
    base.train()
    base_w = _weights(base)
    ft = ("train.train_steps=4", "train.exit_interval=2", "checkpoint.load=auto",
          f"checkpoint.pretrained={tmp_path / 'base' / 'checkpoints'}")
    capsys.readouterr()
    first = Trainer(tiny_config(str(tmp_path / "ft"), *ft))
    assert "initialized from pretrained weights" in capsys.readouterr().out
    assert first.state.step == 0 and first.optimizer.steps == 0  # fresh optimizer, step 0
    for n, w in _weights(first).items():
        assert torch.equal(w, base_w[n]), n
    assert [r["step"] for r in first.train()] == [1, 2]  # preempted after step 2
    capsys.readouterr()
    # The relaunch (same command line) resumes its own checkpoint, not the pretrained weights again.
    second = Trainer(tiny_config(str(tmp_path / "ft"), *ft))
    assert "resumed from" in capsys.readouterr().out and second.state.step == 2
    assert [r["step"] for r in second.train()] == [3, 4]


def test_pretrained_accepts_an_hf_conversion(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--from", "hf", "--to", "megalite",
                    "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "conv")], check=True,
                   capture_output=True)
    t = Trainer(tiny_config(str(tmp_path / "run"), "model.vocab_size=320", "model.make_vocab_size_divisible_by=64",
                            f"checkpoint.pretrained={tmp_path / 'conv'}", "checkpoint.load=auto"))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    emb = dict(t.chunks[0].named_parameters())["embedding.weight"]
    assert torch.equal(emb, hf.model.embed_tokens.weight)
    assert t.state.step == 0


def test_pretrained_of_another_shape_names_tensor_shapes_and_file(tmp_path):
    Trainer(tiny_config(str(tmp_path / "base"), "train.train_steps=1", "checkpoint.save_on_exit=true")).train()
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_config(str(tmp_path / "ft"), "model.ffn_hidden_size=96", "checkpoint.load=auto",
                            f"checkpoint.pretrained={tmp_path / 'base' / 'checkpoints'}"))
    msg = str(e.value)
    assert "mlp.gate_up.weight" in msg and "[256, 64]" in msg and "[192, 64]" in msg
    assert str(tmp_path / "base" / "checkpoints" / "step_00000001" / "meta.json") in msg


def test_relaunching_a_finished_run_says_so(tmp_path, capsys):
    cfg = ("train.train_steps=2", "checkpoint.save_on_exit=true", "checkpoint.load=auto")
    Trainer(tiny_config(str(tmp_path), *cfg)).train()
    capsys.readouterr()
    assert Trainer(tiny_config(str(tmp_path), *cfg)).train() == []
    out = capsys.readouterr().out.strip().splitlines()
    line = [x for x in out if x.startswith("nothing to train")]
    assert len(line) == 1 and "at step 2" in line[0] and "train.train_steps" in line[0]
    assert "step_00000002" in line[0] and "checkpoint.load=" in line[0]
