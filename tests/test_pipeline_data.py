"""The demo's mined data and its verifiable reward."""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

from megalite.pipeline.collect import _functions, corrupt
from megalite.pipeline.rewards import parses, score


def test_pairs_are_docstring_to_function_and_rejected_never_parses():
    path = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    pairs = list(_functions(path, max_chars=2000))
    assert len(pairs) >= 3
    docs = [" ".join(ast.get_docstring(n).split()) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.FunctionDef) and ast.get_docstring(n)]
    rng = random.Random(0)
    for prompt, answer in pairs:
        sig = answer.splitlines()[0]
        assert prompt.endswith("\n\n" + sig) and sig.startswith("def ")
        fn = ast.parse(answer).body[0]
        assert isinstance(fn, ast.FunctionDef) and ast.get_docstring(fn) is None  # the docstring is the prompt
        assert any(d.startswith(prompt.split("\n\n")[0][:30]) for d in docs)
        bad = corrupt(answer, rng)
        assert bad is not None and bad != answer
        try:
            ast.parse(bad)
        except SyntaxError:
            pass
        else:
            raise AssertionError(f"corrupted function parses:\n{bad}")


def test_reward_parses_and_is_not_trivial():
    assert score("def f(x):\n    return x + 1\n") == 1.0
    assert score("def f(x):\n    return x +\n") == 0.0  # does not parse
    assert score("def f(x):\n    pass\n") == 0.0  # trivial
    assert score("def f(x):\n    'doc'\n    ...\n") == 0.0
    assert score("x = 1\n") == 0.0  # no function
    assert score("def f():\n    return 1\x00") == 0.0
    assert parses("prompt", "def f():\n    return 1") == 1.0
    assert parses(["p", "q"], ["def f():\n    return 1", "def"]) == [1.0, 0.0]
