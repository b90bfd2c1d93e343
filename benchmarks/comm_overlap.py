"""Time blocked in TP communication per training step, blocking vs overlapped (gloo, CPU).

One process group, one model: each measured step runs the trainer's pieces (forward/backward of
the micro-batches under `comm.time_comm()`, then finalize_grads and an optimizer step), alternately with
`parallel.tp_comm_overlap` off (before: every TP collective blocks) and on (after: the column-
parallel backward launches its input-grad all-reduce / reduce-scatter asynchronously and computes
the weight grad meanwhile, and under SP re-gathers its input behind the input-grad matmul).
Alternating the two paths step by step (in turn first) exposes both to the same machine load.

Printed per path (median over the measured steps, rank 0; on a loaded machine the scheduler's
noise lands in the blocked time, as a rank waits for a descheduled peer, so the least blocked
step is printed too):
  step s         the step's wall time
  blocked s      time inside blocking collectives plus time in wait() on asynchronous ones,
                 over forward and backward
  min blocked s  the least blocked step
  bwd blocked s  the part of `blocked s` inside backward, where the overlap acts
  in wait s      the part of it spent in wait()
  hidden         asynchronous collectives already complete when waited for: their whole
                 transfer ran while the weight grad was computed (the collectives were in flight
                 during compute)
Losses and grads of the two paths are compared on every step (bit-identical in fp32).

Usage: python benchmarks/comm_overlap.py [--size tiny|55m|both] [--steps 3] [--no-sp] [--seq N] [--json F]
  tiny: hidden 64, 2 layers, 4 heads, vocab 1000, seq 64
  55m:  hidden 512, 8 layers, 8 heads, vocab 32000, seq 512 (about 60M parameters)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.config import Config, ModelConfig  # noqa: E402
from megalite.parallel.comm import time_comm  # noqa: E402
from megalite.parallel.finalize import finalize_grads  # noqa: E402
from megalite.parallel.rng import seed_everything  # noqa: E402
from megalite.parallel.state import build_parallel_state  # noqa: E402
from megalite.testing import run_distributed  # noqa: E402
from megalite.training.build import build_model  # noqa: E402
from megalite.training.forward_backward import get_forward_backward  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=1000, seq=64),
    "55m": dict(hidden_size=512, num_layers=8, num_heads=8, vocab_size=32000, seq=512),
}


def make_config(size: str, a: argparse.Namespace) -> tuple[Config, int]:
    spec = dict(SIZES[size])
    seq = a.seq or spec.pop("seq")
    spec.pop("seq", None)
    cfg = Config(model=ModelConfig(max_seq_len=seq, **spec))
    cfg.parallel.tp, cfg.parallel.sp = 2, not a.no_sp
    cfg.train.seq_len, cfg.train.micro_batch_size = seq, a.mbs
    cfg.train.global_batch_size = a.mbs * a.micro
    return cfg, seq


def _worker(rank: int, world: int, size: str, a: argparse.Namespace) -> dict:
    cfg, seq = make_config(size, a)
    ps = build_parallel_state(cfg.parallel)
    chunks = build_model(cfg, ps, seed_everything(0, ps.tp_rank, 0, ps.device))
    fb = get_forward_backward(ps, cfg.parallel)
    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: every step sees the same weights, so both paths compare
    g = torch.Generator().manual_seed(0)
    v = cfg.model.vocab_size
    mbs = [{"tokens": torch.randint(0, v, (a.mbs, seq), generator=g),
            "labels": torch.randint(0, v, (a.mbs, seq), generator=g), "position_ids": None, "doc_ids": None}
           for _ in range(a.micro)]
    rows: dict[bool, list[dict]] = {False: [], True: []}
    grads: dict[bool, list[torch.Tensor]] = {}
    identical = True
    for step in range(a.steps + 1):  # step 0 warms both paths up, unmeasured
        for overlap in ((False, True) if step % 2 else (True, False)):  # neither path always goes first
            ps.tp_comm_overlap = overlap
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with time_comm() as timer:
                loss = fb(chunks, mbs, ps, num_units=float(a.mbs * seq * a.micro))["loss"]
            finalize_grads(chunks, ps)
            opt.step()
            wall = time.perf_counter() - t0
            grads[overlap] = [loss.detach().clone()] + [p.grad.clone() for p in params]
            if step > 0:
                rows[overlap].append(dict(step_s=wall, blocked_s=timer.blocked_s, wait_s=timer.seconds["wait"],
                                          bwd_s=timer.backward_s,
                                          waits=timer.calls["wait"], hidden=timer.done_at_wait,
                                          blocking=timer.calls["blocking"]))
        identical &= all(torch.equal(x, y) for x, y in zip(grads[False], grads[True]))
    return {"rows": rows, "identical": identical, "params": sum(p.numel() for p in params) * ps.tp}


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("tiny", "55m", "both"), default="both")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--seq", type=int, default=0, help="override the size's sequence length (0: keep)")
    ap.add_argument("--no-sp", action="store_true")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    sizes = ("tiny", "55m") if a.size == "both" else (a.size,)
    report = {}
    ok = True
    print(f"TP2{'' if a.no_sp else '+SP'}, gloo/CPU, {a.micro} micro-batch(es) x {a.mbs}; median of {a.steps} "
          "steps per path, rank 0")
    print(f"{'config':<8} {'path':<10} {'step s':>8} {'blocked s':>10} {'min blocked s':>14} {'bwd blocked s':>14} "
          f"{'in wait s':>10} {'blocked %':>9} {'hidden':>9}")
    for size in sizes:
        results = run_distributed(_worker, 2, size, a)
        r0 = results[0]
        report[size] = {"params": r0["params"], "identical": all(r["identical"] for r in results),
                        "rows": {("overlap" if k else "blocking"): v for k, v in r0["rows"].items()}}
        ok &= report[size]["identical"]
        for overlap, name in ((False, "blocking"), (True, "overlap")):
            rows = r0["rows"][overlap]
            step, blocked, bwd, waited = (_median(rows, k) for k in ("step_s", "blocked_s", "bwd_s", "wait_s"))
            hidden = f"{rows[-1]['hidden']}/{rows[-1]['waits']}" if rows[-1]["waits"] else "-"
            least = min(r["blocked_s"] for r in rows)
            print(f"{size:<8} {name:<10} {step:>8.3f} {blocked:>10.3f} {least:>14.3f} {bwd:>14.3f} {waited:>10.3f} "
                  f"{100 * blocked / step:>8.1f}% {hidden:>9}")
        b, o = (_median(r0["rows"][k], "blocked_s") for k in (False, True))
        bb, bo = (_median(r0["rows"][k], "bwd_s") for k in (False, True))
        print(f"{size:<8} blocked time per step {b:.3f} s -> {o:.3f} s ({(o - b) / b * 100:+.0f}%), in backward "
              f"{bb:.3f} s -> {bo:.3f} s ({(bo - bb) / bb * 100:+.0f}%); "
              f"{r0['params'] / 1e6:.1f}M params; grads "
              f"{'bit-identical' if report[size]['identical'] else 'DIFFER'}")
    if a.json:  # written whole, then renamed into place
        with open(a.json + ".partial", "w") as f:
            json.dump({"args": vars(a), "report": report}, f, indent=1)
        os.replace(a.json + ".partial", a.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
