"""Evaluation: `megalite eval` (held-out perplexity, perplexity.py) and the lm-evaluation-harness
adapter (lm_eval_adapter.py, run through `python -m megalite.evaluation.lm_eval_main`)."""

from __future__ import annotations

from megalite.config import Config


def run(cfg: Config) -> None:
    """The `eval` stage of `megalite.cli`."""
    import torch.distributed as dist

    from megalite.evaluation.perplexity import run_eval

    try:
        run_eval(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
