"""The indexed dataset: tokens in `P.bin`, the sequence index in `P.idx` (Megatron's MMIDIDX format).

`.idx` layout, little endian: the 9-byte magic `MMIDIDX\\x00\\x00`, u64 version (1), u8 dtype code,
u64 sequence count S, u64 document count D, then int32 sizes[S], int64 byte pointers[S] and int64
document boundaries[D] (0 first, S last). A document is one or more consecutive sequences.

Reading maps both files; nothing is loaded. Writing streams through the C++ builder, so memory
stays flat on any corpus size, and both files appear atomically at `finalize()`.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8

# Megatron's dtype codes.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A missing, truncated or corrupt shard; the message names the file and the problem."""


def best_dtype(vocab_size: int | None) -> np.dtype:
    """uint16 while every id fits (with Megatron's margin), else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def data_file(prefix: str | Path) -> str:
    return f"{prefix}.bin"


def index_file(prefix: str | Path) -> str:
    return f"{prefix}.idx"


def exists(prefix: str | Path) -> bool:
    return os.path.isfile(data_file(prefix)) and os.path.isfile(index_file(prefix))


def _map(path: str) -> memoryview:
    """A read-only view of the whole file; empty files get an empty buffer (mmap refuses them)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


class IndexedDataset(Sequence):
    """Read-only view of a `.bin/.idx` pair. `ds[i]` is sequence i; `ds.tokens` the whole stream.

    Arrays are plain ndarrays over mmap (not np.memmap), which keeps slicing cheap in hot loops.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        idx_path, bin_path = index_file(prefix), data_file(prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise IndexedDatasetError(f"{p}: no such file")
        idx = _map(idx_path)
        if len(idx) < HEADER_BYTES:
            raise IndexedDatasetError(f"{idx_path}: truncated header ({len(idx)} of {HEADER_BYTES} bytes)")
        if bytes(idx[:9]) != MAGIC:
            raise IndexedDatasetError(f"{idx_path}: bad magic {bytes(idx[:9])!r}, not an MMIDIDX index")
        (version,) = struct.unpack("<Q", idx[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported version {version} (expected {VERSION})")
        code = idx[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        s, d = struct.unpack("<QQ", idx[18:34])
        want = HEADER_BYTES + 4 * s + 8 * s + 8 * d
        # Megatron's multimodal variant appends one int8 mode per sequence; accept exactly that too.
        if len(idx) not in (want, want + s):
            raise IndexedDatasetError(
                f"{idx_path}: {len(idx)} bytes, but the header's {s} sequences and {d} document "
                f"boundaries need {want} (truncated or corrupt)")
        if d < 1:
            raise IndexedDatasetError(f"{idx_path}: document count is 0 (needs at least the leading boundary)")
        off = HEADER_BYTES
        self.sizes = np.frombuffer(idx, np.int32, s, off)
        self.pointers = np.frombuffer(idx, np.int64, s, off + 4 * s)
        self.doc_idx = np.frombuffer(idx, np.int64, d, off + 12 * s)
        if self.doc_idx[0] != 0 or self.doc_idx[-1] != s:
            raise IndexedDatasetError(
                f"{idx_path}: document boundaries run {self.doc_idx[0]}..{self.doc_idx[-1]}, expected 0..{s}")
        if d > 1 and np.any(np.diff(self.doc_idx) < 0):
            raise IndexedDatasetError(f"{idx_path}: document boundaries are not sorted")
        if s and self.sizes.min() < 0:
            raise IndexedDatasetError(f"{idx_path}: negative sequence size")
        item = self.dtype.itemsize
        expected_bin = int(self.pointers[-1]) + int(self.sizes[-1]) * item if s else 0
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != expected_bin:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_bytes} bytes, but {idx_path} describes {expected_bin} "
                f"({'truncated' if bin_bytes < expected_bin else 'trailing data'})")
        if s and self.pointers[0] != 0:
            raise IndexedDatasetError(f"{idx_path}: the first pointer is {self.pointers[0]}, not 0")
        self._item = item
        self._check_pointers(idx_path)
        self.tokens = np.frombuffer(_map(bin_path), self.dtype)

    def _check_pointers(self, idx_path: str) -> None:
        """Pointers must be the running sum of the sizes: checked in full up to 16M sequences, at
        a fixed sample of positions beyond (opening a huge shard must stay cheap on every rank)."""
        s = len(self.sizes)
        if s < 2:
            return
        if s <= 1 << 24:
            at = np.arange(s - 1)
        else:
            at = np.unique(np.concatenate([np.arange(4096), np.linspace(0, s - 2, 1 << 16).astype(np.int64),
                                           np.arange(s - 4097, s - 1)]))
        step = (self.pointers[at + 1] - self.pointers[at]) // self._item
        if not np.array_equal(step, self.sizes[at].astype(np.int64)):
            raise IndexedDatasetError(f"{idx_path}: pointers disagree with sequence sizes (corrupt)")

    def _start(self, i: int) -> int:
        return int(self.pointers[i]) // self._item

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        p = self._start(i)
        return self.tokens[p : p + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        p, n = self._start(i), int(self.sizes[i])
        end = n if length is None else min(n, offset + length)
        return self.tokens[p + offset : p + end]

    def document(self, j: int) -> np.ndarray:
        """All sequences of document j, concatenated."""
        a, b = int(self.doc_idx[j]), int(self.doc_idx[j + 1])
        if a == b:
            return self.tokens[:0]
        return self.tokens[self._start(a) : self._start(b - 1) + int(self.sizes[b - 1])]

    def document_sizes(self) -> np.ndarray:
        """Tokens per document (int32): the sizes of each document's sequences, summed. (The GPT
        dataset splits by document but packs sequences; it reads `sizes`, not this.)"""
        if len(self.doc_idx) - 1 == len(self.sizes):
            return np.asarray(self.sizes)
        csum = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        return (csum[self.doc_idx[1:]] - csum[self.doc_idx[:-1]]).astype(np.int32)


class IndexedDatasetWriter:
    """Streams documents into `prefix.bin/.idx`; use as a context manager so failures leave nothing.

    >>> with IndexedDatasetWriter("out/web_text_document", vocab_size=32000) as w:
    ...     w.add_document([1, 2, 3])
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type | None = None, vocab_size: int | None = None):
        from megalite import _C

        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype) if dtype is not None else best_dtype(vocab_size)
        if self.dtype not in CODE_OF:
            raise ValueError(f"{self.prefix}: dtype {self.dtype} has no MMIDIDX code")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._b = _C.IndexedBuilder(data_file(prefix), index_file(prefix), CODE_OF[self.dtype])
        self._max = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self.result: tuple[int, int] | None = None

    def _cast(self, tokens) -> np.ndarray:
        a = np.asarray(tokens)
        if a.dtype != self.dtype:
            if a.size and self._max is not None and (a.max() > self._max or a.min() < 0):
                raise ValueError(f"{self.prefix}: token id {int(a.max())} does not fit {self.dtype}")
            a = a.astype(self.dtype)
        return np.ascontiguousarray(a.reshape(-1))

    def add_item(self, tokens) -> None:
        """One sequence of the current document (close it with `end_document`)."""
        self._b.add_item(self._cast(tokens))

    def end_document(self) -> None:
        self._b.end_document()

    def add_document(self, tokens) -> None:
        self._b.add_item(self._cast(tokens))
        self._b.end_document()

    def add_documents(self, tokens, lengths) -> None:
        """Many single-sequence documents at once: `tokens` concatenated, `lengths` per document."""
        self._b.add_documents(self._cast(tokens), np.asarray(lengths, dtype=np.int64))

    def merge(self, prefix: str | Path) -> None:
        """Appends every document of another shard of the same dtype, streaming."""
        for p in (data_file(prefix), index_file(prefix)):
            if not os.path.isfile(p):
                raise IndexedDatasetError(f"{p}: no such file")
        try:
            self._b.merge(data_file(prefix), index_file(prefix))
        except RuntimeError as e:
            raise IndexedDatasetError(str(e)) from None

    @property
    def num_documents(self) -> int:
        return self._b.num_documents

    @property
    def num_tokens(self) -> int:
        return self._b.num_tokens

    def finalize(self) -> tuple[int, int]:
        """Writes the index and moves both files into place; returns (documents, tokens)."""
        self.result = tuple(self._b.finalize())  # type: ignore[assignment]
        return self.result  # type: ignore[return-value]

    def abort(self) -> None:
        self._b.abort()

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.result is None:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        elif exc_type is not None:
            self.abort()


def merge_shards(prefixes: Sequence[str | Path], output_prefix: str | Path) -> tuple[int, int]:
    """Concatenates shards in order into one (streaming); returns (documents, tokens)."""
    if not prefixes:
        raise ValueError("merge_shards: no input shards")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetWriter(output_prefix, dtype=dtype) as w:
        for p in prefixes:
            w.merge(p)
        return w.finalize()
