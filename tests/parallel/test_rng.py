from __future__ import annotations

import torch

from megalite.parallel.rng import seed_everything


def test_tp_stream_differs_per_rank_and_default_stream_matches():
    draws = []
    for tp_rank in (0, 1):
        tracker = seed_everything(42, tp_rank, 0, torch.device("cpu"))
        a = torch.rand(4)
        with tracker.fork():
            forked = torch.rand(4)
        b = torch.rand(4)
        draws.append((a, forked, b))
    (a0, f0, b0), (a1, f1, b1) = draws
    assert torch.equal(a0, a1) and torch.equal(b0, b1)  # replicated activations: same masks
    assert not torch.equal(f0, f1)  # sharded activations: different masks


def test_fork_leaves_default_stream_untouched_and_advances_its_own():
    tracker = seed_everything(1, 0, 0, torch.device("cpu"))
    with tracker.fork():
        first = torch.rand(3)
    with tracker.fork():
        second = torch.rand(3)
    assert not torch.equal(first, second)
    x = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(x, torch.rand(3))


def test_state_roundtrip_replays_the_stream():
    tracker = seed_everything(3, 1, 0, torch.device("cpu"))
    saved = tracker.state_dict()
    with tracker.fork():
        a = torch.rand(5)
    tracker.load_state_dict(saved)
    with tracker.fork():
        assert torch.equal(a, torch.rand(5))
