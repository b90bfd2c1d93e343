"""How a text is scored, shared by `megalite eval` and the lm-eval adapter so both give the same
log-likelihoods: the text's tokens follow one end-of-document token (the separator every
pretraining document follows), and every text token is predicted. A text longer than the window
is cut into disjoint windows of `window` predicted tokens, each window's context being the token
just before it (lm-eval's rolling windows with a context of one token)."""

from __future__ import annotations

from collections.abc import Iterator


def scored_windows(ids: list[int], eod: int, window: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs of equal length <= window covering every token of `ids` once."""
    seq = [eod, *ids]
    for start in range(0, len(ids), window):
        n = min(window, len(ids) - start)
        yield seq[start: start + n], seq[start + 1: start + 1 + n]
