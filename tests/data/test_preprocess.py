"""preprocess_data: formats, partitions == single pass, malformed lines, the CLI's errors."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalite.data.indexed import IndexedDataset
from megalite.data.preprocess import MalformedInput, preprocess
from megalite.data.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _docs(path):
    return [json.loads(x)["text"] for x in Path(path).read_text().splitlines()]


def _read(prefix):
    ds = IndexedDataset(f"{prefix}_text_document")
    return [ds[i].tolist() for i in range(len(ds))]


def test_tokens_match_the_tokenizer(tmp_path, jsonl):
    tok = build_tokenizer("byte")
    stats = preprocess([str(jsonl)], str(tmp_path / "o"), "byte", append_eod=True, workers=0, progress=False)
    expect = [tok.encode(t) + [tok.eod] for t in _docs(jsonl)]
    assert _read(tmp_path / "o") == expect
    assert stats.docs == 400 and stats.skipped == 0 and stats.tokens["text"] == sum(map(len, expect))


@pytest.mark.parametrize("fmt", ["gz", "zst", "parquet"])
def test_compressed_and_parquet_inputs(tmp_path, jsonl, fmt):
    raw = jsonl.read_bytes()
    if fmt == "gz":
        src = tmp_path / "c.jsonl.gz"
        src.write_bytes(gzip.compress(raw))
    elif fmt == "zst":
        import zstandard

        src = tmp_path / "c.jsonl.zst"
        src.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": _docs(jsonl)}), src, row_group_size=50)
    preprocess([str(jsonl)], str(tmp_path / "ref"), "byte", append_eod=True, workers=0, progress=False)
    preprocess([str(src)], str(tmp_path / "o"), "byte", append_eod=True, workers=0, progress=False,
               chunk_bytes=4096)
    assert _read(tmp_path / "o") == _read(tmp_path / "ref")


def test_partitions_and_workers_equal_single_pass(tmp_path, jsonl):
    preprocess([str(jsonl)], str(tmp_path / "one"), "byte", append_eod=True, workers=0, progress=False)
    preprocess([str(jsonl), str(jsonl)], str(tmp_path / "two"), "byte", append_eod=True, workers=0, progress=False)
    preprocess([str(jsonl), str(jsonl)], str(tmp_path / "parts"), "byte", append_eod=True, workers=2,
               partitions=3, progress=False, chunk_bytes=2048)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"two_text_document{ext}").read_bytes() == (tmp_path / f"parts_text_document{ext}").read_bytes()
    assert len(_read(tmp_path / "two")) == 2 * len(_read(tmp_path / "one"))
    assert sorted(p.name for p in tmp_path.glob("parts*")) == ["parts_text_document.bin", "parts_text_document.idx"]


def test_partitions_leave_no_parts_on_failure(tmp_path, jsonl, monkeypatch):
    import megalite.data.preprocess as pp

    bad = tmp_path / "bad.jsonl"
    lines = jsonl.read_text().splitlines()
    lines[380] = "{not json"  # in the last partition: the first two are finished by then
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedInput, match=r"bad\.jsonl:381: invalid JSON"):
        preprocess([str(bad)], str(tmp_path / "s"), "byte", workers=0, partitions=3, strict=True, progress=False,
                   chunk_bytes=2048)
    assert not list(tmp_path.glob("s_*"))

    def failing_merge(parts, final):
        raise OSError("disk full")

    monkeypatch.setattr(pp, "merge_shards", failing_merge)
    with pytest.raises(OSError, match="disk full"):
        preprocess([str(jsonl)], str(tmp_path / "m"), "byte", workers=0, partitions=3, progress=False,
                   chunk_bytes=2048)
    assert not list(tmp_path.glob("m_*"))


def test_malformed_lines_counted_or_fatal(tmp_path, jsonl):
    bad = tmp_path / "bad.jsonl"
    lines = jsonl.read_text().splitlines()
    lines[10] = "{not json"
    lines[20] = json.dumps({"body": "x"})
    lines[30] = json.dumps([1, 2])
    bad.write_text("\n".join(lines) + "\n")
    stats = preprocess([str(bad)], str(tmp_path / "o"), "byte", workers=0, progress=False)
    assert stats.skipped == 3 and stats.docs == 397
    assert "bad.jsonl:11: invalid JSON" in stats.skipped_examples[0]
    assert "bad.jsonl:21: missing key 'text'" in stats.skipped_examples[1]
    with pytest.raises(MalformedInput, match=r"bad\.jsonl:11: invalid JSON"):
        preprocess([str(bad)], str(tmp_path / "s"), "byte", workers=0, progress=False, strict=True)
    assert not list(tmp_path.glob("s_*"))  # nothing half-written


def test_cli_stats_and_one_line_errors(tmp_path, jsonl):
    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--tokenizer-type", "byte", "--no-progress"]
    ok = subprocess.run(cmd + ["--input", str(jsonl), "--output-prefix", str(tmp_path / "o"), "--append-eod",
                               "--workers", "1"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "docs: 400" in ok.stdout and "skipped (malformed): 0" in ok.stdout
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    err = subprocess.run(cmd + ["--input", str(bad), "--output-prefix", str(tmp_path / "x"), "--strict"],
                         capture_output=True, text=True, cwd=ROOT)
    assert err.returncode == 2 and err.stderr.strip() == f"error: {bad}:2: non-string value for key 'text'"
    missing = subprocess.run(cmd + ["--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "y")],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "none.jsonl: no such input file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_megatron_reader_layout(tmp_path, jsonl):
    """The fields Megatron's reader uses: int32 sizes, int64 pointers, boundaries from 0 to S."""
    preprocess([str(jsonl)], str(tmp_path / "o"), "byte", workers=0, progress=False)
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64
    assert ds.doc_idx[0] == 0 and ds.doc_idx[-1] == len(ds)
