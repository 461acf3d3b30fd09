"""One sampling thread for all running jobs: each tick takes one process snapshot of the machine,
lets every running job measure its tree in it, and hands the figures to the executor's policy.
Idle (waiting, not polling) when nothing runs."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from mpmsub import _proctree
from mpmsub._launcher import Handle

logger = logging.getLogger("mpmsub")

Measure = Tuple[Any, int]  # (what the job was watched with, resident bytes now)


class Monitor:
    def __init__(self, interval: float = 0.1, on_tick: Optional[Callable[[List[Measure]], None]] = None) -> None:
        self.interval = interval
        self._on_tick = on_tick
        self._handles: Dict[Handle, Any] = {}
        self._scanner = _proctree.Scanner()
        self._new_job = False  # a job started since the last scan: read every process again
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mpmsub-monitor", daemon=True)
        self._thread.start()

    def watch(self, handle: Handle, tag: Any) -> None:
        with self._cond:
            was_idle = not self._handles
            self._handles[handle] = tag
            self._new_job = True
            if was_idle:
                self._cond.notify()

    def unwatch(self, handle: Handle) -> None:
        with self._cond:
            self._handles.pop(handle, None)

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
                watched = list(self._handles.items())
                full, self._new_job = self._new_job, False
            try:
                # A new job's processes may have a pid reused from another program's process:
                # read everything once, so that they are found and claimed from the start.
                snap = self._scanner.scan(full=full)
                measures = []
                for handle, tag in watched:
                    rss = handle.sample(snap)
                    if rss is not None:
                        measures.append((tag, rss))
                self._scanner.settle(snap)
                if self._on_tick is not None:
                    self._on_tick(measures)
            except Exception:  # a bug: measuring must never take the executor down
                logger.exception("mpmsub: memory sampling failed")
            with self._cond:
                if not self._closed:
                    self._cond.wait(self.interval)  # the sampling interval
