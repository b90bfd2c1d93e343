"""`make demo`: pretrain the tiny Llama on the embedded corpus (the Python standard library).

The first run builds the token shards into .cache/megalite; the run itself takes about a minute
on 2 CPU cores and prints the falling loss. Extra `key=value` arguments override the config, e.g.
`python -m megalite.demo train.train_steps=50`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from megalite.cli import main as cli_main

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny.yaml"
RUN_DIR = Path("runs/demo")


def main(argv: list[str]) -> int:
    shutil.rmtree(RUN_DIR, ignore_errors=True)  # a fresh run each time, not a resume of the last one
    rc = cli_main(["pretrain", "--config", str(CONFIG), f"train.run_dir={RUN_DIR}", *argv])
    if rc != 0:
        return rc
    rows = [json.loads(line) for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    print(f"\ndemo: loss {rows[0]['loss']:.3f} at step {rows[0]['step']} -> {rows[-1]['loss']:.3f} at step "
          f"{rows[-1]['step']}" + (f"; held-out perplexity {evals[-1]['eval_ppl']:.2f}" if evals else ""))
    print(f"demo: metrics in {RUN_DIR / 'metrics.jsonl'}, checkpoint in {RUN_DIR / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
