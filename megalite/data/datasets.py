"""Pretraining datasets over indexed shards: GPT packing, blending and curriculum schedules.

A `GPTDataset` packs the documents of one split (a contiguous range of documents of a shard) into
windows of seq_len+1 tokens; consecutive windows share their boundary token, so every token of an
epoch is an input exactly once. Document order is shuffled per epoch and the sample order once,
both from the seed. The three index arrays are cached on disk under a hash of everything that
determines them, built once (see cache.py) and mapped on every later use, so a resumed run reads
the same sample at the same position: resumption is just "start at consumed sample k".

A `BlendedDataset` mixes datasets by weight with the smallest possible error at every prefix of
the stream; a curriculum is a blend whose weights change at given steps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megalite.config import ConfigError, DataConfig
from megalite.data import indexed
from megalite.data.cache import build_once, params_hash
from megalite.data.indexed import IndexedDataset, IndexedDatasetError
from megalite.data.tokenizer import Tokenizer, append_eod, tokenizer_key

INDEX_VERSION = 1
SPLITS = ("train", "valid", "test")


def _C():
    from megalite import _C as ext

    return ext


def split_ranges(num_docs: int, split: str) -> list[tuple[int, int]]:
    """Document ranges for train/valid/test from weights like "969,30,1" (or "98/2/0")."""
    try:
        weights = [float(w) for w in str(split).replace("/", ",").split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"data.split '{split}' must be comma-separated numbers") from None
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    total = sum(weights)
    if total <= 0 or min(weights) < 0:
        raise ConfigError(f"data.split '{split}' needs non-negative weights with a positive sum")
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w / total
        bounds.append(round(acc * num_docs))
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


MANY_EPOCHS = 100
_warned: set[tuple[str, str]] = set()


def _warn_many_epochs(prefix: str, split: str, epochs: int, tokens: int, samples: int) -> None:
    """Once per shard and split (on rank 0): a run that repeats a tiny shard this often is almost
    always a mistake, and its sample index grows with the epoch count."""
    if epochs <= MANY_EPOCHS or (prefix, split) in _warned or os.environ.get("RANK", "0") != "0":
        return
    _warned.add((prefix, split))
    print(f"warning: {prefix} ({split}): {samples:,} samples need {epochs:,} epochs of its {tokens:,} tokens; "
          f"use more data or fewer train.train_steps", flush=True)


class GPTDataset(Sequence):
    """Samples of seq_len+1 tokens from the sequences of documents [doc_begin, doc_end) of a shard."""

    def __init__(self, shard: IndexedDataset, doc_range: tuple[int, int], seq_len: int, seed: int,
                 num_samples: int | None = None, cache_dir: str | os.PathLike | None = None,
                 name: str = "train") -> None:
        self.shard, self.seq_len, self.name = shard, seq_len, name
        lo, hi = doc_range
        seq_lo, seq_hi = int(shard.doc_idx[lo]), int(shard.doc_idx[hi])
        self.units = np.arange(seq_lo, seq_hi, dtype=np.int64)
        self.tokens_per_epoch = self.epoch_tokens(shard, doc_range)
        if self.tokens_per_epoch - 1 < seq_len:
            raise ValueError(f"{shard.prefix} ({name}): {self.tokens_per_epoch} tokens, fewer than one "
                             f"sample of {seq_len + 1}")
        per_epoch = self.samples_per_epoch(self.tokens_per_epoch, seq_len)
        want = per_epoch if num_samples is None else max(int(num_samples), 1)
        # The fewest epochs whose stream holds `want` windows.
        self.num_epochs = max(1, -(-(want * seq_len + 1) // self.tokens_per_epoch))  # ceil
        while (self.num_epochs * self.tokens_per_epoch - 1) // seq_len < want:
            self.num_epochs += 1
        _warn_many_epochs(shard.prefix, name, self.num_epochs, self.tokens_per_epoch, want)
        stat = os.stat(indexed.index_file(shard.prefix))
        self.params = {
            "version": INDEX_VERSION, "shard": os.path.abspath(shard.prefix), "idx_bytes": stat.st_size,
            "idx_mtime_ns": stat.st_mtime_ns, "docs": [lo, hi], "seq_len": seq_len, "seed": seed,
            "epochs": self.num_epochs, "split": name,
        }
        if cache_dir:
            key = f"{Path(shard.prefix).name}-{name}-{params_hash(self.params)}"
            d = build_once(Path(cache_dir) / "index" / key, self._build_to, "GPT dataset index")
            self.doc_index = np.load(d / "doc_index.npy", mmap_mode="r")
            self.sample_index = np.load(d / "sample_index.npy", mmap_mode="r")
            self.shuffle_index = np.load(d / "shuffle_index.npy", mmap_mode="r")
        else:
            self.doc_index, self.sample_index, self.shuffle_index = self._build()
        # Plain ndarray views: np.memmap's Python-level indexing costs more than a whole gather.
        self.doc_index, self.sample_index, self.shuffle_index = (
            a.view(np.ndarray) for a in (self.doc_index, self.sample_index, self.shuffle_index))
        self._sizes = np.ascontiguousarray(shard.sizes)
        self._gather = _C().gather_samples

    @staticmethod
    def epoch_tokens(shard: IndexedDataset, doc_range: tuple[int, int]) -> int:
        """Tokens in one epoch of documents [doc_begin, doc_end) of `shard`."""
        seq_lo, seq_hi = int(shard.doc_idx[doc_range[0]]), int(shard.doc_idx[doc_range[1]])
        return int(np.asarray(shard.sizes[seq_lo:seq_hi], dtype=np.int64).sum())

    @staticmethod
    def samples_per_epoch(tokens_per_epoch: int, seq_len: int) -> int:
        """The length of a one-epoch dataset: windows of seq_len+1 sharing their boundary token."""
        return (tokens_per_epoch - 1) // seq_len

    def _build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ext = _C()
        # Each split gets its own stream of the seed, so train and valid orders are independent.
        split_no = SPLITS.index(self.name) if self.name in SPLITS else len(SPLITS)
        seed = int(self.params["seed"]) * 1_000_003 + split_no
        doc_index = ext.build_document_index(self.units, self.num_epochs, seed)
        sample_index = ext.build_sample_idx(np.ascontiguousarray(self.shard.sizes), doc_index, self.seq_len,
                                            self.num_epochs, self.tokens_per_epoch, True, 1, 1)
        shuffle_index = ext.build_shuffle_index(len(sample_index) - 1, seed)
        return doc_index, sample_index, shuffle_index

    def _build_to(self, tmp: Path) -> None:
        tmp.mkdir(parents=True)
        doc_index, sample_index, shuffle_index = self._build()
        np.save(tmp / "doc_index.npy", doc_index)
        np.save(tmp / "sample_index.npy", sample_index)
        np.save(tmp / "shuffle_index.npy", shuffle_index)
        (tmp / "description.json").write_text(json.dumps(self.params, indent=1))

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """[len(indices), seq_len+1] int64 rows, gathered in C++ straight from the mapped shard."""
        return self._gather(self.shard.tokens, self.shard.pointers, self._sizes, self.doc_index, self.sample_index,
                            np.asarray(indices, dtype=np.int64), self.seq_len, 1, self.shuffle_index)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} outside a dataset of {n}")
        return self.get_batch((i % n,))[0]


class BlendedDataset(Sequence):
    """Sample k comes from dataset `which[k]`, as that dataset's sample `within[k]`."""

    def __init__(self, datasets: Sequence[Sequence[np.ndarray]], which: np.ndarray, within: np.ndarray,
                 names: Sequence[str] = ()) -> None:
        self.datasets, self.which, self.within, self.names = list(datasets), which, within, list(names)

    def __len__(self) -> int:
        return len(self.which)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        which, within = self.which[idx], self.within[idx]
        rows: np.ndarray | None = None
        for d in np.unique(which):
            sel = np.nonzero(which == d)[0]
            part = get_rows(self.datasets[int(d)], within[sel])
            if rows is None:
                rows = np.empty((len(idx), part.shape[1]), dtype=np.int64)
            rows[sel] = part
        assert rows is not None
        return rows

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.get_batch([i])[0]


def get_rows(ds: Sequence[np.ndarray], indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """[len(indices), seq_len+1] int64 rows of `ds`; indices past its end wrap into further epochs.
    Uses the dataset's batched `get_batch` where it has one, else stacks its items."""
    n = len(ds)
    if hasattr(ds, "get_batch"):
        return ds.get_batch(np.asarray(indices) % n)  # type: ignore[attr-defined]
    return np.stack([np.asarray(ds[int(i) % n], dtype=np.int64) for i in indices])


def blend(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(which dataset, index within it) for `size` samples mixed by `weights`."""
    return _C().build_blending_indices(np.asarray(weights, dtype=np.float64), int(size))


# ---------------------------------------------------------------------------------------------
# Blend specifications: a prefix, a list of prefixes, {prefix: weight}, or a YAML file of either.


def _weight(v: Any, where: str) -> float:
    if isinstance(v, str) and v.strip().endswith("%"):
        v = v.strip()[:-1]
    try:
        w = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: blend weight {v!r} is not a number") from None
    if w < 0:
        raise ConfigError(f"{where}: blend weight {v!r} is negative")
    return w


def _is_number(x: str) -> bool:
    try:
        float(x.rstrip("%"))
    except ValueError:
        return False
    return True


def parse_blend(spec: Any, where: str = "data.path") -> list[tuple[str, float | None]]:
    """[(prefix, weight or None)]; None weights mean "in proportion to the shard's tokens"."""
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
        p = Path(spec)
        if not p.is_file():
            raise ConfigError(f"{where}: blend file not found: {spec}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            raise ConfigError(f"{spec}: cannot parse YAML") from None
        if isinstance(data, dict) and "blend" in data:
            data = data["blend"]
        entries = parse_blend(data, str(p))
        base = p.parent
        return [(e if os.path.isabs(e) or indexed.exists(e) else str(base / e), w) for e, w in entries]
    if isinstance(spec, str) and len(spec.split()) > 1:
        spec = spec.split()  # Megatron's --data-path: "0.3 web 0.7 code" or "web code"
    if isinstance(spec, str):
        return [(spec, 1.0)]
    if isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
        if len(items) % 2 == 0 and items and all(_is_number(w) for w in items[::2]):
            return [(p, _weight(w, where)) for w, p in zip(items[::2], items[1::2])]
        return [(s, None) for s in items]
    if isinstance(spec, dict):
        out = []
        for k, v in spec.items():
            # Either {prefix: weight} or {name: {path|prefix: P, weight: W}}.
            if isinstance(v, dict):
                prefix = v.get("path") or v.get("prefix")
                if not prefix:
                    raise ConfigError(f"{where}: blend entry '{k}' needs a 'path'")
                out.append((str(prefix), _weight(v.get("weight", 1.0), f"{where}.{k}")))
            else:
                out.append((str(k), _weight(v, f"{where}.{k}")))
        return out
    raise ConfigError(f"{where}: expected a shard prefix, a list of them or a {{prefix: weight}} mapping")


def _open_shard(prefix: str, where: str) -> IndexedDataset:
    try:
        return IndexedDataset(prefix)
    except IndexedDatasetError as e:
        raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The default corpus: the Python standard library, tokenized once into cache_dir.


def default_corpus_prefix(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    from megalite.data.corpus import stdlib_documents

    key = tokenizer_key(cfg.tokenizer_type, cfg.tokenizer_model)
    target = Path(cfg.cache_dir) / "corpus" / key

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        with indexed.IndexedDatasetWriter(tmp / "stdlib_text_document", vocab_size=tokenizer.vocab_size) as w:
            batch: list[str] = []
            for doc in stdlib_documents():
                batch.append(doc)
                if len(batch) == 64:
                    _write_batch(w, tokenizer, batch)
                    batch = []
            if batch:
                _write_batch(w, tokenizer, batch)

    build_once(target, build, "default corpus shards")
    return str(target / "stdlib_text_document")


def _write_batch(w: indexed.IndexedDatasetWriter, tokenizer: Tokenizer, texts: list[str]) -> None:
    w.add_documents(*append_eod(*tokenizer.encode_batch_flat(texts, w.dtype), tokenizer.eod))


# ---------------------------------------------------------------------------------------------
# The trainer's entry point.


def build_pretrain_datasets(cfg: DataConfig, seq_len: int, seed: int, tokenizer: Tokenizer,
                            num_samples: dict[str, int | None] | int | None = None,
                            global_batch_size: int | None = None):
    """(train, valid, test) sequences of int64 windows of seq_len+1 tokens; a split may be None.

    `num_samples`: samples wanted per split ({"train": n, ...} or an int for train); by default one
    epoch. `global_batch_size` converts a curriculum's steps into samples (required with one). Call it on every rank: one rank per file system builds the indices, the others
    wait for them and map them.
    """
    try:
        return _build_pretrain_datasets(cfg, seq_len, seed, tokenizer, num_samples, global_batch_size)
    except (OSError, TimeoutError) as e:
        # Disk problems in the cache (read-only, full, a builder that never finished) are config problems.
        raise ConfigError(f"data.cache_dir '{cfg.cache_dir}': {e}") from None


def _build_pretrain_datasets(cfg: DataConfig, seq_len: int, seed: int, tokenizer: Tokenizer,
                             num_samples: dict[str, int | None] | int | None,
                             global_batch_size: int | None):
    if isinstance(num_samples, dict):
        wanted = {s: num_samples.get(s) for s in SPLITS}
    else:
        wanted = {"train": num_samples, "valid": None, "test": None}
    cache = cfg.cache_dir or None
    if cfg.path in ("", None) and not cfg.curriculum:
        entries: list[tuple[str, float | None]] = [(default_corpus_prefix(cfg, tokenizer), 1.0)]
    elif cfg.path in ("", None):
        entries = []
    else:
        entries = parse_blend(cfg.path)

    stages = _parse_curriculum(cfg.curriculum, global_batch_size)
    prefixes = list(dict.fromkeys([p for p, _ in entries] + [p for _, b in stages for p, _ in b]))
    shards = {p: _open_shard(p, "data.path") for p in prefixes}
    for p, s in shards.items():
        # The size guard first: a full max() over a huge mapped shard would read all of it.
        if 0 < s.num_tokens < 50_000_000 and s.tokens.max() >= tokenizer.vocab_size:
            raise ConfigError(f"data.path: {p} holds token ids >= the tokenizer's vocab size {tokenizer.vocab_size}")

    out = []
    for si, split in enumerate(SPLITS):
        ranges = {p: split_ranges(s.num_documents, cfg.split)[si] for p, s in shards.items()}

        def make(p: str, n: int | None, split: str = split, ranges: dict = ranges) -> GPTDataset | None:
            lo, hi = ranges[p]
            if hi <= lo:
                return None
            try:
                return GPTDataset(shards[p], (lo, hi), seq_len, seed, n, cache, split)
            except ValueError:
                return None  # too few tokens in this split for one sample

        def natural(p: str, ranges: dict = ranges) -> tuple[int, int] | None:
            """(tokens, samples) of one epoch of p's split, from the shard's sizes alone; None
            exactly where make() gives None (an empty split, or too few tokens for one sample)."""
            lo, hi = ranges[p]
            if hi <= lo:
                return None
            tokens = GPTDataset.epoch_tokens(shards[p], (lo, hi))
            return None if tokens - 1 < seq_len else (tokens, GPTDataset.samples_per_epoch(tokens, seq_len))

        if split == "train" and stages:
            out.append(_curriculum_dataset(stages, entries, make, natural, wanted["train"]))
            continue
        use = entries or stages[-1][1]
        if len(use) == 1:
            out.append(make(use[0][0], wanted[split]))
            continue
        out.append(_blended_dataset(use, make, natural, wanted[split]))
    return tuple(out)


# make(p, n) for n within one epoch builds the same (one-epoch) index as make(p, None), so the
# blends below size their components from natural() and build each dataset once, for its count.


def _blended_dataset(entries, make, natural, size: int | None) -> BlendedDataset | None:
    # Natural sizes (one epoch each) decide the default total and token-proportional weights.
    sizes = {p: natural(p) for p, _ in entries}
    live = [(p, w) for p, w in entries if sizes[p] is not None]
    if not live:
        return None
    weights = [float(w) if w is not None else float(sizes[p][0]) for p, w in live]
    if sum(weights) <= 0:
        raise ConfigError("data.path: blend weights sum to zero")
    total = int(size) if size is not None else sum(sizes[p][1] for p, _ in live)
    which, within = blend(weights, total)
    counts = np.bincount(which, minlength=len(live))
    datasets = [make(p, int(counts[d])) for d, (p, _) in enumerate(live)]
    return BlendedDataset(datasets, which, within, [p for p, _ in live])


def _parse_curriculum(curriculum: list[Any] | None, gbs: int | None) -> list[tuple[int, list[tuple[str, float]]]]:
    """[(first sample, [(prefix, weight)])] sorted by start."""
    if not curriculum:
        return []
    if gbs is None:
        raise ConfigError("data.curriculum: steps need the global batch size; the caller must pass "
                          "build_pretrain_datasets(..., global_batch_size=train.global_batch_size)")
    stages = []
    for i, st in enumerate(curriculum):
        where = f"data.curriculum[{i}]"
        if not isinstance(st, dict) or "blend" not in st:
            raise ConfigError(f"{where}: expected {{step: N, blend: {{prefix: weight}}}}")
        step = st.get("step", 0)
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"{where}.step: expected a non-negative integer, got {step!r}")
        entries = parse_blend(st["blend"], f"{where}.blend")
        if any(w is None for _, w in entries):
            raise ConfigError(f"{where}.blend: a curriculum stage needs explicit weights")
        stages.append((step * gbs, entries))
    stages.sort(key=lambda s: s[0])
    return stages


def _curriculum_dataset(stages, base_entries, make, natural, size: int | None) -> BlendedDataset | None:
    """One blend per stage, concatenated; each dataset's sample cursor continues across stages."""
    if stages[0][0] > 0:
        if not base_entries:
            raise ConfigError("data.curriculum: the first stage starts after step 0 and data.path is empty")
        stages = [(0, [(p, w if w is not None else 1.0) for p, w in base_entries])] + stages
    prefixes = list(dict.fromkeys(p for _, b in stages for p, _ in b))
    sizes = {p: natural(p) for p in prefixes}
    prefixes = [p for p in prefixes if sizes[p] is not None]
    if not prefixes:
        return None
    total = int(size) if size is not None else max(stages[-1][0] + 1, sum(sizes[p][1] for p in prefixes))
    which_parts, within_parts = [], []
    cursor = np.zeros(len(prefixes), dtype=np.int64)
    for k, (start, entries) in enumerate(stages):
        end = stages[k + 1][0] if k + 1 < len(stages) else total
        end = min(end, total)
        if end <= start:
            continue
        wmap = dict(entries)
        weights = [float(wmap.get(p, 0.0)) for p in prefixes]
        if sum(weights) <= 0:
            raise ConfigError(f"data.curriculum: the stage at sample {start} has no usable dataset")
        which, within = blend(weights, end - start)
        within = within + cursor[which]
        cursor += np.bincount(which, minlength=len(prefixes))
        which_parts.append(which)
        within_parts.append(within)
    which, within = np.concatenate(which_parts), np.concatenate(within_parts)
    datasets = [make(p, int(cursor[d])) for d, p in enumerate(prefixes)]
    return BlendedDataset(datasets, which, within, prefixes)
