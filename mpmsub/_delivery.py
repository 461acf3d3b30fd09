"""Resolving futures without running user code on the executor's event loop.

A future's done-callbacks are user code; run on the loop, a slow one would stall dispatch, output
and timeouts. Futures without callbacks are resolved on the loop at once (their waiters, from
`wait`/`as_completed`, are the standard library's own); the others are resolved, one at a time,
on a thread of their own.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Optional, Tuple

from mpmsub import _threads
from mpmsub._future import JobFuture

logger = logging.getLogger("mpmsub")

_Action = Tuple[Callable[..., Any], Tuple[Any, ...]]


def _has_callbacks(future: Future[Any]) -> Optional[bool]:
    """Whether `future` has done-callbacks; None where the standard library's internals differ."""
    callbacks = getattr(future, "_done_callbacks", None)
    return None if callbacks is None else bool(callbacks)


class Delivery:
    """Sets results and cancels futures, keeping their callbacks off the caller's thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Optional[_Action]] = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._direct = False  # no thread could start (interpreter shutdown)

    def set_result(self, future: Future[Any], result: Any) -> None:
        self._resolve(future.set_result, future, result)

    def set_exception(self, future: Future[Any], exception: BaseException) -> None:
        self._resolve(future.set_exception, future, exception)

    def _resolve(self, method: Callable[[Any], None], future: Future[Any], value: Any) -> None:
        condition = getattr(future, "_condition", None)
        if condition is not None:
            # The condition is re-entrant: holding it, no callback can be added between the check
            # and resolving, which then has none to call.
            with condition:
                if _has_callbacks(future) is False:
                    method(value)
                    return
        self._put(method, value)

    def cancel(self, future: Future[Any]) -> None:
        """Cancel a queued future and wake the threads waiting on it (wait, as_completed)."""
        if isinstance(future, JobFuture) and future.cancel_unobserved():
            return  # no one was waiting on it: nothing to wake
        self._put(_cancel_and_notify, future)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def join(self) -> None:
        """Wait until everything handed over so far is delivered (not from a callback itself)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _put(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._thread is None and not self._direct:
            self._thread = _threads.start(self._run, "mpmsub-results")
            self._direct = self._thread is None
        if self._direct:  # the interpreter is shutting down: no thread may start; deliver here
            _call(fn, args)
            return
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            action = self._queue.get()
            if action is None:
                return
            _call(*action)


def _call(fn: Callable[..., Any], args: Tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except BaseException:  # a callback's exception must not stop the delivery of others
        logger.exception("mpmsub: exception while resolving a future")


def _cancel_and_notify(future: Future[Any]) -> None:
    if future.cancel():
        future.set_running_or_notify_cancel()
