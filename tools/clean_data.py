"""Clean a JSONL corpus: filters, PII scrubbing, exact and near dedup, with a stats report.

    python tools/clean_data.py --input raw.jsonl.zst --output clean.jsonl.zst --stats stats.json \
        --config clean.yaml --workers 8

Streaming and multiprocess: workers filter and hash documents; the main process deduplicates in
input order and writes the kept documents (other JSON fields are preserved). Every dropped
document is counted under one reason in the stats report; outputs appear atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO

import _common  # noqa: F401 - sets up the import path

from megalite.atomic import atomic_write, atomic_write_text
from megalite.data.cleaning import CleanConfig, Cleaner, Deduplicator, DocResult, load_clean_config
from megalite.data.pool import bounded_imap
from megalite.data.readers import Chunk, iter_records, read_chunks

_cleaner: Cleaner | None = None
_key = "text"


def _init(cfg: CleanConfig) -> None:
    global _cleaner, _key
    _cleaner, _key = Cleaner(cfg), cfg.text_key


def clean_chunk(chunk: Chunk) -> list[tuple[dict | None, DocResult]]:
    assert _cleaner is not None
    out: list[tuple[dict | None, DocResult]] = []
    for _, obj, _ in iter_records(chunk):  # a line that does not parse comes as None: malformed
        if not isinstance(obj, dict) or not isinstance(obj.get(_key), str):
            out.append((None, DocResult(None, "malformed")))
            continue
        r = _cleaner.process(obj[_key])
        if r.text is not None:
            obj[_key] = r.text
        out.append((obj if r.text is not None else None, r))
    return out


@contextlib.contextmanager
def _open_output(path: str, final: str) -> Iterator[IO[bytes]]:
    """`path` open for writing, compressed as the extension of `final` (its eventual name) says.
    The compressor is closed first, then the file itself, so its last bytes are written (or the
    write error raised) before the caller goes on to publish it."""
    with open(path, "wb", buffering=1 << 20) as raw:
        if final.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="wb") as gz:  # never closes `raw` itself
                yield gz  # type: ignore[misc]
        elif final.endswith((".zst", ".zstd")):
            import zstandard

            with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as zst:
                yield zst  # type: ignore[misc]
        else:
            yield raw


def clean(inputs: list[str], output: str, stats_path: str | None, cfg: CleanConfig, workers: int,
          progress: bool = True) -> dict:
    t0 = time.perf_counter()
    dropped: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    n_in = n_out = lines_removed = 0
    dedup = Deduplicator()
    chunks = read_chunks(inputs, [cfg.text_key])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", unit_scale=True, mininterval=0.5, file=sys.stderr)

    def write(tmp: str) -> None:
        nonlocal n_in, n_out, lines_removed
        with bounded_imap(clean_chunk, chunks, workers, _init, (cfg,)) as results, \
                _open_output(tmp, output) as out:
            for batch in results:
                for obj, r in batch:
                    n_in += 1
                    lines_removed += r.lines_removed
                    reason = r.reason or dedup.check(r)
                    if reason:
                        dropped[reason] += 1
                        continue
                    pii.update(r.pii)
                    out.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
                    n_out += 1
                if bar is not None:
                    bar.update(len(batch))

    try:
        atomic_write(output, write)
    finally:
        if bar is not None:
            bar.close()
    report = {
        "input_docs": n_in, "kept_docs": n_out, "dropped_docs": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())), "pii_replaced": dict(sorted(pii.items())),
        "c4_lines_removed": lines_removed, "seconds": round(time.perf_counter() - t0, 3),
        "inputs": inputs, "output": output,
    }
    if stats_path:
        atomic_write_text(stats_path, json.dumps(report, indent=1))
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="JSONL (.gz/.zst) or Parquet files")
    p.add_argument("--output", required=True, help="cleaned JSONL (.gz/.zst by extension)")
    p.add_argument("--stats", default=None, help="write the stats report (JSON) here")
    p.add_argument("--config", default=None, help="YAML/JSON with thresholds (see megalite/data/cleaning.py)")
    p.add_argument("--text-key", default=None, help="the JSON key holding the text (default: text)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    data = None
    if args.config:
        import yaml

        if not os.path.isfile(args.config):
            raise ValueError(f"{args.config}: no such config file")
        try:
            data = yaml.safe_load(open(args.config).read())
        except yaml.YAMLError:
            raise ValueError(f"{args.config}: cannot parse YAML/JSON") from None
    cfg = load_clean_config(data, args.config or "config")
    if args.text_key:
        cfg.text_key = args.text_key
    report = clean(args.input, args.output, args.stats, cfg, args.workers, not args.no_progress)
    print(json.dumps({k: report[k] for k in ("input_docs", "kept_docs", "dropped", "pii_replaced")}))
    if report["kept_docs"] == 0:  # an empty output is never a success: say why, leave no empty file
        os.remove(args.output)
        why = (f"all {report['input_docs']:,} documents were dropped ({', '.join(f'{k}: {v}' for k, v in report['dropped'].items())})"
               if report["input_docs"] else "the input holds no records")
        raise ValueError(f"no documents written to {args.output}: {why}"
                         f"{'; is --text-key ' + cfg.text_key + ' right?' if report['dropped'].get('malformed') == report['input_docs'] else ''}")
    return 0


if __name__ == "__main__":
    _common.run_main(main)
