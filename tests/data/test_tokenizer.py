"""Tokenizer backends behind one interface, and the trainer tool."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalite.config import ConfigError
from megalite.data.tokenizer import RESERVED_CHAT_TOKENS, append_eod, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXT = "def f(x):\n    return 12345 + x  # naïve ü\n"


def _check(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert all(0 <= i < tok.vocab_size for i in ids + [tok.bos, tok.eos, tok.pad, tok.eod])
    flat, lengths = tok.encode_batch_flat([TEXT, "", "x"], np.dtype(np.int32))
    assert lengths.tolist() == [len(ids), 0, len(tok.encode("x"))] and flat[: len(ids)].tolist() == ids


def test_byte():
    tok = build_tokenizer("byte")
    _check(tok)
    assert tok.chat_tokens == {"<|im_start|>": 259, "<|im_end|>": 260, "<|start_header_id|>": 261,
                               "<|end_header_id|>": 262, "<|eot_id|>": 263}


def test_append_eod_ends_every_document_even_empty_ones():
    flat, lengths = append_eod(np.array([1, 2, 3, 4], np.uint16), np.array([2, 0, 2]), 9)
    assert flat.dtype == np.uint16 and flat.tolist() == [1, 2, 9, 9, 3, 4, 9] and lengths.tolist() == [3, 1, 3]
    flat, lengths = append_eod(np.zeros(0, np.uint16), np.zeros(0, np.int64), 9)
    assert flat.size == 0 and lengths.size == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "c.jsonl"
    with open(corpus, "w") as f:
        for p in sorted(Path(json.__file__).parent.parent.glob("*.py"))[:25]:
            f.write(json.dumps({"text": p.read_text()}) + "\n")
    out = {}
    for kind, name in (("sentencepiece", "sp.model"), ("hf-bpe", "tokenizer.json")):
        r = subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", str(corpus),
                            "--type", kind, "--vocab-size", "600", "--output", str(d / name), "--threads", "1"],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        out[kind] = d / name
    return out


def test_sentencepiece_llama2_style(trained):
    tok = build_tokenizer("sentencepiece", str(trained["sentencepiece"]))
    _check(tok)
    assert (tok.bos, tok.eos) == (1, 2) and set(tok.chat_tokens) == set(RESERVED_CHAT_TOKENS)
    assert len(tok.encode("12345")) >= 5  # split_digits


def test_hf_byte_level_bpe(trained):
    tok = build_tokenizer("hf", str(trained["hf-bpe"]))
    _check(tok)
    assert tok.eos == tok.token_id("<|endoftext|>") and set(tok.chat_tokens) == set(RESERVED_CHAT_TOKENS)


def test_tiktoken_local_rank_file(tmp_path):
    ranks = tmp_path / "bytes.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    tok = build_tokenizer("tiktoken", str(ranks))
    _check(tok)
    assert tok.eos == 256 and tok.chat_tokens["<|im_start|>"] == 258


def test_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown data.tokenizer_type"):
        build_tokenizer("wordpiece")
    with pytest.raises(ConfigError, match="not found"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot load sentencepiece"):
        build_tokenizer("sentencepiece", str(tmp_path / "junk.model"))


def test_sentencepiece_word_cache_is_exact(trained):
    """The C++ word cache must reproduce the model's own encoding on awkward whitespace and text."""
    import random

    tok = build_tokenizer("sentencepiece", str(trained["sentencepiece"]))
    assert tok._wc is not None
    rnd = random.Random(0)
    alphabet = list("ab xyz  \t\n.,é漢0123") + ["\u00a0", "  ", "<|im_start|>", "def ", "    return"]
    texts = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40))) for _ in range(3000)]
    texts += [t + "\u2581 " + t for t in texts[:50]]  # SentencePiece's own space symbol, next to a space
    tok._verify_left = 0  # exercise the cached path only
    for dtype in (np.uint16, np.int32):
        for batch in (texts[i : i + 50] for i in range(0, len(texts), 50)):
            flat, lengths = tok.encode_batch_flat(batch, np.dtype(dtype))
            direct = tok.sp.encode(batch)
            assert lengths.tolist() == [len(d) for d in direct]
            assert flat.tolist() == [t for d in direct for t in d]


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_preprocess_with_trained_tokenizers(trained, tmp_path, kind):
    from megalite.data.indexed import IndexedDataset
    from megalite.data.preprocess import preprocess

    model = str(trained["sentencepiece" if kind == "sentencepiece" else "hf-bpe"])
    texts = [f"line {i}: " + TEXT * (i % 5) + "  trailing  " * (i % 2) for i in range(700)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([str(src)], str(tmp_path / "o"), kind, model, append_eod=True, workers=2, progress=False,
               chunk_bytes=8192)
    tok = build_tokenizer(kind, model)
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert len(ds) == len(texts)
    for i in range(0, len(texts), 7):
        assert ds[i].tolist() == tok.encode(texts[i]) + [tok.eod]


@pytest.mark.parametrize("kind", ["sentencepiece", "hf-bpe"])
def test_trained_tokenizers_carry_the_default_chat_template(trained, kind):
    """train_tokenizer reserves the chat tokens, so `auto` picks the Llama-3-like template and the
    loss mask covers each answer and its <|eot_id|>, one special id each."""
    from megalite.data.chat import Llama3Template, encode_conversation, load_chat_template

    tok = build_tokenizer("sentencepiece" if kind == "sentencepiece" else "hf", str(trained[kind]))
    template = load_chat_template("auto", tok, str(trained[kind]))
    assert isinstance(template, Llama3Template)
    conv = [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "return x"}]
    ids, mask = encode_conversation(template, tok, conv)
    eot = tok.chat_tokens["<|eot_id|>"]
    assert ids.tolist().count(eot) == 2 and ids[0] == tok.bos
    assert ids[mask > 0].tolist() == tok.encode("return x") + [eot]
