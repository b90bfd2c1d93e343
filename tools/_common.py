"""Shared plumbing for the command-line tools: import path and one-line error reporting."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# Tools run as `python tools/X.py` from a checkout; make the package importable without installing.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def run_main(main: Callable[[], int | None]) -> None:
    """Runs `main`; user-facing failures become `error: ...` on stderr and exit status 2."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, RuntimeError, TimeoutError, ImportError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
