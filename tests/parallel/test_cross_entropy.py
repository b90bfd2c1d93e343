"""The torch vocab-parallel cross-entropy in place: the head's fp32 logits become the softmax and
then the gradient, with no [tokens, V] copy, and exactly the gradients of the copying path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy


class _CountBig(TorchDispatchMode):
    """Counts ops that return a new buffer of at least `numel` elements (a logits-sized allocation)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() >= self.numel and o.untyped_storage().data_ptr() not in ins:
                self.count += 1
        return out


def _run(inplace: bool, vocab_start: int, vocab_size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 8, generator=g, requires_grad=True)  # [s, b, h]
    w = torch.randn(40, 8, generator=g, requires_grad=True)  # this rank's 40 vocabulary rows
    target = torch.randint(vocab_start, vocab_size, (6, 2), generator=g)  # real columns only
    target[0, 1] = -100
    target[2, 0] = vocab_size - 1
    counter = _CountBig(6 * 2 * 40)
    with counter:
        logits = F.linear(x, w)
        ptr, version = logits.data_ptr(), logits._version
        loss = vocab_parallel_cross_entropy(logits, target, vocab_start, vocab_size, inplace=inplace)
        modified = logits._version > version
        (loss * torch.arange(12.0).view(6, 2)).sum().backward()  # per-token upstream grads differ
    return dict(loss=loss.detach(), dx=x.grad, dw=w.grad, allocs=counter.count, modified=modified,
                logits_ptr=ptr)


@pytest.mark.parametrize("vocab_start,vocab_size", [(0, 40), (40, 70)])  # the second: 10 padding columns
def test_in_place_matches_copy_without_the_copy(vocab_start: int, vocab_size: int):
    new, old = _run(True, vocab_start, vocab_size), _run(False, vocab_start, vocab_size)
    for k in ("loss", "dx", "dw"):
        assert torch.equal(new[k], old[k]), k
    assert torch.isfinite(new["loss"]).all()
    assert new["modified"] and not old["modified"]  # the logits tensor itself holds the softmax
    assert (new["allocs"], old["allocs"]) == (1, 2)  # the head's output alone; the copy path clones it


def test_in_place_matches_reference_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, 16, generator=g)
    target = torch.randint(0, 16, (5, 3), generator=g)
    ref = F.cross_entropy(logits.reshape(-1, 16), target.reshape(-1), reduction="none").view(5, 3)
    got = vocab_parallel_cross_entropy(logits.clone(), target, 0, 16, inplace=True)
    torch.testing.assert_close(got, ref)


def test_other_holders_of_the_logits_fail_loudly():
    x = torch.randn(4, 8, requires_grad=True)
    logits = x * 2.0
    probe = logits.sigmoid()  # sigmoid saves its output, not logits: allowed
    twice = logits * logits  # saves logits: its backward must refuse the overwritten values
    loss = vocab_parallel_cross_entropy(logits, torch.zeros(4, dtype=torch.long), 0, 8, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss.sum() + twice.sum() + probe.sum()).backward()


def test_model_loss_uses_the_in_place_path():
    from megalite.model.spec import torch_vocab_parallel_loss

    x = torch.randn(6, 2, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    counter = _CountBig(6 * 2 * 40)
    with counter:
        loss = torch_vocab_parallel_loss(x, w, torch.randint(0, 40, (6, 2)), vocab_start=0, vocab_size=40, group=None)
        loss.sum().backward()
    assert counter.count == 1  # the logits; neither a copy for the softmax nor one for the gradient
