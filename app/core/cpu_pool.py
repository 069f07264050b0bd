"""Processes for CPU-bound request work written in Python (an upload's schema check), off the API's GIL.

A worker thread is enough to keep such work off the event loop, but not to keep it from slowing every other
request: a pure-Python loop holds the GIL, and each request thread then waits up to the interpreter's switch
interval for it at every handoff. Measured on a 200 MB CSV upload: GETs from another connection stalled up
to 1.6 s while its check ran in a thread (bench/README.md, "Upload validation"). Here the check runs in a
child process; the calling thread only waits for the answer.

The pool starts at the first call (spawned interpreters that import only what the function needs: no
torch), keeps up to `MAX_PROCESSES` processes, is rebuilt if a process dies (the call then raises
`CheckProcessDied`), and is shut down with the app (`shutdown()` in the lifespan).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

R = TypeVar("R")

# Concurrent checks (each one a process of ~60 MB): half the cores, between 1 and 4.
MAX_PROCESSES = max(1, min(4, (os.cpu_count() or 2) // 2))

_pool: ProcessPoolExecutor | None = None
_lock = threading.Lock()


class CheckProcessDied(RuntimeError):
    """The process running the call died (killed, out of memory); the pool was rebuilt for the next call."""


def _get() -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(
                max_workers=MAX_PROCESSES, mp_context=multiprocessing.get_context("spawn")
            )
        return _pool


def run(fn: Callable[..., R], *args: object) -> R:
    """`fn(*args)` in a pool process, waited for in the calling (worker) thread; its exception re-raised.

    `fn`, its arguments, result and exceptions cross a pickle: module-level functions and plain data only.
    """
    pool = _get()
    try:
        return pool.submit(fn, *args).result()
    except BrokenProcessPool as exc:
        _discard(pool)
        raise CheckProcessDied(f"the process running {fn.__name__} died ({exc})") from exc


def _discard(pool: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def started() -> bool:
    """Whether a pool is running (a call has started it since the last shutdown)."""
    with _lock:
        return _pool is not None


def shutdown() -> None:
    """Stop the pool's processes (the app's lifespan end); a later call starts a new pool."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
