"""A small event loop on one thread: file-descriptor readiness, timers and thread-safe callbacks.

The executor's bookkeeping runs here, so dispatch, process exits, output and timeouts are handled
by one thread woken by events (a wake-up pipe, a pidfd, a pipe, the next timer), never by polling.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

logger = logging.getLogger("mpmsub")

Callback = Callable[..., object]

# epoll takes its timeout in int milliseconds; a longer wait is cut short and re-evaluated.
_MAX_WAIT = 86400.0


class Timer:
    """A handle on a callback scheduled with EventLoop.call_later; cancel() stops it."""

    __slots__ = ("args", "callback", "cancelled", "loop", "when")

    def __init__(self, loop: EventLoop, when: float, callback: Callback, args: Tuple[Any, ...]) -> None:
        self.loop = loop
        self.when = when
        self.callback: Optional[Callback] = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the timer and drop what it holds (the entry may stay in the heap until its time)."""
        if not self.cancelled:
            self.cancelled = True
            self.callback, self.args = None, ()
            self.loop._timer_cancelled()


class EventLoop:
    """One thread waiting on a selector; everything registered runs on that thread."""

    def __init__(self, name: str) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._ready: Deque[Tuple[Callback, Tuple[Any, ...]]] = deque()
        self._timers: List[Tuple[float, int, Timer]] = []
        self._cancelled_timers = 0
        self._tiebreak = itertools.count()
        self._readers: Dict[int, Tuple[Callback, Tuple[Any, ...]]] = {}
        self._writers: Dict[int, Tuple[Callback, Tuple[Any, ...]]] = {}
        self._stopping = False
        self._closed = False
        self._wake_pending = False  # a byte is in the wake-up pipe (guarded by _close_lock)
        # Guards the wake-up pipe against being closed (and its fd number reused) during a write,
        # and the wake-up flag.
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ended = threading.Event()  # set by the loop's thread as it ends (see join)

    # -- from any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon_threadsafe(self, callback: Callback, *args: Any) -> None:
        """Run `callback(*args)` on the loop thread, after what is already queued."""
        if self.in_loop_thread():
            self._ready.append((callback, args))  # the loop runs it before it waits again
            return
        with self._close_lock:
            if self._closed:
                logger.debug("mpmsub: event loop closed, dropped %r", callback)
                return
            self._ready.append((callback, args))
            # One byte per wake-up, not per call. The flag is set only after the write and
            # cleared only with the drain, both under this lock: when it is set, a byte is
            # waiting in the pipe. (An interrupt between the write and the flag costs one extra
            # wake-up; a full pipe wakes the loop anyway.)
            if not self._wake_pending:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\0")
                self._wake_pending = True

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the loop to end. Not Thread.join: on Python 3.11, a Ctrl-C that interrupts
        Thread.join marks a thread that runs on as stopped (is_alive() then says False), and an
        executor would take its loop for ended, and leave its jobs running."""
        self._ended.wait(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._ended.is_set()

    # -- on the loop thread only ----------------------------------------------------------------

    def call_later(self, delay: float, callback: Callback, *args: Any) -> Timer:
        timer = Timer(self, time.monotonic() + max(0.0, delay), callback, args)
        heapq.heappush(self._timers, (timer.when, next(self._tiebreak), timer))
        return timer

    def _timer_cancelled(self) -> None:
        self._cancelled_timers += 1
        # Rebuild the heap when cancelled timers are most of it, so that a long batch of jobs
        # with long timeouts does not keep one dead entry per finished job.
        if self._cancelled_timers > 256 and self._cancelled_timers > len(self._timers) // 2:
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def add_reader(self, fd: int, callback: Callback, *args: Any) -> None:
        self._readers[fd] = (callback, args)
        self._selector.register(fd, selectors.EVENT_READ, None)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._selector.unregister(fd)

    def add_writer(self, fd: int, callback: Callback, *args: Any) -> None:
        """Call `callback(*args)` whenever `fd` can be written to (an fd not read from here)."""
        self._writers[fd] = (callback, args)
        self._selector.register(fd, selectors.EVENT_WRITE, None)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._selector.unregister(fd)

    def stop(self) -> None:
        """Leave the loop after the current iteration; pending callbacks are dropped."""
        self._stopping = True

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._run_once()
                except Exception:  # a bug in the loop itself: keep serving the jobs
                    logger.exception("mpmsub internal error in the event loop")
        finally:
            try:
                self._close()
            finally:
                self._ended.set()

    def _run_once(self) -> None:
        timeout: Optional[float]
        if self._ready:
            timeout = 0.0
        elif self._timers:
            timeout = min(_MAX_WAIT, max(0.0, self._timers[0][0] - time.monotonic()))
        else:
            timeout = None
        for key, _ in self._selector.select(timeout):
            fd = key.fd
            if fd == self._wake_r:
                self._drain_wakeups()
            elif fd in self._readers:
                callback, args = self._readers[fd]
                self._invoke(callback, args)
            elif fd in self._writers:
                callback, args = self._writers[fd]
                self._invoke(callback, args)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if timer.cancelled:
                self._cancelled_timers -= 1
            elif timer.callback is not None:
                self._invoke(timer.callback, timer.args)
        # Run only what was queued before this point, so that callbacks that queue more
        # callbacks cannot starve the selector.
        for _ in range(len(self._ready)):
            callback, args = self._ready.popleft()
            self._invoke(callback, args)
            if self._stopping:
                return

    def _drain_wakeups(self) -> None:
        with self._close_lock:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
            self._wake_pending = False

    @staticmethod
    def _invoke(callback: Callback, args: Tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except BaseException:  # a bug in mpmsub: keep the loop alive so that other jobs finish
            logger.exception("mpmsub internal error in %r", callback)

    def _close(self) -> None:
        with self._close_lock:
            self._closed = True
            for fd in list(self._readers):
                self.remove_reader(fd)
            for fd in list(self._writers):
                self.remove_writer(fd)
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
