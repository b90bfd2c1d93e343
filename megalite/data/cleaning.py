"""Document cleaning: length, Gopher and C4 quality filters, PII scrubbing, exact and MinHash dedup.

Per-document work (filters, scrubbing, hashes, MinHash signatures) is pure and runs in worker
processes; the only shared state, the sets of seen hashes and LSH band keys, lives in the main
process, which decides duplicates in input order so the output is deterministic. Every dropped
document is attributed to exactly one reason (the first filter that rejects it).

Thresholds default to the published ones (Gopher: Rae et al. 2021; C4: Raffel et al. 2020, as
FineWeb applies them) and are all exposed in `CleanConfig`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LengthConfig:
    enabled: bool = True
    min_chars: int = 50
    max_chars: int = 1_000_000


@dataclass
class GopherConfig:
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    # Repetition filters.
    max_dup_line_ratio: float = 0.3
    max_dup_para_ratio: float = 0.3
    max_dup_line_char_ratio: float = 0.2
    max_dup_para_char_ratio: float = 0.2
    top_ngram_char_ratio: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_ngram_char_ratio: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


@dataclass
class C4Config:
    enabled: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000
    drop_lines_without_terminal_punct: bool = True
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    min_sentences: int = 5


@dataclass
class PIIConfig:
    enabled: bool = True
    email: str = "<EMAIL>"  # replacement text; "" leaves that kind alone
    phone: str = "<PHONE>"
    ipv4: str = "<IP>"
    ssn: str = "<SSN>"


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    ngram: int = 5  # word shingles
    bands: int = 14  # FineWeb: 14 bands x 8 hashes = 112 permutations
    rows: int = 8
    seed: int = 1


@dataclass
class CleanConfig:
    text_key: str = "text"
    length: LengthConfig = field(default_factory=LengthConfig)
    gopher: GopherConfig = field(default_factory=GopherConfig)
    c4: C4Config = field(default_factory=C4Config)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


def load_clean_config(data: dict[str, Any] | None, source: str = "config") -> CleanConfig:
    """A CleanConfig from a mapping (YAML/JSON), rejecting unknown keys by name."""
    cfg = CleanConfig()

    def apply(obj: Any, upd: dict[str, Any], prefix: str) -> None:
        names = {f.name: f for f in dataclasses.fields(obj)}
        for k, v in upd.items():
            if k not in names:
                raise ValueError(f"{source}: unknown key '{prefix}{k}'")
            cur = getattr(obj, k)
            if dataclasses.is_dataclass(cur):
                if not isinstance(v, dict):
                    raise ValueError(f"{source}: '{prefix}{k}' must be a mapping")
                apply(cur, v, f"{prefix}{k}.")
            elif isinstance(cur, dict):
                if not isinstance(v, dict):
                    raise ValueError(f"{source}: '{prefix}{k}' must be a mapping")
                setattr(obj, k, {int(a): float(b) for a, b in v.items()})
            elif isinstance(cur, bool):
                if not isinstance(v, bool):
                    raise ValueError(f"{source}: '{prefix}{k}' must be true or false")
                setattr(obj, k, v)
            elif isinstance(cur, (int, float)):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise ValueError(f"{source}: '{prefix}{k}' must be a number")
                setattr(obj, k, type(cur)(v))
            else:
                setattr(obj, k, v)

    apply(cfg, data or {}, "")
    return cfg


# ---------------------------------------------------------------------------------------------
# PII

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
_PHONE = re.compile(r"(?<![\w+])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])")


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """Replaces emails, SSN-like numbers, phone numbers and IPv4 addresses; returns the counts."""
    counts: dict[str, int] = {}
    # SSNs before phones: a phone pattern must never eat the digits of an SSN.
    for kind, pattern in (("email", _EMAIL), ("ssn", _SSN), ("phone", _PHONE), ("ipv4", _IPV4)):
        repl = getattr(cfg, kind)
        if repl:
            text, n = pattern.subn(repl, text)
            if n:
                counts[kind] = n
    return text, counts


# ---------------------------------------------------------------------------------------------
# Quality filters: each returns None (keep) or the drop reason.

_BULLETS = ("•", "●", "-", "*", "‣", "⁃", "◦", "▪")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def length_filter(text: str, cfg: LengthConfig) -> str | None:
    if len(text) < cfg.min_chars:
        return "length_too_short"
    if len(text) > cfg.max_chars:
        return "length_too_long"
    return None


def _dup_stats(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of chars in such items)."""
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for x in items:
        total_chars += len(x)
        if x in seen:
            dup += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup / max(len(items), 1), dup_chars / max(total_chars, 1)


def _lines(text: str) -> list[str]:
    """The non-blank lines of `text`."""
    return [ln for ln in text.split("\n") if ln.strip()]


def gopher_repetition(text: str, words: list[str], cfg: GopherConfig, lines: list[str] | None = None) -> str | None:
    """`lines`: `text`'s non-blank lines, when the caller has them already."""
    paras = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
    lines = _lines(text) if lines is None else lines
    frac, char_frac = _dup_stats(paras)
    if frac > cfg.max_dup_para_ratio:
        return "gopher_dup_paragraphs"
    if char_frac > cfg.max_dup_para_char_ratio:
        return "gopher_dup_paragraph_chars"
    frac, char_frac = _dup_stats(lines)
    if frac > cfg.max_dup_line_ratio:
        return "gopher_dup_lines"
    if char_frac > cfg.max_dup_line_char_ratio:
        return "gopher_dup_line_chars"
    if not words:
        return None
    # Word n-grams as 64-bit rolling hashes over word ids: numpy work instead of tuples per position.
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words))
    with np.errstate(over="ignore"):
        ids = (ids + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        ids ^= ids >> np.uint64(29)
    wlen = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    csum = np.concatenate([[0], np.cumsum(wlen)])
    total = int(csum[-1]) or 1
    for n, limit in sorted(cfg.top_ngram_char_ratio.items()):
        if len(words) < n:
            continue
        h = _ngram_hashes(ids, n)
        _, first, counts = np.unique(h, return_index=True, return_counts=True)
        top = counts.max()
        if top > 1:
            # Among the most frequent n-grams, the one covering the most characters.
            chars = (csum[first + n] - csum[first])[counts == top].max()
            if top * chars / total > limit:
                return f"gopher_top_{n}gram"
    for n, limit in sorted(cfg.dup_ngram_char_ratio.items()):
        if len(words) < n:
            continue
        h = _ngram_hashes(ids, n)
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        starts = np.nonzero(first[inverse] != np.arange(len(h)))[0]  # n-grams seen before
        if len(starts):
            depth = np.cumsum(np.bincount(starts, minlength=len(words) + 1)
                              - np.bincount(starts + n, minlength=len(words) + 1))[: len(words)]
            if wlen[depth > 0].sum() / total > limit:
                return f"gopher_dup_{n}gram"
    return None


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    k = len(ids) - n + 1
    h = np.zeros(k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(0x100000001B3) + ids[j : j + k]
    return h


def gopher_quality(text: str, words: list[str], cfg: GopherConfig, lines: list[str] | None = None) -> str | None:
    """`lines`: `text`'s non-blank lines, when the caller has them already."""
    plain = [w for w in words if _PUNCT.sub("", w)]  # words that are not pure punctuation
    n = len(plain)
    if n < cfg.min_words:
        return "gopher_too_few_words"
    if n > cfg.max_words:
        return "gopher_too_many_words"
    mean = sum(len(w) for w in plain) / n
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return "gopher_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "gopher_symbol_ratio"
    lines = _lines(text) if lines is None else lines
    if lines:
        if sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines_ratio:
            return "gopher_bullet_lines"
        if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
            return "gopher_ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1) < cfg.min_alpha_words_ratio:
        return "gopher_alpha_words"
    stop = set(cfg.stop_words)
    if sum(w.lower() in stop for w in words) < cfg.min_stop_words:
        return "gopher_stop_words"
    return None


def c4_filter(text: str, cfg: C4Config) -> tuple[str | None, str, int]:
    """(drop reason or None, the text with C4's bad lines removed, lines removed)."""
    low = text.lower()
    if cfg.drop_lorem_ipsum and "lorem ipsum" in low:
        return "c4_lorem_ipsum", text, 0
    if cfg.drop_curly_bracket and "{" in text:
        return "c4_curly_bracket", text, 0
    kept, removed = [], 0
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            continue
        ls = s.lower()
        words = s.split()
        bad = (
            len(words) < cfg.min_words_per_line
            or any(len(w) > cfg.max_word_length for w in words)
            or (cfg.drop_lines_without_terminal_punct and not s.endswith(_TERMINAL))
            or (cfg.drop_javascript_lines and "javascript" in ls)
            or (cfg.drop_policy_lines and any(p in ls for p in _POLICY))
        )
        if bad:
            removed += 1
        else:
            kept.append(s)
    out = "\n".join(kept)
    if not kept:
        return "c4_no_lines_left", out, removed
    sentences = len(re.findall(r"[.!?]+(?:\s|$)", out))
    if sentences < cfg.min_sentences:
        return "c4_too_few_sentences", out, removed
    return None, out, removed


# ---------------------------------------------------------------------------------------------
# Dedup keys


def normalize(text: str) -> str:
    """Lowercase, NFKC, punctuation stripped, whitespace collapsed: what exact dedup compares."""
    t = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", t).split())


def exact_hash(text: str) -> bytes:
    return exact_hash_normalized(normalize(text))


def exact_hash_normalized(norm: str) -> bytes:
    """`exact_hash` of a text whose `normalize` the caller already has."""
    return hashlib.blake2b(norm.encode(), digest_size=16).digest()


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _permutations(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, num, dtype=np.uint64)
    return a, b


class MinHasher:
    """MinHash signatures over word n-gram shingles and their LSH band keys.

    Word hashes come from CRC32+Adler32 (deterministic across processes, unlike `hash`); shingle
    hashes combine them polynomially; permutations are multiply-shift hashes a*x+b mod 2^64.
    """

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.num = cfg.bands * cfg.rows
        self.a, self.b = _permutations(self.num, cfg.seed)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_normalized(normalize(text))

    def signature_normalized(self, norm: str) -> np.ndarray:
        """`signature` of a text whose `normalize` the caller already has."""
        words = [w.encode() for w in norm.split()] or [b""]
        wh = np.fromiter(((zlib.crc32(w) << 32) | zlib.adler32(w) for w in words), dtype=np.uint64, count=len(words))
        # Shingles of n words (the whole text when it is shorter), hashed as the Gopher n-grams are.
        sh = _ngram_hashes(wh, min(self.cfg.ngram, len(words)))
        k = len(sh)
        with np.errstate(over="ignore"):
            sig = np.full(self.num, np.iinfo(np.uint64).max, dtype=np.uint64)
            for s in range(0, k, 2048):
                block = sh[s : s + 2048, None] * self.a[None, :] + self.b[None, :]
                np.minimum(sig, (block >> np.uint64(32)).min(axis=0), out=sig)
        return sig

    def band_keys(self, sig: np.ndarray) -> list[bytes]:
        rows = sig.reshape(self.cfg.bands, self.cfg.rows)
        return [bytes([i]) + hashlib.blake2b(r.tobytes(), digest_size=12).digest() for i, r in enumerate(rows)]


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


# ---------------------------------------------------------------------------------------------
# One document, end to end (the worker side).


@dataclass
class DocResult:
    text: str | None  # cleaned (and scrubbed) text, None when dropped
    reason: str | None
    exact: bytes | None = None
    bands: list[bytes] | None = None
    pii: dict[str, int] = field(default_factory=dict)
    lines_removed: int = 0


class Cleaner:
    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.minhash = MinHasher(cfg.dedup) if cfg.dedup.near else None

    def process(self, text: str) -> DocResult:
        cfg = self.cfg
        if cfg.length.enabled and (r := length_filter(text, cfg.length)):
            return DocResult(None, r)
        if cfg.gopher.enabled:
            words, lines = text.split(), _lines(text)
            if ((r := gopher_repetition(text, words, cfg.gopher, lines))
                    or (r := gopher_quality(text, words, cfg.gopher, lines))):
                return DocResult(None, r)
        removed = 0
        if cfg.c4.enabled:
            r, text, removed = c4_filter(text, cfg.c4)
            if r:
                return DocResult(None, r, lines_removed=removed)
            if cfg.length.enabled and len(text) < cfg.length.min_chars:
                return DocResult(None, "length_too_short_after_c4", lines_removed=removed)
        # Dedup keys are taken before scrubbing, so placeholders never make documents look alike.
        norm = normalize(text) if cfg.dedup.exact or self.minhash else ""
        exact = exact_hash_normalized(norm) if cfg.dedup.exact else None
        bands = self.minhash.band_keys(self.minhash.signature_normalized(norm)) if self.minhash else None
        pii: dict[str, int] = {}
        if cfg.pii.enabled:
            text, pii = scrub_pii(text, cfg.pii)
        return DocResult(text, None, exact, bands, pii, removed)


class Deduplicator:
    """The main process's memory of what has been kept: exact hashes and LSH band keys."""

    def __init__(self) -> None:
        self.exact: set[bytes] = set()
        self.bands: set[bytes] = set()

    def check(self, r: DocResult) -> str | None:
        if r.exact is not None:
            if r.exact in self.exact:
                return "exact_duplicate"
        if r.bands is not None and any(b in self.bands for b in r.bands):
            return "near_duplicate"
        if r.exact is not None:
            self.exact.add(r.exact)
        if r.bands is not None:
            self.bands.update(r.bands)
        return None
