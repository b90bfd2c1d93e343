"""Chat/preference shards and the SFT/preference datasets: preprocessing, masks, packing, bad input."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megalite.config import ConfigError, DataConfig
from megalite.data.chat import encode_conversation, load_chat_template, preference_from_record
from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalite.data.preprocess import MalformedInput, preprocess
from megalite.data.sft import (
    IGNORE_INDEX,
    best_fit_pack,
    build_preference_datasets,
    build_sft_datasets,
    preference_micro_batch,
    sft_micro_batch,
)
from megalite.data.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOK = build_tokenizer("byte")
EOT = TOK.chat_tokens["<|eot_id|>"]


def _words(rnd: random.Random, lo: int, hi: int) -> str:
    return " ".join(rnd.choice(["alpha", "beta", "gamma", "über", "δ", "42"]) for _ in range(rnd.randint(lo, hi)))


def make_records(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append({"prompt": _words(rnd, 1, 6), "completion": _words(rnd, 1, 6)})
            continue
        msgs = [{"role": "system", "content": "be nice"}] if i % 3 == 0 else []
        for _ in range(rnd.randint(1, 3)):
            msgs += [{"role": "user", "content": _words(rnd, 1, 8)}, {"role": "assistant", "content": _words(rnd, 1, 8)}]
        out.append({"messages": msgs})
    return out


def conversation(rec: dict) -> list[dict]:
    if "messages" in rec:
        return rec["messages"]
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def chat_shard(tmp_path):
    records = make_records(80)
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    preprocess([str(src)], str(tmp_path / "sft"), "byte", mode="chat", workers=0, progress=False)
    return str(tmp_path / "sft"), records


def labels_of(ids: np.ndarray, mask: np.ndarray, threshold: int) -> list[int]:
    """What the rows must hold for one sample: label j is token j+1 where its mask is selected."""
    return np.where(mask[1:] >= threshold, ids[1:], IGNORE_INDEX).tolist()


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def test_chat_mode_with_workers_round_trips(tmp_path):
    records = make_records(120)
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    stats = preprocess([str(src)], str(tmp_path / "w"), "byte", mode="chat", workers=2, progress=False,
                       chunk_bytes=2048)
    tokens, mask = IndexedDataset(tmp_path / "w_chat_document"), IndexedDataset(tmp_path / "w_chat_mask")
    assert mask.dtype == np.uint8 and len(tokens) == len(mask) == 120 == stats.docs
    assert np.array_equal(tokens.sizes, mask.sizes) and np.array_equal(tokens.doc_idx, mask.doc_idx)
    template = load_chat_template("auto", TOK)
    for i, rec in enumerate(records):
        ids, m = encode_conversation(template, TOK, conversation(rec))
        assert tokens[i].tolist() == ids.tolist() and mask[i].tolist() == m.tolist()
    assert stats.loss_tokens == int(np.count_nonzero(mask.tokens)) and stats.skipped == 0
    # Workers and partitions change nothing in the output.
    preprocess([str(src)], str(tmp_path / "one"), "byte", mode="chat", workers=0, progress=False)
    preprocess([str(src)], str(tmp_path / "parts"), "byte", mode="chat", workers=2, partitions=2, progress=False,
               chunk_bytes=2048)
    for name in ("chat_document", "chat_mask"):
        for ext in (".bin", ".idx"):
            one = (tmp_path / f"one_{name}{ext}").read_bytes()
            assert one == (tmp_path / f"w_{name}{ext}").read_bytes() == (tmp_path / f"parts_{name}{ext}").read_bytes()


def test_preference_mode_writes_pairs_as_two_sequence_documents(tmp_path):
    rnd = random.Random(1)
    records = [{"prompt": _words(rnd, 1, 5) if i % 2 else
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                 {"role": "user", "content": _words(rnd, 1, 5)}],
                "chosen": _words(rnd, 1, 6), "rejected": _words(rnd, 1, 6)} for i in range(30)]
    src = write_jsonl(tmp_path / "pref.jsonl", records)
    stats = preprocess([str(src)], str(tmp_path / "p"), "byte", mode="preference", workers=2, progress=False,
                       chunk_bytes=1024)
    tokens, mask = IndexedDataset(tmp_path / "p_preference_document"), IndexedDataset(tmp_path / "p_preference_mask")
    assert stats.docs == 30 and tokens.num_documents == 30 and len(tokens) == 60
    assert np.diff(tokens.doc_idx).tolist() == [2] * 30
    template = load_chat_template("auto", TOK)
    for i, rec in enumerate(records):
        for j, conv in enumerate(preference_from_record(rec)):
            ids, m = encode_conversation(template, TOK, conv)
            assert tokens[2 * i + j].tolist() == ids.tolist() and mask[2 * i + j].tolist() == m.tolist()


BAD_LINES = {
    "missing field": (json.dumps({"prompt": "only"}).encode(), "missing field 'completion'"),
    "unknown role": (json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(),
                     "messages[0]: unknown role 'bot'"),
    "empty assistant": (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant",
                                                                                   "content": ""}]}).encode(),
                        "messages[1]: empty assistant turn"),
    "non-utf8": (b'{"prompt": "caf\xe9", "completion": "x"}', "not UTF-8: byte 0xe9"),
    "lone surrogate": (b'{"prompt": "x", "completion": "\\udc00y"}', "completion: lone surrogate"),
}


def _with_bad(tmp_path, bad: list[bytes], name: str = "bad.jsonl") -> Path:
    good = [json.dumps(r).encode() for r in make_records(4)]
    path = tmp_path / name
    path.write_bytes(b"\n".join(good[:2] + bad + good[2:]) + b"\n")
    return path


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_record_names_file_and_line(tmp_path, kind):
    line, reason = BAD_LINES[kind]
    path = _with_bad(tmp_path, [line])
    with pytest.raises(MalformedInput) as e:
        preprocess([str(path)], str(tmp_path / "o"), "byte", mode="chat", workers=0, progress=False)
    assert str(e.value).startswith(f"{path}:3: {reason}") and "\n" not in str(e.value)
    assert not list(tmp_path.glob("o_*"))  # nothing half-written


def test_cli_bad_records_error_or_counted(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--tokenizer-type", "byte", "--no-progress",
           "--mode", "chat", "--workers", "2"]
    for kind in ("non-utf8", "lone surrogate"):
        line, reason = BAD_LINES[kind]
        path = _with_bad(tmp_path, [line], f"{kind.replace(' ', '_')}.jsonl")
        r = subprocess.run(cmd + ["--input", str(path), "--output-prefix", str(tmp_path / "o")],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"error: {path}:3: {reason}")
    all_bad = _with_bad(tmp_path, [line for line, _ in BAD_LINES.values()])
    r = subprocess.run(cmd + ["--input", str(all_bad), "--output-prefix", str(tmp_path / "s"), "--skip-bad-records"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "samples: 4 " in r.stdout and f"skipped (bad records): {len(BAD_LINES)}" in r.stdout
    assert f"{all_bad}:7: completion: lone surrogate" in r.stdout
    assert len(IndexedDataset(tmp_path / "s_chat_mask")) == 4
    bad_template = tmp_path / "t.jinja"
    bad_template.write_text("{% if %}")
    r = subprocess.run(cmd + ["--input", str(all_bad), "--output-prefix", str(tmp_path / "t"),
                              "--chat-template", str(bad_template)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: {bad_template}: malformed chat template")


def test_template_without_assistant_tokens_is_a_bad_record(tmp_path):
    """A template that renders no assistant text leaves an empty mask: an error, never silent."""
    template = tmp_path / "users_only.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
                        "{% endfor %}")
    src = write_jsonl(tmp_path / "c.jsonl", make_records(3))
    with pytest.raises(MalformedInput, match=r"c\.jsonl:1: empty loss mask"):
        preprocess([str(src)], str(tmp_path / "o"), "byte", mode="chat", workers=0, progress=False,
                   chat_template=str(template))
    stats = preprocess([str(src)], str(tmp_path / "o"), "byte", mode="chat", workers=0, progress=False,
                       chat_template=str(template), skip_bad_records=True)
    assert stats.skipped == 3 and stats.docs == 0


# ---------------------------------------------------------------------------------------------
# The datasets.


def _cfg(path: str, tmp_path, **kw) -> DataConfig:
    return DataConfig(path=path, split="1,0,0", cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("loss_on", ["all", "last"])
def test_unpacked_rows_label_exactly_the_selected_turns(chat_shard, tmp_path, loss_on):
    prefix, records = chat_shard
    train, valid = build_sft_datasets(_cfg(prefix, tmp_path, loss_on=loss_on, packing=False), 256, 7, TOK, log=None)
    assert valid is None and len(train) == len(records)
    batch = train.get_batch(range(len(train)))
    assert batch["position_ids"] is None and batch["doc_ids"] is None  # one sample per row
    assert batch["tokens"].shape == (len(records), 256)
    seen = set()
    for row in range(len(train)):
        (u,) = train.units_of_row(row).tolist()
        seen.add(u)
        conv = conversation(records[u])
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        want = [t for a in (answers if loss_on == "all" else answers[-1:]) for t in [*a.encode(), EOT]]
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == want
        ids, _ = encode_conversation(load_chat_template("auto", TOK), TOK, conv)
        n = len(ids) - 1
        assert batch["tokens"][row, :n].tolist() == ids[:-1].tolist()
        assert (batch["tokens"][row, n:] == TOK.pad).all() and (labels[n:] == IGNORE_INDEX).all()
    assert seen == set(range(len(records)))
    assert batch["num_loss_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())


def test_best_fit_packer():
    def reference(lengths, cap, best):
        loads = []
        for n in sorted(lengths, reverse=True):
            fits = [i for i, x in enumerate(loads) if x + n <= cap]
            if not fits:
                loads.append(n)
                continue
            loads[max(fits, key=lambda i: loads[i]) if best else fits[0]] += n
        return sorted(loads)

    rng = np.random.default_rng(3)
    lengths = rng.choice(np.arange(1, 512), 300, replace=False)  # distinct: the order is fixed by length
    offsets, items = best_fit_pack(lengths, 512, seed=0)
    assert sorted(items.tolist()) == list(range(300))  # every item exactly once
    loads = [int(lengths[items[a:b]].sum()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert max(loads) <= 512 and min(np.diff(offsets)) >= 1
    assert reference(lengths, 512, best=False) != reference(lengths, 512, best=True)  # the instance tells them apart
    assert sorted(loads) == reference(lengths, 512, best=True)
    # Seeded: the same seed repeats itself, another seed shuffles ties and rows differently.
    again = best_fit_pack(lengths, 512, seed=0)
    assert np.array_equal(again[0], offsets) and np.array_equal(again[1], items)
    assert not np.array_equal(best_fit_pack(lengths, 512, seed=1)[1], items)
    small = rng.integers(1, 60, 2000)
    o, _ = best_fit_pack(small, 256, seed=0)
    assert small.sum() / ((len(o) - 1) * 256) > 0.97


def test_packed_micro_batch_restarts_positions_and_masks_across_samples(chat_shard, tmp_path):
    prefix, records = chat_shard
    lines = []
    train, _ = build_sft_datasets(_cfg(prefix, tmp_path), 160, 3, TOK, log=lines.append)
    assert "packing efficiency" in lines[0]
    template = load_chat_template("auto", TOK)
    encoded = [encode_conversation(template, TOK, conversation(r)) for r in records]
    all_units, real = [], 0
    batch = sft_micro_batch(train, 0, 0, len(train), 0, 1)
    assert batch["doc_ids"] is not None and batch["tokens"].shape == (len(train), 160)
    for row in range(len(train)):
        units = train.units_of_row(row).tolist()
        all_units += units
        at = 0
        for d, u in enumerate(units):
            ids, mask = encoded[u]
            ids, mask = ids[:161], mask[:161]  # overlong samples are truncated to seq_len + 1 tokens
            n = len(ids) - 1
            sl = slice(at, at + n)
            assert batch["tokens"][row, sl].tolist() == ids[:-1].tolist()
            assert batch["labels"][row, sl].tolist() == labels_of(ids, mask, 1)
            assert batch["position_ids"][row, sl].tolist() == list(range(n))
            assert (batch["doc_ids"][row, sl] == d).all()
            at += n
        real += at
        assert (batch["labels"][row, at:] == IGNORE_INDEX).all()
        assert (batch["doc_ids"][row, at:] == len(units)).all()  # padding attends to none of the samples
    assert sorted(all_units) == list(range(len(records)))
    assert train.packing_efficiency == pytest.approx(real / (len(train) * 160))
    assert len(train) < len(records) and train.packing_efficiency > 0.8


def test_packed_rows_compute_what_each_sample_computes_alone(chat_shard, tmp_path):
    """Through the model: a packed row's per-token losses equal those of its samples run one by one
    (doc_ids keep attention inside a sample; RoPE being relative, the position restarts are checked
    on the batch itself above)."""
    from megalite.config import ModelConfig
    from megalite.model.llama import LlamaModel
    from megalite.parallel.state import ParallelState

    prefix, _ = chat_shard
    train, _ = build_sft_datasets(_cfg(prefix, tmp_path), 160, 3, TOK, log=None)
    row = next(k for k in range(len(train)) if len(train.units_of_row(k)) >= 3)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, max_seq_len=160, attention_backend="sdpa")
    torch.manual_seed(0)
    model = LlamaModel(cfg, ParallelState())
    model.init_weights(0)
    packed = train.get_batch([row])
    with torch.no_grad():
        losses = model(tokens=packed["tokens"], labels=packed["labels"], position_ids=packed["position_ids"],
                       doc_ids=packed["doc_ids"])[0]
        at = 0
        for u in train.units_of_row(row).tolist():
            n = int(train.unit_len[u, 0]) - 1
            tokens, labels = packed["tokens"][:, at : at + n], packed["labels"][:, at : at + n]
            ref = model(tokens=tokens, labels=labels)[0]  # the sample alone, from position 0
            sel = labels[0] != IGNORE_INDEX
            torch.testing.assert_close(losses[at : at + n][sel], ref[sel], rtol=1e-5, atol=1e-5)
            at += n


def test_overlong_truncate_or_drop_is_counted(tmp_path):
    records = [{"prompt": "a" * 10, "completion": "b" * 10},  # 21 tokens with the raw template
               {"prompt": "a" * 50, "completion": "b" * 10},  # 61: its answer lies past 41 tokens
               {"prompt": "a" * 5, "completion": "b" * 50},  # 56: truncation keeps 36 answer tokens
               {"prompt": "a" * 5, "completion": "b" * 5}]  # 11
    src = write_jsonl(tmp_path / "o.jsonl", records)
    preprocess([str(src)], str(tmp_path / "o"), "byte", mode="chat", workers=0, progress=False, chat_template="raw")
    cut, _ = build_sft_datasets(_cfg(str(tmp_path / "o"), tmp_path, overlong="truncate"), 40, 0, TOK, log=None)
    c = cut.counts
    assert (c.samples, c.truncated, c.dropped, c.skipped) == (3, 1, 1, 0)
    assert c.loss_tokens == 11 + 36 + 6 and c.tokens == 20 + 40 + 10
    dropped, _ = build_sft_datasets(_cfg(str(tmp_path / "o"), tmp_path, overlong="drop"), 40, 0, TOK, log=None)
    assert (dropped.counts.samples, dropped.counts.truncated, dropped.counts.dropped) == (2, 0, 2)
    assert sorted(dropped.unit_seq.tolist()) == [0, 3]


def _write_chat_shard(prefix: str, samples: list[tuple[list[int], list[int]]]) -> None:
    with IndexedDatasetWriter(f"{prefix}_chat_document", vocab_size=TOK.vocab_size) as t, \
            IndexedDatasetWriter(f"{prefix}_chat_mask", dtype=np.uint8) as m:
        for ids, mask in samples:
            t.add_document(ids)
            m.add_document(mask)


def test_samples_without_loss_tokens_error_or_are_skipped(tmp_path):
    prefix = str(tmp_path / "h")
    _write_chat_shard(prefix, [([1, 2, 3, 4], [0, 0, 2, 2]), ([5, 6, 7], [0, 1, 0]), ([8, 9], [2, 0])])
    with pytest.raises(ConfigError, match=r"h_chat_mask: sample 2 has no loss tokens.*skip_bad_records") as e:
        build_sft_datasets(_cfg(prefix, tmp_path), 16, 0, TOK, log=None)
    # Cached: every later build (every rank) reports the same error.
    with pytest.raises(ConfigError, match="sample 2 has no loss tokens"):
        build_sft_datasets(_cfg(prefix, tmp_path), 16, 0, TOK, log=None)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="sample 1 has no loss tokens"):  # under `last` sample 1 has none
        build_sft_datasets(_cfg(prefix, tmp_path, loss_on="last"), 16, 0, TOK, log=None)
    ok, _ = build_sft_datasets(_cfg(prefix, tmp_path, loss_on="last", skip_bad_records=True), 16, 0, TOK, log=None)
    assert (ok.counts.samples, ok.counts.skipped) == (1, 2)


def test_bad_shards_are_config_errors(chat_shard, tmp_path):
    prefix, _ = chat_shard
    with pytest.raises(ConfigError, match="no preference shard"):
        build_preference_datasets(_cfg(prefix, tmp_path), 64, 0, TOK, log=None)
    with pytest.raises(ConfigError, match="a preference shard has 2"):
        build_preference_datasets(_cfg(prefix + "_chat_document", tmp_path), 64, 0, TOK, log=None)
    Path(prefix + "_chat_mask.idx").unlink()
    with pytest.raises(ConfigError, match=r"sft_chat_mask\.idx: no such file"):
        build_sft_datasets(_cfg(prefix, tmp_path), 64, 0, TOK, log=None)
    with pytest.raises(ConfigError, match="data.overlong"):
        build_sft_datasets(_cfg(prefix, tmp_path, overlong="wrap"), 64, 0, TOK, log=None)


def test_micro_batches_resume_shard_over_dp_and_reshuffle_epochs(chat_shard, tmp_path):
    prefix, _ = chat_shard
    cfg = DataConfig(path=prefix, split="8,2,0", cache_dir=str(tmp_path / "cache"))
    train, valid = build_sft_datasets(cfg, 128, 5, TOK, log=None)
    assert valid is not None and valid.counts.samples == 16 and train.counts.samples == 64
    again, _ = build_sft_datasets(cfg, 128, 5, TOK, log=None)  # from the cache
    for consumed in (0, 3, len(train) + 1):
        a, b = sft_micro_batch(train, consumed, 1, 2, 0, 1), sft_micro_batch(again, consumed, 1, 2, 0, 1)
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
    # DP ranks take consecutive slices of the same stream.
    whole = sft_micro_batch(train, 4, 0, 4, 0, 1)
    halves = [sft_micro_batch(train, 4, 0, 2, r, 2) for r in (0, 1)]
    assert torch.equal(torch.cat([h["tokens"] for h in halves]), whole["tokens"])
    # The second epoch holds the same rows in another order.
    n = len(train)
    first = [tuple(train.units_of_row(k).tolist()) for k in range(n)]
    second = [tuple(train.units_of_row(k).tolist()) for k in range(n, 2 * n)]
    assert sorted(first) == sorted(second) and first != second
    other_seed, _ = build_sft_datasets(cfg, 128, 6, TOK, log=None)
    assert [tuple(other_seed.units_of_row(k).tolist()) for k in range(len(other_seed))] != first


def test_preference_micro_batch_pairs_rows_and_masks_the_prompt(tmp_path):
    rnd = random.Random(2)
    records = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                           {"role": "user", "content": _words(rnd, 1, 5)}],
                "chosen": _words(rnd, 1, 6), "rejected": _words(rnd, 1, 6)} for _ in range(12)]
    src = write_jsonl(tmp_path / "pref.jsonl", records)
    preprocess([str(src)], str(tmp_path / "p"), "byte", mode="preference", workers=0, progress=False)
    train, valid = build_preference_datasets(_cfg(str(tmp_path / "p"), tmp_path), 96, 0, TOK, log=None)
    assert valid is None and len(train) == 12
    b = preference_micro_batch(train, 0, 1, 3, 0, 1)  # pairs 3..5 of the stream
    assert b["tokens"].shape == (6, 96) and b["pair_index"].tolist() == [0, 1, 2, 0, 1, 2]
    assert b["is_chosen"].tolist() == [True] * 3 + [False] * 3
    assert b["position_ids"] is None and b["doc_ids"] is None
    template = load_chat_template("auto", TOK)
    for i, pair in enumerate(b["pair_ids"].tolist()):
        assert train.units_of_row(3 + i).tolist() == [pair]
        for j, conv in enumerate(preference_from_record(records[pair])):
            ids, mask = encode_conversation(template, TOK, conv)
            row = i + 3 * j
            labels = b["labels"][row]
            # Only the answer (and its <|eot_id|>) is labelled, not the earlier assistant turn.
            assert labels[labels != IGNORE_INDEX].tolist() == [*conv[-1]["content"].encode(), EOT]
            assert b["tokens"][row, : len(ids) - 1].tolist() == ids[:-1].tolist()
            assert labels[: len(ids) - 1].tolist() == labels_of(ids, mask, 2)
    assert b["num_loss_tokens"] == int((b["labels"] != IGNORE_INDEX).sum())
    assert train.packing_efficiency == pytest.approx(train.counts.tokens / (2 * 12 * 96))
