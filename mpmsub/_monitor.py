"""One sampling thread for all running jobs: each tick takes one process snapshot of the machine
and lets every running job measure its tree in it. Idle (waiting, not polling) when nothing runs."""

from __future__ import annotations

import logging
import threading
from typing import Set

from mpmsub import _proctree
from mpmsub._launcher import Handle

logger = logging.getLogger("mpmsub")


class Monitor:
    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._handles: Set[Handle] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mpmsub-monitor", daemon=True)
        self._thread.start()

    def watch(self, handle: Handle) -> None:
        with self._cond:
            was_idle = not self._handles
            self._handles.add(handle)
            if was_idle:
                self._cond.notify()

    def unwatch(self, handle: Handle) -> None:
        with self._cond:
            self._handles.discard(handle)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._handles and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                handles = list(self._handles)
            try:
                snap = _proctree.snapshot()
                for handle in handles:
                    handle.sample(snap)
            except Exception:  # a bug: measuring must never take the executor down
                logger.exception("mpmsub: memory sampling failed")
            with self._cond:
                if not self._closed:
                    self._cond.wait(self.interval)  # the sampling interval
