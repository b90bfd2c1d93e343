"""Activation recomputation: drop a region's activations in forward, recompute them in backward.

* `selective`: only the attention core (softmax(QK^T)V, the activations that grow with s^2) is
  recomputed; it is cheap in FLOPs and dominant in memory.
* `full`: whole decoder layers are recomputed, every `every`-th layer counted by global layer id
  (layer i when i % every == 0, so `every=1` is all layers), which keeps the choice independent
  of the pipeline layout.

Dropout must draw the same masks when a region is recomputed. torch's checkpoint restores the
default CPU/CUDA generator; the RNG tracker's named streams (TP-rank-specific dropout) live outside
it, so `checkpoint` also snapshots the tracker at the forward and replays from that snapshot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint

from megalite.config import ConfigError
from megalite.parallel.rng import RNGTracker

RECOMPUTE_MODES = ("none", "selective", "full")


def _tracker_contexts(rng: RNGTracker | None) -> tuple[Any, Any]:
    """(forward context, recompute context) for torch's checkpoint `context_fn`."""
    if rng is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    snapshot: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def forward() -> Iterator[None]:
        snapshot.update(rng.state_dict())
        yield

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        after_forward = rng.state_dict()
        rng.load_state_dict(snapshot)
        try:
            yield
        finally:
            # Later forwards (other micro-batches) continue from where the streams really are.
            rng.load_state_dict(after_forward)

    return forward(), recompute()


def checkpoint(fn: Callable[..., Any], *args: Any, rng: RNGTracker | None = None) -> Any:
    """Runs `fn(*args)` without keeping its activations; backward reruns it with the same RNG.
    Pass `rng` only when the region draws from the tracker's streams: without it the checkpoint
    has no custom context, so torch.compile can trace it (train.compile with selective recompute)."""
    if rng is None:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return _checkpoint_with_tracker(fn, *args, rng=rng)


@torch.compiler.disable  # dynamo cannot trace a custom context_fn: under compile, this region runs eagerly
def _checkpoint_with_tracker(fn: Callable[..., Any], *args: Any, rng: RNGTracker) -> Any:
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                                             context_fn=lambda: _tracker_contexts(rng))


def apply_recompute(model: nn.Module, mode: str, every: int = 1) -> None:
    """Sets the recompute flags on a LlamaModel chunk's layers (parameters are untouched)."""
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"unknown parallel.recompute '{mode}' (expected one of: {', '.join(RECOMPUTE_MODES)})")
    if every < 1:
        raise ConfigError(f"parallel.recompute_every must be >= 1, got {every}")
    for layer_id, layer in model.layers.items():  # type: ignore[union-attr]
        layer.attn.recompute_core = mode == "selective"
        layer.recompute = mode == "full" and int(layer_id) % every == 0
