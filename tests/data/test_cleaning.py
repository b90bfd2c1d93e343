"""Cleaning: planted exact and near duplicates and PII are removed; every drop has a reason."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from megalite.data.cleaning import (
    CleanConfig,
    Cleaner,
    DedupConfig,
    MinHasher,
    PIIConfig,
    exact_hash,
    gopher_quality,
    jaccard_estimate,
    load_clean_config,
    scrub_pii,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = ("the of and to with that have be river stone market winter garden letter harbor music lantern "
         "village morning engine silver forest doctor window travel museum orchard signal candle bridge "
         "pocket meadow thunder copper").split()


def prose(rng: random.Random, sentences: int = 12) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(VOCAB) for _ in range(rng.randint(8, 16))]
        out.append(" ".join(words).capitalize() + ".")
    return "\n".join(" ".join(out[i : i + 3]) for i in range(0, len(out), 3))


def test_pii_is_scrubbed():
    text = ("Mail jane.doe@example.co.uk or call (555) 123-4567 / +1 555-987-6543. Server 192.168.10.1 "
            "SSN 123-45-6789. Version 1.2.3 and 3.14 stay, as does 2024-01-15.")
    out, counts = scrub_pii(text, PIIConfig())
    assert counts == {"email": 1, "phone": 2, "ipv4": 1, "ssn": 1}
    for secret in ("jane.doe", "123-4567", "987-6543", "192.168", "123-45-6789"):
        assert secret not in out
    assert "1.2.3" in out and "3.14" in out and "2024-01-15" in out


def test_minhash_estimates_similarity():
    rng = random.Random(1)
    mh = MinHasher(DedupConfig())
    a = prose(rng, 30)
    words = a.split()
    b = " ".join(words[:-6] + ["zebra"] * 6)  # a small edit at the end
    c = prose(rng, 30)
    assert jaccard_estimate(mh.signature(a), mh.signature(b)) > 0.7
    assert jaccard_estimate(mh.signature(a), mh.signature(c)) < 0.2
    assert mh.signature(a).shape == (112,)  # FineWeb's 14 bands x 8 rows
    assert np.array_equal(mh.signature(a), MinHasher(DedupConfig()).signature(a))  # deterministic


def test_cleaner_dedup_keys_equal_the_public_hashes():
    """The cleaner normalizes each document once and hands that to both keys: same keys as the
    one-call functions (including texts shorter than a shingle)."""
    cfg = load_clean_config({"length": {"enabled": False}, "gopher": {"enabled": False}, "c4": {"enabled": False},
                             "pii": {"enabled": False}})
    mh = MinHasher(cfg.dedup)
    for text in ("", "Two words.", prose(random.Random(4), 20)):
        r = Cleaner(cfg).process(text)
        assert r.exact == exact_hash(text) and r.bands == mh.band_keys(mh.signature(text))


def test_gopher_quality_reasons():
    cfg = CleanConfig().gopher
    assert gopher_quality("word " * 10, ("word " * 10).split(), cfg) == "gopher_too_few_words"
    text = " ".join(["#tag"] * 60)
    assert gopher_quality(text, text.split(), cfg) == "gopher_symbol_ratio"
    good = prose(random.Random(3))
    assert gopher_quality(good, good.split(), cfg) is None


def test_config_rejects_unknown_keys():
    cfg = load_clean_config({"gopher": {"min_words": 10}, "dedup": {"bands": 20, "rows": 5}})
    assert cfg.gopher.min_words == 10 and cfg.dedup.bands == 20
    try:
        load_clean_config({"gopher": {"min_wrods": 10}}, "c.yaml")
    except ValueError as e:
        assert str(e) == "c.yaml: unknown key 'gopher.min_wrods'"
    else:
        raise AssertionError("unknown key accepted")


def test_clean_tool_removes_planted_duplicates_and_pii(tmp_path):
    rng = random.Random(0)
    docs = [prose(rng) for _ in range(60)]
    planted = {
        "exact": docs[3].upper().replace(".", " . "),  # same after normalization
        "near": docs[5].replace(docs[5].split()[-1], "lantern", 1) + " Candle river stone.",
        "pii": docs[7] + "\nWrite to bob@example.com or call 555-123-4567 today.",
        "short": "Too short.",
        "lorem": "Lorem ipsum " + docs[9],
    }
    rows = [{"text": d, "id": i} for i, d in enumerate(docs)]
    rows[7] = {"text": planted["pii"], "id": 7}
    rows += [{"text": planted[k], "id": k} for k in ("exact", "near", "short", "lorem")]
    src = tmp_path / "raw.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    out, stats = tmp_path / "clean.jsonl.zst", tmp_path / "stats.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools/clean_data.py"), "--input", str(src), "--output", str(out),
                        "--stats", str(stats), "--workers", "2", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = json.loads(stats.read_text())
    import zstandard

    kept = [json.loads(x) for x in zstandard.ZstdDecompressor().stream_reader(out.open("rb")).read().splitlines()]
    ids = {k["id"] for k in kept}
    assert report["input_docs"] == len(rows) + 1 and report["kept_docs"] == len(kept)
    assert report["dropped"]["exact_duplicate"] == 1 and "exact" not in ids
    assert report["dropped"]["near_duplicate"] == 1 and "near" not in ids
    assert report["dropped"]["malformed"] == 1
    assert report["dropped"]["length_too_short"] == 1 and report["dropped"]["c4_lorem_ipsum"] == 1
    assert report["dropped_docs"] + report["kept_docs"] == report["input_docs"]
    assert report["pii_replaced"] == {"email": 1, "phone": 1}
    pii_doc = next(k for k in kept if k["id"] == 7)["text"]
    assert "bob@example.com" not in pii_doc and "<EMAIL>" in pii_doc and "<PHONE>" in pii_doc
    assert len(ids & set(range(60))) == 60  # every original document survives


def test_cleaner_single_process_matches_defaults():
    c = Cleaner(CleanConfig())
    res = c.process(prose(random.Random(5)))
    assert res.text is not None and res.reason is None and len(res.bands) == 14
