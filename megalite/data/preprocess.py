"""Raw text to packed token shards: the engine behind tools/preprocess_data.py.

The main process reads the input in ~1 MiB chunks of whole lines and hands them to worker
processes, which parse the JSON, tokenize each chunk with the backend's batch call and send back
one flat token array and the document lengths per key. The main process appends those to the C++
shard writers in input order. Nothing grows with the corpus: not the reader, not the queue (the
pool's ordered imap keeps a bounded window), not the writer.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megalite.data.indexed import IndexedDatasetWriter, best_dtype, merge_shards
from megalite.data.pool import bounded_imap
from megalite.data.readers import Chunk, iter_records, read_chunks
from megalite.data.tokenizer import Tokenizer, append_eod, build_tokenizer


class MalformedInput(ValueError):
    """A record that cannot be used; raised only in --strict mode."""


@dataclass
class Encoded:
    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    docs: int
    malformed: list[tuple[str, int, str]]  # (file, line, reason)
    tag: int = 0  # the chunk's tag (its output partition)


@dataclass
class Stats:
    docs: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        tok = sum(self.tokens.values())
        rate = f"{self.docs / self.seconds:,.0f} docs/s, {tok / self.seconds:,.0f} tokens/s" if self.seconds else ""
        lines = [f"docs: {self.docs:,}  tokens: {tok:,}  skipped (malformed): {self.skipped:,}  "
                 f"time: {self.seconds:.1f}s  {rate}"]
        lines += [f"  {k}: {v:,} tokens" for k, v in self.tokens.items()]
        lines += [f"  skipped e.g. {e}" for e in self.skipped_examples]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Worker side: one tokenizer per process, built once by the pool initializer.

_tok: Tokenizer | None = None
_opts: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, keys: Sequence[str], append_eod: bool,
                 dtype: str) -> None:
    global _tok, _opts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from the pool
    _tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _opts = {"keys": list(keys), "eod": append_eod, "dtype": np.dtype(dtype)}


def encode_chunk(chunk: Chunk) -> Encoded:
    assert _tok is not None, "worker not initialised"
    keys, dtype = _opts["keys"], _opts["dtype"]
    texts: dict[str, list[str]] = {k: [] for k in keys}
    bad: list[tuple[str, int, str]] = []
    for line, obj, why in iter_records(chunk):
        if why is None and not isinstance(obj, dict):
            why = "not a JSON object"
        if why is None:
            missing = next((k for k in keys if not isinstance(obj.get(k), str)), None)
            if missing is not None and chunk.records is not None:
                why = f"column {missing!r} is not a string"
            elif missing is not None:
                why = f"{'missing key' if missing not in obj else 'non-string value for key'} {missing!r}"
        if why is not None:
            bad.append((chunk.source, line, why))
            continue
        for k in keys:
            texts[k].append(obj[k])
    tokens, lengths = {}, {}
    for k in keys:
        flat, lens = _tok.encode_batch_flat(texts[k], dtype)
        if _opts["eod"]:
            flat, lens = append_eod(flat, lens, _tok.eod)
        tokens[k], lengths[k] = flat, lens
    return Encoded(tokens, lengths, len(texts[keys[0]]), bad, chunk.tag)


# ---------------------------------------------------------------------------------------------
# Main side.


def _partitioned(chunks: Iterator[Chunk], partitions: int) -> Iterator[Chunk]:
    """Tags chunks with a partition number: contiguous slices of the input by raw bytes."""
    for c in chunks:
        c.tag = min(partitions - 1, int(c.progress * partitions - 1e-9)) if partitions > 1 else 0
        yield c


def _output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_type: str, tokenizer_model: str = "",
               json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               partitions: int = 1, strict: bool = False, progress: bool = True,
               chunk_bytes: int = 1 << 20) -> Stats:
    """Tokenizes `inputs` into `<output_prefix>_<key>_document.{bin,idx}`, one pair per JSON key."""
    t0 = time.perf_counter()
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = best_dtype(tok.vocab_size)
    keys = list(json_keys)
    if not keys:
        raise ValueError("--json-keys: at least one key is needed")
    if partitions < 1:
        raise ValueError("--partitions must be >= 1")
    stats = Stats(tokens={k: 0 for k in keys})
    chunks = _partitioned(read_chunks(inputs, keys, chunk_bytes=chunk_bytes), partitions)
    init = (tokenizer_type, tokenizer_model, keys, append_eod, dtype.str)

    def part_prefix(key: str, part: int) -> str:
        base = _output_prefix(output_prefix, key)
        return base if partitions == 1 else f"{base}.part{part:04d}-of-{partitions:04d}"

    def remove_parts(which: Sequence[str]) -> None:
        """Deletes every partial shard of these keys, finished or not (their writers' temp files are
        their abort's business)."""
        if partitions > 1:
            for k in which:
                for p in range(partitions):
                    for ext in (".bin", ".idx"):
                        Path(part_prefix(k, p) + ext).unlink(missing_ok=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", unit_scale=True, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    writers: dict[str, IndexedDatasetWriter] = {}
    done_parts: list[int] = []
    current = -1
    try:
        with bounded_imap(encode_chunk, chunks, workers, _init_worker, init) as results:
            for enc in results:
                part = enc.tag
                if part != current:
                    for w in writers.values():
                        w.finalize()
                    if current >= 0:
                        done_parts.append(current)
                    writers = {k: IndexedDatasetWriter(part_prefix(k, part), dtype=dtype) for k in keys}
                    current = part
                if enc.malformed:
                    if strict:
                        f, line, why = enc.malformed[0]
                        raise MalformedInput(f"{f}:{line}: {why}")
                    stats.skipped += len(enc.malformed)
                    for f, line, why in enc.malformed[: max(0, 5 - len(stats.skipped_examples))]:
                        stats.skipped_examples.append(f"{f}:{line}: {why}")
                for k in keys:
                    writers[k].add_documents(enc.tokens[k], enc.lengths[k])
                    stats.tokens[k] += len(enc.tokens[k])
                stats.docs += enc.docs
                if bar is not None:
                    bar.update(enc.docs)
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{sum(stats.tokens.values()) / el:,.0f} tok/s, skipped {stats.skipped}",
                                        refresh=False)
        if not writers:  # an empty input still yields (empty) shards
            writers = {k: IndexedDatasetWriter(part_prefix(k, 0), dtype=dtype) for k in keys}
            current = 0
        for w in writers.values():
            w.finalize()
        done_parts.append(current)
        writers = {}
    except BaseException:
        for w in writers.values():
            w.abort()
        remove_parts(keys)  # the partitions finished before the failure
        raise
    finally:
        if bar is not None:
            bar.close()

    try:
        for k in keys:
            final = _output_prefix(output_prefix, k)
            if partitions > 1:
                merge_shards([part_prefix(k, p) for p in done_parts], final)
                remove_parts([k])
            stats.outputs.append(final)
    finally:
        remove_parts(keys)  # after a failed merge too
    stats.seconds = time.perf_counter() - t0
    return stats
