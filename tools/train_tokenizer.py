"""Train a tokenizer from JSONL (plain, .gz, .zst) or Parquet text.

    python tools/train_tokenizer.py --input data.jsonl --type sentencepiece --vocab-size 32000 --output tok.model
    python tools/train_tokenizer.py --input data.jsonl --type hf-bpe --vocab-size 50304 --output tokenizer.json

`sentencepiece`: a BPE model set up as Llama-2's (byte fallback, digits split, identity
normalization, unk/bos/eos = 0/1/2, no pad). `hf-bpe`: a byte-level BPE in a HF tokenizer.json with
<|endoftext|> and <|pad|>. Both reserve the chat markers as special tokens: ChatML's <|im_start|> and
<|im_end|>, and Llama-3's <|start_header_id|>, <|end_header_id|> and <|eot_id|> (the default SFT
chat template, see docs/sft_data.md).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import _common


def chat_markers() -> list[str]:
    from megalite.data.tokenizer import RESERVED_CHAT_TOKENS

    return list(RESERVED_CHAT_TOKENS)


def iter_texts(inputs: list[str], key: str, max_docs: int | None) -> Iterator[str]:
    from megalite.data.readers import iter_records, read_chunks

    n = 0
    for chunk in read_chunks(inputs, [key]):
        # Malformed lines (obj None, or no string under `key`) are preprocess_data's business;
        # training skips them.
        for _, obj, _ in iter_records(chunk):
            if isinstance(obj, dict) and isinstance(obj.get(key), str) and obj[key]:
                yield obj[key]
                n += 1
                if max_docs is not None and n >= max_docs:
                    return


def train_sentencepiece(texts: Iterator[str], vocab_size: int, output: str, threads: int) -> None:
    import sentencepiece as spm

    out = Path(output)
    with tempfile.TemporaryDirectory(dir=out.parent or ".") as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=texts, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
            character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=chat_markers(), max_sentence_length=1 << 16, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=threads, minloglevel=2)
        os.replace(prefix + ".model", out)
        os.replace(prefix + ".vocab", out.with_suffix(".vocab"))


def train_hf_bpe(texts: Iterator[str], vocab_size: int, output: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=["<|endoftext|>", "<|pad|>", *chat_markers()],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    from megalite.atomic import atomic_write

    atomic_write(output, tok.save)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="JSONL (.gz/.zst) or Parquet files")
    p.add_argument("--json-key", default="text")
    p.add_argument("--type", choices=["sentencepiece", "hf-bpe"], default="sentencepiece")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--output", required=True, help="the .model (sentencepiece) or tokenizer.json (hf-bpe)")
    p.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    if args.vocab_size < 300:
        raise ValueError(f"--vocab-size {args.vocab_size} is too small (byte fallback alone needs 256 + specials)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    texts = iter_texts(args.input, args.json_key, args.max_docs)
    first = next(texts, None)  # no text at all would end in SentencePiece's INTERNAL error
    if first is None:
        raise ValueError(f"no text to train on: {', '.join(args.input)} holds no non-empty string under "
                         f"--json-key {args.json_key}")
    texts = itertools.chain([first], texts)
    if args.type == "sentencepiece":
        train_sentencepiece(texts, args.vocab_size, args.output, args.threads)
    else:
        train_hf_bpe(texts, args.vocab_size, args.output)
    from megalite.data.tokenizer import build_tokenizer

    tok = build_tokenizer("sentencepiece" if args.type == "sentencepiece" else "hf", args.output)
    print(f"wrote {args.output}: vocab {tok.vocab_size}, bos {tok.bos}, eos {tok.eos}, pad {tok.pad}, "
          f"chat {tok.chat_tokens}")
    return 0


if __name__ == "__main__":
    _common.run_main(main)
