"""The futures an executor returns: standard Futures that carry the measured usage of their job
or call (`usage`), and build their lock on first use.

A standard Future builds a `threading.Condition` when it is created: about 1 KB and several
microseconds. An executor holding 100,000 queued jobs pays that 100,000 times for futures that
nobody waits on one by one. `JobFuture` is a real Future (same class, methods and internals);
its condition is made, once and under a lock, the first time anything touches it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any, Dict, Optional, TypeVar

if TYPE_CHECKING:
    from mpmsub._result import JobResult

T = TypeVar("T")

_create = threading.Lock()


def _template() -> Dict[str, Any]:
    """The state of a new Future except its condition; empty when the internals are not the
    expected simple values (another Python's Future), and JobFuture then builds futures as usual."""
    state = {key: value for key, value in Future().__dict__.items() if key != "_condition"}
    simple = all(value is None or isinstance(value, (str, list)) for value in state.values())
    return state if simple and "_condition" in Future().__dict__ else {}


_STATE = _template()


class JobFuture(Future[T]):
    """A `concurrent.futures.Future` for one job or call.

    `usage` is the JobResult of the job or call once it has ended (None before, and for a
    future cancelled before it ran): peak memory in MB (`memory_used`), CPU time (`cpu_used`),
    `runtime`, `start_time`/`end_time`, `attempts`, and for a failure the sentence saying why
    (`error`). For a command, `result()` is that same JobResult; for a Python call, `result()` is
    what the function returned. It is set before the future is resolved, so it is there for
    every waiter and done-callback.
    """

    usage: Optional[JobResult] = None
    _executor: Any = None  # a weak reference to its executor, for kill()
    _job_id: Optional[str] = None
    _handed = False  # its job was handed to a backend where it may wait before it begins

    def __init__(self) -> None:
        if not _STATE:
            super().__init__()
            return
        fields = self.__dict__
        for key, value in _STATE.items():
            fields[key] = [] if isinstance(value, list) else value

    def __getattr__(self, name: str) -> Any:
        # Called only for attributes not found: here, the condition before its first use.
        if name != "_condition":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        with _create:
            condition = self.__dict__.get("_condition")
            if condition is None:
                condition = self.__dict__["_condition"] = threading.Condition()
        return condition

    def cancel(self) -> bool:
        """Cancel the job if it has not begun: True if it is cancelled now. A job waits in the
        executor's queue, or, on Dask, also as a task handed to the cluster that no worker has
        begun yet: such a task is taken back (a worker may have begun it a moment before: it is
        then killed). False once it runs (see kill())."""
        if not super().cancel():
            return False
        if self.__dict__.get("_handed"):
            ref = self.__dict__.get("_executor")
            executor = None if ref is None else ref()
            if executor is not None:
                executor._take_back(self)
        return True

    def begin(self) -> None:
        """Its job's run has begun where a backend runs it (any thread): a pending future is
        running now; one cancelled or resolved meanwhile stays so."""
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING

    def wake_cancelled(self) -> None:
        """Wake wait() and as_completed() for a future cancelled and not woken yet (on the loop's
        thread, which alone does so: other threads only ever cancel)."""
        if self.__dict__.get("_state") == CANCELLED:
            self.set_running_or_notify_cancel()

    def kill(self, reason: Optional[str] = None) -> bool:
        """Kill this job: a running job's whole process tree (a call's worker, which is then
        replaced), or a queued job cancelled as by `cancel()`; nothing of it runs again. Its
        result says failure "killed" and the reason (a call's `result()` raises CallKilledError).
        Returns whether it stopped the job (False once it has ended). See
        `MemoryAwareExecutor.kill`; `cancel()` keeps its standard meaning (queued jobs only)."""
        ref = self.__dict__.get("_executor")
        executor = None if ref is None else ref()
        if executor is None:  # its executor is gone, and with it every job it ran
            return False
        return bool(executor.kill(self, reason))

    def cancelled_now(self) -> bool:
        """cancelled() without taking the lock (nor building it): a glance at the state, for the
        scheduler, which checks again under the lock before it starts the job."""
        return self.__dict__.get("_state") in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def cancel_unobserved(self) -> bool:
        """Cancel the future at once if nothing has ever touched its condition; False otherwise.

        No condition means no waiter, no callback and no thread blocked on the result: all of
        these create it first. Holding the creation lock, no one can create it meanwhile.
        """
        with _create:
            if "_condition" in self.__dict__ or self.__dict__.get("_state") != PENDING:
                return False
            self.__dict__["_state"] = CANCELLED_AND_NOTIFIED
            return True
