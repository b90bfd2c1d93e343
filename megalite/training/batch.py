"""Turns a [mbs, seq+1] token window into model inputs: shifted labels and document masking.

Everything is computed on the host window (the sampler's CPU tensor), so building a step's
batches never waits on the device: the EOD check and the loss-token count are plain CPU reads.
Only the finished tensors go to the device, from pinned memory and without blocking on CUDA.
"""

from __future__ import annotations

import torch

from megalite.parallel.cross_entropy import IGNORE_INDEX


def make_micro_batch(window: torch.Tensor, eod: int, reset_at_eod: bool, eod_mask_loss: bool,
                     device: torch.device) -> dict[str, torch.Tensor | int | None]:
    window = window.cpu()  # a no-op for the sampler's windows
    tokens, labels = window[:, :-1].contiguous(), window[:, 1:].clone()
    if eod_mask_loss:
        labels[tokens == eod] = IGNORE_INDEX
    position_ids = doc_ids = None
    if reset_at_eod:
        # A token after an EOD starts a new document: positions restart there and attention
        # does not cross the boundary (the EOD itself closes the previous document).
        is_eod = (tokens == eod).long()
        doc_ids = torch.cumsum(is_eod, dim=1) - is_eod
        seq = torch.arange(tokens.shape[1]).expand_as(tokens)
        starts = torch.where(torch.nn.functional.pad(is_eod[:, :-1], (1, 0)) == 1, seq, torch.zeros_like(seq))
        position_ids = seq - torch.cummax(starts, dim=1).values
        if not bool(is_eod[:, :-1].any()):
            doc_ids = None  # one document per row: plain causal attention is the same, and faster
    num_loss_tokens = int((labels != IGNORE_INDEX).sum())
    return {"tokens": _to_device(tokens, device), "labels": _to_device(labels, device),
            "position_ids": _to_device(position_ids, device), "doc_ids": _to_device(doc_ids, device),
            "num_loss_tokens": num_loss_tokens}


def _to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None or torch.device(device).type == "cpu":
        return t
    if torch.device(device).type == "cuda":
        # From pageable memory a "non_blocking" copy is synchronous; pinned memory makes it async
        # (the caching host allocator keeps the pinned block alive until the copy has run).
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def loss_token_count(batches: list[dict]) -> int:
    """Tokens whose loss counts (labels != IGNORE_INDEX); read from the host-side count when the
    batch has one, so no device sync."""
    return sum(b["num_loss_tokens"] if "num_loss_tokens" in b else int((b["labels"] != IGNORE_INDEX).sum())
               for b in batches)


def batch_to_device(mb: dict, device: torch.device) -> dict:
    """A host-built micro-batch with its tensors on `device` (other values kept as they are)."""
    return {k: _to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
