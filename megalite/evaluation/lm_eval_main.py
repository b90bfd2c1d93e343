"""`python -m megalite.evaluation.lm_eval_main [lm_eval arguments]`: lm-eval's command line with the
`megalite` model registered (lm-eval 0.4 has no plugin discovery; see lm_eval_adapter.py).

    python -m megalite.evaluation.lm_eval_main --model megalite \\
        --model_args checkpoint=runs/tiny/checkpoints,batch_size=16 --tasks arc_easy --device cpu
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        import lm_eval.__main__ as cli
    except ImportError:
        print("error: lm-evaluation-harness is not installed (pip install 'lm-eval==0.4.13', or "
              "pip install -e '.[eval]')", file=sys.stderr)
        sys.exit(2)
    import megalite.evaluation.lm_eval_adapter  # noqa: F401  (registers --model megalite)

    sys.argv[0] = "lm_eval"  # lm-eval inserts its `run` subcommand itself when none is given
    cli.cli_evaluate()


if __name__ == "__main__":
    main()
