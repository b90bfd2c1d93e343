"""make_micro_batch: the host-side token count and EOD check; a CUDA batch equals the CPU one."""

from __future__ import annotations

import pytest
import torch

from megalite.parallel.cross_entropy import IGNORE_INDEX
from megalite.training.batch import loss_token_count, make_micro_batch

EOD = 9


def _window(seed: int, eods: bool) -> torch.Tensor:
    w = torch.randint(0, EOD, (3, 17), generator=torch.Generator().manual_seed(seed))
    if eods:
        w[0, 4] = w[1, 0] = w[2, 15] = EOD
    return w


@pytest.mark.parametrize("eods", [True, False])
def test_token_count_and_doc_ids_are_read_on_the_host(eods):
    mb = make_micro_batch(_window(1, eods), EOD, reset_at_eod=True, eod_mask_loss=True, device=torch.device("cpu"))
    assert mb["num_loss_tokens"] == int((mb["labels"] != IGNORE_INDEX).sum())
    without = {k: v for k, v in mb.items() if k != "num_loss_tokens"}  # the labels-only fallback
    assert loss_token_count([mb, mb]) == loss_token_count([without, without]) == 2 * mb["num_loss_tokens"]
    assert (mb["doc_ids"] is None) == (not eods)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reset,mask", [(True, True), (False, False)])
def test_cuda_batch_equals_cpu_batch(reset, mask):
    w = _window(2, eods=True)
    cpu = make_micro_batch(w, EOD, reset, mask, torch.device("cpu"))
    gpu = make_micro_batch(w, EOD, reset, mask, torch.device("cuda"))
    assert gpu.keys() == cpu.keys() and gpu["num_loss_tokens"] == cpu["num_loss_tokens"]
    for k, v in cpu.items():
        if isinstance(v, torch.Tensor):
            assert gpu[k].device.type == "cuda" and torch.equal(gpu[k].cpu(), v), k
        else:
            assert gpu[k] == v, k
