"""A run's trace: JSON Lines of what happened when, for `mpmsub report` and `Cluster.report()`.

One object per line, each with a "type":

- "run" (the first line): format `version`, mpmsub's version, `start` (Unix time), `host`, the
  executor's `cpus`, `memory` (bytes), `max_workers`, `schedule` and `backend`, and where it has
  them, its named `resources` (name -> count) and `gpus` (each device's `id` and `memory`).
- "start": a run of a job began: `t` (seconds since the trace began), `job`, `run` (1, 2, ...
  for retries and requeues), the `cpus` and `memory` (bytes, or null) it reserves, `cmd` (one
  line, shortened) and `waited` (seconds since it was submitted); and, for a run that holds
  them, `gpus` (its device ids, or their number where a remote backend chooses them),
  `gpu_memory` (bytes it reserves on each) and `resources` (named resource -> count).
- "end": that run ended (or, with `ran` false, the job was cancelled or killed before it began):
  `t`, `job`, `run`, `status` ("ok", a JobResult failure kind, or
  "requeued" for a stop for the machine's sake), `final` (false when the job runs again),
  `peak` (bytes, its whole tree), `runtime`, `cpu` (seconds), `rc`, `memory` (what it reserved),
  `error` (shortened), `estimate` (m="auto": how its memory was predicted) and, for a run that
  failed, `stderr`: the last lines of its standard error where it was captured; `gpus` (the
  device ids it had) and `gpu_peak` (bytes, its processes' peak GPU memory, where NVML measured
  it) when it had GPUs.
- "sample": the memory in use, measured on this machine: `t`, `used` (bytes, every running job's
  tree at this tick), `max` (the most `used` was at any tick since the last sample line, this
  one included; written when the last running job ends too, so no tick goes unreported), and
  `jobs` (job id -> bytes, the largest `JOBS_PER_SAMPLE` of them).
- "gpus": the GPU devices (each device's `id` and `memory`), at `t`, when they were detected
  after the run began (as a job first asked for one); the header has them where they were known.
- "close" (the last line): `t`, when the executor finished.

Size: two lines per run, and sample lines at most every `interval` seconds in the first
`SAMPLES` of them, then ever further apart (a sample every t/SAMPLES seconds at time t), so a
day's run holds about 4,000 of them whatever its number of jobs. Jobs on a remote backend are
measured there: their runs have peaks but the trace has no samples.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import IO, Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from mpmsub._files import open_private
from mpmsub._units import shorten
from mpmsub._version import __version__

VERSION = 1
SAMPLES = 500  # sample lines at the monitor's pace before they spread out
JOBS_PER_SAMPLE = 16  # the largest jobs named in a sample line
_CMD = 200  # characters of a command kept
_ERROR = 400  # characters of an error (and of a failed run's standard error) kept
_TAIL_LINES = 3  # lines of a failed run's standard error kept
_BATCH = 256  # queued starts and ends that are written at once, whatever the time

logger = logging.getLogger("mpmsub")

PathLike = Union[str, "os.PathLike[str]"]


def _tail(text: Optional[str]) -> Optional[str]:
    """The last lines of a failed run's standard error (what it said last), shortened."""
    if not text or not text.strip():
        return None
    lines = text.strip().splitlines()[-_TAIL_LINES:]
    tail = "\n".join(lines)
    return tail if len(tail) <= _ERROR else "…" + tail[-(_ERROR - 1) :]


def check_target(trace: object) -> Optional[PathLike]:
    """A trace path as given (None: no trace), if it can be a file; anything else is refused,
    naming it (before any job is taken)."""
    if trace is None:
        return None
    if isinstance(trace, bool) or not isinstance(trace, (str, os.PathLike)):
        raise TypeError(f"trace must be a file path (str or os.PathLike) or None; got {trace!r}")
    path = os.fspath(trace)
    if not path:
        raise ValueError(f"invalid trace {trace!r}: expected a file path")
    if os.path.isdir(path):
        raise ValueError(f"invalid trace {trace!r}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"invalid trace {trace!r}: there is no directory {parent!r}")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"invalid trace {trace!r}: not writable here")
    return trace


class Trace:
    """Writes a trace to a file (`path`), or keeps its lines in memory (path None) for `events`.
    Safe to call from the executor's loop and the monitor thread; a trace that cannot be written
    any more (a full disk) stops, once, with a warning on the 'mpmsub' logger.

    Starts and ends are queued as they come (an append: the loop thread goes on to the next job
    at once) and written in batches, then flushed: at each sample line (the monitor's thread),
    when many wait or a second has passed (jobs on a remote backend have no samples), when the
    last running job ends, and at close."""

    def __init__(
        self,
        path: Optional[PathLike],
        header: Dict[str, Any],
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._lines: List[str] = []  # in memory: the lines a file would hold
        # A new trace is 0600 (it holds command lines); an existing one keeps its mode when truncated.
        self._file: Optional[IO[str]] = None
        if path is not None:
            self._file = open(open_private(os.fspath(path), os.O_TRUNC), "w", encoding="utf-8")  # noqa: SIM115
        self._queue: Deque[Tuple[Any, ...]] = collections.deque()  # starts and ends not yet written
        self._lock = threading.Lock()  # the file, the lines, and the sampling state
        self._clock = clock
        self._t0 = clock()
        self._written_at = self._t0
        self._interval = interval
        self._last_sample = float("-inf")
        # Ticks since the last sample line: the most in use at any of them, and the last one.
        self._max = 0
        self._tick: Optional[Tuple[float, int, List[Tuple[str, int]]]] = None
        self._closed = False

        with self._lock:
            self._put(
                {
                    "type": "run",
                    "version": VERSION,
                    "mpmsub": __version__,
                    "start": round(time.time(), 3),
                    "host": socket.gethostname(),
                    **header,
                },
                flush=True,
            )

    @property
    def events(self) -> List[Dict[str, Any]]:
        """The events so far, where the trace is kept in memory."""
        with self._lock:
            self._drain()
            return [json.loads(line) for line in self._lines]

    def started(
        self,
        job: str,
        run: int,
        cpus: int,
        memory: Optional[int],
        cmd: str,
        submitted: float,
        held: Optional[Dict[str, Any]] = None,
    ) -> None:
        """`held`: what the run holds beside CPUs and memory ("gpus": device ids, or a count where
        they are chosen elsewhere; "gpu_memory": bytes on each; "resources": name to count)."""
        now = self._clock()
        self._queue.append(("start", now, job, run, cpus, memory, cmd, submitted, held))
        self._maybe_drain(now)

    def ended(self, job: str, run: int, status: str, final: bool, result: Any) -> None:
        """`result`: the run's JobResult."""
        now = self._clock()
        self._queue.append(("end", now, job, run, status, final, result))
        self._maybe_drain(now)

    def cancelled(self, job: str, run: int, error: str, status: str = "cancelled") -> None:
        """A job cancelled before its run number `run` started (queued, held, or waiting to run
        again): its final end, a run that never began. `status` "killed": it was killed there
        (kill()), which the report shows apart from the cancelled."""
        now = self._clock()
        self._queue.append(("cancel", now, job, run, error, status))
        self._maybe_drain(now)

    def idle(self) -> None:
        """Nothing runs any more (for now): write what waits, the last ticks' most included."""
        with self._lock:
            self._write_tick()
            self._drain()

    def sample(self, jobs: Iterable[Tuple[str, int]]) -> None:
        """The running jobs' memory at a tick of the monitor: written when a sample is due."""
        usage = list(jobs)
        used = sum(rss for _, rss in usage)
        t = self._clock() - self._t0
        with self._lock:
            self._max = max(self._max, used)
            self._tick = (t, used, usage)
            if t - self._last_sample >= max(self._interval, t / SAMPLES):
                self._drain()
                self._write_tick()

    def devices(self, gpus: List[Dict[str, Any]]) -> None:
        """The GPU devices, where they were found after the run began (detected when a job first
        asked for one): a line of their own, as the header would have them."""
        with self._lock:
            self._drain()
            self._put({"type": "gpus", "t": round(self._clock() - self._t0, 3), "gpus": gpus}, flush=True)

    def close(self) -> None:
        with self._lock:
            self._write_tick()
            self._drain()
            self._put({"type": "close", "t": round(self._clock() - self._t0, 3)}, flush=True)
            self._stop()

    # -- under the lock ----------------------------------------------------------------------------

    def _maybe_drain(self, now: float) -> None:
        if len(self._queue) >= _BATCH or now - self._written_at >= 1.0:
            with self._lock:
                self._drain()

    def _write_tick(self) -> None:
        """The last tick as a sample line, with the most in use at any tick since the last line."""
        if self._tick is None:
            return
        t, used, usage = self._tick
        jobs = dict(sorted(usage, key=lambda pair: pair[1], reverse=True)[:JOBS_PER_SAMPLE])
        self._put({"type": "sample", "t": round(t, 3), "used": used, "max": self._max, "jobs": jobs}, flush=True)
        self._last_sample = t
        self._tick = None
        self._max = 0

    def _drain(self) -> None:
        """Write the queued starts and ends, then flush."""
        self._written_at = self._clock()
        makers: Dict[str, Callable[..., str]] = {"start": self._start, "end": self._end, "cancel": self._cancel}
        wrote = False
        while True:
            try:
                item = self._queue.popleft()
            except IndexError:
                break
            self._put(makers[item[0]](*item[1:]))
            wrote = True
        if wrote and self._file is not None and not self._closed:
            self._flush()

    def _start(
        self,
        at: float,
        job: str,
        run: int,
        cpus: int,
        memory: Optional[int],
        cmd: str,
        submitted: float,
        held: Optional[Dict[str, Any]],
    ) -> str:
        text = line(
            ("type", "start"),
            ("t", round(at - self._t0, 3)),
            ("job", job),
            ("run", run),
            ("cpus", cpus),
            ("memory", memory),
            ("cmd", shorten(cmd, _CMD)),
            ("waited", round(max(0.0, at - submitted), 3)),
        )
        if held:  # (rare: a line of its own making is cheap enough)
            text = text[:-1] + "," + json.dumps(held, separators=(",", ":"))[1:]
        return text

    def _cancel(self, at: float, job: str, run: int, error: str, status: str) -> str:
        """The end event of a job cancelled (or killed) before its run `run` began."""
        return line(
            ("type", "end"),
            ("t", round(at - self._t0, 3)),
            ("job", job),
            ("run", run),
            ("status", status),
            ("final", True),
            ("peak", 0),
            ("runtime", 0.0),
            ("cpu", 0.0),
            ("rc", None),
            ("memory", None),
            ("error", shorten(error, _ERROR)),
            ("estimate", None),
            ("stderr", None),
            ("ran", False),
        )

    def _end(self, at: float, job: str, run: int, status: str, final: bool, result: Any) -> str:
        """The end event of a run: its status, whether the job runs again, and its JobResult."""
        requested = result.memory_requested
        text = line(
            ("type", "end"),
            ("t", round(at - self._t0, 3)),
            ("job", job),
            ("run", run),
            ("status", status),
            ("final", final),
            ("peak", int(result.memory_used * 2**20)),
            ("runtime", round(result.runtime, 3)),
            ("cpu", round(result.cpu_used, 3)),
            ("rc", result.returncode),
            ("memory", None if requested is None else int(requested * 2**20)),
            ("error", None if result.error is None else shorten(result.error, _ERROR)),
            ("estimate", result.memory_estimate),
            ("stderr", None if status == "ok" else _tail(result.stderr)),
        )
        if result.gpus:
            text = text[:-1] + f',"gpus":{json.dumps(list(result.gpus))}}}'
        if result.gpu_memory_used is not None:
            text = text[:-1] + f',"gpu_peak":{int(result.gpu_memory_used * 2**20)}}}'
        return text

    def _stop(self) -> None:
        self._closed = True
        self._queue.clear()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def _flush(self) -> None:
        assert self._file is not None
        try:
            self._file.flush()
        except (OSError, ValueError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        logger.warning("mpmsub: the trace %s is no longer written: %s", self.path, exc)
        self._stop()

    def _put(self, event: Union[str, Dict[str, Any]], flush: bool = False) -> None:
        """Write an event (a dict, or a line made by `line`)."""
        if self._closed:
            return
        text = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
        if self._file is None:
            self._lines.append(text)
            return
        try:
            self._file.write(text + "\n")
        except (OSError, ValueError) as exc:
            self._failed(exc)
            return
        if flush:
            self._flush()


_encode = json.encoder.encode_basestring_ascii


def line(*fields: Tuple[str, Any]) -> str:
    """A JSON object of (name, value) pairs, values str, int, float, bool or None: what
    json.dumps makes of them, made for the two events of every run at a fraction of its cost."""
    parts = []
    for name, value in fields:
        if value is None:
            text = "null"
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        elif isinstance(value, str):
            text = _encode(value)
        else:
            text = repr(value)  # an int, or a finite float
        parts.append(f'"{name}":{text}')
    return "{" + ",".join(parts) + "}"


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
