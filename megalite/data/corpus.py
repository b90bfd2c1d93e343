"""The embedded default corpus: the Python standard library's source files and pydoc topics.

It ships with every interpreter, so the demo and the tests have real text without a network.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_documents(max_docs: int | None = None) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    try:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
            n += 1
            if max_docs is not None and n >= max_docs:
                return
    except ImportError:
        pass
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text
            n += 1
            if max_docs is not None and n >= max_docs:
                return
