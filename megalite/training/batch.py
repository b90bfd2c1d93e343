"""Turns a [mbs, seq+1] token window into model inputs: shifted labels and document masking."""

from __future__ import annotations

import torch

from megalite.parallel.cross_entropy import IGNORE_INDEX


def make_micro_batch(window: torch.Tensor, eod: int, reset_at_eod: bool, eod_mask_loss: bool,
                     device: torch.device) -> dict[str, torch.Tensor | None]:
    window = window.to(device, non_blocking=True)
    tokens, labels = window[:, :-1].contiguous(), window[:, 1:].clone()
    if eod_mask_loss:
        labels[tokens == eod] = IGNORE_INDEX
    position_ids = doc_ids = None
    if reset_at_eod:
        # A token after an EOD starts a new document: positions restart there and attention
        # does not cross the boundary (the EOD itself closes the previous document).
        is_eod = (tokens == eod).long()
        doc_ids = torch.cumsum(is_eod, dim=1) - is_eod
        seq = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        starts = torch.where(torch.nn.functional.pad(is_eod[:, :-1], (1, 0)) == 1, seq, torch.zeros_like(seq))
        position_ids = seq - torch.cummax(starts, dim=1).values
        if not bool(is_eod[:, :-1].any()):
            doc_ids = None  # one document per row: plain causal attention is the same, and faster
    return {"tokens": tokens, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


def loss_token_count(batches: list[dict]) -> int:
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
