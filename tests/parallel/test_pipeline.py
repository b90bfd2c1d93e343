"""Every pipeline schedule must reproduce the single-process model: the step's loss and every
gradient, with uneven splits, tied embeddings, TP and SP. The recorded order of forwards and
backwards must be the schedule's (1F1B keeps at most pp - rank micro-batches in flight)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch

from megalite.config import ConfigError, ModelConfig, ParallelConfig
from megalite.model import LlamaModel
from megalite.parallel.finalize import finalize_grads
from megalite.parallel.pipeline import SCHEDULE_FNS, check_schedule, split_layers, stage_specs
from megalite.parallel.pipeline import schedules as schedules_mod
from megalite.parallel.state import ParallelState, build_parallel_state
from megalite.testing import full_tensors, run_distributed

BASE = ModelConfig(vocab_size=203, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                   ffn_hidden_size=64, max_seq_len=16, norm_eps=1e-6)
SEQ, MBS = 8, 2

# (name, world) -> cases; each case: parallel config kwargs, micro-batch count, model overrides.
CASES = {
    2: [
        dict(par=dict(pp=2, pipeline_schedule="afab", pp_layer_split=[1, 3]), m=3, model=dict(tie_embeddings=True)),
        dict(par=dict(pp=2, pipeline_schedule="1f1b"), m=5, model=dict(num_layers=3)),
        dict(par=dict(pp=2, pipeline_schedule="1f1b"), m=1, model={}),
        dict(par=dict(pp=2, vpp=2, pipeline_schedule="interleaved"), m=6, model=dict(tie_embeddings=True)),
        dict(par=dict(pp=2, vpp=2, pipeline_schedule="interleaved"), m=2, model={}),
        dict(par=dict(pp=2, vpp=2, pipeline_schedule="interleaved"), m=4, model={}, forward_only=True),
    ],
    4: [
        dict(par=dict(pp=4, pipeline_schedule="1f1b"), m=6, model=dict(num_layers=5, tie_embeddings=True)),
        dict(par=dict(pp=4, pipeline_schedule="afab"), m=3, model={}),
        dict(par=dict(pp=4, vpp=2, pipeline_schedule="interleaved"), m=8, model=dict(num_layers=8)),
        dict(par=dict(tp=2, sp=True, pp=2, vpp=2, pipeline_schedule="interleaved", pp_layer_split=[2, 1, 1, 2]),
             m=4, model=dict(num_layers=6, tie_embeddings=True)),
        dict(par=dict(tp=2, sp=True, pp=2, pipeline_schedule="1f1b"), m=3, model={}),
    ],
}


def _model_cfg(case: dict) -> ModelConfig:
    return dataclasses.replace(BASE, **case["model"])


def _micro_batches(m: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(m):
        tokens = torch.randint(0, BASE.vocab_size, (MBS, SEQ), generator=g)
        labels = torch.randint(0, BASE.vocab_size, (MBS, SEQ), generator=g)
        labels[0, 2] = -100
        doc_ids = torch.zeros(MBS, SEQ, dtype=torch.long)
        doc_ids[1, 5:] = 1  # two packed documents; positions restart at the boundary
        position_ids = torch.arange(SEQ).repeat(MBS, 1)
        position_ids[1, 5:] -= 5
        out.append(dict(tokens=tokens, labels=labels, position_ids=position_ids, doc_ids=doc_ids))
    return out


def _num_tokens(mbs) -> float:
    return float(sum(int((mb["labels"] != -100).sum()) for mb in mbs))


def _grads(chunks, ps: ParallelState) -> dict[str, torch.Tensor]:
    return full_tensors(chunks, ps)


class _Recording(schedules_mod._Steps):
    """Logs the order in which the schedule runs forwards and backwards."""

    events: list[tuple[str, int, int]] = []

    def forward(self, chunk_id, mb_id, inp):
        self.events.append(("F", chunk_id, mb_id))
        return super().forward(chunk_id, mb_id, inp)

    def backward(self, inp, out, grad):
        self.events.append(("B", -1, -1))
        return super().backward(inp, out, grad)


@contextlib.contextmanager
def _NoSync() -> Iterator[None]:  # noqa: N802 (stands in for DataParallel.no_sync)
    """Logs that a backward runs with DP grad reduction deferred."""
    _Recording.events.append(("N", -1, -1))
    yield


def _pp_worker(rank: int, world: int, cases: list[dict]):
    results = []
    for case in cases:
        par = ParallelConfig(**case["par"])
        cfg = _model_cfg(case)
        ps = build_parallel_state(par)
        chunks = []
        for spec in stage_specs(cfg.num_layers, par, ps.pp_rank):
            chunk = LlamaModel(cfg, ps, layer_ids=spec.layer_ids, pre_process=spec.pre_process,
                               post_process=spec.post_process)
            chunk.init_weights(7)
            chunks.append(chunk)
        events: list[tuple[str, int, int]] = []
        steps_cls = schedules_mod._Steps
        _Recording.events = events
        schedules_mod._Steps = _Recording
        try:
            mbs = _micro_batches(case["m"])
            fn = SCHEDULE_FNS[par.pipeline_schedule]
            loss = fn(chunks, mbs, ps, num_units=_num_tokens(mbs), forward_only=case.get("forward_only", False),
                      no_sync=_NoSync)
        finally:
            schedules_mod._Steps = steps_cls
        grads = {}
        if not case.get("forward_only"):
            finalize_grads(chunks, ps)
            grads = _grads(chunks, ps)
        else:
            assert all(p.grad is None for c in chunks for p in c.parameters())
        results.append(dict(loss=loss["loss"], grads=grads, events=events, pp_rank=ps.pp_rank, tp_rank=ps.tp_rank))
    return results


def _reference(case: dict):
    model = LlamaModel(_model_cfg(case), ParallelState())
    model.init_weights(7)
    mbs = _micro_batches(case["m"])
    n = _num_tokens(mbs)
    total = torch.zeros(())
    for mb in mbs:
        loss = model(tokens=mb["tokens"], labels=mb["labels"], position_ids=mb["position_ids"],
                     doc_ids=mb["doc_ids"])
        (loss.sum() / n).backward()
        total += loss.detach().sum()
    return total, _grads([model], ParallelState())


def _check_order(case: dict, res: dict, pp: int) -> None:
    events, r, m = res["events"], res["pp_rank"], case["m"]
    v = case["par"].get("vpp", 1)
    fwd = [e for e in events if e[0] == "F"]
    assert sorted(fwd) == sorted(("F", c, i) for c in range(v) for i in range(m))
    if case.get("forward_only"):
        assert len(fwd) == len(events)
        return
    # Grad reduction is deferred (no_sync) in every backward but the rank's last one.
    kinds = "".join(e[0] for e in events if e[0] in "BN")
    assert kinds == "BN" * (m * v - 1) + "B", kinds
    events = [e for e in events if e[0] != "N"]
    in_flight = peak = 0
    for e in events:
        in_flight += 1 if e[0] == "F" else -1
        peak = max(peak, in_flight)
    assert in_flight == 0
    sched = case["par"]["pipeline_schedule"]
    if sched == "afab":
        assert peak == m  # every activation alive at once
    elif sched == "1f1b":
        assert peak == min(pp - r, m)
    else:
        warmup = m * v if m == pp else min((pp - r - 1) * 2 + (v - 1) * pp, m * v)
        assert peak == min(warmup + 1, m * v)


def _compare(world: int, results) -> None:
    for i, case in enumerate(CASES[world]):
        ref_loss, ref_grads = _reference(case)
        par = ParallelConfig(**case["par"])
        seen: dict[str, torch.Tensor] = {}
        for res in (r[i] for r in results):
            _check_order(case, res, par.pp)
            if res["pp_rank"] == par.pp - 1:
                torch.testing.assert_close(res["loss"], ref_loss, rtol=1e-5, atol=1e-5)
            else:
                assert float(res["loss"]) == 0.0
            for name, g in res["grads"].items():
                ref = ref_grads["embedding.weight" if name == "head" and "head" not in ref_grads else name]
                torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=f"{case} {name}")
                seen[name] = g
        if not case.get("forward_only"):
            assert set(ref_grads) <= set(seen), f"{case}: missing {set(ref_grads) - set(seen)}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_schedules_match_single_process(world: int):
    _compare(world, run_distributed(_pp_worker, world, CASES[world]))


def test_split_layers():
    assert split_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Remainders go to interior stages first (the ends hold the embedding and the head).
    assert [len(s) for s in split_layers(6, 4)] == [1, 2, 2, 1]
    assert [len(s) for s in split_layers(7, 4)] == [2, 2, 2, 1]
    assert split_layers(5, 2, split=[1, 4]) == [[0], [1, 2, 3, 4]]
    par = ParallelConfig(pp=2, vpp=2, pipeline_schedule="interleaved")
    specs = stage_specs(8, par, pp_rank=1)  # chunk v holds virtual stage v*pp + rank
    assert [s.virtual_stage for s in specs] == [1, 3]
    assert [s.layer_ids for s in specs] == [[2, 3], [6, 7]]
    assert [(s.pre_process, s.post_process) for s in specs] == [(False, False), (False, True)]


@pytest.mark.parametrize("par,m,layers,msg", [
    (dict(pp=2, vpp=2, pipeline_schedule="interleaved"), 3, 4, "multiple of parallel.pp"),
    (dict(pp=2, pipeline_schedule="interleaved"), 4, 4, "vpp >= 2"),
    (dict(pp=2, vpp=2, pipeline_schedule="afab"), 4, 4, "vpp=2 needs the interleaved schedule .* not 'afab'"),
    (dict(pp=2, vpp=2), 3, 4, "multiple of parallel.pp"),  # the default 1f1b runs interleaved with vpp
    (dict(pp=2, pipeline_schedule="gpipe"), 4, 4, "unknown parallel.pipeline_schedule"),
    (dict(pp=2, pp_layer_split=[1, 2]), 4, 4, "sums to 3"),
    (dict(pp=2, pp_layer_split=[4]), 4, 4, "has 1 entries"),
    (dict(pp=2, pp_layer_split=[0, 4]), 4, 4, "at least one layer"),
    (dict(pp=4), 4, 3, "fewer than pp\\*vpp"),
    (dict(pp=2), 0, 4, "at least one"),
])
def test_check_schedule_rejects(par: dict, m: int, layers: int, msg: str):
    with pytest.raises(ConfigError, match=msg):
        check_schedule(ParallelConfig(**par), m, layers)


def test_check_schedule_accepts():
    check_schedule(ParallelConfig(pp=2, vpp=2, pipeline_schedule="interleaved"), 4, 4)
    check_schedule(ParallelConfig(pp=4, pipeline_schedule="1f1b"), 2, 4)  # fewer micro-batches than stages
    check_schedule(ParallelConfig(), 1, 1)


def test_trainer_hook_selects_the_configured_schedule():
    from megalite.training.forward_backward import forward_backward_no_pipelining, get_forward_backward

    assert get_forward_backward(ParallelState(), ParallelConfig()) is forward_backward_no_pipelining
    for name, vpp in (("afab", 1), ("1f1b", 1), ("interleaved", 2)):
        par = ParallelConfig(pp=2, vpp=vpp, pipeline_schedule=name)
        assert get_forward_backward(ParallelState(pp=2, vpp=vpp), par) is SCHEDULE_FNS[name]
    with pytest.raises(ConfigError, match="vpp >= 2"):
        get_forward_backward(ParallelState(pp=2), ParallelConfig(pp=2, pipeline_schedule="interleaved"))
