"""Communication volume per training step, measured on gloo and checked against the analytical count.

One real training step (the trainer's pieces: model chunks, pipeline schedule, bucketed DP /
distributed optimizer) runs under `comm.count_comm()`, which records the payload of every
collective: the full tensor of an all-reduce, the gathered output of an all-gather, the input
of a reduce-scatter, each p2p send. DP collectives are recorded as `dp.*`. Per rank, the
analytical count for M micro-batches of b x s tokens, hidden h, L layers on the rank, A = b*s*h*4
bytes, is:

    TP + SP     all_gather, reduce_scatter: 4A per layer per micro-batch (2 in forward, their
                adjoints in backward), +A on the first stage (embedding) and +A on the last
                (final gather before the head); with parallel.tp_comm_overlap (the default)
                all_gather +2A per layer and +A on the last stage: the QKV, gate/up and head
                projections keep only their sequence shard and gather it again in backward,
                behind the input-grad matmul
    TP, no SP   all_reduce: 4A per layer per micro-batch, +A first stage, +A last stage
    both        all_reduce: vocab-parallel CE statistics 3*b*s*4 per micro-batch (last stage),
                TP-partial grads (norm weights under SP) once per step
    PP          p2p: A (A/tp under SP) per micro-batch per direction a stage sends
    DP          dp.all_reduce of the grads (psi*4, psi counted from the model; the buffer adds
                at most dp-1 padding elements per bucket), or dp.reduce_scatter + dp.all_gather
                of them with the distributed optimizer; a ring moves 2(n-1)/n of the payload per
                rank for an all-reduce, (n-1)/n for each of the others: about 2x the param bytes

Any op whose measured payload exceeds its analytical count is flagged EXCESS (the tool exits 1).

Usage: python benchmarks/comm_volume.py [--tp 2] [--pp 1] [--dp 2] [--no-sp] [--no-tp-overlap] [--distributed-optimizer]
                                        [--hidden 64] [--layers 4] [--seq 16] [--mbs 2] [--micro 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.config import Config, ModelConfig  # noqa: E402
from megalite.parallel.comm import count_comm  # noqa: E402
from megalite.parallel.finalize import finalize_grads  # noqa: E402
from megalite.parallel.rng import seed_everything  # noqa: E402
from megalite.parallel.state import build_parallel_state  # noqa: E402
from megalite.testing import run_distributed  # noqa: E402
from megalite.training.build import build_model  # noqa: E402
from megalite.training.forward_backward import get_forward_backward  # noqa: E402
from megalite.training.optimizer import build_optimizer  # noqa: E402

E = 4  # bytes per fp32 element


def make_config(a: argparse.Namespace) -> Config:
    cfg = Config(model=ModelConfig(vocab_size=1000, hidden_size=a.hidden, num_layers=a.layers, num_heads=4,
                                   num_kv_heads=4, ffn_hidden_size=2 * a.hidden, max_seq_len=a.seq))
    p, t = cfg.parallel, cfg.train
    p.tp, p.pp, p.sp, p.distributed_optimizer, p.bucket_size_mb = a.tp, a.pp, not a.no_sp, a.distributed_optimizer, 0.05
    p.tp_comm_overlap = not getattr(a, "no_tp_overlap", False)  # tests pass a Namespace without it
    t.seq_len, t.micro_batch_size, t.global_batch_size = a.seq, a.mbs, a.mbs * a.micro * a.dp
    return cfg


def _worker(rank: int, world: int, a: argparse.Namespace) -> dict:
    cfg = make_config(a)
    ps = build_parallel_state(cfg.parallel)
    rng = seed_everything(cfg.train.seed, ps.tp_rank, ps.pp_rank, ps.device)
    chunks = build_model(cfg, ps, rng)
    opt = build_optimizer(chunks, cfg, ps)
    fb = get_forward_backward(ps, cfg.parallel)
    g = torch.Generator().manual_seed(ps.dp_rank)
    mbs = [{"tokens": torch.randint(0, 1000, (a.mbs, a.seq), generator=g),
            "labels": torch.randint(0, 1000, (a.mbs, a.seq), generator=g), "position_ids": None, "doc_ids": None}
           for _ in range(a.micro)]
    num_tokens = float(a.mbs * a.seq * a.micro * ps.dp)
    for _ in range(2):  # the second step is measured (the first may set up lazily)
        with count_comm() as counter:
            opt.zero_grad()
            fb(chunks, mbs, ps, num_units=num_tokens, no_sync=opt.no_sync)
            # Buckets whose reduction was already in flight when backward returned (overlap).
            overlapped = sum(b.launched for b in opt.ddp.buckets)
            finalize_grads(chunks, ps)
            opt.step(1e-3)
    layers = sum(len(c.layer_ids) for c in chunks)
    tp_partial = sum(p.numel() for c in chunks for p in c.parameters() if getattr(p, "sync_tp_grad", False) is True)
    return {"rank": rank, "tp_rank": ps.tp_rank, "pp_rank": ps.pp_rank, "dp_rank": ps.dp_rank,
            "first": ps.is_first_stage, "last": ps.is_last_stage, "layers": layers,
            "psi": sum(p.numel() for c in chunks for p in c.parameters()),  # from the model, not the buffer
            "padding": opt.ddp.numel - opt.ddp.num_params,  # bucket padding to a multiple of dp
            "tp_partial": tp_partial if ps.tp > 1 and ps.sp else 0,
            "bytes": dict(counter.bytes), "calls": dict(counter.calls),
            "overlap": (overlapped, len(opt.ddp.buckets), sum(b.late for b in opt.ddp.buckets))}


def analytical(r: dict, a: argparse.Namespace) -> dict[str, int]:
    """Expected payload bytes per op for one rank (see the module docstring)."""
    tp, pp, dp, sp = a.tp, a.pp, a.dp, not a.no_sp
    act = a.mbs * a.seq * a.hidden * E  # A: one full-sequence activation
    m, ends = a.micro, int(r["first"]) + int(r["last"])
    out: dict[str, int] = {}
    if tp > 1:
        if sp:
            out["all_gather"] = out["reduce_scatter"] = m * (4 * r["layers"] + ends) * act
            if not getattr(a, "no_tp_overlap", False):
                out["all_gather"] += m * (2 * r["layers"] + int(r["last"])) * act
            out["all_reduce"] = r["tp_partial"] * E
        else:
            out["all_reduce"] = m * (4 * r["layers"] + ends) * act
        if r["last"]:
            out["all_reduce"] = out.get("all_reduce", 0) + m * 3 * a.mbs * a.seq * E
    if pp > 1:
        sends = int(not r["last"]) + int(not r["first"])
        out["p2p"] = m * sends * act // (tp if sp else 1)
    if dp > 1:
        psi = r["psi"] * E
        if a.distributed_optimizer:
            out["dp.reduce_scatter"] = out["dp.all_gather"] = psi
        else:
            out["dp.all_reduce"] = psi
    if tp * pp > 1 or (dp > 1 and a.distributed_optimizer):
        out["opt.all_reduce"] = 8  # the squared grad norm (float64)
    return out


def ring_wire_bytes(op: str, payload: float, n: int) -> float:
    """Bytes a rank sends on a ring for a collective of this payload over n ranks."""
    factor = 2 * (n - 1) / n if op.endswith("all_reduce") else (n - 1) / n
    return payload * factor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--no-sp", action="store_true")
    ap.add_argument("--no-tp-overlap", action="store_true")
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    world = a.tp * a.pp * a.dp
    results = run_distributed(_worker, world, a)
    excess = False
    rows: list[dict] = []
    print(f"layout tp={a.tp} pp={a.pp} dp={a.dp} sp={not a.no_sp} tp_comm_overlap={not a.no_tp_overlap} "
          f"distributed_optimizer={a.distributed_optimizer} | "
          f"hidden {a.hidden}, layers {a.layers}, micro-batches {a.micro} x {a.mbs} x {a.seq} tokens")
    print(f"{'ranks':>7} {'op':<18} {'measured B':>12} {'analytical B':>12} {'ratio':>6}  note")
    groups: dict[str, list[int]] = {}  # ranks with identical counts (e.g. all DP/TP peers of a stage)
    for r in results:
        groups.setdefault(json.dumps([r["bytes"], r["psi"], r["first"], r["last"]], sort_keys=True), []).append(r["rank"])
    for ranks in groups.values():
        r = results[ranks[0]]
        label = ",".join(map(str, ranks)) if len(ranks) < 3 else f"{ranks[0]}..{ranks[-1]}"
        want = analytical(r, a)
        for op in sorted(set(want) | set(r["bytes"])):
            got, exp = r["bytes"].get(op, 0), want.get(op, 0)
            note = ""
            slack = r["padding"] * E if op.startswith("dp.") else 0
            if got > exp + slack:
                note, excess = "EXCESS", True
            elif got > exp:
                note = f"+{got - exp} B bucket padding"
            elif got < exp:
                note = "below analytical"
            if op.startswith("dp.") and a.dp > 1:
                note += f" ring wire {ring_wire_bytes(op, got, a.dp):,.0f} B"
            ratio = got / exp if exp else float("inf")
            print(f"{label:>7} {op:<18} {got:>12,} {exp:>12,} {ratio:>6.3f}  {note}".rstrip())
            rows += [{"rank": k, "op": op, "measured": got, "analytical": exp, "calls": r["calls"].get(op, 0)}
                     for k in ranks]
        if a.dp > 1:
            dp_wire = sum(ring_wire_bytes(op, b, a.dp) for op, b in r["bytes"].items() if op.startswith("dp."))
            param_bytes = r["psi"] * E
            done, total, late = r["overlap"]
            print(f"{label:>7} DP buckets in flight before backward returned: {done} of {total} "
                  f"({late} late: TP-partial/tied grads, reduced after their group sum)")
            print(f"{label:>7} DP ring traffic per rank {dp_wire:,.0f} B = {dp_wire / param_bytes:.2f} x the "
                  f"param bytes ({param_bytes:,} B); ring all-reduce: 2(n-1)/n = {2 * (a.dp - 1) / a.dp:.2f}, "
                  "-> 2 for large n")
    if a.json:  # written whole, then renamed into place
        with open(a.json + ".partial", "w") as f:
            json.dump({"args": vars(a), "rows": rows, "excess": excess}, f, indent=1)
        os.replace(a.json + ".partial", a.json)
    print("EXCESS traffic found" if excess else "no excess: every op within its analytical count")
    return 1 if excess else 0


if __name__ == "__main__":
    sys.exit(main())
