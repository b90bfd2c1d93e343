"""`megalite <stage> --config FILE [key=value ...]` (DESIGN.md contract 1).

The same command runs alone or under torchrun. User errors (bad config, bad layout, missing or
corrupt files) end with one `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

# stage -> "module:function(cfg)"; imported only when run, so `megalite --help` stays fast.
STAGES = {
    "pretrain": "megalite.training.trainer:pretrain",
    "sft": "megalite.alignment.sft:run",
    "rm": "megalite.alignment.rm:run",
    "dpo": "megalite.alignment.dpo:run",
    "ppo": "megalite.alignment.ppo:run",
    "grpo": "megalite.alignment.grpo:run",
    "generate": "megalite.generation.cli:run",
    "eval": "megalite.evaluation:run",
}


def _run(stage: str, config: str | None, overrides: list[str]) -> None:
    import importlib

    from megalite.config import ConfigError, load_config

    cfg = load_config(config, overrides)
    if not _exists(STAGES[stage]):
        available = ", ".join(s for s, target in STAGES.items() if _exists(target))
        raise ConfigError(f"stage '{stage}' is not available in this version of megalite "
                          f"(available: {available})")
    module, fn = STAGES[stage].split(":")
    getattr(importlib.import_module(module), fn)(cfg)


def _exists(target: str) -> bool:
    import importlib.util

    module = target.split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megalite", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--config", "-c", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    from megalite.config import ConfigError, RunError

    try:
        _run(args.stage, args.config, args.overrides)
    except ConfigError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
            print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
