"""The end-to-end demo pipeline (`make demo`): stdlib text in, an aligned model and a report out.

Each stage runs the real command a user would type (the data tools, `megalite pretrain`, `sft`,
`rm`, `dpo`, `grpo`, `generate`) as a subprocess; `runner.py` keys it by its inputs and skips it when
its output is already there. See megalite/demo.py for the entry point.
"""
