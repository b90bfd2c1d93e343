"""Choosing the next token from full-vocabulary logits: greedy, or sampled with temperature, top-k
and top-p (nucleus), from a seeded generator.

The log-prob returned for a token is its log-softmax under logits / temperature (plain log-softmax
for greedy), over the whole vocabulary: top-k / top-p only narrow what may be drawn, they do not
renormalize the reported log-probs (so they stay comparable with a training forward's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalite.config import ConfigError


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [b, V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the most
        # likely token is always kept.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, V] (the real vocabulary) -> (next tokens [b], their log-probs [b])."""
    logits = logits.float()
    if temperature == 0.0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / temperature
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, F.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)
