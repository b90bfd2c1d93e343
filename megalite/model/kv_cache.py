"""The key/value cache of incremental decoding: per layer, the keys and values of every position
seen so far, so that each new token attends to them without recomputing the prefix.

Each layer's buffers are [batch, local_kv_heads, max_len, head_dim], allocated once (on the first
write, in the dtype the projections produce) and filled left to right. The heads are this TP rank's
kv heads as `Attention._project` returns them: nkv / tp of them, or the one replicated head this
rank's query heads use when there are fewer kv heads than TP ranks. Heads before positions is the
layout SDPA reads, so the cached prefix is passed to it as a view, without a copy.

Rows of a batch may start with padding (prompts of different lengths, left-padded): `valid` marks
the real slots, and a query attends to the valid slots up to its own. A padding query attends only
to itself, which keeps its (discarded) output finite.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """One decoder layer's buffers; `update` appends this step's keys/values and returns the prefix."""

    def __init__(self, parent: KVCache) -> None:
        self.parent = parent
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """k, v [s, b, heads, d] of the new positions -> (keys, values [b, heads, length + s, d],
        boolean mask [b, 1, s, length + s] or None, is_causal) for SDPA."""
        c = self.parent
        s, b, h, d = k.shape
        if self.k is None:
            self.k = k.new_empty(b, h, c.max_len, d)
            self.v = v.new_empty(b, h, c.max_len, d)
        end = c.length + s
        self.k[:, :, c.length: end] = k.permute(1, 2, 0, 3)
        self.v[:, :, c.length: end] = v.permute(1, 2, 0, 3)
        return self.k[:, :, :end], self.v[:, :, :end], c.mask, c.causal


class KVCache:
    """The cache of one model chunk: a `LayerKVCache` per layer id, the filled length and the mask.

    `valid` [batch, max_len] marks the slots that hold real tokens (False for left padding). The
    model calls `begin(s)` before its layers (the step's mask is built once for all layers) and
    `advance(s)` after them. Without padding, a prefill is plain causal attention and a one-token
    step attends to everything cached, so no mask is built and SDPA may pick its fastest kernel."""

    def __init__(self, layer_ids: list[int], valid: torch.Tensor) -> None:
        self.valid = valid.bool()
        self.max_len, self.length = valid.shape[1], 0
        self.padded = not bool(self.valid.all())
        self.layers = {i: LayerKVCache(self) for i in layer_ids}
        self.mask: torch.Tensor | None = None
        self.causal = False

    def begin(self, s: int) -> None:
        if self.length + s > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.length} + {s} do not fit")
        self.mask, self.causal = None, False
        if not self.padded and (s == 1 or self.length == 0):
            self.causal = s > 1
            return
        end = self.length + s
        q = torch.arange(self.length, end, device=self.valid.device).unsqueeze(1)  # query slots [s, 1]
        kv = torch.arange(end, device=self.valid.device).unsqueeze(0)  # key slots [1, end]
        self.mask = (((kv <= q) & self.valid[:, None, :end]) | (kv == q)).unsqueeze(1)  # [b, 1, s, end]

    def advance(self, s: int) -> None:
        self.length += s
        self.mask, self.causal = None, False
