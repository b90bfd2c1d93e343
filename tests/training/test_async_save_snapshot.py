"""An async save writes the state of the moment it was called, even when the writer runs late.

The background writer is held back (the file write, and payload building should it ever move off
the main thread, wait on an Event) until the next optimizer step has changed the weights and the
Adam moments; the checkpoint must still hold the values of the save call."""

from __future__ import annotations

import threading

import torch

from megalite.checkpoint import dist as ckpt
from megalite.parallel.state import ParallelState
from tests.training.test_checkpoint import _same_state, _tiny, _train


def _held_off_main_thread(fn, release: threading.Event, entered: list[str]):
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            entered.append(fn.__name__)
            assert release.wait(timeout=120), "the test never released the writer"
        return fn(*args, **kwargs)

    return wrapper


def test_async_save_writes_the_state_at_call_time_despite_a_late_writer(tmp_path, monkeypatch):
    release, entered = threading.Event(), []
    for name in ("atomic_write", "rank_payload"):
        monkeypatch.setattr(ckpt, name, _held_off_main_thread(getattr(ckpt, name), release, entered))
    cfg, m, opt = _tiny(async_save=True)
    _train(m, opt)
    snapshot = _tiny()
    for (_, p), (_, q) in zip(snapshot[1].named_parameters(), m.named_parameters(), strict=True):
        p.data.copy_(q)
    snapshot[2].load_state_dict(opt.state_dict())
    try:
        ckpt.save_checkpoint(tmp_path, 2, [m], opt, ParallelState(), cfg, {"consumed_samples": 2})
        assert ckpt._pending is not None and ckpt._pending.is_alive()  # the writer is waiting
        _train(m, opt, 1)  # the next step updates weights and moments in place
        changed = [n for (n, p), (_, q) in zip(m.named_parameters(), snapshot[1].named_parameters(), strict=True)
                   if not torch.equal(p, q)]
        assert changed, "the step after the save changed nothing, so the test would prove nothing"
        assert not (tmp_path / "latest").exists()  # nothing was written yet
    finally:
        release.set()
        ckpt.wait_for_pending_save()
    assert entered, "the background writer never reached the held write"
    loaded = _tiny()
    ckpt.load_checkpoint(tmp_path, [loaded[1]], loaded[2], ParallelState(), loaded[0])
    _same_state(snapshot, loaded)
