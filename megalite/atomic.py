"""Atomic file writes: write a temporary sibling, flush it to disk, rename it over the target.

A crash at any point leaves either the old file or the new one at `path`, never half of one.
Kept free of torch so the data tools can use it too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Calls `write(temp_path)`, fsyncs that file, then renames it to `path`; the temp file is removed
    if `write` fails."""
    partial = f"{path}.{os.getpid()}.partial"
    try:
        write(partial)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))
