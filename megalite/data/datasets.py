"""Pretraining datasets: documents packed into windows of seq_len+1 tokens.

This first version tokenizes the embedded corpus in memory; the indexed-shard GPT dataset replaces
it behind the same `build_pretrain_datasets` signature.
"""

from __future__ import annotations

import numpy as np

from megalite.config import ConfigError, DataConfig
from megalite.data.corpus import stdlib_documents
from megalite.data.tokenizer import Tokenizer


class PackedWindows:
    """Samples are consecutive windows of seq_len+1 tokens sharing their boundary token."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        n = (len(tokens) - 1) // seq_len
        if n < 1:
            raise ConfigError(f"the corpus has {len(tokens)} tokens, fewer than one sample of seq_len+1")
        self.order = np.random.default_rng(seed).permutation(n)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(self.order[i]) * self.seq_len
        return self.tokens[s : s + self.seq_len + 1].astype(np.int64)


def _split_docs(n_docs: int, split: str) -> list[tuple[int, int]]:
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"data.split '{split}' must be comma-separated numbers") from None
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    total = sum(weights)
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w / total
        bounds.append(round(acc * n_docs))
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def build_pretrain_datasets(cfg: DataConfig, seq_len: int, seed: int, tokenizer: Tokenizer):
    if cfg.path:
        raise ConfigError("data.path: indexed shards are not readable by this build yet")
    docs = [tokenizer.encode(d) + [tokenizer.eod] for d in stdlib_documents()]
    out = []
    for lo, hi in _split_docs(len(docs), cfg.split):
        flat = np.fromiter((t for d in docs[lo:hi] for t in d), dtype=np.int32)
        out.append(PackedWindows(flat, seq_len, seed) if len(flat) > seq_len else None)
    return tuple(out)
