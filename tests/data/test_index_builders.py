"""Sample-index, document-index, shuffle and blending invariants on random document sizes."""

import numpy as np
import pytest

from megalite import _C


def _windows(sizes, doc_index, sample_index, extra=1):
    """Expand each sample to the global stream positions it covers."""
    starts = np.concatenate([[0], np.cumsum(sizes[doc_index], dtype=np.int64)])
    rows = []
    for s in range(len(sample_index) - 1):
        (d0, o0), (d1, o1) = sample_index[s], sample_index[s + 1]
        rows.append((starts[d0] + o0, starts[d1] + o1 + extra))
    return rows


@pytest.mark.parametrize("trial", range(12))
def test_sample_index_invariants(trial):
    rng = np.random.default_rng(trial)
    n_docs = int(rng.integers(1, 300))
    sizes = rng.integers(0, 60, n_docs).astype(np.int32)
    sizes[rng.random(n_docs) < 0.1] = 0  # empty documents
    if trial % 3 == 0:
        sizes[int(rng.integers(n_docs))] = 20_000  # one very large document
    sizes[0] = max(sizes[0], 2)
    seq_len = int(rng.integers(1, 200))
    epochs = int(rng.integers(1, 4))
    doc_index = _C.build_document_index(np.arange(n_docs), epochs, trial)
    tokens_per_epoch = int(sizes.sum())
    sample_index = _C.build_sample_idx(sizes, doc_index, seq_len, epochs, tokens_per_epoch, True, 1, 1 + trial % 3)
    num_samples = (epochs * tokens_per_epoch - 1) // seq_len
    assert sample_index.shape == (num_samples + 1, 2)
    spans = _windows(sizes, doc_index, sample_index)
    for i, (a, b) in enumerate(spans):
        assert b - a == seq_len + 1  # windows are seq_len+1 tokens
        assert a == i * seq_len  # consecutive samples share exactly the boundary token
    # Each epoch is a permutation of the documents, and its tokens are inputs exactly once.
    for e in range(epochs):
        assert sorted(doc_index[e * n_docs : (e + 1) * n_docs]) == list(range(n_docs))
    covered = np.zeros(epochs * tokens_per_epoch, dtype=np.int64)
    for a, b in spans:
        covered[a : b - 1] += 1  # the inputs: all but the last token of each window
    assert covered.max() <= 1 and covered[: num_samples * seq_len].min() == 1
    # Offsets always fall inside their document (the layout Megatron's reader expects).
    docs = doc_index[sample_index[1:, 0]]
    assert np.all(sample_index[1:, 1] < np.maximum(sizes[docs], 1))


def test_sample_index_threads_agree():
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 3000, 200_000).astype(np.int32)
    doc_index = _C.build_document_index(np.arange(len(sizes)), 2, 1)
    a = _C.build_sample_idx(sizes, doc_index, 4096, 2, int(sizes.sum()), True, 1, 1)
    b = _C.build_sample_idx(sizes, doc_index, 4096, 2, int(sizes.sum()), True, 1, 3)
    assert a.dtype == np.int32 and np.array_equal(a, b)


def test_shuffle_is_a_seeded_permutation():
    a, b, c = (_C.build_shuffle_index(10_000, s) for s in (1, 1, 2))
    assert a.dtype == np.int32 and np.array_equal(np.sort(a), np.arange(10_000))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("trial", range(6))
def test_blending_error_bound(trial):
    rng = np.random.default_rng(100 + trial)
    k = int(rng.integers(1, 8))
    weights = rng.random(k) + (0.001 if trial % 2 else 0.2)
    size = 5000
    which, within = _C.build_blending_indices(weights, size)
    w = weights / weights.sum()
    counts = np.zeros(k, dtype=np.int64)
    worst = 0.0
    for n, d in enumerate(which, start=1):
        assert within[n - 1] == counts[d]  # each dataset's samples are taken in order
        counts[d] += 1
        worst = max(worst, float(np.abs(counts - w * n).max()))
    # The greedy "largest deficit" rule keeps every prefix within one sample of its target.
    assert worst < 1.0 + 1e-9, worst
    assert which.dtype == np.int16 and within.dtype == np.int64


def _reference_walk(sizes, doc_index, seq_len, total, drop_last, extra):
    """A direct, slow statement of the layout: walk the document stream sample by sample."""
    usable = total - extra
    n = usable // seq_len if drop_last else -(-usable // seq_len)
    rows = [(0, 0)]
    d, off = 0, 0
    for _ in range(n):
        need = seq_len + extra  # tokens this window still needs, counting the shared boundary token
        while True:
            avail = int(sizes[doc_index[d]]) - off
            need -= avail
            if need <= 0:
                off += avail + need - extra
                break
            if d == len(doc_index) - 1:  # the stream ran out: a kept partial last window
                off = int(sizes[doc_index[d]]) - extra
                break
            d, off = d + 1, 0
        rows.append((d, off))
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("trial", range(40))
def test_sample_index_matches_reference_walk(trial):
    rng = np.random.default_rng(1000 + trial)
    n_docs = int(rng.integers(1, 40))
    sizes = rng.integers(0, 25, n_docs).astype(np.int32)
    if trial % 4 == 0:
        sizes[int(rng.integers(n_docs))] = 300
    sizes[0] = max(sizes[0], 3)
    epochs = int(rng.integers(1, 3))
    doc_index = _C.build_document_index(np.arange(n_docs), epochs, trial)
    total = epochs * int(sizes.sum())
    for drop_last in (True, False):
        for extra in (0, 1):
            seq_len = int(rng.integers(1, 30))
            if total - extra <= 0:
                continue
            got = _C.build_sample_idx(sizes, doc_index, seq_len, epochs, int(sizes.sum()), drop_last, extra, 1)
            want = _reference_walk(sizes, doc_index, seq_len, total, drop_last, extra)
            np.testing.assert_array_equal(got, want)
