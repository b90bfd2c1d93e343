"""RNG streams for tensor parallelism.

Dropout on activations that are replicated across TP ranks must draw the same mask on every rank
(the default stream, seeded identically), while dropout on TP-sharded activations (attention
probabilities of different heads, or sequence shards under SP) must differ per rank: that is the
`tensor_parallel` stream, seeded with an offset per TP rank. `fork` swaps a stream in and out so
the default stream is untouched, which also keeps recomputation bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TP_STREAM = "tensor_parallel"
_TP_SEED_OFFSET = 2718


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        saved = _get_state(self.device)
        torch.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(saved, self.device)

    @contextlib.contextmanager
    def fork(self, name: str = TP_STREAM) -> Iterator[None]:
        saved = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(saved, self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}


def seed_everything(seed: int, tp_rank: int, pp_rank: int, device: torch.device) -> RNGTracker:
    """Default stream: same on all TP ranks (differs by PP stage, which holds different layers)."""
    import random

    import numpy as np

    base = seed + 100 * pp_rank
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)
    tracker = RNGTracker(device)
    tracker.add(TP_STREAM, base + _TP_SEED_OFFSET + tp_rank)
    return tracker
