import json
import random

import numpy as np
import pytest

from megalite.data.indexed import IndexedDatasetWriter


def random_docs(rng: np.random.Generator, n: int, vocab: int = 60000, max_len: int = 80) -> list[np.ndarray]:
    """Random documents, including empty ones and an occasional very long one."""
    docs = [rng.integers(0, vocab, int(rng.integers(0, max_len))) for _ in range(n)]
    for i in rng.choice(n, size=max(1, n // 50), replace=False):
        docs[int(i)] = np.zeros(0, dtype=np.int64) if rng.random() < 0.5 else rng.integers(0, vocab, 5000)
    return docs


def write_shard(prefix, docs, vocab: int = 60000) -> str:
    with IndexedDatasetWriter(prefix, vocab_size=vocab) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


@pytest.fixture
def jsonl(tmp_path):
    """A small JSONL corpus of word salad, one document per line."""
    rnd = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "über", "naïve", "42"]
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(400):
            text = " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 120)))
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return path
