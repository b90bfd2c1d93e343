"""Frozen models beside the policy (DPO/PPO reference, reward model) and forward-only passes on them.

A frozen model has the policy's TP/PP layout (the same chunks on the same ranks, so its per-row
results land on the policy's last pipeline stage, in the very micro-batch dicts the policy's loss
reads), weights from a checkpoint of any saved layout, no grads, no optimizer and dropout off. It
may be parked on the CPU between the phases that use it (`offload` / `to_device`).

`forward_only` runs it through the ordinary pipeline schedule with `forward_only=True`; its step's
"loss" stores a per-row result into each micro-batch dict on the last stage, e.g.
`mb["ref_logps"]`, and returns 0. Under PP the other stages never see those keys, which is fine:
only the last stage computes a loss.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from megalite.checkpoint.dist import METADATA, read_metadata, resolve_checkpoint, saved_model_config
from megalite.checkpoint.pretrained import load_pretrained
from megalite.config import Config, ConfigError, ParallelConfig
from megalite.data.sft import IGNORE_INDEX
from megalite.parallel.pipeline.step import TokenLoss
from megalite.parallel.state import ParallelState
from megalite.training.build import build_model
from megalite.training.forward_backward import get_forward_backward

Store = Callable[[torch.Tensor, dict], None]


def check_checkpoint_vocab(checkpoint_dir: str | Path, cfg: Config, what: str) -> Path:
    """The step directory of `checkpoint_dir`, after checking its model shares the policy's vocabulary
    (a reward or reference model over another tokenizer scores other tokens: one ConfigError line)."""
    step_dir = resolve_checkpoint(checkpoint_dir)
    if step_dir is None:
        raise ConfigError(f"{what}: no checkpoint at {checkpoint_dir} (neither a step directory with {METADATA} "
                          f"nor a checkpoint root with a `latest`)")
    saved = saved_model_config(read_metadata(step_dir), str(step_dir / METADATA))
    if saved.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"{what}: {step_dir} has model.vocab_size {saved.vocab_size} but the policy has "
                          f"{cfg.model.vocab_size}; it must use the policy's tokenizer")
    return step_dir


def build_frozen_model(cfg: Config, ps: ParallelState, checkpoint_dir: str | Path, output_head: str = "lm",
                       offload: bool = False, what: str = "frozen model") -> list[nn.Module]:
    """This rank's chunks of a frozen copy of the policy's architecture (`output_head` lm or score),
    loaded from `checkpoint_dir`. `cfg.model.vocab_size` must already be resolved (the trainer does)."""
    step_dir = check_checkpoint_vocab(checkpoint_dir, cfg, what)
    fcfg = copy.deepcopy(cfg)
    fcfg.model.output_head = output_head
    fcfg.parallel.recompute = "none"  # nothing is kept for a backward
    chunks = build_model(fcfg, ps, None, schedule_checked=True)  # eval below: no dropout, so no RNG streams
    load_pretrained(step_dir, chunks, None, ps)
    for c in chunks:
        c.requires_grad_(False)
        c.eval()
    if offload:
        offload_chunks(chunks)
    return chunks


def offload_chunks(chunks: list[nn.Module]) -> None:
    """Parks the weights in CPU memory (in place: parameter attributes such as TP tags survive)."""
    for c in chunks:
        c.to("cpu")


offload = offload_chunks  # the name the RL stages use


def to_device(chunks: list[nn.Module], device: torch.device) -> None:
    for c in chunks:
        c.to(device)


class _StoreStep(TokenLoss):
    """The default forward (per-token CE with labels, or scores); the loss stores, returns 0."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def loss(self, output: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.store(output.detach(), mb)
        return output.new_zeros(()), {}


@torch.no_grad()
def forward_only(chunks: list[nn.Module], micro_batches: list[dict], ps: ParallelState, par: ParallelConfig,
                 store: Store, autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
    """Runs `chunks` over `micro_batches` through the layout's schedule, forward only; on the last
    pipeline stage `store(output, mb)` receives each micro-batch's output (per-token CE [b, s] for an
    lm head with labels, scores [b, s] for a score head) to put what it needs into `mb`."""
    fb = get_forward_backward(ps, par)
    with autocast() if autocast is not None else contextlib.nullcontext():
        fb(chunks, micro_batches, ps, num_units=1.0, step=_StoreStep(store), forward_only=True)


def sequence_logps_of(token_ce: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of log p(label) over the labelled positions ([b], float32): -(CE * mask).sum."""
    return -(token_ce.float() * (labels != IGNORE_INDEX)).sum(-1)


def sequence_logps(chunks: list[nn.Module], micro_batches: list[dict], ps: ParallelState, par: ParallelConfig,
                   key: str = "ref_logps", autocast=None) -> None:
    """Stores each row's sequence log-prob of its labels as `mb[key]` ([rows], float32) on the last
    pipeline stage. Vocab-parallel (the model's labels path), never gathering the vocabulary."""
    def store(out: torch.Tensor, mb: dict) -> None:
        mb[key] = sequence_logps_of(out, mb["labels"])

    forward_only(chunks, micro_batches, ps, par, store, autocast)


def token_logps(chunks: list[nn.Module], micro_batches: list[dict], ps: ParallelState, par: ParallelConfig,
                key: str = "ref_token_logps", autocast=None) -> None:
    """Stores per-token log p(label) as `mb[key]` ([b, s] float32, 0 where labels are -100)."""
    def store(out: torch.Tensor, mb: dict) -> None:
        mb[key] = -out.float() * (mb["labels"] != IGNORE_INDEX)

    forward_only(chunks, micro_batches, ps, par, store, autocast)
