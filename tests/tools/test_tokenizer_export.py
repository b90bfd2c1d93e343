"""Issue 12 item 12: the HF export carries the tokenizer, so AutoTokenizer loads the folder and
gives the training ids."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.data.tokenizer import build_tokenizer
from megalite.hf.tokenizer_export import export_tokenizer
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

ROOT = Path(__file__).resolve().parents[2]
transformers = pytest.importorskip("transformers")
TEXTS = ["river stone 12 héllo  x", "tab\tand 漢字 and more", "garden1234 the lantern", "a  b   c\nnew line"]


def test_convert_to_hf_includes_the_run_tokenizer(tmp_path):
    Trainer(tiny_config(str(tmp_path / "run"), "train.train_steps=1", "checkpoint.save_on_exit=true")).train()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--from", "megalite", "--to",
                        "hf", "--input", str(tmp_path / "run" / "checkpoints"), "--output", str(tmp_path / "hf")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tokenizer (byte) -> tokenizer.json" in r.stdout
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = build_tokenizer("byte")
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
        assert tok.decode(ours.encode(text)) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ours.bos, ours.eos, ours.pad)
    assert tok.convert_tokens_to_ids("<|im_start|>") == ours.chat_tokens["<|im_start|>"]


def test_a_missing_tokenizer_model_is_one_line(tmp_path):
    Trainer(tiny_config(str(tmp_path / "run"), "train.train_steps=1", "checkpoint.save_on_exit=true")).train()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--from", "megalite", "--to",
                        "hf", "--input", str(tmp_path / "run" / "checkpoints"), "--output", str(tmp_path / "hf"),
                        "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(tmp_path / "gone.model")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gone.model" in r.stderr
    assert not (tmp_path / "hf").exists()


def test_sentencepiece_export_gives_the_training_ids(tmp_path):
    rng = random.Random(0)
    words = "river stone market winter garden letter harbor morning lantern valley orchard candle".split()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30)) + f" {i}"}) + "\n"
                           for i in range(300)))
    model = tmp_path / "tok.model"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(src), "--output",
                    str(model), "--vocab-size", "320", "--threads", "1"], check=True, capture_output=True, env=env)
    out = tmp_path / "hf"
    out.mkdir()
    export_tokenizer("sentencepiece", str(model), out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = build_tokenizer("sentencepiece", str(model))
    for text in TEXTS + ["hi<|im_end|>\n<|im_start|>assistant\nthe river"]:
        assert tok.encode(text, add_special_tokens=False) == ours.encode(text), text
    assert (tok.bos_token_id, tok.eos_token_id) == (ours.bos, ours.eos)
    assert (out / "tokenizer.model").read_bytes() == model.read_bytes()
