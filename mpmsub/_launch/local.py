"""The local launcher: jobs as process trees on this machine, driven by the executor's event loop.

Each pipeline stage starts in a session of its own, so its whole tree can be signalled. Exits are
learnt through a pidfd registered on the loop (a waiter thread where pidfds do not exist), output
pipes are read on the loop, and every stage is reaped with os.wait4 to get the kernel's rusage.

A job's peak memory is the largest of three measures: the kernel's ru_maxrss of each stage from
wait4 (exact for the largest single process, however short-lived), the sampled sum of its tree's
resident memory (the monitor's ticks, faster while the job is young), and, where per-job memory
cgroups can be made (see cgroups), the group's peak, exact for the whole tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from subprocess import Popen
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from mpmsub import _threads
from mpmsub._launch import proctree as _proctree
from mpmsub._launch.base import Handle, Launcher, MemorySeries, Outcome, PoolOptions, escalate
from mpmsub._launch.cgroups import JobGroup, JobGroups
from mpmsub._launch.loop import EventLoop, Timer
from mpmsub._launch.pool import WorkerPool
from mpmsub._launch.watchman import Watchman
from mpmsub._result import ERROR, START, TIMEOUT, FailureKind
from mpmsub._spec import JobSpec
from mpmsub._system import hostname
from mpmsub._units import format_memory

logger = logging.getLogger("mpmsub")

# How long captured output may stay open after every stage has exited before the rest of the
# job's session is killed, and then before mpmsub stops waiting for it.
_LEFTOVER_GRACE = 0.2
_READ_SIZE = 1 << 16
# A job gets its memory cgroup once it has run this long. Moving processes between groups makes
# the kernel wait for an RCU grace period (about 5 ms measured here) during which every fork on
# the machine waits too: worth it for a job that runs a while, not for a burst of tiny ones,
# whose largest process wait4's ru_maxrss measures exactly anyway.
_PLACE_AFTER = 0.1
# How long a killed job's processes may take to die once its stages have exited (a process in
# uninterruptible sleep, say): its memory stays the job's until they are gone, or until this.
_SURVIVOR_WAIT = 10.0


def _start_error(spec: JobSpec, argv0: str, exc: OSError) -> str:
    """A sentence saying why a process could not be started."""
    if spec.cwd is not None and exc.filename == spec.cwd:
        if isinstance(exc, FileNotFoundError):
            return f"working directory not found: {spec.cwd!r}"
        if isinstance(exc, NotADirectoryError):
            return f"working directory is not a directory: {spec.cwd!r}"
        return f"cannot enter working directory {spec.cwd!r}: {exc.strerror}"
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {argv0!r}"
    if isinstance(exc, PermissionError):
        return f"permission denied: cannot execute {argv0!r}"
    return f"cannot start {argv0!r}: {exc.strerror or exc}"


def _search_path(env: Optional[Dict[str, str]]) -> str:
    """The PATH a job's program is searched in, as Popen does: the job's environment's, or ours."""
    return (os.environ if env is None else env).get("PATH", os.defpath)


class LocalLauncher(Launcher):
    """Runs jobs as local process trees, and Python calls in a pool of reused worker processes
    (see pool); every callback runs on `loop`'s thread."""

    def __init__(
        self,
        loop: EventLoop,
        kill_grace: float = 2.0,
        cgroups: bool = True,
        pool: Optional[PoolOptions] = None,
        output_limit: Optional[int] = None,
    ) -> None:
        self.loop = loop
        self.kill_grace = kill_grace
        self.output_limit = output_limit  # bytes of each captured stream kept (None: all)
        self._programs: Dict[Tuple[str, str], str] = {}
        self.groups = JobGroups.detect() if cgroups else None  # a memory cgroup per job, if we may
        self.watchman = Watchman()  # kills the jobs if this process dies without closing
        self.workers = WorkerPool(loop, kill_grace, self.watchman, pool or PoolOptions())

    def close(self) -> None:
        self.workers.close()
        if self.groups is not None:
            self.groups.close()
        self.watchman.close()

    def housekeeping(self) -> None:
        self.watchman.flush()  # the sessions started and ended since the last tick

    def program(self, name: str, env: Optional[Dict[str, str]]) -> Optional[str]:
        """The file that running `name` executes, looked up in PATH once per executor (Popen
        would build and try every PATH entry on each start); None to let Popen search."""
        if os.sep in name:
            return None
        path = _search_path(env)
        key = (name, path)
        found = self._programs.get(key)
        if found is None:
            if not all(d and os.path.isabs(d) for d in path.split(os.pathsep)):
                return None  # an entry relative to the job's directory (empty is '.'): search each time
            found = shutil.which(name, path=path)
            if found is None:
                return None  # Popen reports it as it would
            self._programs[key] = found
        return found

    def forget(self, name: str, env: Optional[Dict[str, str]]) -> None:
        self._programs.pop((name, _search_path(env)), None)

    def start(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> Handle:
        if spec.call is not None:
            return self.workers.start(spec, job_id, on_exit)
        handle = LocalHandle(self, spec, job_id, on_exit)
        handle.launch()
        return handle


class CapturedOutput:
    """A job's captured stdout and stderr: the pipes its last stage writes them to, read on the
    loop, what the output limit keeps of each, and the note at a stream's end where the limit cut
    it. Everything here runs on the loop thread; `captured` is read by the monitor thread too."""

    def __init__(self, loop: EventLoop, job_id: str, limit: Optional[int], on_end: Callable[[], None]) -> None:
        self._loop = loop
        self._job_id = job_id
        self._limit = limit  # bytes of each stream kept (None: all)
        self._on_end = on_end  # called when the last open pipe reaches its end
        self._open: Dict[int, bytearray] = {}  # capture fd -> what is kept of it
        self._streams: Dict[str, Tuple[int, bytearray]] = {}  # "stdout" or "stderr" -> (fd, kept)
        self._dropped: Dict[int, int] = {}  # capture fd -> bytes read past the output limit
        self.captured = 0  # bytes of output held for the job

    @property
    def open(self) -> bool:
        """Whether a pipe is still open: a process may still write to it."""
        return bool(self._open)

    def pipe(self, name: str) -> int:
        """A pipe to capture stream `name` ("stdout" or "stderr") through: its write end, for the
        job (the caller closes ours once the job holds it); its read end is kept here."""
        read_fd, write_fd = os.pipe()
        kept = bytearray()
        self._open[read_fd] = kept
        self._streams[name] = (read_fd, kept)
        return write_fd

    def read(self) -> None:
        """Start reading the pipes on the loop."""
        for fd in list(self._open):
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._on_readable, fd)

    def close_unread(self) -> None:
        """Close the pipes before any is read (the job could not start)."""
        for fd in list(self._open):
            os.close(fd)
        self._open.clear()

    def abandon(self) -> None:
        """Stop reading: a process outside the job's session keeps its output open."""
        if self._open:
            logger.warning(
                "mpmsub: job %s: a process outside the job's session keeps its output open; "
                "output after its end is not captured",
                self._job_id,
            )
            for fd in list(self._open):
                self._close(fd)

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        if data:
            kept = self._open[fd]
            limit = self._limit
            if limit is not None and len(kept) + len(data) > limit:  # read on, so the job never blocks
                self._dropped[fd] = self._dropped.get(fd, 0) + len(kept) + len(data) - limit
                data = data[: limit - len(kept)]
            kept += data
            self.captured += len(data)
            return
        self._close(fd)
        if not self._open:
            self._on_end()

    def _close(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        del self._open[fd]

    def text(self, name: str) -> Optional[str]:
        """A captured stream as text, with a note at its end where the output limit cut it (None
        where the stream was not captured)."""
        stream = self._streams.get(name)
        if stream is None:
            return None
        fd, kept = stream
        size = len(kept)
        text = kept.decode("utf-8", "replace")
        del kept[:]  # the text is what is held from now on
        dropped = self._dropped.get(fd)
        if dropped:
            limit = format_memory(self._limit or 0)
            whole = format_memory(size + dropped)
            note = (
                f"{name} cut here: the job wrote about {whole}; the first {limit} are kept (output_limit); "
                f"a file keeps it all ({name}_to, or mpmsub run --results DIR)"
            )
            logger.warning("mpmsub: job %s: %s", self._job_id, note)
            separator = "" if text.endswith("\n") else "\n"
            text += f"{separator}[mpmsub: {note}]\n"
        return text


class Stages:
    """A job's stage processes until each is reaped, and what reaping told: their exit codes,
    their CPU time and the largest ru_maxrss. Exits are learnt through a pidfd registered on the
    loop, or, where there is none, a waiter thread (or a look now and then); each stage is reaped
    with os.wait4, on the loop but where a waiter thread must reap it itself (macOS). Everything
    here runs on the loop thread but the waiter threads (they add to `gone`); the monitor thread
    reads `unreaped`."""

    def __init__(self, loop: EventLoop, count: int, on_lost: Callable[[], None], on_done: Callable[[], None]) -> None:
        self._loop = loop
        self._on_lost = on_lost  # called when another part of the program reaped a stage
        self._on_done = on_done  # called once no stage is left unreaped
        self.returncodes: List[Optional[int]] = [None] * count
        self.unreaped: Dict[int, int] = {}  # pid -> stage index
        self.gone: Set[int] = set()  # reaped by a waiter thread, not yet recorded on the loop
        self._pidfds: Dict[int, int] = {}  # pid -> pidfd
        self.cpu_time = 0.0
        self.max_rss = 0

    def watch(self, pid: int) -> None:
        """Learn of the exit of `pid` (in `unreaped`), and reap it then."""
        try:
            pidfd = os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):
            if _threads.start(self._wait_thread, f"mpmsub-wait-{pid}", (pid,)) is None:
                self._poll_exit(pid)  # interpreter shutdown: no thread may wait
            return
        self._pidfds[pid] = pidfd
        self._loop.add_reader(pidfd, self._on_pidfd, pid)

    def _wait_thread(self, pid: int) -> None:
        """Where there is no pidfd: wait for the exit without reaping, then reap on the loop."""
        if hasattr(os, "waitid"):
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            self._loop.call_soon_threadsafe(self._reap, pid)
        else:
            # macOS has no waitid: reaping here gives up the killpg safety of an unreaped leader,
            # and leftovers in the job's group are not killed after a normal exit.
            try:
                _, status, usage = os.wait4(pid, 0)
            except ChildProcessError:
                self.gone.add(pid)
                self._loop.call_soon_threadsafe(self._record_lost, pid)
                return
            self.gone.add(pid)  # never signal this pid again: it may be reused
            self._loop.call_soon_threadsafe(self._record_exit, pid, status, usage)

    def _poll_exit(self, pid: int) -> None:
        """Where neither a pidfd nor a thread can tell of the exit: look again soon."""
        seen = _threads.exited(pid)
        if seen is None:  # (not among the job's timers: it ends with the exit, which every finish waits for)
            self._loop.call_later(_threads.EXIT_POLL, self._poll_exit, pid)
        elif hasattr(os, "waitid"):
            self._reap(pid)  # a zombie still: reaped on the loop, as a pidfd's exit is
        else:
            self.gone.add(pid)  # reaped by that look: never signal this pid again
            status, usage = seen
            if status is None:
                self._record_lost(pid)
            else:
                self._record_exit(pid, status, usage)

    def _on_pidfd(self, pid: int) -> None:
        pidfd = self._pidfds.pop(pid)
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        self._reap(pid)

    def _reap(self, pid: int) -> None:
        # The stage is a zombie: its pid still holds its process group, so killing what is left
        # of the group cannot hit an unrelated process.
        _proctree.kill_group(pid)
        try:
            _, status, usage = os.wait4(pid, 0)
        except ChildProcessError:
            self._record_lost(pid)
            return
        self._record_exit(pid, status, usage)

    def _record_lost(self, pid: int) -> None:
        """Another part of the program reaped this stage (a SIGCHLD handler, os.wait())."""
        self.unreaped.pop(pid, None)
        self._on_lost()
        if not self.unreaped:
            self._on_done()

    def _record_exit(self, pid: int, status: int, usage: object) -> None:
        index = self.unreaped.pop(pid)
        self.returncodes[index] = os.waitstatus_to_exitcode(status)
        self.cpu_time += usage.ru_utime + usage.ru_stime  # type: ignore[attr-defined]
        # A child's ru_maxrss also counts the memory of the process it was forked from (this one)
        # as it stood at exec time. It is the program's own peak only where it is above ours.
        max_rss = usage.ru_maxrss * _proctree.MAXRSS_UNIT  # type: ignore[attr-defined]
        if max_rss > resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _proctree.MAXRSS_UNIT:
            self.max_rss = max(self.max_rss, max_rss)
        if not self.unreaped:
            self._on_done()


class CgroupPlacement:
    """A job's memory cgroup: made, and the job's processes moved in, by the monitor thread once
    the job has run a while (`place`); its peak and OOM kills read, and the group released, on
    the loop at the job's end (`release`). `finished` tells whether the job has ended: no group
    is kept for it after that."""

    def __init__(self, groups: JobGroups, finished: Callable[[], bool]) -> None:
        self._groups = groups
        self._finished = finished
        self._group: Optional[JobGroup] = None  # made by the monitor thread, released on the loop
        self._lock = threading.Lock()
        self.placed = False  # the monitor thread's

    def place(self, pids: Set[int]) -> Optional[bool]:
        """Give the job a memory cgroup and move its processes in (once it has run a while).
        Whether the group's peak is the whole tree's; None where no group was kept."""
        groups = self._groups
        self.placed = True  # tried once, whatever happens
        if self._finished():
            return None
        group = groups.create()
        if group is None:
            return None
        moved = group.adopt(sorted(pids))  # slow (the kernel's grace period): not under the lock
        with self._lock:
            if moved and not self._finished():
                self._group = group
                # In v1 the memory the processes held moved with them, so the group's peak is
                # the tree's (unless one was left in a group of its own); in v2 it stayed where it
                # was charged. Otherwise sampling stays fast.
                return groups.version == 1 and group.whole
        groups.release(group)  # nothing moved, or the job ended meanwhile
        return None

    def release(self, failed: bool) -> Tuple[Optional[int], Optional[int]]:
        """The group's peak and, where the job `failed`, its OOM kills; (None, None) where it has
        no group. Called once the job has finished."""
        with self._lock:  # no group is made for this job from now on
            group, self._group = self._group, None
        if group is None:
            return None, None
        peak = group.peak()
        oom_kills = group.oom_kills() if failed else None
        self._groups.release(group)
        return peak, oom_kills


class LocalHandle(Handle):
    """One job's processes, timers and kill; its stages' exits are its Stages', its output pipes
    its CapturedOutput's, its memory cgroup its CgroupPlacement's. It runs on the loop thread,
    but for `sample` (and the `strays`, `sampled_peak`, `series`, `exact_peak` and `captured` it
    and the engine read or write), which runs on the monitor thread."""

    def __init__(self, launcher: LocalLauncher, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> None:
        self._launcher = launcher
        self._loop = launcher.loop
        self.spec = spec
        self.job_id = job_id
        self._on_exit = on_exit
        self.pids: List[int] = []  # stage roots, each a session leader
        self._stages = Stages(self._loop, len(spec.stages), self._stage_lost, self._stages_done)
        self._output = CapturedOutput(self._loop, job_id, launcher.output_limit, self._output_ended)
        self.sampled_peak = 0  # written by the monitor thread
        self.series = MemorySeries()  # written by the monitor thread
        groups = launcher.groups
        self._cgroup = None if groups is None else CgroupPlacement(groups, lambda: self._finished)
        self._timers: List[Timer] = []
        self.failure: Optional[FailureKind] = None
        self.error: Optional[str] = None
        self._killing = False
        self._finished = False
        self._survivors = _proctree.Survivors()  # a killed job's processes, held until they end
        self.strays: Tuple[int, ...] = ()  # those alive, for the monitor thread (replaced whole)
        self._survivor_fds: List[int] = []  # pidfds of survivors watched on the loop
        self._survivors_since: Optional[float] = None
        self._start_time = time.time()
        self._start_mono = time.monotonic()

    # -- starting -------------------------------------------------------------------------------

    def launch(self) -> None:
        spec = self.spec
        env = None if spec.env is None else {**os.environ, **spec.env}
        parent_fds: List[int] = []  # our copies of the children's ends, closed once they started
        files: List[IO[bytes]] = []
        try:
            out_target = self._output_target("stdout", spec.stdout, files, parent_fds)
            err_target = self._output_target("stderr", spec.stderr, files, parent_fds)
        except OSError as exc:
            self._close_all(parent_fds, files)
            if spec.cwd is not None and not os.path.isdir(spec.cwd):  # the real cause, as Popen says it
                cause = NotADirectoryError if os.path.exists(spec.cwd) else FileNotFoundError
                self._fail_start(_start_error(spec, spec.stages[0][0], cause(0, "", spec.cwd)))
            else:
                self._fail_start(f"cannot open {exc.filename!r} for the job's output: {exc.strerror}")
            return
        stdin: Optional[int] = None  # read end of the previous stage's pipe
        argv = spec.stages[0]
        try:
            for index, argv in enumerate(spec.stages):
                last = index == len(spec.stages) - 1
                pipe_r: Optional[int] = None
                pipe_w: Optional[int] = None
                try:
                    if not last:
                        pipe_r, pipe_w = os.pipe()
                    proc = self._popen(argv, stdin, out_target if pipe_w is None else pipe_w, err_target, env)
                except BaseException:
                    if pipe_r is not None:
                        os.close(pipe_r)
                    raise
                finally:
                    if stdin is not None:
                        os.close(stdin)
                        stdin = None
                    if pipe_w is not None:
                        os.close(pipe_w)
                stdin = pipe_r
                # Popen's bookkeeping is ours now: the stage is reaped with os.wait4 on the loop.
                proc.returncode = 0
                self.pids.append(proc.pid)
                self._launcher.watchman.watch(proc.pid)  # its session id
                self._stages.unreaped[proc.pid] = index
        except Exception as exc:
            self._close_all(parent_fds, files)
            message = (
                _start_error(spec, argv[0], exc) if isinstance(exc, OSError) else f"cannot start {argv[0]!r}: {exc}"
            )
            self.failure, self.error = START, message
            if not self.pids:
                self._fail_start(self.error)
                return
            self._killing = True
            self._signal(signal.SIGKILL)  # the stages of a pipeline that could not be completed
        else:
            self._close_all(parent_fds, files)
        for pid in self.pids:
            self._stages.watch(pid)
        self._output.read()
        if spec.timeout is not None and not self._killing and self.failure is None:
            self._timers.append(
                self._loop.call_later(spec.timeout, self.kill, TIMEOUT, f"timed out after {spec.timeout:g} s")
            )

    def _popen(self, argv: Sequence[str], stdin: Optional[int], stdout: Any, stderr: Any, env: Any) -> Popen[bytes]:
        program = self._launcher.program(argv[0], env)
        while True:
            try:
                return subprocess.Popen(
                    argv,
                    executable=program,
                    stdin=subprocess.DEVNULL if stdin is None else stdin,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=self.spec.cwd,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except FileNotFoundError:
                if program is None:
                    raise
                self._launcher.forget(argv[0], env)  # removed since it was looked up: search again
                program = None

    def _output_target(self, name: str, path: Optional[str], files: List[IO[bytes]], parent_fds: List[int]) -> int:
        """The fd a stream goes to: a file the user named, or a pipe we capture."""
        if path is not None:
            if self.spec.cwd is not None:  # a relative name is the job's, as its command sees it
                path = os.path.join(self.spec.cwd, path)
            f = open(path, "wb")  # noqa: SIM115 - closed in launch() once the children hold it
            files.append(f)
            return f.fileno()
        write_fd = self._output.pipe(name)
        parent_fds.append(write_fd)
        return write_fd

    @staticmethod
    def _close_all(fds: List[int], files: List[IO[bytes]]) -> None:
        for fd in fds:
            os.close(fd)
        for f in files:
            f.close()
        fds.clear()
        files.clear()

    def _fail_start(self, message: str) -> None:
        self.failure, self.error = START, message
        self._output.close_unread()
        # Report on a later loop iteration, never from inside start().
        self._loop.call_soon_threadsafe(self._finish)

    # -- events on the loop ---------------------------------------------------------------------

    def _stage_lost(self) -> None:
        """Another part of the program reaped a stage (a SIGCHLD handler, os.wait())."""
        if self.failure is None:
            self.failure = ERROR
            self.error = (
                "its exit status was collected by another part of this program (os.wait() or a SIGCHLD "
                "handler), so how it ended is unknown"
            )

    def _stages_done(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._killing:
            self._kill_rest()  # a killed job's processes outside its process group
        if self._output.open:
            # Something still holds our output pipes: a process of the job that left its group.
            self._timers.append(self._loop.call_later(_LEFTOVER_GRACE, self._kill_leftovers))
        else:
            self._finish()

    def _kill_rest(self) -> None:
        """SIGKILL what is left of the job: its sessions (the roots are reaped, so only their
        session ids are safe to match on now) and the processes held since it was signalled."""
        self._survivors.signal([], signal.SIGKILL, self.pids)
        self.strays = tuple(self._survivors.alive())

    def _kill_leftovers(self) -> None:
        self._kill_rest()
        self._timers.append(self._loop.call_later(_LEFTOVER_GRACE, self._abandon_output))

    def _abandon_output(self) -> None:
        self._output.abandon()
        self._finish()

    def _output_ended(self) -> None:
        if not self._stages.unreaped:
            self._finish()

    def _finish(self) -> None:
        if self._finished or self._await_survivors():
            return
        self._finished = True
        for timer in self._timers:
            timer.cancel()
        for pid in self.pids:
            self._launcher.watchman.forget(pid)
        runtime = time.monotonic() - self._start_mono
        group_peak: Optional[int] = None
        oom_kills: Optional[int] = None
        if self._cgroup is not None:
            group_peak, oom_kills = self._cgroup.release(any(rc != 0 for rc in self._stages.returncodes))
        outcome = Outcome(
            returncodes=self._stages.returncodes,
            stdout=self._output.text("stdout"),
            stderr=self._output.text("stderr"),
            start_time=self._start_time,
            runtime=runtime,
            cpu_time=self._stages.cpu_time,
            peak_memory=max(self._stages.max_rss, self.sampled_peak, group_peak or 0),
            process_peak=max(self._stages.max_rss, self.sampled_peak),
            failure=self.failure,
            error=self.error,
            memory_series=list(self.series.points),
            oom_kills=oom_kills,
            host=hostname(),
        )
        self._on_exit(outcome)

    def _await_survivors(self) -> bool:
        """True while processes of a killed job are still alive: each is killed (with what it
        started meanwhile) and the job ends once they are gone, its memory counted until then."""
        for fd in self._survivor_fds:
            self._loop.remove_reader(fd)
        self._survivor_fds.clear()
        if not self._survivors:
            return False
        self._kill_rest()
        if not self.strays:
            self._survivors.close()
            return False
        now = time.monotonic()
        if self._survivors_since is None:
            self._survivors_since = now
            self._timers.append(self._loop.call_later(_SURVIVOR_WAIT, self._finish))
        elif now - self._survivors_since >= _SURVIVOR_WAIT:
            logger.warning(
                "mpmsub: job %s: %d of its processes (pids %s) outlived SIGKILL by %g s; the job ends without them",
                self.job_id,
                len(self.strays),
                ", ".join(map(str, self.strays)),
                _SURVIVOR_WAIT,
            )
            self._survivors.close()
            self.strays = ()
            return False
        fds = self._survivors.fds()
        for pid in self.strays:
            if pid in fds:
                self._survivor_fds.append(fds[pid])
                self._loop.add_reader(fds[pid], self._finish)
        if len(self._survivor_fds) < len(self.strays):  # no pidfd to wait on: look again soon
            self._timers.append(self._loop.call_later(_threads.EXIT_POLL, self._finish))
        return True

    # -- killing and measuring ------------------------------------------------------------------

    def kill(self, failure: FailureKind, message: str, grace: Optional[float] = None) -> bool:
        if self._finished or not self._stages.unreaped:
            return False
        grace = self._launcher.kill_grace if grace is None else grace
        # A memory stop during a timeout's grace, say, does not wait for the grace to end.
        started = escalate(self._killing, grace, self._signal, self._signal_later)
        if started:
            self._killing = True
            self.failure, self.error = failure, message
        return started

    def _signal_later(self, delay: float, sig: int) -> None:
        self._timers.append(self._loop.call_later(delay, self._signal, sig))

    def _signal(self, sig: int) -> None:
        roots = [pid for pid in self._stages.unreaped if pid not in self._stages.gone]
        self._survivors.signal(roots, sig)
        self.strays = tuple(self._survivors.alive())

    @property
    def captured(self) -> int:
        """Bytes of output held for the job (read by the monitor thread)."""
        return self._output.captured

    def sample(self, snapshot: _proctree.Snapshot) -> Optional[int]:
        roots = [*self._stages.unreaped, *self.strays]
        if not roots:
            return None
        pids = _proctree.members(snapshot, roots)
        self.tree = pids
        rss = sum(snapshot[pid].rss for pid in pids)
        if rss > self.sampled_peak:
            self.sampled_peak = rss
        age = time.monotonic() - self._start_mono
        if rss:  # 0 is a tree of zombies (their resident size reads 0): ended, not small
            self.series.add(age, rss)
        cgroup = self._cgroup
        if cgroup is not None and not cgroup.placed and age >= _PLACE_AFTER:
            exact = cgroup.place(pids)
            if exact is not None:
                self.exact_peak = exact
        return rss

    def roots(self) -> Sequence[int]:
        return list(self.pids)

    def cpu_time(self, snapshot: _proctree.Snapshot) -> Optional[float]:
        # Its live processes' (with what they waited for) and its stages' already reaped.
        pids = _proctree.members(snapshot, [*self._stages.unreaped, *self.strays])
        return _proctree.cpu_seconds(pids) + self._stages.cpu_time
