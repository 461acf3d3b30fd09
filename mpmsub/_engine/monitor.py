"""One sampling thread for all running jobs: each tick takes one process snapshot of the machine,
lets every running job measure its tree in it, and hands the figures to the executor's policy.
Idle (waiting, not polling) when nothing runs.

Ticks are fast while a job whose peak is not otherwise known exactly (it has no memory cgroup) is
young, when short trees and start-up spikes would slip between slow ones, and slow down as the
youngest such job ages (see `pace`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from mpmsub._launch import proctree as _proctree
from mpmsub._launch.base import Handle

logger = logging.getLogger("mpmsub")

Measure = Tuple[Any, int]  # (what the job was watched with, resident bytes now)

# (age of the youngest job below which, tick interval): 50 ticks a second in a job's first
# quarter second, 20 until its first second is over, then the monitor's own interval.
PACE = ((0.25, 0.02), (1.0, 0.05))


def pace(age: float, interval: float) -> float:
    """Seconds to the next tick when the youngest running job is `age` seconds old."""
    for below, tick in PACE:
        if age < below:
            return min(tick, interval)
    return interval


class Monitor:
    def __init__(
        self,
        interval: float = 0.1,
        on_tick: Optional[Callable[[List[Measure]], None]] = None,
        housekeeping: Optional[Callable[[], None]] = None,
    ) -> None:
        self.interval = interval
        self._on_tick = on_tick
        self._housekeeping = housekeeping  # the launcher's, at each tick and on going idle
        self._handles: Dict[Handle, Any] = {}
        self._watched_at: Dict[Handle, float] = {}
        self._scanner = _proctree.Scanner()
        self._fresh: Set[int] = set()  # first processes of jobs started since the last scan
        self._deadline = float("inf")  # when the thread will tick next (inf: idle)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mpmsub-monitor", daemon=True)
        self._thread.start()

    def watch(self, handle: Handle, tag: Any) -> None:
        with self._cond:
            self._handles[handle] = tag
            self._watched_at[handle] = time.monotonic()
            self._fresh.update(handle.roots())
            # Idle, or in a slow tick's wait while the new job's peak needs fast ticks: it is due
            # sooner. (A job measured exactly waits for the next tick: no wake-up per start.)
            if self._deadline == float("inf") or (
                not handle.exact_peak and self._deadline > time.monotonic() + PACE[0][1]
            ):
                self._cond.notify()

    def unwatch(self, handle: Handle) -> None:
        with self._cond:
            self._handles.pop(handle, None)
            self._watched_at.pop(handle, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        last = float("-inf")  # when the last tick began
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if not self._handles:
                        self._deadline = float("inf")
                        self._cond.release()
                        try:
                            self._keep_house()  # what the last jobs' ends left to do
                        finally:
                            self._cond.acquire()
                        if self._handles or self._closed:
                            continue
                        self._cond.wait()
                        continue
                    now = time.monotonic()
                    youngest = max((t for h, t in self._watched_at.items() if not h.exact_peak), default=-1e9)
                    self._deadline = last + pace(now - youngest, self.interval)
                    if self._deadline <= now:
                        break
                    self._cond.wait(self._deadline - now)
                watched = list(self._handles.items())
                fresh, self._fresh = self._fresh, set()
            last = time.monotonic()
            try:
                # A new job's first process may have the pid of another program's process that
                # ended since the last scan: read it whatever the scanner had learnt of that pid.
                snap = self._scanner.scan(fresh=fresh)
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
            self._keep_house()

    def _keep_house(self) -> None:
        if self._housekeeping is not None:
            try:
                self._housekeeping()
            except Exception:
                logger.exception("mpmsub: the launcher's housekeeping failed")
