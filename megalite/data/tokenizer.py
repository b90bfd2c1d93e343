"""One tokenizer interface over several backends. The byte tokenizer needs no model file."""

from __future__ import annotations

from megalite.config import ConfigError


class Tokenizer:
    vocab_size: int
    eod: int
    bos: int
    eos: int
    pad: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes plus four special ids; useful for tests and the zero-setup demo."""

    def __init__(self) -> None:
        self.bos, self.eos, self.pad = 256, 257, 258
        self.eod = self.eos
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str = "") -> Tokenizer:
    if tokenizer_type == "byte":
        return ByteTokenizer()
    raise ConfigError(f"unknown data.tokenizer_type '{tokenizer_type}'")
