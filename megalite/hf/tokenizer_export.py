"""The tokenizer beside an HF export, so `AutoTokenizer.from_pretrained(dir)` loads the folder.

Every kind is written as a `tokenizer.json` (the tokenizers library's format, which transformers
loads without sentencepiece or protobuf), plus `tokenizer_config.json` naming the special tokens:
- hf: the run's tokenizer.json itself;
- byte: a byte-level BPE without merges whose ids are the raw bytes, then megalite's specials;
- sentencepiece: the .model rebuilt as Llama's tokenizer.json (BPE over "▁"-joined text with byte
  fallback; merges recovered from the pieces), and the .model copied as tokenizer.model.
The ids are the training ids in every case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megalite.config import ConfigError
from megalite.data.tokenizer import Tokenizer, build_tokenizer


def _byte_level(tok: Tokenizer):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    hf = HFTok(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf, {256: "<s>", 257: "</s>", 258: "<pad>", **{i: p for p, i in tok.chat_tokens.items()}}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _sentencepiece(model: str, tok: Tokenizer):
    import sentencepiece as spm
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_file=model)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    # Control pieces (<s>, </s>), <unk>, and the chat markers (user-defined: matched before BPE).
    specials = {i: sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    specials.update({i: p for p, i in tok.chat_tokens.items()})
    merges = []
    for piece, pid in vocab.items():  # a BPE piece is the merge of two pieces; its id is the merge's rank
        if pid in specials or sp.is_byte(pid) or len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(pid, vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    hf = HFTok(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk, fuse_unk=True,
                          byte_fallback=True))
    # Spaces become "▁" and only the text's first segment gets the dummy prefix ("first"): a segment
    # that follows a chat marker must not get one, as SentencePiece itself never adds it there.
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return hf, specials


def export_tokenizer(tokenizer_type: str, tokenizer_model: str, out: Path) -> str:
    """Writes the tokenizer files into `out`; returns a short description of what was written."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTok

    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    kind = tok.name if hasattr(tok, "name") else tokenizer_type
    if kind == "hf":
        src = Path(tokenizer_model)
        hf = HFTok.from_file(str(src / "tokenizer.json" if src.is_dir() else src))
        specials = {}
    elif kind == "byte":
        hf, specials = _byte_level(tok)
    elif kind == "sentencepiece":
        hf, specials = _sentencepiece(tokenizer_model, tok)
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    else:
        raise ConfigError(f"tokenizer type '{tokenizer_type}' cannot be exported to HF files "
                          f"(byte, sentencepiece and hf can)")
    for i, piece in sorted(specials.items()):
        hf.add_special_tokens([AddedToken(piece, special=True, normalized=False)])
        if hf.token_to_id(piece) != i:
            raise ConfigError(f"{tokenizer_model or kind}: special token {piece!r} would get id "
                              f"{hf.token_to_id(piece)} instead of {i} in the exported tokenizer")
    hf.save(str(out / "tokenizer.json"))

    def name(i: int) -> str | None:
        return hf.id_to_token(i) if 0 <= i < tok.vocab_size else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos), "eos_token": name(tok.eos),
              "pad_token": name(tok.pad), "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 1 << 30, "additional_special_tokens": sorted(tok.chat_tokens)}
    if kind == "sentencepiece" and getattr(tok, "sp", None) is not None and tok.sp.unk_id() >= 0:
        config["unk_token"] = name(tok.sp.unk_id())
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return f"tokenizer ({kind}) -> tokenizer.json, tokenizer_config.json"
