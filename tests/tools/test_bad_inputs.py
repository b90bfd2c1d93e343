"""Issue 12 items 3 and 4: a bad line is skipped and counted (named under --strict); an empty result
is one line saying what is empty and why, never exit 0 with empty outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalite import cli
from tests.training.common import TINY

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The river and the stone have a market with the winter garden, said the letter to the harbor. "
WORDS = ("river stone market winter garden letter harbor morning lantern valley orchard candle bridge "
         "meadow thunder silver forest whisper copper island").split()


def prose(seed: int, n: int = 120) -> str:
    """Varied English-like text that passes the cleaning filters (no dominant n-grams)."""
    import random

    rng = random.Random(seed)
    vocab = WORDS + [w + s for w in WORDS for s in ("s", "ed", "ing")] + ["the", "a", "of", "and", "to", "in"]
    sentences = [" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 12))).capitalize() + "."
                 for _ in range(n // 9)]
    return " ".join(sentences)


LONE = '{"text": "a lone \\ud800 surrogate in an otherwise ordinary line of text ' + "words " * 30 + '"}\n'


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _one_line_error(r: subprocess.CompletedProcess, expected: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr


@pytest.fixture
def with_lone_surrogate(tmp_path) -> Path:
    good = [json.dumps({"text": prose(i)}) + "\n" for i in range(4)]
    p = tmp_path / "in.jsonl"
    p.write_text("".join(good[:2]) + LONE + "".join(good[2:]))
    json.loads(LONE)  # valid JSON ...
    with pytest.raises(UnicodeEncodeError):
        json.loads(LONE)["text"].encode()  # ... but not encodable text
    return p


@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_preprocess_skips_and_counts_a_lone_surrogate(tmp_path, with_lone_surrogate, tokenizer):
    args = ["--tokenizer-type", tokenizer]
    if tokenizer == "hf":
        tok = tmp_path / "tokenizer.json"
        r = _tool("train_tokenizer.py", "--input", str(with_lone_surrogate), "--type", "hf-bpe",
                  "--vocab-size", "400", "--output", str(tok))
        assert r.returncode == 0, r.stderr
        args += ["--tokenizer-model", str(tok)]
    r = _tool("preprocess_data.py", "--input", str(with_lone_surrogate), "--output-prefix", str(tmp_path / "o"),
              "--workers", "0", "--no-progress", *args)
    assert r.returncode == 0, r.stderr
    assert "docs: 4 " in r.stdout and "skipped (malformed): 1" in r.stdout
    assert f"{with_lone_surrogate}:3: invalid text (a lone UTF-16 surrogate escape)" in r.stdout
    assert (tmp_path / "o_text_document.bin").stat().st_size > 0


def test_preprocess_strict_names_the_surrogate_line(tmp_path, with_lone_surrogate):
    r = _tool("preprocess_data.py", "--input", str(with_lone_surrogate), "--output-prefix", str(tmp_path / "o"),
              "--tokenizer-type", "byte", "--workers", "0", "--no-progress", "--strict")
    _one_line_error(r, f"{with_lone_surrogate}:3: invalid text (a lone UTF-16 surrogate escape)")


def test_clean_data_counts_a_lone_surrogate_as_malformed(tmp_path, with_lone_surrogate):
    r = _tool("clean_data.py", "--input", str(with_lone_surrogate), "--output", str(tmp_path / "c.jsonl"),
              "--no-progress")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["input_docs"] == 5 and report["dropped"].get("malformed") == 1
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == report["kept_docs"] >= 1


@pytest.mark.parametrize("content, keys, expected", [
    ("", "text", "the input holds no records"),
    (json.dumps({"text": TEXT}) + "\n", "txt", "all 1 records were skipped as malformed (e.g. "),
    (bytes(range(256)) * 8, "text", "all 9 records were skipped as malformed"),
])
def test_preprocess_refuses_an_empty_result(tmp_path, content, keys, expected):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = _tool("preprocess_data.py", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
              "--tokenizer-type", "byte", "--json-keys", keys, "--workers", "0", "--no-progress")
    _one_line_error(r, f"no tokens written from {src}: {expected}")
    assert not list(tmp_path.glob("o_*"))


def test_clean_data_refuses_an_empty_result(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    r = _tool("clean_data.py", "--input", str(src), "--output", str(tmp_path / "c.jsonl"), "--no-progress")
    _one_line_error(r, f"no documents written to {tmp_path / 'c.jsonl'}: the input holds no records")
    assert not (tmp_path / "c.jsonl").exists()


def test_train_tokenizer_on_no_text(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"body": TEXT}) + "\n")
    r = _tool("train_tokenizer.py", "--input", str(src), "--output", str(tmp_path / "t.model"), "--vocab-size", "400")
    _one_line_error(r, f"no text to train on: {src} holds no non-empty string under --json-key text")


def _shard(tmp_path: Path, docs: list[str]) -> str:
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    from megalite.data.preprocess import preprocess

    preprocess([str(src)], str(tmp_path / "d"), "byte", "", ["text"], True, 0, 1, False, False)
    return str(tmp_path / "d_text_document")


@pytest.mark.parametrize("docs, why", [
    (["tiny"], "the shard holds 1 documents, 5 tokens"),
    ([TEXT * 40], "data.split '0,1,0'"),
])
def test_pretrain_on_an_empty_split_is_one_line(tmp_path, capsys, monkeypatch, docs, why):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    prefix = _shard(tmp_path, docs)
    extra = ["data.split=0,1,0"] if "split" in why else []
    code = cli.main(["pretrain", *TINY, f"train.run_dir={tmp_path / 'run'}", f"data.path={prefix}",
                     f"data.cache_dir={tmp_path / 'cache'}", "train.train_steps=1", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: data.path {prefix}: the train split is empty (") and why in err


def test_a_tiny_shard_trained_for_many_epochs_warns_once(tmp_path, capsys):
    from megalite.config import load_config
    from megalite.data import build_pretrain_datasets
    from megalite.data.tokenizer import build_tokenizer

    prefix = _shard(tmp_path, [TEXT])  # ~95 tokens: one 33-token sample needs ~0.35 epochs
    cfg = load_config(None, [f"data.path={prefix}", f"data.cache_dir={tmp_path / 'cache'}", "data.split=1,0,0"])
    tok = build_tokenizer("byte", "")
    for _ in range(2):
        build_pretrain_datasets(cfg.data, 32, 1, tok, num_samples={"train": 1000})
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1 and "1,000 samples need 341 epochs of its 94 tokens" in lines[0]
