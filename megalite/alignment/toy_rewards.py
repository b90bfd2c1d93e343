"""Verifiable reward functions for examples and smoke runs (`reward.function=module:callable`).

A reward function takes the decoded prompt and answer (without the eos token) and returns a
finite number; anything else stops the run with one line naming it and the prompt.
"""

from __future__ import annotations

import ast


def lowercase_fraction(prompt: str, response: str) -> float:
    """The share of lowercase letters in the answer: dense, so a tiny model learns it in steps."""
    return sum(c.islower() for c in response) / max(len(response), 1)


def python_parses(prompt: str, response: str) -> float:
    """1 when the answer is non-empty Python that `ast.parse` accepts, else 0."""
    if not response.strip():
        return 0.0
    try:
        ast.parse(response)
    except (SyntaxError, ValueError):
        return 0.0
    return 1.0
