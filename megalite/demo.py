"""`make demo` (`python -m megalite.demo`): the whole pipeline on the embedded corpus.

Raw stdlib text -> cleaned JSONL -> SentencePiece tokenizer -> shards -> pretraining -> SFT ->
reward model and DPO -> GRPO with a verifiable reward -> samples before and after alignment, and
runs/demo/REPORT.md with each stage's numbers and plots. Each stage runs the real command (shown
as it runs) and is reused on a rerun when its inputs are unchanged; `--fresh` (make demo FRESH=1)
redoes everything. `--smoke` (or DEMO_SIZE=smoke) is the same pipeline at CI size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from megalite.pipeline.report import write_report
from megalite.pipeline.runner import run_stages
from megalite.pipeline.stages import SIZES, build


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megalite.demo", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the CI size (also DEMO_SIZE=smoke)")
    p.add_argument("--fresh", action="store_true", help="redo every stage (also FRESH=1)")
    p.add_argument("--out", default=None, help="output directory (default runs/demo, runs/demo-smoke)")
    args = p.parse_args(argv)
    env_size = os.environ.get("DEMO_SIZE", "")  # make passes it empty when unset
    if env_size and env_size not in SIZES:
        print(f"error: DEMO_SIZE={env_size}: expected one of {', '.join(SIZES)}", file=sys.stderr)
        return 2
    size = "smoke" if args.smoke or env_size == "smoke" else "full"
    fresh = args.fresh or os.environ.get("FRESH", "") not in ("", "0")
    out = Path(args.out or ("runs/demo" if size == "full" else "runs/demo-smoke")).resolve()
    t0 = time.time()
    results = run_stages(build(out, size), out, fresh)
    report = write_report(out, results, size, time.time() - t0)
    print(f"\n=== megalite demo ({size}) in {time.time() - t0:.0f}s")
    for r in results:
        print(f"  {r.name:<10} {r.status:<8} {r.line}")
    print(f"report: {report}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
