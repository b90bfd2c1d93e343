"""Data: tokenizers, the indexed (.bin/.idx) shards, datasets and the per-DP-rank batch stream."""

from megalite.data.datasets import BlendedDataset, GPTDataset, build_pretrain_datasets  # noqa: F401
from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter, merge_shards  # noqa: F401
from megalite.data.tokenizer import build_tokenizer  # noqa: F401
