"""Raw text to packed token shards: the engine behind tools/preprocess_data.py.

The main process reads the input in ~1 MiB chunks of whole lines and hands them to worker
processes, which parse the JSON, tokenize each chunk with the backend's batch call and send back
one flat token array and the document lengths per key. The main process appends those to the C++
shard writers in input order. Nothing grows with the corpus: not the reader, not the queue (the
pool's ordered imap keeps a bounded window), not the writer.

`mode="chat"` and `mode="preference"` run the same pipeline over chat records (see chat.py): each
sample's tokens go to `<prefix>_<mode>_document` and its uint8 loss mask, token for token, to
`<prefix>_<mode>_mask`. A preference pair is one document of two sequences, chosen then rejected.
A bad record stops the run with its file and line unless `skip_bad_records` counts and skips it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megalite.data import chat
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
    seqs_per_doc: int = 1  # preference pairs: 2 (chosen, rejected)
    loss_tokens: int = 0  # chat modes: tokens whose mask is nonzero


@dataclass
class Stats:
    docs: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    mode: str = "text"
    loss_tokens: int = 0

    def summary(self) -> str:
        tok = sum(self.tokens.values())
        unit = {"text": "docs", "chat": "samples", "preference": "pairs"}[self.mode]
        rate = f"{self.docs / self.seconds:,.0f} {unit}/s, {tok / self.seconds:,.0f} tokens/s" if self.seconds else ""
        if self.mode == "text":
            lines = [f"docs: {self.docs:,}  tokens: {tok:,}  skipped (malformed): {self.skipped:,}  "
                     f"time: {self.seconds:.1f}s  {rate}"]
            lines += [f"  {k}: {v:,} tokens" for k, v in self.tokens.items()]
        else:
            share = f" ({self.loss_tokens / tok:.1%})" if tok else ""
            lines = [f"{unit}: {self.docs:,}  tokens: {tok:,}  loss tokens: {self.loss_tokens:,}{share}  "
                     f"skipped (bad records): {self.skipped:,}  time: {self.seconds:.1f}s  {rate}"]
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


def _init_chat_worker(tokenizer_type: str, tokenizer_model: str, template: str, mode: str, dtype: str) -> None:
    global _tok, _opts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _opts = {"template": chat.load_chat_template(template, _tok, tokenizer_model), "mode": mode,
             "dtype": np.dtype(dtype)}


def _chat_records(chunk: Chunk):
    """(line, record, None) or (line, None, reason), telling bad UTF-8 apart from bad JSON."""
    for i, line in enumerate((chunk.lines or b"").split(b"\n")):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield chunk.first_line + i, None, f"not UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1}"
            continue
        try:
            yield chunk.first_line + i, json.loads(text), None
        except ValueError as e:
            msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            yield chunk.first_line + i, None, f"invalid JSON ({msg})"


def encode_chat_chunk(chunk: Chunk) -> Encoded:
    """Tokens and masks of a chunk's conversations (two per preference pair), one batch encode."""
    assert _tok is not None, "worker not initialised"
    template, mode = _opts["template"], _opts["mode"]
    per = 2 if mode == "preference" else 1
    plans: list[list[chat.Segment]] = []
    lines: list[int] = []  # the input line of each record in `plans` (per plans each)
    bad: list[tuple[str, int, str]] = []
    for line, obj, why in _chat_records(chunk):
        if why is None:
            try:
                if mode == "preference":
                    chosen, rejected = chat.preference_from_record(obj)
                    plans += [template.segments(chosen), template.segments(rejected)]
                else:
                    plans.append(template.segments(chat.conversation_from_record(obj)))
                lines.append(line)
            except chat.BadRecord as e:
                why = str(e)
        if why is not None:
            bad.append((chunk.source, line, why))
    encoded = chat.encode_segments(_tok, plans, _opts["dtype"])
    kept = []
    for r, line in enumerate(lines):
        sample = encoded[r * per : (r + 1) * per]
        # Token 0 is never a label (nothing predicts it), so a mask there alone trains nothing.
        if any(not m[1:].any() for _, m in sample):
            bad.append((chunk.source, line, "empty loss mask: the chat template renders no assistant tokens"))
        else:
            kept += sample
    bad.sort(key=lambda b: b[1])
    lengths = np.fromiter((len(ids) for ids, _ in kept), dtype=np.int64, count=len(kept))
    tokens = np.concatenate([ids for ids, _ in kept]) if kept else np.zeros(0, _opts["dtype"])
    mask = np.concatenate([m for _, m in kept]) if kept else np.zeros(0, np.uint8)
    return Encoded({"tokens": tokens, "mask": mask}, {"tokens": lengths, "mask": lengths}, len(kept) // per,
                   bad, chunk.tag, per, int(np.count_nonzero(mask)))


# ---------------------------------------------------------------------------------------------
# Main side.


def _partitioned(chunks: Iterator[Chunk], partitions: int) -> Iterator[Chunk]:
    """Tags chunks with a partition number: contiguous slices of the input by raw bytes."""
    for c in chunks:
        c.tag = min(partitions - 1, int(c.progress * partitions - 1e-9)) if partitions > 1 else 0
        yield c


def _output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def _add(writer: IndexedDatasetWriter, tokens: np.ndarray, lengths: np.ndarray, seqs_per_doc: int) -> None:
    if seqs_per_doc == 1:
        writer.add_documents(tokens, lengths)
        return
    ends = np.cumsum(lengths)
    for i, (end, n) in enumerate(zip(ends.tolist(), lengths.tolist())):
        writer.add_item(tokens[end - n : end])
        if (i + 1) % seqs_per_doc == 0:
            writer.end_document()


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_type: str, tokenizer_model: str = "",
               json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               partitions: int = 1, strict: bool = False, progress: bool = True,
               chunk_bytes: int = 1 << 20, mode: str = "text", chat_template: str = "auto",
               skip_bad_records: bool = False) -> Stats:
    """Tokenizes `inputs` into `<output_prefix>_<key>_document.{bin,idx}`, one pair per JSON key; in
    the chat modes into `<output_prefix>_<mode>_document` plus its `<output_prefix>_<mode>_mask`."""
    t0 = time.perf_counter()
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = best_dtype(tok.vocab_size)
    if partitions < 1:
        raise ValueError("--partitions must be >= 1")
    if mode == "text":
        keys = list(json_keys)
        if not keys:
            raise ValueError("--json-keys: at least one key is needed")
        outputs = {k: (_output_prefix(output_prefix, k), dtype) for k in keys}
        counted = keys
        encode, init, initargs = encode_chunk, _init_worker, (tokenizer_type, tokenizer_model, keys, append_eod,
                                                              dtype.str)
    elif mode in chat.CHAT_MODES:
        chat.load_chat_template(chat_template, tok, tokenizer_model)  # a bad template fails here, once
        for p in inputs:
            if p.endswith((".parquet", ".pq")):
                raise ValueError(f"{p}: --mode {mode} reads JSONL (.jsonl, .jsonl.gz, .jsonl.zst), not Parquet")
        keys = []
        tokens_prefix, mask_prefix = chat.shard_prefixes(output_prefix, mode)
        outputs = {"tokens": (tokens_prefix, dtype), "mask": (mask_prefix, np.dtype(np.uint8))}
        counted = ["tokens"]
        strict = not skip_bad_records
        encode, init, initargs = encode_chat_chunk, _init_chat_worker, (tokenizer_type, tokenizer_model,
                                                                        chat_template, mode, dtype.str)
    else:
        raise ValueError(f"--mode {mode!r}: expected text | chat | preference")
    stats = Stats(tokens={k: 0 for k in counted}, mode=mode)
    chunks = _partitioned(read_chunks(inputs, keys, chunk_bytes=chunk_bytes), partitions)

    def part_prefix(key: str, part: int) -> str:
        base = outputs[key][0]
        return base if partitions == 1 else f"{base}.part{part:04d}-of-{partitions:04d}"

    def new_writers(part: int) -> dict[str, IndexedDatasetWriter]:
        return {k: IndexedDatasetWriter(part_prefix(k, part), dtype=dt) for k, (_, dt) in outputs.items()}

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

        bar = tqdm(unit=f" {'docs' if mode == 'text' else 'samples' if mode == 'chat' else 'pairs'}",
                   unit_scale=True, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    writers: dict[str, IndexedDatasetWriter] = {}
    done_parts: list[int] = []
    current = -1
    try:
        with bounded_imap(encode, chunks, workers, init, initargs) as results:
            for enc in results:
                part = enc.tag
                if part != current:
                    for w in writers.values():
                        w.finalize()
                    if current >= 0:
                        done_parts.append(current)
                    writers = new_writers(part)
                    current = part
                if enc.malformed:
                    if strict:
                        f, line, why = enc.malformed[0]
                        hint = "  (--skip-bad-records counts and skips such records)" if mode != "text" else ""
                        raise MalformedInput(f"{f}:{line}: {why}{hint}")
                    stats.skipped += len(enc.malformed)
                    for f, line, why in enc.malformed[: max(0, 5 - len(stats.skipped_examples))]:
                        stats.skipped_examples.append(f"{f}:{line}: {why}")
                for k in outputs:
                    _add(writers[k], enc.tokens[k], enc.lengths[k], enc.seqs_per_doc)
                for k in counted:
                    stats.tokens[k] += len(enc.tokens[k])
                stats.docs += enc.docs
                stats.loss_tokens += enc.loss_tokens
                if bar is not None:
                    bar.update(enc.docs)
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{sum(stats.tokens.values()) / el:,.0f} tok/s, skipped {stats.skipped}",
                                        refresh=False)
        if not writers:  # an empty input still yields (empty) shards
            writers = new_writers(0)
            current = 0
        for w in writers.values():
            w.finalize()
        done_parts.append(current)
        writers = {}
    except BaseException:
        for w in writers.values():
            w.abort()
        remove_parts(list(outputs))  # the partitions finished before the failure
        raise
    finally:
        if bar is not None:
            bar.close()

    try:
        for k, (final, _) in outputs.items():
            if partitions > 1:
                merge_shards([part_prefix(k, p) for p in done_parts], final)
                remove_parts([k])
            stats.outputs.append(final)
    finally:
        remove_parts(list(outputs))  # after a failed merge too
    stats.seconds = time.perf_counter() - t0
    return stats
