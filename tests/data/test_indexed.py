"""The .bin/.idx format: exact round trips, streaming merge, and clear errors on bad files."""

import struct

import numpy as np
import pytest

from megalite.data.indexed import (
    HEADER_BYTES,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_dtype,
    merge_shards,
)
from tests.data.conftest import random_docs, write_shard


@pytest.mark.parametrize("vocab", [1000, 65499, 65500, 200_000])
def test_round_trip_exact(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    docs = random_docs(rng, 300, vocab=vocab)
    write_shard(tmp_path / "s", docs, vocab)
    ds = IndexedDataset(tmp_path / "s")
    assert ds.dtype == best_dtype(vocab) == (np.uint16 if vocab < 65500 else np.int32)
    assert len(ds) == ds.num_documents == len(docs)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.document(i), d)
    # Megatron's header: magic, version 1, its dtype code.
    raw = (tmp_path / "s.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<Q", raw[9:17])[0] == 1
    assert raw[17] == (8 if vocab < 65500 else 4)


def test_batched_add_and_multi_sequence_documents(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 200)
    with IndexedDatasetWriter(tmp_path / "b", vocab_size=60000) as w:
        w.add_documents(np.concatenate(docs), [len(d) for d in docs])
    ds = IndexedDataset(tmp_path / "b")
    assert all(np.array_equal(ds[i], d) for i, d in enumerate(docs))
    # Documents made of several sequences (sentence-split data).
    with IndexedDatasetWriter(tmp_path / "m", vocab_size=60000) as w:
        w.add_item([1, 2])
        w.add_item([3])
        w.end_document()
        w.add_item([4])
        w.end_document()
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == 3 and ds.num_documents == 2
    assert ds.document(0).tolist() == [1, 2, 3] and ds.document_sizes().tolist() == [3, 1]


def test_merge_equals_single_pass(tmp_path):
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 500)
    write_shard(tmp_path / "all", docs)
    parts = [write_shard(tmp_path / f"p{i}", docs[a:b]) for i, (a, b) in enumerate([(0, 120), (120, 121), (121, 121), (121, 500)])]
    assert merge_shards(parts, tmp_path / "merged") == (500, sum(len(d) for d in docs))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"all{ext}").read_bytes() == (tmp_path / f"merged{ext}").read_bytes()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "x", vocab_size=100) as w:
        w.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("via", ["abort", "context"])
def test_finalize_failing_partway_leaves_nothing(tmp_path, via):
    """The .idx temp file exists once finalize has begun writing it; a failure after that removes it too."""
    w = IndexedDatasetWriter(tmp_path / "x", vocab_size=100)
    w.add_document([1, 2, 3])
    next(tmp_path.glob("x.idx.sizes.*.tmp")).unlink()  # finalize fails reading it back, mid-.idx
    if via == "abort":
        with pytest.raises(RuntimeError, match="cannot open"):
            w.finalize()
        w.abort()
    else:
        with pytest.raises(RuntimeError, match="cannot open"), w:
            pass
    assert list(tmp_path.iterdir()) == []


def test_token_out_of_range_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not fit"), IndexedDatasetWriter(tmp_path / "x", vocab_size=100) as w:
        w.add_document([70000])


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,needle", [
    ("magic", "bad magic"),
    ("version", "unsupported version 7"),
    ("dtype", "unknown dtype code"),
    ("truncate_idx", "truncated or corrupt"),
    ("truncate_bin", "truncated"),
    ("extra_bin", "trailing data"),
    ("short_header", "truncated header"),
    ("pointers", "pointers disagree"),
    ("missing_bin", "no such file"),
])
def test_corrupt_files_are_named(tmp_path, damage, needle):
    prefix = write_shard(tmp_path / "c", random_docs(np.random.default_rng(3), 50))
    idx, binf = tmp_path / "c.idx", tmp_path / "c.bin"
    if damage == "magic":
        _corrupt(idx, 0, b"XXIDIDX")
    elif damage == "version":
        _corrupt(idx, 9, struct.pack("<Q", 7))
    elif damage == "dtype":
        _corrupt(idx, 17, bytes([99]))
    elif damage == "truncate_idx":
        idx.write_bytes(idx.read_bytes()[:-5])
    elif damage == "truncate_bin":
        binf.write_bytes(binf.read_bytes()[:-2])
    elif damage == "extra_bin":
        binf.write_bytes(binf.read_bytes() + b"\0\0")
    elif damage == "short_header":
        idx.write_bytes(idx.read_bytes()[:20])
    elif damage == "pointers":
        s = struct.unpack("<Q", idx.read_bytes()[18:26])[0]
        _corrupt(idx, HEADER_BYTES + 4 * s + 8 * 3, struct.pack("<q", 2))
    elif damage == "missing_bin":
        binf.unlink()
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    msg = str(e.value)
    assert needle in msg and ("c.idx" in msg or "c.bin" in msg) and "\n" not in msg
