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


def main(argv: list[str] | None = None) -> int:
    """`python -m megalite.data.corpus --output raw.jsonl`: the demo corpus as JSONL ({"text": ...}
    per line), a real input for the data tools' README walk-through."""
    import argparse
    import json

    from megalite.atomic import atomic_write

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--output", required=True)
    p.add_argument("--max-docs", type=int, default=None)
    args = p.parse_args(argv)
    n = 0

    def write(tmp: str) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in stdlib_documents(args.max_docs):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n += 1

    atomic_write(args.output, write)
    print(f"wrote {args.output}: {n} documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
