"""Build-once caching for data artefacts (index arrays, the default corpus shards).

Exactly one process per file system builds a cache entry; everyone else waits for it to appear and
then maps it. The election is an exclusive lock file created next to the entry, so it needs no
collective call: on shared storage one rank in the whole job builds, on node-local storage one
rank per node does (Megatron-LM #907: rank 0 building on storage the other nodes cannot see).
Only ranks with LOCAL_RANK 0 (or no LOCAL_RANK: a single process) stand for election, so a node's
other ranks never compete for disk and CPU with the builder. Entries are directories or files
renamed into place when complete, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WAIT_TIMEOUT_S = float(os.environ.get("MEGALITE_DATA_WAIT_S", "7200"))
STALE_LOCK_S = 6 * 3600.0


def params_hash(params: dict[str, Any]) -> str:
    """A short, stable key for a description of how an artefact was built."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_candidate() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _lock_is_stale(lock: Path) -> bool:
    """A lock left by a dead process on this host, or one far older than any build."""
    try:
        info = json.loads(lock.read_text() or "{}")
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return False
    if age > STALE_LOCK_S:
        return True
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


def build_once(target: Path, build: Callable[[Path], None], what: str = "data cache") -> Path:
    """Ensures `target` exists. `build(tmp)` must create the complete artefact at `tmp` (a file or a
    directory); it is then renamed to `target`. Returns `target`."""
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(target.name + ".lock")
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not target.exists():
        if _is_candidate():
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _lock_is_stale(lock):
                    lock.unlink(missing_ok=True)
                    continue
            else:
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
                    if not target.exists():
                        tmp = target.with_name(f"{target.name}.{socket.gethostname()}.{os.getpid()}.tmp")
                        _remove(tmp)
                        try:
                            build(tmp)
                            os.replace(tmp, target)
                        finally:
                            _remove(tmp)
                finally:
                    lock.unlink(missing_ok=True)
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target}: waited {WAIT_TIMEOUT_S:.0f}s for another rank to build the {what}")
        time.sleep(0.05)
    return target


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink(missing_ok=True)
