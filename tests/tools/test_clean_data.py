"""tools/clean_data.py in process: what it publishes is complete at the moment it is renamed into place."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_data(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import clean_data

    yield clean_data
    sys.modules.pop("clean_data", None)


@pytest.mark.parametrize("ext", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_output_and_stats_are_complete_when_renamed(tmp_path, monkeypatch, clean_data, ext):
    from megalite.data.cleaning import load_clean_config

    text = ("The river and the stone have a market with the winter garden. " * 4).strip()
    rows = [{"text": f"{text} Number {i} of the letters to the harbor.", "id": i} for i in range(300)]
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, stats = tmp_path / f"clean.{ext}", tmp_path / "stats.json"
    published: dict[str, bytes] = {}
    real_replace = os.replace

    def replace(a, b):  # what a reader would see the instant the name appears
        published[os.path.basename(b)] = Path(a).read_bytes()
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    cfg = load_clean_config({"gopher": {"enabled": False}, "c4": {"enabled": False},
                             "dedup": {"exact": False, "near": False}})
    report = clean_data.clean([str(src)], str(out), str(stats), cfg, workers=0, progress=False)
    raw = published[out.name]
    if ext.endswith(".gz"):
        raw = gzip.decompress(raw)
    elif ext.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
    assert [json.loads(x)["id"] for x in raw.splitlines()] == list(range(300))
    assert report["kept_docs"] == 300 and json.loads(published[stats.name]) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["raw.jsonl", out.name, stats.name])


class _FullDisk(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("ext", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_a_failed_final_flush_is_an_error_and_publishes_nothing(tmp_path, monkeypatch, clean_data, ext):
    """Everything fits the write buffer, so the disk-full error comes from closing the file: it must
    surface, not be swallowed when the file object is collected after a truncated file was renamed."""
    from megalite.data.cleaning import load_clean_config

    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document number {i} about the river."}) + "\n" for i in range(50)))
    monkeypatch.setattr(clean_data, "open", lambda path, mode="r", buffering=-1: io.BufferedWriter(
        _FullDisk(path, "wb"), 1 << 20), raising=False)
    cfg = load_clean_config({"length": {"enabled": False}, "gopher": {"enabled": False}, "c4": {"enabled": False}})
    with pytest.raises(OSError, match="No space left"):
        clean_data.clean([str(src)], str(tmp_path / f"clean.{ext}"), str(tmp_path / "s.json"), cfg, workers=0,
                         progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.jsonl"]
