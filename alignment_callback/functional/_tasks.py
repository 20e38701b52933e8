"""Independent tasks on the calling thread and a few pool threads (the CPU backends of the
permutation nulls: their numba kernels release the GIL).

Tasks are claimed from a shared counter by whichever thread is free, so a thread on a busy core
simply does fewer of them, and a task whose thread stalls is re-run by another one (both runs
give the same numbers, bit for bit): more threads never make a call much slower than one.
The pool is this module's own; the user's thread settings are only read
(``torch.get_num_threads()`` by the callers), never changed.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["run_tasks"]


class _Tasks:
    """Tasks ``0..count-1`` claimed from a shared counter by whichever thread is free.

    ``fn(t)`` returns the task's result in a buffer of its own; the first result of a task is
    kept.  A thread that finds no task left to claim re-runs the oldest unfinished task once it
    has taken 1.5× as long as a task usually takes (its thread was descheduled on a busy
    core): both runs compute the same numbers bit for bit, so the first to finish wins, and a
    stalled helper thread delays the call by about one task instead of a scheduler time slice.
    (A stalled calling thread still has to finish its own run before the call returns.)
    """

    def __init__(self, fn, count: int) -> None:
        self.fn, self.count = fn, count
        self.results: list = [None] * count
        self._started = [0.0] * count
        self._covered: set[int] = set()
        self._durations: list[float] = []
        self._next = itertools.count()  # next() is atomic under the GIL
        self._left = count
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def _run(self, t: int) -> None:
        if self.error is not None:
            return
        start = time.perf_counter()
        try:
            result = self.fn(t)
        except BaseException as err:  # re-raised by the calling thread
            self.error = self.error or err
            self.done.set()
            return
        with self._lock:
            self._durations.append(time.perf_counter() - start)
            if self.results[t] is None:
                self.results[t] = result
                self._left -= 1
                if self._left == 0:
                    self.done.set()

    def work(self) -> None:
        """Claim and run tasks; then cover for a stalled thread until all are done."""
        while self.error is None:
            t = next(self._next)
            if t >= self.count:
                break
            self._started[t] = time.perf_counter()
            self._run(t)
        while not self.done.is_set() and self.error is None:
            with self._lock:
                pending = [t for t in range(self.count)
                           if self.results[t] is None and t not in self._covered]
                durations = sorted(self._durations)
            if not pending:  # every unfinished task is run twice already
                self.done.wait()
                break
            oldest = min(pending, key=self._started.__getitem__)
            typical = durations[len(durations) // 2] if durations else 1e-3
            wait = self._started[oldest] + 1.5 * typical - time.perf_counter()
            if wait > 0:
                self.done.wait(wait)
                continue
            with self._lock:
                if self.results[oldest] is not None or oldest in self._covered:
                    continue
                self._covered.add(oldest)
            self._run(oldest)


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _helpers(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="alignment_null")
            _pool_size = count
        return _pool


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_tasks(fn, count: int, threads: int) -> list:
    """``[fn(t) for t in range(count)]`` on the calling thread and up to ``threads - 1`` pool
    threads.

    The caller never waits for a helper to start (a busy pool, or a forked child without the
    parent's threads, just leaves more tasks to the caller), and any thread re-runs the task
    of a thread that stalls (see :class:`_Tasks`).
    """
    threads = max(1, min(threads, count))
    if threads == 1:
        return [fn(t) for t in range(count)]
    tasks = _Tasks(fn, count)
    pool = _helpers(threads - 1)
    for _ in range(threads - 1):
        pool.submit(tasks.work)
    try:
        tasks.work()
    except BaseException as err:  # e.g. KeyboardInterrupt: helpers stop after their task
        tasks.error = tasks.error or err
        raise
    if tasks.error is not None:
        raise tasks.error
    return tasks.results
