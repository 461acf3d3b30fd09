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
from typing import Any, Callable, List, Optional, Tuple

from mpmsub import _threads
from mpmsub._engine.future import JobFuture

logger = logging.getLogger("mpmsub")

_Action = Tuple[Callable[..., Any], Tuple[Any, ...]]


def _has_callbacks(future: Future[Any]) -> Optional[bool]:
    """Whether `future` has done-callbacks; None where the standard library's internals differ."""
    callbacks = getattr(future, "_done_callbacks", None)
    return None if callbacks is None else bool(callbacks)


class Delivery:
    """Sets results and cancels futures, keeping their callbacks off the caller's thread.

    Where no thread may start (at interpreter shutdown, on the Pythons that refuse then), a
    future is resolved at once, its waiters woken, and its callbacks run later by `join`, on the
    thread that waits for the executor: never on the loop, where a callback waiting for another
    future would stop the loop that resolves it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Optional[_Action]] = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._direct = False  # no thread could start: callbacks wait for join()

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
        if self._started():
            self._queue.put((method, (value,)))
        else:
            self._queue.put((_call_back, (future, _without_callbacks(future, method, value))))

    def cancel(self, future: Future[Any]) -> None:
        """Cancel a queued future and wake the threads waiting on it (wait, as_completed)."""
        if isinstance(future, JobFuture) and future.cancel_unobserved():
            return  # no one was waiting on it: nothing to wake
        if self._started():
            self._queue.put((_cancel_and_notify, (future,)))
        else:
            self._queue.put((_call_back, (future, _without_callbacks(future, _cancel_and_notify, future))))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def join(self) -> None:
        """Wait until everything handed over so far is delivered (not from a callback itself);
        where no thread could start, run the callbacks waiting for it here."""
        if self._direct:
            while True:
                try:
                    action = self._queue.get_nowait()
                except queue.Empty:
                    return
                if action is not None:
                    _call(*action)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _started(self) -> bool:
        """Whether the delivery thread runs (started now if need be)."""
        if self._thread is None and not self._direct:
            self._thread = _threads.start(self._run, "mpmsub-results")
            self._direct = self._thread is None
        return not self._direct

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


def _without_callbacks(future: Future[Any], resolve: Callable[..., Any], *args: Any) -> List[Callable[..., Any]]:
    """Resolve `future` with `resolve(*args)` now, waking its waiters, without its callbacks: they
    are returned, for later (the standard library's internals: an empty list where they differ)."""
    with future._condition:
        callbacks = getattr(future, "_done_callbacks", None)
        detached = list(callbacks) if isinstance(callbacks, list) else []
        if isinstance(callbacks, list):
            callbacks.clear()
        resolve(*args)
    return detached


def _call_back(future: Future[Any], callbacks: List[Callable[..., Any]]) -> None:
    for callback in callbacks:
        _call(callback, (future,))


def _cancel_and_notify(future: Future[Any]) -> None:
    if future.cancel():
        future.set_running_or_notify_cancel()
