"""Independent solves of one search run side by side, their results kept in order.

HiGHS releases the GIL while it solves (``scipy.optimize.milp``), so two threads overlap one
program's solve with the next program's tables (Python). Results come back in the order of the
inputs, whatever finished first, and every solve is a pure function of its input: the plan is
the same as one after the other. A call made from inside a worker runs its items one after the
other (no nested pool waiting on itself).

Short of the solver's time limit: a solve that hits it keeps the best plan HiGHS found by then,
which depends on the machine's speed and load, side by side or one after the other alike
(``ShardParallel`` warns when that happens). At a limit too short for any incumbent the plan
falls back to each group's cheapest strategy, which is deterministic.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

# Two threads: one in HiGHS while the other builds the next program; more only queue on the GIL.
_WORKERS = min(2, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_background: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_inside = threading.local()


def _mark_worker() -> None:
    _inside.worker = True


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="shardax-solve",
                                       initializer=_mark_worker)
        return _pool


def in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` started now on its own thread (not a solver's: those stay free for
    ``in_order``); its ``result()`` returns its value or raises its exception."""
    global _background
    with _lock:
        if _background is None:
            _background = ThreadPoolExecutor(1, thread_name_prefix="shardax-early")
    return _background.submit(fn, *args)


def in_order(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, the calls run side by side (see the module's docstring).

    ``items`` is consumed as the calls run: a generator makes its next item (in the calling
    thread) while the calls of the earlier ones are under way. The first exception raised by a
    call (or by ``items``) is raised here, after every call handed out has ended."""
    if isinstance(items, (list, tuple)) and len(items) < 2 or _WORKERS < 2 \
            or getattr(_inside, "worker", False):
        return [fn(x) for x in items]
    futures = []
    try:
        for x in items:
            futures.append(_executor().submit(fn, x))
    finally:
        wait(futures)
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
