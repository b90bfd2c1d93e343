"""Verifiable rewards for the demo's GRPO stage (`reward.function=megalite.pipeline.rewards:parses`).

The task is docstring + signature -> function. An answer earns 1.0 when `ast.parse` accepts it and
it defines a function that does something (not just `pass`, `...` or a docstring), else 0.0. The
same check gives the sample stage's parse rate, so the report's numbers and the RL signal agree.
"""

from __future__ import annotations

import ast


def _trivial(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))


def score(completion: str) -> float:
    """1.0 for source that parses and holds a function with a real statement in its body."""
    try:
        tree = ast.parse(completion)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the text
        return 0.0
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not all(map(_trivial, node.body)):
            return 1.0
    return 0.0


def parses(prompts, completions=None, **_: object):
    """The reward callable. Called with a prompt and a completion (strings) it returns one float;
    called with lists of them, a list of floats (either batching a trainer may use)."""
    if completions is None:
        raise TypeError("parses(prompt, completion): the completion is missing")
    if isinstance(completions, str):
        return score(completions)
    return [score(c) for c in completions]
