"""`megalite <stage> --config FILE [key=value ...]` (DESIGN.md contract 1).

The same command runs alone or under torchrun. User errors (bad config, bad layout, missing or
corrupt files) end with one `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
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

    # The built-in model default would not fit anywhere small; stages that read a checkpoint's model
    # (generate, eval) do not build it.
    if stage not in ("generate", "eval") and config is None and not any(o.startswith("model.") for o in overrides):
        raise ConfigError("no --config given: the built-in default model is Llama-7B-sized; pass a config, e.g. "
                          "--config examples/configs/tiny.yaml (or set model.* overrides)")
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
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # argparse would only say that `overrides` (which may be empty) is required
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv)
    from megalite.config import ConfigError, RunError
    from megalite.launcher import exit_with_parent, launched_by_torchrun, print_error

    if launched_by_torchrun():
        exit_with_parent()  # a killed torchrun must not leave ranks training on as orphans
    try:
        _run(args.stage, args.config, args.overrides)
    except ConfigError as e:
        print_error(str(e))
        return 2
    except RunError as e:
        print_error(str(e))
        return 1
    except FileNotFoundError as e:
        print_error(f"file not found: {e.filename or e}")
        return 2
    except OSError as e:  # e.g. a read-only or full run dir: the path and the OS reason
        print_error(f"{e.filename}: {e.strerror}" if e.filename else f"{e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
