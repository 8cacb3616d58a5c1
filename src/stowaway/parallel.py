"""Run tasks on a bounded thread pool so that one failure, or Ctrl-C, stops all of them.

``ThreadPoolExecutor`` alone lets tasks already under way run to the end: after Ctrl-C a
push would go on uploading hundreds of megabytes. Each task here gets a ``Stop`` and
calls ``stop.check()`` between chunks of work; the first failure (or an exception in
the waiting thread, which is where Python delivers SIGINT) sets it, and every task then
raises ``Stopped`` at its next check and cleans up on its way out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """The run this task belongs to was stopped; its own cleanup is all that is left."""


class Stop:
    """Set once by the runner; read by the tasks between chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def check(self) -> None:
        if self._event.is_set():
            raise Stopped


def run_all(tasks: Sequence[Callable[[Stop], T]], jobs: int, name: str = "stowaway") -> list[T]:
    """Results of ``tasks`` in order, ``jobs`` at a time. The first exception stops the
    others and is raised once every task has returned; ``Stopped`` of the others is
    never what the caller sees."""
    if not tasks:
        return []
    stop = Stop()
    with ThreadPoolExecutor(max(1, min(jobs, len(tasks))), name) as pool:
        futures: list[Future[T]] = [pool.submit(task, stop) for task in tasks]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C while waiting: stop every task at its next check
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        first = next((e for f in futures if f.done() and (e := f.exception()) is not None), None)
        if first is not None:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise first
        return [f.result() for f in futures]
