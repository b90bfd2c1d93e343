"""Tokenize raw text (JSONL, .jsonl.gz, .jsonl.zst, Parquet) into Megatron-compatible shards.

    python tools/preprocess_data.py --input data.jsonl.zst --output-prefix out/web \
        --tokenizer-type sentencepiece --tokenizer-model tok.model --json-keys text --append-eod --workers 8

writes out/web_text_document.{bin,idx}. Malformed lines are skipped and counted (or, with
--strict, the first one stops the run with its file and line). Outputs appear atomically.

Post-training data (docs/sft_data.md):

    python tools/preprocess_data.py --mode chat --input chats.jsonl --output-prefix out/sft \
        --tokenizer-type hf --tokenizer-model tok/ --chat-template auto --workers 8

writes the tokens to out/sft_chat_document.{bin,idx} and the loss mask to out/sft_chat_mask.{bin,idx}
(`--mode preference`: out/sft_preference_*). A bad record stops the run with its file and line
unless --skip-bad-records counts and skips it.
"""

from __future__ import annotations

import argparse
import glob

import _common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+",
                   help="input files or globs: .jsonl, .json, .jsonl.gz, .jsonl.zst, .parquet")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys (columns) to tokenize")
    g.add_argument("--strict", action="store_true", help="the first malformed line is a fatal error")
    g.add_argument("--mode", default="text", choices=["text", "chat", "preference"],
                   help="text: --json-keys documents; chat: {messages} or {prompt, completion} records; "
                        "preference: {prompt, chosen, rejected} records")
    g.add_argument("--chat-template", default="auto",
                   help="chat modes: auto | llama3 | chatml | raw | a tokenizer_config.json | a Jinja file")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="chat modes: count and skip bad records instead of stopping at the first")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="sentencepiece",
                   help="byte | sentencepiece | hf | tiktoken (Megatron's names are accepted)")
    g.add_argument("--tokenizer-model", default="", help="model file: .model, tokenizer.json or .tiktoken")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document id to each document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.{bin,idx}")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="accepted for Megatron compatibility")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (0: tokenize in this process)")
    g.add_argument("--partitions", type=int, default=1,
                   help="write the output as N partial shards over contiguous input slices, then merge them")
    g.add_argument("--chunk-mb", type=float, default=1.0, help="input handed to a worker at a time")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _refuse_empty(stats, inputs: list[str], keys: list[str]) -> None:
    """Empty shards are never a success: remove them and say why nothing was written."""
    import os

    for out in stats.outputs:
        for ext in (".bin", ".idx"):
            if os.path.exists(out + ext):
                os.remove(out + ext)
    if stats.skipped:
        why = (f"all {stats.skipped:,} records were skipped as malformed (e.g. {stats.skipped_examples[0]}); "
               f"check --json-keys {' '.join(keys)} and the input format")
    elif stats.docs:
        why = f"its {stats.docs:,} documents hold no text under --json-keys {' '.join(keys)}"
    else:
        why = "the input holds no records"
    raise ValueError(f"no tokens written from {', '.join(inputs)}: {why}")


def main() -> int:
    args = parse_args()
    from megalite.data.preprocess import preprocess

    inputs: list[str] = []
    for pattern in args.input:
        found = sorted(glob.glob(pattern))
        inputs += found if found else [pattern]  # a missing file is reported by the reader
    stats = preprocess(inputs, args.output_prefix, args.tokenizer_type, args.tokenizer_model, args.json_keys,
                       args.append_eod, args.workers, args.partitions, args.strict, not args.no_progress,
                       int(args.chunk_mb * (1 << 20)), args.mode, args.chat_template, args.skip_bad_records)
    print(stats.summary())
    if stats.docs == 0 or sum(stats.tokens.values()) == 0:
        _refuse_empty(stats, inputs, args.json_keys)
    for out in stats.outputs:
        print(f"wrote {out}.bin and {out}.idx")
    return 0


if __name__ == "__main__":
    _common.run_main(main)
