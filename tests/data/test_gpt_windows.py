"""Every GPTDataset window, checked against a reference built in plain Python from the documents.

The reference: concatenate the documents in the dataset's per-epoch order, cut windows of seq_len+1
tokens that start every seq_len tokens (so neighbours share their boundary token), and serve window
shuffle_index[i] as sample i. Document lengths include multiples and divisors of seq_len, so windows
end exactly on document boundaries, plus empty and one-token documents, and more than one epoch."""

from __future__ import annotations

import numpy as np
import pytest

from megalite.data.datasets import GPTDataset
from megalite.data.indexed import IndexedDataset
from tests.data.conftest import write_shard

SEQ = 8
# Lengths dividing seq_len or multiples of it (8, 4, 2, 1, 16, 24), next to it (7, 9, 15, 17), and empty.
LENGTHS = [8, 4, 16, 2, 1, 8, 9, 7, 24, 0, 3, 5, 8, 12, 6, 32, 1, 15, 17, 4, 4, 8, 2, 2, 2, 2, 11, 8]


def _docs() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(1, 500, n).astype(np.int64) for n in LENGTHS]


def _reference(ds: GPTDataset, docs: list[np.ndarray], doc_range: tuple[int, int]) -> np.ndarray:
    """[len(ds), SEQ+1] rows in served order, from the documents (not from the shard)."""
    lo, hi = doc_range
    order = np.asarray(ds.doc_index, dtype=np.int64)
    per_epoch = hi - lo
    assert len(order) == ds.num_epochs * per_epoch
    for e in range(ds.num_epochs):  # each epoch is a permutation of the split's documents
        assert sorted(order[e * per_epoch:(e + 1) * per_epoch].tolist()) == list(range(lo, hi))
    stream = np.concatenate([docs[d] for d in order])
    n = (len(stream) - 1) // SEQ  # every full window of SEQ+1 tokens
    windows = np.stack([stream[j * SEQ: j * SEQ + SEQ + 1] for j in range(n)])
    shuffle = np.asarray(ds.shuffle_index, dtype=np.int64)
    assert sorted(shuffle.tolist()) == list(range(n))  # every window is served exactly once
    return windows[shuffle]


@pytest.mark.parametrize("doc_range,num_samples", [
    ((0, len(LENGTHS)), None),  # one epoch
    ((3, len(LENGTHS) - 2), None),  # a split in the middle of the shard
    ((0, len(LENGTHS)), 100),  # several epochs
    ((5, 9), 40),  # a few documents, many epochs
    ((5, 9), None),  # 48 tokens, a multiple of seq_len: 5 windows (the 6th would need a 49th token)
    ((5, 9), 6),  # so 6 samples need a second epoch
])
def test_every_window_matches_the_reference(tmp_path, doc_range, num_samples):
    docs = _docs()
    shard = IndexedDataset(write_shard(tmp_path / "s", docs, vocab=500))
    ds = GPTDataset(shard, doc_range, SEQ, seed=11, num_samples=num_samples)
    ref = _reference(ds, docs, doc_range)
    tokens = sum(len(docs[d]) for d in range(*doc_range))
    assert len(ds) == (ds.num_epochs * tokens - 1) // SEQ
    if num_samples is None:
        assert ds.num_epochs == 1
    else:  # the fewest epochs that hold the requested samples
        assert len(ds) >= num_samples > ((ds.num_epochs - 1) * tokens - 1) // SEQ and ds.num_epochs > 1
    got = ds.get_batch(np.arange(len(ds)))
    assert got.shape == (len(ds), SEQ + 1) and got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)
    for i in range(len(ds)):  # the single-sample path as well
        np.testing.assert_array_equal(ds[i], ref[i], err_msg=f"sample {i}")
