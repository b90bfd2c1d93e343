"""The batch stream: global sample order cut into micro-batches, sharded over DP ranks.

Sample `consumed + m*mbs*dp + r*mbs + j` goes to DP rank r, micro-batch m, row j (Megatron's
pretraining sampler), so the stream is resumable from any consumed-sample count: a run restarted
at consumed sample k reads exactly the batches the uninterrupted run would have read next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from megalite.data.datasets import get_rows


def micro_batch_indices(consumed: int, micro: int, mbs: int, dp_rank: int, dp: int) -> range:
    start = consumed + micro * mbs * dp + dp_rank * mbs
    return range(start, start + mbs)


def get_micro_batch(dataset: Sequence[np.ndarray], consumed: int, micro: int, mbs: int,
                    dp_rank: int, dp: int) -> torch.Tensor:
    """A [mbs, seq_len+1] int64 tensor; indices past the dataset wrap into further epochs."""
    r = micro_batch_indices(consumed, micro, mbs, dp_rank, dp)
    return torch.from_numpy(get_rows(dataset, np.arange(r.start, r.stop, dtype=np.int64)))


def batch_stream(dataset: Sequence[np.ndarray], consumed: int, mbs: int, num_micro: int, dp_rank: int,
                 dp: int) -> Iterator[list[torch.Tensor]]:
    """Endless per-step lists of this rank's micro-batches, starting at `consumed` samples."""
    while True:
        yield [get_micro_batch(dataset, consumed, m, mbs, dp_rank, dp) for m in range(num_micro)]
        consumed += mbs * dp * num_micro
