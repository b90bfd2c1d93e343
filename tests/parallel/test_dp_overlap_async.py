"""With overlap on, DP bucket reductions start inside backward and are NOT waited there.

Real gloo, 2 ranks. torch.distributed.all_reduce / reduce_scatter_single are wrapped to record the
async_op each bucket collective was issued with and when its handle is waited; the micro-batch
loop marks the phase (backward of the last micro-batch, then finalize_grads). A reducer that blocks
in the grad hook (async_op=False, or wait() right after launching) fails here, although its grads
are still right."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megalite.config import ModelConfig, ParallelConfig
from megalite.model import LlamaModel
from megalite.parallel.data_parallel import DataParallel
from megalite.parallel.finalize import finalize_grads
from megalite.parallel.state import build_parallel_state
from megalite.testing import run_distributed

CFG = ModelConfig(vocab_size=301, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=64, max_seq_len=32, tie_embeddings=True)


class _Spy:
    """Records (event, bucket-collective id, phase); wraps the returned work handles."""

    def __init__(self, grad_data: torch.Tensor) -> None:
        self.grad_data, self.phase, self.events = grad_data, "setup", []
        self.hook_checks: list[bool] = []

    def _is_bucket(self, t: torch.Tensor) -> bool:
        base = self.grad_data.untyped_storage().data_ptr()
        return t.untyped_storage().data_ptr() == base

    def wrap(self, fn, tensor_arg: int):
        def collective(*args, **kwargs):
            t = args[tensor_arg] if len(args) > tensor_arg else None
            if t is None or not self._is_bucket(t):
                return fn(*args, **kwargs)
            k = sum(e[0] == "launch" for e in self.events)
            async_op = bool(kwargs.get("async_op", False))
            self.events.append(("launch", k, self.phase, async_op))
            work = fn(*args, **kwargs)
            return _Handle(work, k, self) if work is not None else None

        return collective


class _Handle:
    def __init__(self, work, k: int, spy: _Spy) -> None:
        self.work, self.k, self.spy = work, k, spy

    def wait(self, *args, **kwargs):
        self.spy.events.append(("wait", self.k, self.spy.phase, None))
        return self.work.wait(*args, **kwargs)

    def is_completed(self) -> bool:
        return self.work.is_completed()


def _worker(rank: int, world: int) -> list[dict]:
    originals = dist.all_reduce, dist.reduce_scatter_single
    out = []
    for shard in (False, True):
        try:
            out.append(_one_step(shard))
        finally:
            dist.all_reduce, dist.reduce_scatter_single = originals
    return out


def _one_step(shard: bool) -> dict:
    ps = build_parallel_state(ParallelConfig())
    model = LlamaModel(CFG, ps)
    model.init_weights(3)
    ddp = DataParallel([model], ps, bucket_size_mb=0.004, overlap=True, shard=shard)  # ~1k floats a bucket
    spy = _Spy(ddp.grad_data)
    dist.all_reduce = spy.wrap(dist.all_reduce, 0)
    dist.reduce_scatter_single = spy.wrap(dist.reduce_scatter_single, 1)  # (output, input, ...)

    # After DataParallel's own hook (hooks run in registration order): no wait yet on this rank's
    # launched buckets when a hook returns.
    def after_hook(p: torch.Tensor) -> None:
        if spy.phase == "backward":
            spy.hook_checks.append(not any(e[0] == "wait" for e in spy.events))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(after_hook)

    g = torch.Generator().manual_seed(100 + ps.dp_rank)
    batches = [(torch.randint(0, 301, (2, 8), generator=g), torch.randint(0, 301, (2, 8), generator=g))
               for _ in range(2)]
    ddp.zero_grad()
    with ddp.no_sync():
        spy.phase = "no_sync"
        (model(batches[0][0], labels=batches[0][1]).sum() / 64).backward()
    spy.phase = "backward"
    (model(batches[1][0], labels=batches[1][1]).sum() / 64).backward()
    spy.phase = "finish"
    finalize_grads([model], ps)
    spy.phase = "done"
    return {"events": spy.events, "hook_checks": spy.hook_checks, "buckets": len(ddp.buckets),
            "late": sum(b.late for b in ddp.buckets)}


@pytest.mark.slow
def test_bucket_reductions_are_async_and_waited_only_at_the_end():
    """All-reduce buckets, then reduce-scatter buckets (the distributed optimizer's)."""
    for r in (res for rank in run_distributed(_worker, 2) for res in rank):
        events, regular = r["events"], r["buckets"] - r["late"]
        launches = [e for e in events if e[0] == "launch"]
        waits = [e for e in events if e[0] == "wait"]
        assert regular > 4 and len(launches) == r["buckets"]  # one collective per bucket, none in no_sync
        assert all(e[3] for e in launches), "a bucket collective was issued with async_op=False"
        # Overlap: (almost) every regular bucket started during the last backward...
        assert sum(e[2] == "backward" for e in launches) >= regular - 1
        # ...and none was waited there: every handle is waited once, in finalize, after all launches.
        assert sorted(e[1] for e in waits) == list(range(len(launches)))
        assert all(e[2] == "finish" for e in waits)
        assert events.index(waits[0]) > events.index(launches[-1])
        assert r["hook_checks"] and all(r["hook_checks"])
