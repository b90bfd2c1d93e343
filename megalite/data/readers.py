"""Streaming readers for raw text: JSONL (plain, .gz, .zst) and Parquet, in large chunks.

Readers yield `Chunk`s rather than lines: a JSONL chunk is a block of whole lines as one bytes
object (split by the worker that parses it), which keeps the hand-off between processes cheap. Each
chunk carries the first line number (for error messages) and how far through the input it ends,
as a fraction of the raw bytes (or rows), which is what partitioning cuts on.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

CHUNK_BYTES = 1 << 20


@dataclass
class Chunk:
    source: str
    first_line: int  # 1-based line (or row) number of the first record
    progress: float  # fraction of all inputs consumed once this chunk is read, in [0, 1]
    lines: bytes | None = None  # JSONL: whole lines, newline-separated
    records: dict[str, list[Any]] | None = None  # Parquet: column -> values
    tag: int = 0  # set by consumers (the output partition), carried through to the result

    @property
    def count(self) -> int:
        if self.records is not None:
            return len(next(iter(self.records.values()), []))
        return 0 if not self.lines else self.lines.count(b"\n") + (not self.lines.endswith(b"\n"))


def iter_records(chunk: Chunk) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record, None) for each record of a chunk, or (line number, None, reason) for a
    JSONL line that does not parse. A JSONL record is whatever the line holds (callers check it is
    an object with their keys); a Parquet row is {column: value}. Blank lines are not records."""
    if chunk.records is not None:
        columns = list(chunk.records.items())
        for i in range(chunk.count):
            yield chunk.first_line + i, {k: v[i] for k, v in columns}, None
        return
    for i, line in enumerate((chunk.lines or b"").split(b"\n")):
        if not line.strip():
            continue  # blank lines (and the final newline) are not documents
        try:
            obj = json.loads(line)
        except ValueError as e:  # UnicodeDecodeError included
            yield chunk.first_line + i, None, f"invalid JSON ({str(e).split(':')[0]})"
            continue
        # Valid JSON can still hold a lone UTF-16 surrogate (a "\ud800" escape): text no encoder or
        # tokenizer accepts. Such escapes are rare, so only lines that have one are checked.
        if (b"\\ud" in line or b"\\uD" in line) and _has_lone_surrogate(obj):
            yield chunk.first_line + i, None, "invalid text (a lone UTF-16 surrogate escape)"
            continue
        yield chunk.first_line + i, obj, None


def _has_lone_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_lone_surrogate(v) for v in obj)
    return False


def _open_text_stream(path: str) -> tuple[io.BufferedIOBase, Any]:
    """(decompressed stream, raw file) so progress can be measured on the compressed bytes."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[return-value]
    if path.endswith((".zst", ".zstd")):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK_BYTES), raw
    return raw, raw


def _jsonl_chunks(path: str, done_before: int, total: int, chunk_bytes: int) -> Iterator[Chunk]:
    stream, raw = _open_text_stream(path)
    line = 1
    tail = b""
    try:
        while True:
            try:
                block = stream.read(chunk_bytes)
            except Exception as e:  # noqa: BLE001 - gzip, zstandard and the OS raise unrelated types
                raise ValueError(f"{path}: cannot read/decompress near line {line}: {e}") from None
            if not block:
                break
            block = tail + block
            cut = block.rfind(b"\n")
            if cut < 0:
                tail = block
                continue
            body, tail = block[: cut + 1], block[cut + 1 :]
            progress = (done_before + raw.tell()) / total if total else 1.0
            yield Chunk(path, line, min(progress, 1.0), lines=body)
            line += body.count(b"\n")
        if tail:
            yield Chunk(path, line, (done_before + os.path.getsize(path)) / total if total else 1.0, lines=tail)
    finally:
        stream.close()
        raw.close()


def _parquet_chunks(path: str, keys: Sequence[str], done_before: int, total: int,
                    batch_rows: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [k for k in keys if k not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
    rows = pf.metadata.num_rows or 1
    size = os.path.getsize(path)
    row = 1
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(keys)):
        n = batch.num_rows
        recs = {k: batch.column(k).to_pylist() for k in keys}
        frac = (row - 1 + n) / rows
        yield Chunk(path, row, (done_before + frac * size) / total if total else 1.0, records=recs)
        row += n


def read_chunks(paths: Sequence[str], keys: Sequence[str], chunk_bytes: int = CHUNK_BYTES,
                batch_rows: int = 2048) -> Iterator[Chunk]:
    """Every input in order, as chunks; progress runs over the inputs' combined raw size."""
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"{p}: no such input file")
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    done = 0
    for p, size in zip(paths, sizes):
        if p.endswith((".parquet", ".pq")):
            yield from _parquet_chunks(p, keys, done, total, batch_rows)
        else:
            yield from _jsonl_chunks(p, done, total, chunk_bytes)
        done += size

