"""The buffer optimizers: AdamW arithmetic, ZeRO-1 == replicated == one process, memory formula."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from benchmarks import comm_volume
from megalite.config import ModelConfig, OptimConfig, ParallelConfig
from megalite.model import LlamaModel
from megalite.parallel.distributed_optimizer import BufferOptimizer, DistributedOptimizer, _merge
from megalite.parallel.finalize import finalize_grads
from megalite.parallel.state import ParallelState, build_parallel_state
from megalite.testing import full_tensors, run_distributed

CFG = ModelConfig(vocab_size=301, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=64, max_seq_len=32)
# A small clip threshold so clipping is active and the global norm must be right to match. eps is
# large because Adam's g / (sqrt(v) + eps) turns float-order noise in near-zero grads (summed in
# another order under TP/DP) into visible weight differences when eps is tiny.
OPT = OptimConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5, eps=1e-4)


def _batches(dp_rank: int, dp: int, n_micro: int = 2):
    """The step's global batch is 4 rows; DP rank r takes its share as `n_micro` micro-batches."""
    g = torch.Generator().manual_seed(5)
    tokens, labels = torch.randint(0, 301, (4, 8), generator=g), torch.randint(0, 301, (4, 8), generator=g)
    rows = 4 // dp
    t, y = tokens[dp_rank * rows: (dp_rank + 1) * rows], labels[dp_rank * rows: (dp_rank + 1) * rows]
    return list(zip(t.chunk(n_micro), y.chunk(n_micro), strict=True))


def _train(model: LlamaModel, opt: BufferOptimizer, ps: ParallelState, steps: int = 2):
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        batches = _batches(ps.dp_rank, ps.dp)
        for i, (tokens, labels) in enumerate(batches):
            ctx = opt.no_sync() if i < len(batches) - 1 else torch.enable_grad()
            with ctx:
                (model(tokens, labels=labels).sum() / 32.0).backward()
        finalize_grads([model], ps)
        norms.append(opt.step(OPT.lr))
    return norms


def _full_params(model: LlamaModel, ps: ParallelState) -> dict[str, torch.Tensor]:
    return full_tensors(model, ps, grad=False)


def test_buffer_optimizer_matches_torch_adamw():
    ps = ParallelState()
    model, ref = LlamaModel(CFG, ps), LlamaModel(CFG, ps)
    model.init_weights(1)
    ref.init_weights(1)
    opt = BufferOptimizer([model], OPT, ps, bucket_size_mb=0.004)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=OPT.lr,
                                  betas=(OPT.beta1, OPT.beta2), eps=OPT.eps)
    norms = _train(model, opt, ps, steps=3)
    for _ in range(3):
        torch_opt.zero_grad()
        for tokens, labels in _batches(0, 1):
            (ref(tokens, labels=labels).sum() / 32.0).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), OPT.clip_grad)
        torch_opt.step()
    assert norms[-1] == pytest.approx(float(norm), rel=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_norm_and_decay_ranges_are_merged():
    """The grad norm and weight decay work on merged runs, not one slice per parameter."""
    assert _merge([(8, 9), (4, 6), (0, 4), (6, 7)]) == [(0, 7), (8, 9)]
    ps = ParallelState()
    model = LlamaModel(CFG, ps)
    opt = BufferOptimizer([model], OPT, ps)  # one bucket: the whole model
    assert opt._norm == [(0, opt.ddp.num_params)]
    n_matrices = sum(p.dim() >= 2 for p in model.parameters())
    assert sum(len(r) for r in opt._decay) < n_matrices
    covered = sum(z - a for r in opt._decay for a, z in r)
    assert covered == sum(p.numel() for p in model.parameters() if p.dim() >= 2)


def _comm_args(tp: int, sp: bool) -> argparse.Namespace:
    return argparse.Namespace(tp=tp, pp=1, dp=2, no_sp=not sp, distributed_optimizer=True, hidden=32, layers=2,
                              seq=8, mbs=2, micro=2)


def _zero_worker(rank: int, world: int, tp: int, sp: bool, tie: bool):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    ps = build_parallel_state(ParallelConfig(tp=tp, sp=sp))
    # benchmarks/comm_volume.py's measurement of one real step, in the same processes.
    out = {"comm": comm_volume._worker(rank, world, _comm_args(tp, sp))}
    for cls in (BufferOptimizer, DistributedOptimizer):
        model = LlamaModel(cfg, ps)
        model.init_weights(1)
        opt = cls([model], OPT, ps, bucket_size_mb=0.004)
        norms = _train(model, opt, ps)
        out[cls.__name__] = (norms, _full_params(model, ps), opt.memory_report(), opt.describe_memory())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp,sp,tie", [(2, True, True)], ids=["tp2sp-dp2-tied"])
def test_zero1_matches_replicated_and_single_process(tp: int, sp: bool, tie: bool):
    results = run_distributed(_zero_worker, 2 * tp, tp, sp, tie)
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    ref = LlamaModel(cfg, ParallelState())
    ref.init_weights(1)
    ref_norms = _train(ref, BufferOptimizer([ref], OPT, ParallelState(), bucket_size_mb=0.004), ParallelState())
    ref_params = _full_params(ref, ParallelState())
    for r in results:
        for name in ("BufferOptimizer", "DistributedOptimizer"):
            norms, params, mem, line = r[name]
            assert norms == pytest.approx(ref_norms, rel=1e-5), name
            for n, want in ref_params.items():
                torch.testing.assert_close(params[n], want, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")
            # Memory per rank: measured from the tensors == the ZeRO-1 formula (K=8: fp32 m, v;
            # the fp32 parameters double as master weights), and the sharded state is 1/dp of it.
            assert "match" in line and "MISMATCH" not in line, line
            assert 0 <= mem["measured_optimizer"] - 8 * mem["psi"] / mem["nd"] <= mem["padding_slack"]
        assert r["DistributedOptimizer"][2]["nd"] == 2
        # No collective moves more than the analytical count (TP/SP pairs, DP reduce-scatter +
        # all-gather of the parameters), and none is missing.
        got, want = r["comm"]["bytes"], comm_volume.analytical(r["comm"], _comm_args(tp, sp))
        assert got.keys() == want.keys()
        for op, b in want.items():  # DP buffers may pad each bucket by < dp elements
            slack = 4 * r["comm"]["padding"] if op.startswith("dp.") else 0
            assert b <= got[op] <= b + slack, (op, got[op], b)
        assert (r["DistributedOptimizer"][2]["measured_optimizer"]
                == r["BufferOptimizer"][2]["measured_optimizer"] / 2)
