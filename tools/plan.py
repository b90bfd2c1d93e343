"""Plan a training run: parameters, FLOPs, Chinchilla, per-GPU memory and time of every layout.

    python tools/plan.py --config examples/configs/llama3_8b.yaml --tokens 15e12 --gpu H100 --gpus 16 --mfu 0.4
    python tools/plan.py --config examples/configs/llama3_70b.yaml --tokens 2e12 --gpu H200 --gpus 256 \\
        train.micro_batch_size=1

Prints the parameter count and training FLOPs, the Chinchilla-optimal token count and fitted loss,
then the candidate TP/PP/VPP/DP layouts (with and without SP, ZeRO-1 and recomputation) that fit,
fastest first, with their weights/grads/optimizer/activation memory per GPU and the expected time at
the stated MFU, and picks the fastest that fits. The formulas are in megalite/plan.py and docs/plan.md.
"""

from __future__ import annotations

import argparse

import _common


def main() -> int:
    from megalite import plan
    from megalite.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a run config (its model and train sections are used)")
    ap.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 15e12")
    ap.add_argument("--gpu", default="H100", help=f"one of: {', '.join(plan.GPUS)}")
    ap.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside a node (default 8)")
    ap.add_argument("--mfu", type=float, default=0.4, help="expected model FLOPs utilization (default 0.4)")
    ap.add_argument("--top", type=int, default=12, help="layouts to list (default 12)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = ap.parse_intermixed_args()
    if args.gpus < 1 or args.tokens <= 0:
        raise ValueError("--gpus and --tokens must be positive")
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == 0:
        raise ValueError("model.vocab_size is 0 (the tokenizer's): set it, e.g. model.vocab_size=32000")
    print(plan.report(cfg.model, cfg.train, args.tokens, args.gpu, args.gpus, args.mfu, args.gpus_per_node, args.top))
    return 0


if __name__ == "__main__":
    _common.run_main(main)
