"""One tokenizer interface over several backends: byte, SentencePiece, HF `tokenizer.json`, tiktoken.

Every tokenizer exposes `vocab_size`, the special ids `bos`, `eos`, `pad`, `eod` (the separator
appended after each document; eos unless the model says otherwise) and `chat_tokens`, the ids of
the chat-template markers the model knows (`<|im_start|>`, `<|im_end|>`, Llama-3's header tokens...).
`encode_batch` is the hot path of preprocessing: backends with a native batch call use it.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np

from megalite.config import ConfigError

# Chat markers looked up in every vocabulary; the byte tokenizer and our trainers add the first five
# (ChatML's and Llama-3's), so both built-in chat templates work with every tokenizer we make.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
RESERVED_CHAT_TOKENS = CHAT_TOKENS[:5]
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer(abc.ABC):
    vocab_size: int
    eod: int
    bos: int
    eos: int
    pad: int
    chat_tokens: dict[str, int]
    name: str = "tokenizer"

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_flat(self, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated as `dtype`, plus per-text lengths: what shard writers take."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(lengths.sum()))
        return flat, lengths

    def token_id(self, piece: str) -> int | None:
        """The id of a special piece, or None when the vocabulary lacks it."""
        return None

    def _find_specials(self) -> None:
        self.chat_tokens = {p: i for p in CHAT_TOKENS if (i := self.token_id(p)) is not None}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes plus special ids; no model file, useful for tests and the zero-setup demo. The
    specials sit above the byte range (bos, eos, pad, then the reserved chat markers)."""

    name = "byte"

    def __init__(self) -> None:
        self.bos, self.eos, self.pad = 256, 257, 258
        self.eod = self.eos
        self.chat_tokens = {p: 259 + i for i, p in enumerate(RESERVED_CHAT_TOKENS)}
        self.vocab_size = 259 + len(RESERVED_CHAT_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch_flat(self, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        raw = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) for b in raw), dtype=np.int64, count=len(raw))
        return np.frombuffer(b"".join(raw), np.uint8).astype(dtype), lengths

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_id(self, piece: str) -> int | None:
        return {"<s>": 256, "</s>": 257, "<pad>": 258, **self.chat_tokens}.get(piece)


# SentencePiece splits its input into words at every space that follows a non-space (pieces never
# cross those points), so a text's ids are the concatenation of its words' ids. Caching words (in
# C++, csrc/word_cache.cpp) turns most of a corpus into table lookups. Models whose normalizer
# rewrites spaces (NFKC maps U+00A0 to a space, for one) or that lack the dummy prefix break that
# identity; they fail these probes, or the check on each process's first documents, and are then
# encoded directly.
_SP_PROBES = ("a b", "  a  b  ", "a\u00a0b", "a\u3000b", "a\u2009b c", "x\ty\nz w", "12345 678", " ", "",
              "<|im_start|>user hi<|im_end|>", "é ü 漢字 x ", "a  ", "\u200bfoo bar", "ﬁ ﬀ ①", "A\u0301 b", "x ")
_SP_VERIFY_DOCS = 256
_SP_CACHE_MAX = 2_000_000


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` (Llama-2 style): bos/eos/pad from the model, eod = eos."""

    name = "sentencepiece"

    def __init__(self, model: str) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model)
        self.vocab_size = self.sp.get_piece_size()
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()
        pad = self.sp.pad_id()
        # Llama-2 has no pad; fall back to eos (a masked position never contributes to the loss).
        self.pad = pad if pad >= 0 else self.eos
        self.eod = self.eos
        self._find_specials()
        self._wc = self._make_word_cache()
        self._verify_left = _SP_VERIFY_DOCS

    def _make_word_cache(self):
        try:
            from megalite import _C
        except ImportError:
            return None
        # A lone trailing space cannot be encoded on its own (empty input gets no dummy prefix):
        # its ids are the difference between "x " and "x".
        x, xs = self.sp.encode("x"), self.sp.encode("x ")
        if xs[: len(x)] != x:
            return None
        wc = _C.WordCache(xs[len(x) :], _SP_CACHE_MAX)
        self._wc = wc
        for p in _SP_PROBES:
            flat, _ = self._cached_flat([p], np.dtype(np.int64))
            if flat.tolist() != self.sp.encode(p):
                return None
        return wc

    def _cached_flat(self, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        missing = self._wc.prepare(texts)
        if missing:
            self._wc.fill(self.sp.encode(missing, num_threads=1))
        return self._wc.assemble(dtype)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)

    def encode_batch_flat(self, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        # A literal U+2581 is SentencePiece's own space symbol: next to a real space it can merge
        # two of our words into one of its own, so such (rare) batches are encoded directly.
        if self._wc is None or any("\u2581" in t for t in texts):
            return super().encode_batch_flat(texts, dtype)
        flat, lengths = self._cached_flat(texts, np.dtype(dtype))
        if self._verify_left > 0:
            k = min(self._verify_left, len(texts))
            self._verify_left -= k
            direct = self.sp.encode(texts[:k], num_threads=1)
            if flat[: int(lengths[:k].sum())].tolist() != [t for ids in direct for t in ids]:
                self._wc = None  # the word identity does not hold for this model: encode directly
                return super().encode_batch_flat(texts, dtype)
        return flat, lengths

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if i != self.sp.unk_id() and self.sp.id_to_piece(i) == piece else None


class HFTokenizer(Tokenizer):
    """A HF `tokenizer.json` (the tokenizers library); a directory holding one works too."""

    name = "hf"

    def __init__(self, model: str) -> None:
        from tokenizers import Tokenizer as _HF

        path = Path(model)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.tok = _HF.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos = self._first(BOS_NAMES)
        self.eos = self._first(EOS_NAMES)
        if self.eos < 0:
            raise ConfigError(f"{model}: no end-of-text token among {', '.join(EOS_NAMES)}")
        self.bos = self.bos if self.bos >= 0 else self.eos
        pad = self._first(PAD_NAMES)
        self.pad = pad if pad >= 0 else self.eos
        # Llama-3 ends turns with <|eot_id|> but documents with <|end_of_text|>.
        eot = self.token_id("<|end_of_text|>")
        self.eod = eot if eot is not None else self.eos
        self._find_specials()

    def _first(self, names: tuple[str, ...]) -> int:
        for n in names:
            i = self.token_id(n)
            if i is not None:
                return i
        return -1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


# cl100k's pre-tokenization pattern, used for local `.tiktoken` rank files that carry no pattern.
_TIKTOKEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
                     r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


class TikTokenizer(Tokenizer):
    """A tiktoken encoding: a registered name (e.g. cl100k_base, when cached locally) or a local
    `.tiktoken` rank file, to which <|endoftext|> and the chat markers are appended as specials."""

    name = "tiktoken"

    def __init__(self, model: str) -> None:
        import tiktoken

        if os.path.isfile(model):
            from tiktoken.load import load_tiktoken_bpe

            ranks = load_tiktoken_bpe(model)
            specials = {p: len(ranks) + i for i, p in enumerate(("<|endoftext|>", "<|pad|>", *RESERVED_CHAT_TOKENS))}
            self.enc = tiktoken.Encoding(name=Path(model).stem, pat_str=_TIKTOKEN_PATTERN,
                                         mergeable_ranks=ranks, special_tokens=specials)
        else:
            try:
                self.enc = tiktoken.get_encoding(model or "cl100k_base")
            except Exception as e:  # noqa: BLE001 - tiktoken raises bare errors when offline
                raise ConfigError(f"tiktoken encoding '{model}' is not available offline: {e}") from None
        self.vocab_size = self.enc.n_vocab
        specials = self.enc._special_tokens
        self.eos = specials.get("<|endoftext|>", specials.get("<|end_of_text|>", self.vocab_size - 1))
        self.bos = specials.get("<|begin_of_text|>", self.eos)
        self.pad = specials.get("<|pad|>", self.eos)
        self.eod = self.eos
        self._find_specials()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int | None:
        return self.enc._special_tokens.get(piece)


def append_eod(flat: np.ndarray, lengths: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """A flat batch (see `encode_batch_flat`) with `eod` appended to every document."""
    return np.insert(flat, np.cumsum(lengths), eod), lengths + 1


def build_tokenizer(tokenizer_type: str, tokenizer_model: str = "") -> Tokenizer:
    """`byte`, `sentencepiece`, `hf` or `tiktoken` (Megatron's type names are accepted too)."""
    kind = {"sentencepiecetokenizer": "sentencepiece", "llama2tokenizer": "sentencepiece", "spm": "sentencepiece",
            "huggingfacetokenizer": "hf", "huggingface": "hf", "tiktokenizer": "tiktoken"
            }.get(tokenizer_type.lower(), tokenizer_type.lower())
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("sentencepiece", "hf", "tiktoken"):
        raise ConfigError(f"unknown data.tokenizer_type '{tokenizer_type}' (byte | sentencepiece | hf | tiktoken)")
    if kind != "tiktoken" or tokenizer_model.endswith(".tiktoken"):
        if not tokenizer_model:
            raise ConfigError(f"data.tokenizer_model is required for tokenizer_type '{tokenizer_type}'")
        if not os.path.exists(tokenizer_model):
            raise ConfigError(f"tokenizer model not found: {tokenizer_model}")
    try:
        if kind == "sentencepiece":
            return SentencePieceTokenizer(tokenizer_model)
        if kind == "hf":
            return HFTokenizer(tokenizer_model)
        return TikTokenizer(tokenizer_model)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - each backend raises its own types for a bad file
        raise ConfigError(f"cannot load {kind} tokenizer from {tokenizer_model}: {str(e).splitlines()[0]}") from None


def tokenizer_key(tokenizer_type: str, tokenizer_model: str = "") -> str:
    """A short stable id for caches keyed by tokenizer: the type plus the model file's content hash."""
    import hashlib

    h = hashlib.sha256(tokenizer_type.encode())
    if tokenizer_model and os.path.isfile(tokenizer_model):
        with open(tokenizer_model, "rb") as f:
            h.update(f.read())
    else:
        h.update(tokenizer_model.encode())
    return f"{tokenizer_type}-{h.hexdigest()[:12]}"
