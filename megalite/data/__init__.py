"""Data: tokenizers, the indexed (.bin/.idx) shards, datasets and the per-DP-rank batch stream."""

from megalite.data.datasets import build_pretrain_datasets  # noqa: F401
