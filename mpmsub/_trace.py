"""A run's trace: JSON Lines of what happened when, for `mpmsub report` and `Cluster.report()`.

One object per line, each with a "type":

- "run" (the first line): format `version`, mpmsub's version, `start` (Unix time), `host`, the
  executor's `cpus`, `memory` (bytes), `max_workers`, `schedule` and `backend`.
- "start": a run of a job began: `t` (seconds since the trace began), `job`, `run` (1, 2, ...
  for retries and requeues), the `cpus` and `memory` (bytes, or null) it reserves, `cmd` (one
  line, shortened) and `waited` (seconds since it was submitted).
- "end": that run ended: `t`, `job`, `run`, `status` ("ok", a JobResult failure kind, or
  "requeued" for a stop for the machine's sake), `final` (false when the job runs again),
  `peak` (bytes, its whole tree), `runtime`, `cpu` (seconds), `rc`, `memory` (what it reserved),
  `error` (shortened), `estimate` (m="auto": how its memory was predicted) and, for a run that
  failed, `stderr`: the last lines of its standard error where it was captured.
- "sample": the memory in use, measured on this machine: `t`, `used` (bytes, every running job's
  tree at this tick), `max` (the most `used` was at any tick since the last sample line), and
  `jobs` (job id -> bytes, the largest `JOBS_PER_SAMPLE` of them).
- "close" (the last line): `t`, when the executor finished.

Size: two lines per run, and sample lines at most every `interval` seconds in the first
`SAMPLES` of them, then ever further apart (a sample every t/SAMPLES seconds at time t), so a
day's run holds about 4,500 of them whatever its number of jobs. Jobs on a remote backend are
measured there: their runs have peaks but the trace has no samples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

VERSION = 1
SAMPLES = 500  # sample lines at the monitor's pace before they spread out
JOBS_PER_SAMPLE = 16  # the largest jobs named in a sample line
_CMD = 200  # characters of a command kept
_ERROR = 400  # characters of an error (and of a failed run's standard error) kept
_TAIL_LINES = 3  # lines of a failed run's standard error kept

logger = logging.getLogger("mpmsub")

PathLike = Union[str, "os.PathLike[str]"]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _tail(text: Optional[str]) -> Optional[str]:
    """The last lines of a failed run's standard error (what it said last), shortened."""
    if not text or not text.strip():
        return None
    lines = text.strip().splitlines()[-_TAIL_LINES:]
    tail = "\n".join(lines)
    return tail if len(tail) <= _ERROR else "…" + tail[-(_ERROR - 1) :]


def check_target(trace: object) -> Optional[PathLike]:
    """A trace path as given (None: no trace); anything else is refused, naming it."""
    if trace is None:
        return None
    if isinstance(trace, bool) or not isinstance(trace, (str, os.PathLike)):
        raise TypeError(f"trace must be a file path (str or os.PathLike) or None; got {trace!r}")
    if not os.fspath(trace):
        raise ValueError(f"invalid trace {trace!r}: expected a file path")
    return trace


class Trace:
    """Writes a trace to a file (`path`) or keeps its events in `events` (path None). Safe to
    call from the executor's loop and the monitor thread; a trace that cannot be written any
    more (a full disk) stops, once, with a warning on the 'mpmsub' logger."""

    def __init__(
        self,
        path: Optional[PathLike],
        header: Dict[str, Any],
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.events: List[Dict[str, Any]] = []
        self._file: Optional[IO[str]] = None if path is None else open(path, "w", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()
        self._clock = clock
        self._t0 = clock()
        self._interval = interval
        self._last_sample = float("-inf")
        self._max = 0  # the most in use since the last sample line
        self._closed = False
        from mpmsub import __version__  # here: the package imports this module before it sets it

        self._put(
            {
                "type": "run",
                "version": VERSION,
                "mpmsub": __version__,
                "start": round(time.time(), 3),
                "host": socket.gethostname(),
                **header,
            }
        )

    def now(self) -> float:
        return round(self._clock() - self._t0, 3)

    def started(self, job: str, run: int, cpus: int, memory: Optional[int], cmd: str, submitted: float) -> None:
        t = self.now()
        self._put(
            {
                "type": "start",
                "t": t,
                "job": job,
                "run": run,
                "cpus": cpus,
                "memory": memory,
                "cmd": _short(cmd, _CMD),
                "waited": round(max(0.0, self._clock() - submitted), 3),
            }
        )

    def ended(self, job: str, run: int, status: str, final: bool, result: Any) -> None:
        """`result`: the run's JobResult."""
        requested = result.memory_requested
        self._put(
            {
                "type": "end",
                "t": self.now(),
                "job": job,
                "run": run,
                "status": status,
                "final": final,
                "peak": int(result.memory_used * 2**20),
                "runtime": round(result.runtime, 3),
                "cpu": round(result.cpu_used, 3),
                "rc": result.returncode,
                "memory": None if requested is None else int(requested * 2**20),
                "error": None if result.error is None else _short(result.error, _ERROR),
                "estimate": result.memory_estimate,
                "stderr": None if status == "ok" else _tail(result.stderr),
            }
        )

    def sample(self, jobs: Iterable[Tuple[str, int]]) -> None:
        """The running jobs' memory at a tick of the monitor: written when a sample is due."""
        usage = list(jobs)
        used = sum(rss for _, rss in usage)
        t = self._clock() - self._t0
        with self._lock:
            self._max = max(self._max, used)
            if t - self._last_sample < max(self._interval, t / SAMPLES):
                return
            self._last_sample = t
            peak, self._max = self._max, 0
        usage.sort(key=lambda pair: pair[1], reverse=True)
        self._put(
            {
                "type": "sample",
                "t": round(t, 3),
                "used": used,
                "max": peak,
                "jobs": dict(usage[:JOBS_PER_SAMPLE]),
            },
            flush=True,
        )

    def close(self) -> None:
        self._put({"type": "close", "t": self.now()})
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        self._closed = True
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def _put(self, event: Dict[str, Any], flush: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            if self._file is None:
                self.events.append(event)
                return
            try:
                self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
                if flush or event["type"] in ("run", "close"):
                    self._file.flush()
            except (OSError, ValueError) as exc:
                logger.warning("mpmsub: the trace %s is no longer written: %s", self.path, exc)
                self._stop()


def read(path: PathLike) -> List[Dict[str, Any]]:
    """The events of a trace file, checked: a clear ValueError names the line that is not one."""
    return list(_parse(path))


def _parse(path: PathLike) -> Iterator[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                if number > 1 and not line.endswith("\n"):
                    return  # a last line cut short (the run was killed while writing it)
                raise ValueError(f"{path}: line {number} is not JSON ({exc.msg}): {line[:80]!r}") from None
            if not isinstance(event, dict) or "type" not in event:
                raise ValueError(f"{path}: line {number} is not a trace event: {line[:80]!r}")
            if number == 1 and event["type"] != "run":
                raise ValueError(f"{path}: not an mpmsub trace (its first line is not a 'run' event)")
            if number == 1 and event.get("version") != VERSION:
                raise ValueError(
                    f"{path}: a trace of format version {event.get('version')!r}; this mpmsub reads version {VERSION}"
                )
            yield event
