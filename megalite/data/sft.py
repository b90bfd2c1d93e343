"""SFT and preference datasets over chat shards (tokens + uint8 loss mask, see chat.py).

A sample of n tokens fills n-1 row slots: inputs are its tokens but the last, labels its tokens but
the first, and a label counts only where the mask selects it (`loss_on: all` -> mask >= 1, `last`
-> mask == 2; -100 elsewhere). Over-long samples are cut to seq_len+1 tokens or dropped
(`data.overlong`); a sample left without loss tokens is an error unless `data.skip_bad_records`
counts and skips it. Nothing here tokenizes: rows are read from the mapped shards.

SFT rows: with `data.packing`, a seeded best-fit packer puts several samples in each row of seq_len
slots (positions restart and doc_ids change at every sample, so attention never crosses one);
without it, one sample per row. Rows are padded to seq_len either way, so every micro-batch has
the same shape. Preference rows: pair i of a micro-batch of B pairs is row i (chosen) and row B+i
(rejected), each padded to seq_len, never packed; labels cover the final answer only.

The per-sample scan and the packing are built once per file system and cached under
`data.cache_dir` like the pretraining indices; a data error found while building is cached too, so
every rank reports the same one-line error instead of waiting on a builder that failed.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megalite.config import ConfigError, DataConfig
from megalite.data import indexed
from megalite.data.cache import build_once, params_hash
from megalite.data.chat import EARLIER_TURN, LAST_TURN, mask_prefix_of
from megalite.data.datasets import SPLITS, parse_blend, split_ranges
from megalite.data.indexed import IndexedDataset, IndexedDatasetError
from megalite.data.sampler import micro_batch_indices
from megalite.data.tokenizer import Tokenizer

IGNORE_INDEX = -100  # megalite.parallel.cross_entropy's ignore label
INDEX_VERSION = 1
_SCAN_TOKENS = 1 << 24  # mask tokens examined at a time while scanning


# ---------------------------------------------------------------------------------------------
# Shards.


class ChatShard:
    """A token shard and its mask shard, checked to line up sequence for sequence."""

    def __init__(self, prefix: str, mode: str) -> None:
        self.prefix, self.mask_prefix = prefix, mask_prefix_of(prefix)
        try:
            self.tokens = IndexedDataset(prefix)
            self.mask = IndexedDataset(self.mask_prefix)
        except IndexedDatasetError as e:
            raise ConfigError(f"data.path: {e}") from None
        t, m = self.tokens, self.mask
        if m.dtype != np.uint8:
            raise ConfigError(f"data.path: {self.mask_prefix} holds {m.dtype}, not a uint8 loss mask")
        if not (np.array_equal(t.sizes, m.sizes) and np.array_equal(t.doc_idx, m.doc_idx)):
            raise ConfigError(f"data.path: {self.mask_prefix} does not line up with {prefix} "
                              "(different sequence sizes or documents)")
        per = np.diff(np.asarray(t.doc_idx))
        want = 2 if mode == "preference" else 1
        if per.size and not np.all(per == want):
            other = "chat" if mode == "preference" else "preference"
            raise ConfigError(f"data.path: {prefix} has documents of {int(per.max())} sequences; a {mode} shard has "
                              f"{want} (is this a {other} shard? see tools/preprocess_data.py --mode)")
        self.mode = mode

    @property
    def num_units(self) -> int:
        """Samples (chat) or pairs (preference)."""
        return self.tokens.num_documents

    def ident(self) -> dict:
        """What the cached index depends on: both files' identity."""
        out = {}
        for name, p in (("tokens", self.prefix), ("mask", self.mask_prefix)):
            st = os.stat(indexed.index_file(p))
            out[name] = [os.path.abspath(p), st.st_size, st.st_mtime_ns]
        return out

    def sample(self, seq: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens.get(seq, 0, length), self.mask.get(seq, 0, length)


def resolve_prefixes(path, mode: str) -> list[str]:
    """data.path -> token shard prefixes: `P_<mode>_document`, or the `P` it was written with."""
    if path in ("", None):
        raise ConfigError(f"data.path: {mode} training needs shards from tools/preprocess_data.py --mode {mode}")
    entries = parse_blend(path)
    if any(w not in (None, 1.0) for _, w in entries):
        raise ConfigError(f"data.path: weighted blends are not supported for {mode} data; list the shards instead")
    out = []
    for p, _ in entries:
        for cand in (p, f"{p}_{mode}_document"):
            if indexed.exists(cand):
                out.append(cand)
                break
        else:
            raise ConfigError(f"data.path: no {mode} shard at {p} (expected {p}_{mode}_document.bin/.idx and its "
                              f"_mask from tools/preprocess_data.py --mode {mode})")
    return out


# ---------------------------------------------------------------------------------------------
# Scanning: per sequence, its length and where its loss tokens are.


def scan_loss(mask: IndexedDataset, lo: int, hi: int, threshold: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """For sequences [lo, hi): (loss tokens in all of it, loss tokens within its first `keep` tokens).
    A token counts when its mask is >= threshold and it is not the sequence's first token."""
    sizes = np.asarray(mask.sizes[lo:hi], dtype=np.int64)
    starts = np.asarray(mask.pointers[lo:hi], dtype=np.int64) // mask.dtype.itemsize
    total, within = np.zeros(hi - lo, np.int64), np.zeros(hi - lo, np.int64)
    a = 0
    while a < hi - lo:
        # Whole sequences, about _SCAN_TOKENS mask tokens at a time (at least one sequence).
        b = max(a + 1, int(np.searchsorted(starts, starts[a] + _SCAN_TOKENS, side="right")))
        b = min(b, hi - lo)
        base, end = int(starts[a]), int(starts[b - 1] + sizes[b - 1])
        sel = mask.tokens[base:end] >= threshold
        s = starts[a:b] - base
        sel[s[sizes[a:b] > 0]] = False
        csum = np.concatenate([[0], np.cumsum(sel, dtype=np.int64)])
        total[a:b] = csum[s + sizes[a:b]] - csum[s]
        within[a:b] = csum[s + np.minimum(sizes[a:b], keep)] - csum[s]
        a = b
    return total, within


@dataclass
class Counts:
    """What became of a split's samples (pairs for preference data)."""

    samples: int = 0  # kept
    skipped: int = 0  # no loss tokens at all (skip_bad_records)
    truncated: int = 0
    dropped: int = 0  # overlong: dropped, or truncated to no loss tokens
    tokens: int = 0  # real (non-padding) slots of the kept samples
    loss_tokens: int = 0
    rows: int = 0
    seq_len: int = 0

    @property
    def efficiency(self) -> float:
        return self.tokens / max(self.rows * self.seq_len, 1)


def _select(shard: ChatShard, seqs_lo: int, seqs_hi: int, per: int, threshold: int, seq_len: int,
            overlong: str, skip_bad: bool, counts: Counts, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(first sequence of each kept unit, kept length of each sequence [units, per]); units are
    `per` consecutive sequences (a sample, or a chosen/rejected pair)."""
    keep = seq_len + 1
    total, within = scan_loss(shard.mask, seqs_lo, seqs_hi, threshold, keep)
    sizes = np.asarray(shard.tokens.sizes[seqs_lo:seqs_hi], dtype=np.int64).reshape(-1, per)
    total, within = total.reshape(-1, per), within.reshape(-1, per)
    first = np.arange(seqs_lo, seqs_hi, per, dtype=np.int64)
    bad = (total == 0).any(axis=1)
    if bad.any() and not skip_bad:
        i = int(np.argmax(bad))
        raise ConfigError(f"{shard.mask_prefix}: {where} {first[i] // per} has no loss tokens under this "
                          "data.loss_on (set data.skip_bad_records=true to skip such samples)")
    over = (sizes > keep).any(axis=1) & ~bad
    if overlong == "drop":
        lost = over
    else:
        lost = over & (within == 0).any(axis=1)
    ok = ~bad & ~lost
    counts.skipped += int(bad.sum())
    counts.dropped += int(lost.sum())
    counts.truncated += int((over & ok).sum())
    counts.samples += int(ok.sum())
    lengths = np.minimum(sizes[ok], keep)
    counts.tokens += int((lengths - 1).sum())
    counts.loss_tokens += int(within[ok].sum())
    return first[ok], lengths.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# The best-fit packer.


def best_fit_pack(lengths: np.ndarray, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups items into rows of total length <= capacity: (row offsets [R+1], items in row order).

    Items go longest first (ties in a seeded random order), each into the open row with the least
    room that still fits it, else a new row; rows are then shuffled with the same seed, so batches
    do not run from long samples to short ones. Deterministic for a given seed.
    """
    n = len(lengths)
    lengths = np.asarray(lengths, dtype=np.int64)
    if n and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"best_fit_pack: lengths must lie in [1, {capacity}]")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    order = order[np.argsort(-lengths[order], kind="stable")]
    room: list[int] = []  # sorted free capacities that have at least one open row
    rows_with: dict[int, list[int]] = {}  # free capacity -> open rows with exactly that room
    row_of = np.empty(n, dtype=np.int64)
    num_rows = 0
    for i, need in zip(order.tolist(), lengths[order].tolist()):
        k = bisect.bisect_left(room, need)
        if k < len(room):
            free = room[k]
            rows = rows_with[free]
            r = rows.pop()
            if not rows:
                del room[k], rows_with[free]
        else:
            r, free = num_rows, capacity
            num_rows += 1
        row_of[i] = r
        left = free - need
        if left > 0:  # a full row takes nothing more (every item is >= 1)
            if left in rows_with:
                rows_with[left].append(r)
            else:
                bisect.insort(room, left)
                rows_with[left] = [r]
    placed = order[np.argsort(row_of[order], kind="stable")]  # by row, in placement order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=num_rows))]).astype(np.int64)
    perm = rng.permutation(num_rows)
    counts = np.diff(offsets)[perm]
    items = np.concatenate([placed[offsets[r] : offsets[r + 1]] for r in perm]) if num_rows else placed
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Datasets.


class _RowsDataset:
    """Rows over kept units; index k past one epoch wraps, in a fresh seeded row order per epoch."""

    def __init__(self, shards: list[ChatShard], arrays: dict[str, np.ndarray], counts: Counts, seq_len: int,
                 seed: int, name: str, pad: int) -> None:
        self.shards, self.counts, self.seq_len, self.name, self.pad = shards, counts, seq_len, name, pad
        self.unit_shard = np.asarray(arrays["unit_shard"])
        self.unit_seq = np.asarray(arrays["unit_seq"])
        self.unit_len = np.asarray(arrays["unit_len"])
        self.row_offsets = np.asarray(arrays["row_offsets"])
        self.row_units = np.asarray(arrays["row_units"])
        self._seed = seed * 1_000_003 + (SPLITS.index(name) if name in SPLITS else len(SPLITS))
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / row slots over one epoch."""
        return self.counts.efficiency

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def _row(self, k: int) -> int:
        n = len(self)
        epoch, r = divmod(int(k), n)
        if epoch == 0:
            return r
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self._seed, epoch]).permutation(n))
        return int(self._perm[1][r])

    def units_of_row(self, k: int) -> np.ndarray:
        r = self._row(k)
        return self.row_units[self.row_offsets[r] : self.row_offsets[r + 1]]

    def _fill(self, tokens, labels, row: int, at: int, u: int, j: int, threshold: int) -> int:
        """Writes sequence j of unit u at slot `at` of `row`; returns its slot count."""
        shard = self.shards[int(self.unit_shard[u])]
        n = int(self.unit_len[u, j])
        t, m = shard.sample(int(self.unit_seq[u]) + j, n)
        t = t.astype(np.int64)
        tokens[row, at : at + n - 1] = t[:-1]
        labels[row, at : at + n - 1] = np.where(m[1:] >= threshold, t[1:], IGNORE_INDEX)
        return n - 1

    def summary(self) -> str:
        c = self.counts
        unit = "pairs" if isinstance(self, PreferenceDataset) else "samples"
        return (f"{self.name}: {c.samples:,} {unit} in {c.rows:,} rows of {c.seq_len} tokens, "
                f"packing efficiency {c.efficiency:.1%} (real tokens / slots), {c.loss_tokens:,} loss tokens; "
                f"truncated {c.truncated:,}, dropped (overlong) {c.dropped:,}, skipped (no loss tokens) {c.skipped:,}")


class SFTDataset(_RowsDataset):
    """Rows of seq_len slots holding one (packing off) or several (best-fit packed) samples."""

    def __init__(self, *args, threshold: int, packing: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threshold, self.packing = threshold, packing

    def get_batch(self, indices: Sequence[int]) -> dict:
        """Host tensors for rows `indices`: tokens, labels, position_ids, doc_ids ([b, seq_len]
        int64, or None when no row holds two samples), num_loss_tokens, num_samples."""
        b, s = len(indices), self.seq_len
        tokens = np.full((b, s), self.pad, dtype=np.int64)
        labels = np.full((b, s), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((b, s), dtype=np.int64)
        docs = np.zeros((b, s), dtype=np.int64)
        multi, num_samples = False, 0
        for row, k in enumerate(indices):
            units = self.units_of_row(k)
            at = 0
            for d, u in enumerate(units.tolist()):
                n = self._fill(tokens, labels, row, at, u, 0, self.threshold)
                positions[row, at : at + n] = np.arange(n)
                docs[row, at : at + n] = d
                at += n
            # Padding is a document of its own, positions counting from 0 again.
            positions[row, at:] = np.arange(s - at)
            docs[row, at:] = len(units)
            multi |= len(units) > 1
            num_samples += len(units)
        out = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
               "position_ids": None, "doc_ids": None,
               "num_loss_tokens": int((labels != IGNORE_INDEX).sum()), "num_samples": num_samples}
        if multi:  # with one sample per row, plain causal attention and 0.. positions are already right
            out["position_ids"], out["doc_ids"] = torch.from_numpy(positions), torch.from_numpy(docs)
        return out


class PreferenceDataset(_RowsDataset):
    """Pairs; a batch of B pairs is 2B rows: chosen rows 0..B-1, then rejected rows B..2B-1."""

    def get_batch(self, indices: Sequence[int]) -> dict:
        """Host tensors: tokens, labels [2B, seq_len] (prompt and padding -100), position_ids and
        doc_ids None, num_loss_tokens, pair_index [2B] (row -> pair in the batch), is_chosen [2B]
        bool, pair_ids [B] (the pair's index in this dataset, stable across epochs)."""
        b, s = len(indices), self.seq_len
        tokens = np.full((2 * b, s), self.pad, dtype=np.int64)
        labels = np.full((2 * b, s), IGNORE_INDEX, dtype=np.int64)
        pair_ids = np.empty(b, dtype=np.int64)
        for i, k in enumerate(indices):
            (u,) = self.units_of_row(k).tolist()
            pair_ids[i] = u
            for j in (0, 1):
                self._fill(tokens, labels, i + j * b, 0, u, j, LAST_TURN)
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels), "position_ids": None,
                "doc_ids": None, "num_loss_tokens": int((labels != IGNORE_INDEX).sum()),
                "pair_index": torch.arange(2 * b) % b, "is_chosen": torch.arange(2 * b) < b,
                "pair_ids": torch.from_numpy(pair_ids)}


# ---------------------------------------------------------------------------------------------
# Building a split (cached).


def _build_arrays(shards: list[ChatShard], ranges: list[tuple[int, int]], mode: str, seq_len: int, seed: int,
                  threshold: int, overlong: str, skip_bad: bool, packing: bool) -> tuple[dict, Counts]:
    per = 2 if mode == "preference" else 1
    counts = Counts(seq_len=seq_len)
    shard_ids, seqs, lens = [], [], []
    for i, (shard, (lo, hi)) in enumerate(zip(shards, ranges)):
        if hi <= lo:
            continue
        first, length = _select(shard, lo * per, hi * per, per, threshold, seq_len, overlong, skip_bad, counts,
                                "pair" if per == 2 else "sample")
        shard_ids.append(np.full(len(first), i, dtype=np.int32))
        seqs.append(first)
        lens.append(length)
    unit_shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
    unit_seq = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    unit_len = np.concatenate(lens) if lens else np.zeros((0, per), np.int32)
    n = len(unit_seq)
    if packing and per == 1:
        offsets, items = best_fit_pack(unit_len[:, 0] - 1, seq_len, seed)
    else:
        offsets, items = np.arange(n + 1, dtype=np.int64), np.random.default_rng(seed).permutation(n)
    counts.rows = (len(offsets) - 1) * per  # a pair fills two rows
    arrays = {"unit_shard": unit_shard, "unit_seq": unit_seq, "unit_len": unit_len, "row_offsets": offsets,
              "row_units": items.astype(np.int64)}
    return arrays, counts


def _cached(target: Path | None, build: Callable[[], tuple[dict, Counts]]) -> tuple[dict, Counts]:
    if target is None:
        return build()

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        try:
            arrays, counts = build()
        except ConfigError as e:  # cached, so every rank waiting on this entry reports it too
            (tmp / "error.txt").write_text(str(e))
            return
        for k, v in arrays.items():
            np.save(tmp / f"{k}.npy", v)
        (tmp / "counts.json").write_text(json.dumps(asdict(counts)))

    d = build_once(target, write, "SFT data index")
    if (d / "error.txt").exists():
        raise ConfigError((d / "error.txt").read_text())
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in d.glob("*.npy")}
    return arrays, Counts(**json.loads((d / "counts.json").read_text()))


def _build(cfg: DataConfig, mode: str, seq_len: int, seed: int, tokenizer: Tokenizer | None,
           log: Callable[[str], None] | None) -> tuple:
    if cfg.loss_on not in ("all", "last"):
        raise ConfigError(f"data.loss_on '{cfg.loss_on}': expected all | last")
    if cfg.overlong not in ("truncate", "drop"):
        raise ConfigError(f"data.overlong '{cfg.overlong}': expected truncate | drop")
    if seq_len < 1:
        raise ConfigError(f"train.seq_len {seq_len}: must be positive")
    shards = [ChatShard(p, mode) for p in resolve_prefixes(cfg.path, mode)]
    if tokenizer is not None:
        for sh in shards:
            t = sh.tokens
            if 0 < t.num_tokens < 50_000_000 and int(t.tokens.max()) >= tokenizer.vocab_size:
                raise ConfigError(f"data.path: {sh.prefix} holds token ids >= the tokenizer's vocab size "
                                  f"{tokenizer.vocab_size} (tokenized with another tokenizer?)")
    threshold = LAST_TURN if mode == "preference" or cfg.loss_on == "last" else EARLIER_TURN
    packing = bool(cfg.packing) and mode == "chat"
    pad = tokenizer.pad if tokenizer is not None else 0
    out = []
    for si, split in enumerate(SPLITS[:2]):
        ranges = [split_ranges(sh.num_units, cfg.split)[si] for sh in shards]
        if all(hi <= lo for lo, hi in ranges):
            out.append(None)
            continue
        split_seed = seed * 1_000_003 + si
        params = {"version": INDEX_VERSION, "mode": mode, "shards": [sh.ident() for sh in shards], "ranges": ranges,
                  "seq_len": seq_len, "seed": seed, "split": split, "threshold": threshold,
                  "overlong": cfg.overlong, "skip_bad_records": bool(cfg.skip_bad_records), "packing": packing}
        target = None
        if cfg.cache_dir:
            target = Path(cfg.cache_dir) / "sft_index" / f"{Path(shards[0].prefix).name}-{split}-{params_hash(params)}"
        arrays, counts = _cached(target, lambda ranges=ranges, split_seed=split_seed: _build_arrays(
            shards, ranges, mode, seq_len, split_seed, threshold, cfg.overlong, bool(cfg.skip_bad_records), packing))
        if counts.samples == 0:
            if split == "train":
                raise ConfigError(f"data.path: no usable {mode} samples in the train split of "
                                  f"{', '.join(sh.prefix for sh in shards)} ({counts.dropped} dropped as overlong, "
                                  f"{counts.skipped} without loss tokens)")
            out.append(None)
            continue
        common = (shards, arrays, counts, seq_len, seed, split, pad)
        ds = (SFTDataset(*common, threshold=threshold, packing=packing) if mode == "chat"
              else PreferenceDataset(*common))
        if log is not None:
            log(ds.summary())
        out.append(ds)
    return tuple(out)


def _guard(fn):
    """Disk problems in the cache (read-only, full, a builder that never finished) are config problems."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"data.cache_dir: {e}") from None

    return wrapped


# ---------------------------------------------------------------------------------------------
# Entry points for the SFT and preference stages.


@_guard
def build_sft_datasets(cfg: DataConfig, seq_len: int, seed: int, tokenizer: Tokenizer | None = None,
                       log: Callable[[str], None] | None = print) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, valid) SFT datasets from the chat shards at cfg.path (`P_chat_document` or `P`), split by
    cfg.split; valid is None when its split is empty. Call on every rank (one builds the cache)."""
    return _build(cfg, "chat", seq_len, seed, tokenizer, log)


@_guard
def build_preference_datasets(cfg: DataConfig, seq_len: int, seed: int, tokenizer: Tokenizer | None = None,
                              log: Callable[[str], None] | None = print
                              ) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """(train, valid) preference datasets from `P_preference_document` shards; one item is a pair."""
    return _build(cfg, "preference", seq_len, seed, tokenizer, log)


def sft_micro_batch(dataset: SFTDataset, consumed: int, micro: int, micro_batch_size: int, dp_rank: int,
                    dp: int) -> dict:
    """This DP rank's micro-batch `micro` of the step starting at `consumed` rows (host tensors,
    [micro_batch_size, seq_len]); the same row order as pretraining's sampler."""
    return dataset.get_batch(micro_batch_indices(consumed, micro, micro_batch_size, dp_rank, dp))


def preference_micro_batch(dataset: PreferenceDataset, consumed: int, micro: int, micro_batch_size: int,
                           dp_rank: int, dp: int) -> dict:
    """As sft_micro_batch, counting pairs: micro_batch_size pairs -> 2 * micro_batch_size rows."""
    return dataset.get_batch(micro_batch_indices(consumed, micro, micro_batch_size, dp_rank, dp))
