"""An ordered, bounded process-pool map for the streaming data tools.

`Pool.imap` drains its input as fast as it can, so a large corpus would pile up in memory ahead
of the workers; a semaphore holds the reader to a window of items in flight. On any error the pool
is terminated (after unblocking the reader thread) so the tool exits at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


@contextlib.contextmanager
def bounded_imap(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                 initializer: Callable[..., None], initargs: tuple = (), in_flight_per_worker: int = 4
                 ) -> Iterator[Iterator[Any]]:
    """Yields an iterator of fn(item), in input order; workers=0 runs in this process."""
    if workers <= 0:
        initializer(*initargs)
        yield map(fn, items)
        return
    slots = threading.Semaphore(in_flight_per_worker * workers)

    def bounded() -> Iterator[Any]:
        for item in items:
            slots.acquire()
            yield item

    def results(it: Iterator[Any]) -> Iterator[Any]:
        for r in it:
            slots.release()
            yield r

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers, initializer=initializer, initargs=initargs)
    try:
        yield results(pool.imap(fn, bounded(), 1))
    except BaseException:
        slots.release(1 << 16)  # unblock the reader thread so the pool can shut down
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
