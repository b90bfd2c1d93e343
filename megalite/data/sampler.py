"""The batch stream: global sample order cut into micro-batches, sharded over DP ranks.

Sample `consumed + m*mbs*dp + r*mbs + j` goes to DP rank r, micro-batch m, row j (Megatron's
pretraining sampler), so the stream is resumable from any consumed-sample count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def micro_batch_indices(consumed: int, micro: int, mbs: int, dp_rank: int, dp: int) -> range:
    start = consumed + micro * mbs * dp + dp_rank * mbs
    return range(start, start + mbs)


def get_micro_batch(dataset: Sequence[np.ndarray], consumed: int, micro: int, mbs: int,
                    dp_rank: int, dp: int) -> torch.Tensor:
    """A [mbs, seq_len+1] int64 tensor; indices past the dataset wrap into further epochs."""
    n = len(dataset)
    rows = [np.asarray(dataset[i % n], dtype=np.int64) for i in micro_batch_indices(consumed, micro, mbs, dp_rank, dp)]
    return torch.from_numpy(np.stack(rows))
