"""Python calls on this machine: a pool of reused worker processes, driven by the event loop.

A worker (see worker_main) is forked from the executor's zygote (see zygote: one interpreter
started with fork-and-exec, safe in a threaded parent, that has imported the main module), or,
where there is none, is a fresh interpreter started the same way (as the "spawn" start method);
either way in a session of its own, so that killing a call kills whatever it started too. A
worker is prepared once (the parent's import path, working directory and main module, then the
initializer) and runs one call at a time for many calls. A call is written to an idle worker
when the executor starts it; its reply carries what it returned or raised and what it used. A
worker that is killed (timeout, memory, termination) or dies is replaced by a new one at the
next call; the other calls and the pool carry on. Requests to the zygote are answered through
the loop: only the pool's close waits for it.

Everything here runs on the loop thread, except `CallHandle.sample` (the monitor thread) and,
where there are no pidfds, `Worker._wait`, on a thread of its own per worker that waits for its
exit and hands it to the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from mpmsub import _protocol as wire
from mpmsub import _threads
from mpmsub._errors import CallPicklingError, RemoteTraceback
from mpmsub._launch import proctree as _proctree
from mpmsub._launch import worker_main
from mpmsub._launch.base import Handle, MemorySeries, Outcome, escalate
from mpmsub._launch.loop import EventLoop, Timer
from mpmsub._launch.watchman import Watchman
from mpmsub._result import ERROR, PICKLE, RAISED, START, TIMEOUT, FailureKind
from mpmsub._spec import JobSpec
from mpmsub._system import hostname

if TYPE_CHECKING:
    from mpmsub._launch.base import PoolOptions
    from mpmsub._launch.zygote import Zygote

logger = logging.getLogger("mpmsub")

# Workers and the zygote run worker_main from this mpmsub's own directory, whatever their working
# directory holds, and from its cached bytecode (a script would be compiled at every start).
_SITE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(worker_main.__file__))))  # where mpmsub/ is
_BOOT = f"import sys; sys.path.insert(0, {_SITE!r}); from mpmsub._launch.worker_main import main; main()"
_READ_SIZE = 1 << 16
_CLOSE_WAIT = 2.0  # seconds idle workers get to exit once their pipe is closed
_ZYGOTE_LOSSES = 3  # zygotes lost one after another before workers start as fresh interpreters


_ZYGOTE_OFF = ("0", "off", "no", "false")  # MPMSUB_ZYGOTE values that turn it off
_pidfds_work: Optional[bool] = None


def can_fork() -> bool:
    """Whether workers can be forked from a zygote here (see zygote, imported only then):
    Linux, pidfds, an interpreter to start, MPMSUB_ZYGOTE not off."""
    global _pidfds_work
    if os.environ.get("MPMSUB_ZYGOTE", "").lower() in _ZYGOTE_OFF or not hasattr(os, "pidfd_open"):
        return False
    if _pidfds_work is None:
        _pidfds_work = False
        if sys.platform.startswith("linux") and not getattr(sys, "frozen", False):
            try:
                os.close(os.pidfd_open(os.getpid()))
                _pidfds_work = True
            except OSError:  # an old kernel, a seccomp filter
                pass
    return _pidfds_work


def _pipe() -> Tuple[int, int]:
    """A pipe whose ends are not 0, 1 or 2 (see worker_main.above_stdio)."""
    read_fd, write_fd = os.pipe()
    try:
        read_fd = worker_main.above_stdio(read_fd)
        write_fd = worker_main.above_stdio(write_fd)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    return read_fd, write_fd


def _pipes() -> Tuple[int, int, int, int]:
    """A worker's two pipes: (to_r, to_w) for what it is sent, (from_r, from_w) for its replies."""
    to_r, to_w = _pipe()
    try:
        from_r, from_w = _pipe()
    except BaseException:
        os.close(to_r)
        os.close(to_w)
        raise
    return to_r, to_w, from_r, from_w


class WorkerPipes:
    """Our ends of a worker's two pipes, and the framing on them: frames written to it (queued
    while its pipe is full; our end closed once what is queued is written, when it retires), and
    what it writes back read and cut into frames, each handed to `on_frame`. Everything here runs
    on the loop thread."""

    def __init__(self, loop: EventLoop, to_fd: int, from_fd: int, on_frame: Callable[[bytes], None]) -> None:
        self._loop = loop
        self.to_fd = to_fd  # -1 once closed
        self.from_fd = from_fd  # -1 once closed
        self._on_frame = on_frame
        self.closing = False  # our end of its pipe is closed once what is queued is written
        self._out = bytearray()  # frames not yet written
        self._in = bytearray()
        self._eof = False

    def open(self) -> None:
        """Start reading its replies on the loop."""
        os.set_blocking(self.to_fd, False)
        os.set_blocking(self.from_fd, False)
        self._loop.add_reader(self.from_fd, self._on_readable)

    # -- writing ----------------------------------------------------------------------------------

    def send(self, body: bytes) -> None:
        header = wire.HEADER.pack(len(body))
        if self._out:
            self._out += header
            self._out += body
            return
        try:
            written = os.writev(self.to_fd, [header, body])
        except BlockingIOError:
            written = 0
        except OSError:  # it is gone: its exit is on its way
            return
        if written < len(header) + len(body):
            self._out += (header + body)[written:]
            self._loop.add_writer(self.to_fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            written = os.write(self.to_fd, self._out)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._out)  # it is gone
        del self._out[:written]
        if not self._out:
            self._loop.remove_writer(self.to_fd)
            if self.closing:
                self._close_input()

    def close_input(self) -> None:
        """Close our end of its pipe once what is queued is written: it exits then."""
        self.closing = True
        if not self._out:
            self._close_input()

    def _close_input(self) -> None:
        if self.to_fd >= 0:
            self._loop.remove_writer(self.to_fd)
            os.close(self.to_fd)
            self.to_fd = -1

    # -- reading ----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self.from_fd, _READ_SIZE)
        except BlockingIOError:
            return
        if data:
            self._feed(data)
            return
        self._loop.remove_reader(self.from_fd)  # its exit comes through the pidfd or waiter
        self._eof = True

    def drain(self) -> None:
        """Read what is in the pipe now (after its exit: what it wrote before it went)."""
        while not self._eof and self.from_fd >= 0:
            try:
                data = os.read(self.from_fd, _READ_SIZE)
            except BlockingIOError:
                return  # a process it started may still hold the pipe
            if not data:
                self._eof = True
                return
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        buffer = self._in
        buffer += data
        while len(buffer) >= wire.HEADER.size:
            (size,) = wire.HEADER.unpack_from(buffer)
            end = wire.HEADER.size + size
            if len(buffer) < end:
                break
            body = bytes(buffer[wire.HEADER.size : end])
            del buffer[:end]
            self._on_frame(body)

    def close(self) -> None:
        """Close our ends of both pipes, whatever is queued."""
        if self.from_fd >= 0:
            self._loop.remove_reader(self.from_fd)
            os.close(self.from_fd)
            self.from_fd = -1
        self._close_input()


class Worker:
    """One worker process: its start, its readiness, the replies it sends (through its
    WorkerPipes), its exit and reaping. Everything here runs on the loop thread, but for the
    waiter thread, where there is no pidfd (it waits for the exit, or reaps it on macOS)."""

    def __init__(
        self, pool: WorkerPool, zygote: Optional[Zygote] = None, forked: Optional[Tuple[int, int, int]] = None
    ) -> None:
        """A fresh interpreter started now, or (`forked`: its pid and our ends of its two pipes)
        a worker `zygote` has forked."""
        if getattr(sys, "frozen", False):
            raise RuntimeError("a frozen application has no Python interpreter to start workers for Python calls with")
        if os.environ.get(wire.PREPARING):
            raise RuntimeError(
                "a worker process is importing the program's main module, and that module submits Python "
                "calls itself: start the executor under `if __name__ == '__main__':`"
            )
        self.pool = pool
        self.zygote = zygote  # the process it was forked from, which reaps it; None: our child
        self.handle: Optional[CallHandle] = None  # the call it runs
        self.calls = 0  # calls it has finished
        self.reported_cpu = 0.0  # CPU time its replies accounted for
        self.ready = False  # prepared (main module, initializer): calls' timeouts run from then
        self.dead = False
        self.lost: Optional[str] = None  # why its exit status could not be had, if so
        self._pidfd: Optional[int] = None
        self._poller: Optional[Any] = None  # polls the pidfd: has it exited?
        self._waiter: Optional[threading.Thread] = None
        self._exit_seen = False  # seen by _poll_exit (no pidfd, no thread)
        self._reaped: Optional[Tuple[Optional[int], Any]] = None  # (status, rusage), reaped by the waiter
        self._released = False
        if forked is not None:
            self.pid, to_fd, from_fd = forked
        else:
            to_r, to_fd, from_fd, from_w = _pipes()
            try:
                self.pid = self._spawn(to_r, from_w)
            except BaseException:
                os.close(to_fd)
                os.close(from_fd)
                raise
            finally:
                os.close(to_r)
                os.close(from_w)
        self.pipes = WorkerPipes(pool.loop, to_fd, from_fd, self._reply)
        try:
            pool.watchman.watch(self.pid)
            self.pipes.open()
            self._watch_exit()
            if zygote is None:  # a forked worker was prepared in the zygote
                self.send(pool.init_frame())
        except BaseException:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)  # not reaped yet: the pid is its own
            self._on_exit()
            raise

    def _spawn(self, to_r: int, from_w: int) -> int:
        """Start a fresh interpreter as the worker; its pid."""
        proc = subprocess.Popen(
            [self.pool.executable, *_interpreter_flags(), "-c", _BOOT, str(to_r), str(from_w)],
            pass_fds=(to_r, from_w),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env={**os.environ, wire.PREPARING: "1"},
        )
        proc.returncode = 0  # Popen's bookkeeping is ours: the worker is reaped with os.wait4
        return proc.pid

    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):
            if self.zygote is not None:  # not our child: nothing else can tell us of its exit
                raise
            # No pidfd (macOS, old kernels, a seccomp filter): a thread waits for the exit. The
            # reply pipe's end is no sign of it: a process the call forked may hold the pipe.
            self._waiter = _threads.start(self._wait, f"mpmsub-worker-{self.pid}")
            if self._waiter is None:  # interpreter shutdown: no thread may wait; look now and then
                self._poll_exit()
            return
        self.pool.loop.add_reader(self._pidfd, self._on_exit)
        self._poller = select.poll()
        self._poller.register(self._pidfd, select.POLLIN)

    def _wait(self) -> None:
        if hasattr(os, "waitid"):  # wait without reaping: the zombie keeps its group id for killpg
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        else:  # macOS: reap here
            try:
                _, status, usage = os.wait4(self.pid, 0)
                self._reaped = (os.waitstatus_to_exitcode(status), usage)
            except ChildProcessError:
                self._reaped = (None, None)
        self.pool.loop.call_soon_threadsafe(self._on_exit)

    def _poll_exit(self) -> None:
        if self._exited():
            self._on_exit()
        else:
            self.pool.loop.call_later(_threads.EXIT_POLL, self._poll_exit)

    def _exited(self) -> bool:
        """Whether it has exited, looked at now (where neither a pidfd nor a thread tells)."""
        if not self._exit_seen:
            seen = _threads.exited(self.pid)
            if seen is not None:
                self._exit_seen = True
                status, usage = seen
                if status is not None:  # reaped by that look (macOS)
                    self._reaped = (os.waitstatus_to_exitcode(status), usage)
        return self._exit_seen

    def alive(self) -> bool:
        """False if it has exited (checked before an idle worker is given a call)."""
        if self.dead:
            return False
        if self._poller is not None:
            return not self._poller.poll(0)
        if self._waiter is not None:
            return self._waiter.is_alive()
        return not self._exited()

    # -- its pipes --------------------------------------------------------------------------------

    def send(self, body: bytes) -> None:
        self.pipes.send(body)

    def retire(self) -> None:
        """Let it finish: close our end of its pipe (once what is queued is written); it exits."""
        self.pipes.close_input()

    # -- its replies ------------------------------------------------------------------------------

    def _reply(self, body: bytes) -> None:
        reply, usage = pickle.loads(body)  # our own frame; what the call returned is inside, as bytes
        handle = self.handle
        if usage is not None:
            self.reported_cpu += usage[2]
        if reply[0] == wire.READY:
            self.ready = True
            if handle is not None:
                handle.worker_ready()
            return
        killed = handle is None or handle.killing  # a kill decides that call's end, when it is gone
        if reply[0] == wire.BROKEN:
            why = self.pool.broke(reply[1])
            if handle is not None and not killed:
                handle.broken(why)  # it exits on its own; its exit ends the call
            return
        if handle is None or killed:
            return
        self.calls += 1
        self.handle = None
        handle.replied(reply, usage)
        self.pool.idle(self)

    # -- its end ----------------------------------------------------------------------------------

    def _on_exit(self) -> None:
        if self.dead:
            return
        self.dead = True
        self.pipes.drain()  # a reply may be behind the exit in this round of the loop
        if self._pidfd is not None:
            self.pool.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = self._poller = None
        if self.zygote is not None and self._reaped is None:
            if not self.orphaned:
                # Not reaped yet (the zygote reaps it when asked), so its process group id cannot
                # have been reused: whatever the call started and left in the group is killed.
                _proctree.kill_group(self.pid)
            self.zygote.reap(self.pid, self._ended)
        else:
            self._ended(*self._reap())

    def _ended(self, status: Optional[int], usage: Any) -> None:
        """It is reaped: let go of it, and end its call with what it left."""
        if usage is None and self.zygote is not None:
            self.lost = self.zygote.lost
        self._reaped = (status, usage)
        self._release()
        self.pool.gone(self)
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.worker_died(status, usage)

    def _release(self) -> None:
        """Close our ends of its pipes and take it off the watchman's list (it is gone, or about
        to be)."""
        if self._released:
            return
        self._released = True
        self.pool.watchman.forget(self.pid)
        self.pipes.close()

    def _reap(self) -> Tuple[Optional[int], Any]:
        """Reap our own child (a fresh interpreter)."""
        if self._reaped is None:
            # A zombie keeps its pid, so its process group id cannot have been reused: whatever
            # the call started and left in the group is killed.
            _proctree.kill_group(self.pid)
            try:
                _, status, usage = os.wait4(self.pid, 0)
                self._reaped = (os.waitstatus_to_exitcode(status), usage)
            except ChildProcessError:
                if self._waiter is not None and not hasattr(os, "waitid"):
                    self._waiter.join()  # it is reaping it: take what it got
                if self._reaped is None:
                    self._reaped = (None, None)  # reaped elsewhere (os.wait(), a SIGCHLD handler)
        return self._reaped

    def signal(self, sig: int) -> None:
        if not self.dead:
            _proctree.signal_tree([self.pid], sig)

    @property
    def orphaned(self) -> bool:
        """It was forked from a zygote that is gone: it dies with it (and may have been reaped
        by init since, its pid free for another process)."""
        return self.zygote is not None and self.zygote.gone

    def kill_by_pidfd(self) -> None:
        """SIGKILL it through its pidfd, which names it whatever its pid has become (see
        `orphaned`)."""
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)  # type: ignore[attr-defined,unused-ignore]

    def kill_now(self) -> None:
        """SIGKILL it and its group (the worker itself too, if a call moved it to another group)."""
        for kill, target in ((os.killpg, self.pid), (os.kill, self.pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(target, signal.SIGKILL)


def _interpreter_flags() -> List[str]:
    """The options this interpreter was started with (-O, -X dev, -W ...), for the workers, as
    multiprocessing passes them on."""
    try:
        return list(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]
    except Exception:  # another Python's internals
        return []


_inherited: Optional[Dict[str, Any]] = None  # a sending process's state (see _backends.remote)


def preparation_data() -> Dict[str, Any]:
    """The state a worker restores before its first call, as multiprocessing's spawn does (the
    path, the directory, the main module): this process's, or, in a job run for another
    process (see _backends.remote), that process's."""
    if _inherited is not None:
        return dict(_inherited)
    import multiprocessing.spawn

    preparation = multiprocessing.spawn.get_preparation_data("mpmsub-worker")
    if "authkey" in preparation:  # pickled only while multiprocessing spawns; ours is plain
        preparation["authkey"] = bytes(preparation["authkey"])
    return preparation


def inherit(preparation: Dict[str, Any]) -> None:
    """Workers started from now on restore `preparation` instead of this process's state."""
    global _inherited
    _inherited = dict(preparation)


class WorkerPool:
    """Reused worker processes for the Python calls of one executor."""

    def __init__(self, loop: EventLoop, kill_grace: float, watchman: Watchman, options: PoolOptions) -> None:
        self.loop = loop
        self.kill_grace = kill_grace
        self.watchman = watchman
        self.max_tasks_per_child = options.max_tasks_per_child
        self._initializer = options.initializer
        self._initargs = options.initargs
        self._init: Optional[bytes] = None
        self._idle: List[Worker] = []
        self._workers: Set[Worker] = set()
        self.exact = False  # workers measure each call's own peak (they can reset theirs)
        self.executable = sys.executable
        # Why workers cannot be prepared (the main module or the initializer raised), once one
        # has failed: later calls fail at once instead of each starting a worker that fails too.
        self.broken: Optional[str] = None
        # The main module's file, looked at now: once the script has run (an executor whose calls
        # start at exit), the interpreter has removed __main__.__file__.
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        self._main_path = os.path.abspath(main_file) if isinstance(main_file, str) else None
        self._forks = options.zygote and can_fork()  # workers are forked from a zygote
        self._zygote: Optional[Zygote] = None
        self._zygote_environment: Dict[str, str] = {}  # the environment the zygote started with
        self._zygote_losses = 0  # zygotes lost since a worker was last forked
        self._closing = False  # close() has begun: a worker forked now is not kept
        self._waiting: List[CallHandle] = []  # calls waiting for the zygote to be prepared

    def init_frame(self) -> bytes:
        """What a new worker is told first: the parent's state to restore, and the initializer."""
        if self._init is None:
            import multiprocessing.spawn

            self.executable = multiprocessing.spawn.get_executable() or sys.executable
            preparation = preparation_data()
            if (
                _inherited is None
                and self._main_path
                and not {"init_main_from_name", "init_main_from_path"} & set(preparation)
            ):
                preparation["init_main_from_path"] = self._main_path
            initializer = None
            if self._initializer is not None:
                initializer = pickle.dumps((self._initializer, self._initargs), pickle.HIGHEST_PROTOCOL)
            self._init = wire.INIT + pickle.dumps((preparation, initializer), pickle.HIGHEST_PROTOCOL)
        return self._init

    def start(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> CallHandle:
        handle = CallHandle(self, spec, job_id, on_exit)
        if self.broken is not None:
            handle.fail_start(f"its worker process could not be prepared: {self.broken}")
            return handle
        self._run(handle)
        return handle

    def _run(self, handle: CallHandle) -> None:
        """Give the call an idle worker, or a new one: forked from the zygote (started if there
        is none; the call waits for it), or a fresh interpreter where there is no zygote."""
        handle.waiting = False
        worker = self._take_idle()
        if worker is None and self._forks:
            from mpmsub._launch import zygote as _zygote  # here: an executor that runs only commands does without it

            zygote = self._zygote
            if zygote is not None and zygote.gone and zygote.lost:
                self._zygote_losses += 1
                if self._zygote_losses >= _ZYGOTE_LOSSES:  # one after another: it cannot serve here
                    self._forks = False
                    logger.warning(
                        "mpmsub: the zygote was lost %d times; workers start as fresh interpreters", self._zygote_losses
                    )
            if self._forks and (zygote is None or zygote.gone):
                zygote = None
                try:
                    zygote = self._start_zygote()
                except Exception as exc:
                    self._forks = False
                    logger.warning("mpmsub: could not start a worker parent process (zygote): %s", exc)
            if self._forks and zygote is not None and not zygote.gone:
                handle.waiting = True
                if zygote.state == _zygote.STARTING:
                    self._waiting.append(handle)  # it runs once the zygote is prepared
                else:
                    self._fork(zygote, handle)
                return
        try:
            worker = worker or self._new_worker()
        except Exception as exc:
            handle.fail_start(f"could not start a worker process: {exc}")
            return
        handle.run_on(worker)

    def _fork(self, zygote: Zygote, handle: CallHandle) -> None:
        """Ask the zygote for a worker for `handle`; it runs there once the zygote has forked it."""
        from mpmsub._launch.zygote import ZygoteError

        try:
            to_r, to_w, from_r, from_w = _pipes()
        except OSError as exc:
            handle.waiting = False
            handle.fail_start(f"could not start a worker process: {exc}")
            return

        def forked(pid: Optional[int], error: Optional[str]) -> None:
            if pid is None:
                os.close(to_w)
                os.close(from_r)
                if not handle.waiting:
                    return  # killed meanwhile: it has ended
                if zygote.gone:
                    self._run(handle)  # a new zygote, or a fresh interpreter
                else:
                    handle.waiting = False
                    handle.fail_start(f"could not start a worker process: {error}")
                return
            if self._closing:  # the pool is closing: the worker is not wanted any more
                os.close(to_w)
                os.close(from_r)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)  # the zygote's, unreaped: it goes with the zygote
                return
            try:
                worker = Worker(self, zygote, (pid, to_w, from_r))
            except Exception as exc:
                if handle.waiting:
                    handle.waiting = False
                    handle.fail_start(f"could not start a worker process: {exc}")
                return
            self._workers.add(worker)
            self._zygote_losses = 0
            if handle.waiting:
                handle.waiting = False
                handle.run_on(worker)
            else:
                self.idle(worker)  # its call was killed meanwhile: the next one takes it

        try:
            zygote.fork(to_r, from_w, self._environment(), forked)  # its ends are the zygote's now
        except ZygoteError:  # it is gone: a new one, or a fresh interpreter
            os.close(to_w)
            os.close(from_r)
            self._run(handle)

    def _environment(self) -> Optional[Dict[str, str]]:
        """This process's environment, for a worker to take, if it has changed since the zygote
        took its own (a worker gets the environment of the moment it starts, as a fresh one)."""
        environment = dict(os.environ)
        return None if environment == self._zygote_environment else environment

    def _start_zygote(self) -> Zygote:
        from mpmsub._launch.zygote import Zygote

        init = self.init_frame()  # made first: it names the executable
        command = [self.executable, *_interpreter_flags(), "-c", _BOOT]
        self._zygote_environment = dict(os.environ)
        self._zygote = Zygote(self.loop, self.watchman, command, init, _pipe, self._zygote_state)
        return self._zygote

    def _zygote_state(self, why: Optional[str], broken: bool) -> None:
        """The zygote is prepared (why is None), or it cannot be used: its main module or its
        initializer's unpickling raised (`broken`: calls fail, as a fresh worker's would), or
        another reason (workers start as fresh interpreters)."""
        if broken:
            assert why is not None
            why = self.broke(why)
        elif why is not None:
            self._forks = False
            logger.warning("mpmsub: workers start as fresh interpreters: %s", why)
        waiting, self._waiting = self._waiting, []
        for handle in waiting:
            if not handle.waiting:
                continue  # killed meanwhile
            if self.broken is not None:
                handle.waiting = False
                handle.fail_start(f"its worker process could not be prepared: {self.broken}")
            elif why is None and self._zygote is not None:
                self._fork(self._zygote, handle)
            else:
                handle.waiting = False
                self._run(handle)

    def stop_waiting(self, handle: CallHandle) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(handle)

    def _take_idle(self) -> Optional[Worker]:
        while self._idle:
            worker = self._idle.pop()
            if worker.orphaned:
                worker.kill_by_pidfd()  # it dies with its zygote anyway: not a call's failure
            elif worker.alive():
                return worker
            worker._on_exit()  # it died while idle: not a call's failure
        return None

    def _new_worker(self) -> Worker:
        """A fresh interpreter."""
        self.init_frame()  # made before the first start: it names the executable
        worker = Worker(self)
        self._workers.add(worker)
        return worker

    def broke(self, text: str) -> str:
        """Record why workers cannot be prepared (the first failure, logged once); return it."""
        if self.broken is None:
            lines = text.strip().splitlines()
            self.broken = lines[-1] if lines else "no traceback"
            logger.error("mpmsub: a worker process could not be prepared; calls will fail:\n%s", text)
        return self.broken

    def idle(self, worker: Worker) -> None:
        limit = self.max_tasks_per_child
        if limit is not None and worker.calls >= limit:
            worker.retire()
        else:
            self._idle.append(worker)

    def gone(self, worker: Worker) -> None:
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)

    def close(self) -> None:
        """End every worker (no call is running): close their pipes, give them a moment to exit,
        then kill what is left; reap them all."""
        self._closing = True
        workers = list(self._workers)
        for worker in workers:
            worker.retire()
        deadline = time.monotonic() + _CLOSE_WAIT
        poller = select.poll()
        waiting = 0
        for worker in workers:
            if not worker.dead and worker._pidfd is not None:
                poller.register(worker._pidfd, select.POLLIN)
                waiting += 1
        while waiting and time.monotonic() < deadline:
            ready = poller.poll(max(0, int((deadline - time.monotonic()) * 1000)) + 1)
            for fd, _ in ready:
                poller.unregister(fd)
                waiting -= 1
        for worker in workers:
            if worker.dead:
                continue
            if worker.orphaned:
                worker.kill_by_pidfd()  # its pid may be another's by now
            elif worker.alive():
                worker.kill_now()
            worker._on_exit()
        if self._zygote is not None:
            self._zygote.settle(_CLOSE_WAIT)  # it reaps them
            self._zygote.close(kill=True)  # no worker is left: its own exit would only make us wait


class CallHandle(Handle):
    """One call, on one worker."""

    def __init__(self, pool: WorkerPool, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> None:
        self.pool = pool
        self.spec = spec
        self.job_id = job_id
        self._on_exit = on_exit
        self.worker: Optional[Worker] = None
        self.waiting = False  # for the zygote to be prepared, before it has a worker
        self.killing = False
        self.failure: Optional[FailureKind] = None
        self.error: Optional[str] = None
        self._finished = False
        self._timers: List[Timer] = []
        self._start_time = time.time()
        self._start_mono = time.monotonic()
        self.exact_peak = pool.exact
        self.sampled_peak = 0  # the tree's, written by the monitor thread
        self.sampled_children = 0  # of processes the call started
        self.series = MemorySeries()

    def run_on(self, worker: Worker) -> None:
        assert self.spec.call is not None
        self.worker = worker
        worker.handle = self
        self._first_call = worker.calls == 0
        worker.send(self.spec.call.data())
        if worker.ready:
            self.worker_ready()

    def worker_ready(self) -> None:
        """The worker is prepared and runs the call: its timeout starts now, not while a new
        worker imports the main module and runs the initializer."""
        if self.spec.timeout is not None and not self._finished and not self.killing:
            timeout = self.spec.timeout
            self._timers.append(
                self.pool.loop.call_later(timeout, self.kill, TIMEOUT, f"timed out after {timeout:g} s")
            )

    def fail_start(self, message: str) -> None:
        self.failure, self.error = START, message
        self.pool.loop.call_soon_threadsafe(self._finish, [None])

    # -- its end ----------------------------------------------------------------------------------

    def replied(self, reply: Tuple[Any, ...], usage: Tuple[float, float, float, Optional[int], int]) -> None:
        value: Any = None
        exception: Optional[BaseException] = None
        try:
            value, exception = self._decode(reply)
        except BaseException as exc:  # user code (__setstate__, __reduce__) ran and failed: the call's
            self.failure = PICKLE
            self.error = f"what it returned could not be unpickled here: {type(exc).__name__}: {exc}"
        started, runtime, cpu, peak, child = usage
        if peak is not None:
            self.pool.exact = True
            peak += max(self.sampled_children, child if child > peak else 0)
        else:
            peak = max(self.sampled_peak, child)
        self._finish([None], started, runtime, cpu, peak, value, exception)

    def _decode(self, reply: Tuple[Any, ...]) -> Tuple[Any, Optional[BaseException]]:
        """The value or exception of a reply (unpickled here, on the loop); sets the failure."""
        status = reply[0]
        if status == wire.OK:
            return pickle.loads(reply[1]), None
        if status == wire.RAISED:
            _, data, text, summary = reply
            self.failure, self.error = RAISED, f"raised {summary}"
            exception = None
            with contextlib.suppress(Exception):
                exception = pickle.loads(data) if data is not None else None
            if not isinstance(exception, BaseException):  # it does not travel: say what it was
                exception = CallPicklingError(f"the call raised {summary}, which could not be pickled back")
            exception.__cause__ = RemoteTraceback(text)
            return None, exception
        self.failure = PICKLE
        if status == wire.UNPICKLED:
            self.error = f"the worker could not unpickle the call: {reply[1]}"
        else:  # UNPICKLABLE
            self.error = reply[1]
        return None, None

    def broken(self, why: str) -> None:
        """The worker could not be prepared (its main module or initializer raised); it exits
        on its own, and its exit ends the call."""
        self.failure = START
        self.error = f"its worker process could not be prepared: {why}"

    def worker_died(self, code: Optional[int], usage: Any) -> None:
        worker = self.worker
        assert worker is not None
        cpu = 0.0
        peak = self.sampled_peak
        if usage is not None:
            # Its whole life's CPU time, less what its earlier calls reported; its lifetime peak
            # is this call's only if this was its first.
            cpu = max(0.0, usage.ru_utime + usage.ru_stime - worker.reported_cpu)
            if self._first_call:
                peak = max(peak, usage.ru_maxrss * _proctree.MAXRSS_UNIT)
        elif self.failure is None:
            self.failure = ERROR
            self.error = (
                f"its worker process ended with its parent: {worker.lost}"
                if worker.lost
                else "its worker's exit status was collected by another part of this program"
            )
        self._finish([code], None, None, cpu, peak)

    def _finish(
        self,
        codes: List[Optional[int]],
        started: Optional[float] = None,
        runtime: Optional[float] = None,
        cpu: float = 0.0,
        peak: int = 0,
        value: Any = None,
        exception: Optional[BaseException] = None,
    ) -> None:
        if self._finished:
            return
        self._finished = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        outcome = Outcome(
            returncodes=codes,
            stdout=None,
            stderr=None,
            start_time=self._start_time if started is None else started,
            runtime=time.monotonic() - self._start_mono if runtime is None else runtime,
            cpu_time=cpu,
            peak_memory=peak,
            process_peak=peak,
            failure=self.failure,
            error=self.error,
            memory_series=list(self.series.points),
            value=value,
            exception=exception,
            host=hostname(),
        )
        self._on_exit(outcome)

    # -- killing and measuring --------------------------------------------------------------------

    def kill(self, failure: FailureKind, message: str, grace: Optional[float] = None) -> bool:
        worker = self.worker
        if self.waiting and not self._finished:  # no process yet: it ends now
            self.waiting = False
            self.pool.stop_waiting(self)
            self.failure, self.error = failure, message
            self._finish([None])
            return True
        if self._finished or worker is None:
            return False
        grace = self.pool.kill_grace if grace is None else grace

        def later(delay: float, sig: int) -> None:
            self._timers.append(self.pool.loop.call_later(delay, worker.signal, sig))

        started = escalate(self.killing, grace, worker.signal, later)
        if started:
            self.killing = True
            self.failure, self.error = failure, message
        return started

    def sample(self, snapshot: _proctree.Snapshot) -> Optional[int]:
        worker = self.worker  # one read: set once, on the loop
        if self._finished or worker is None:
            return None
        pid = worker.pid
        pids = _proctree.members(snapshot, [pid])
        own = snapshot[pid].rss if pid in snapshot else 0
        rss = sum(snapshot[p].rss for p in pids)
        if rss > self.sampled_peak:
            self.sampled_peak = rss
        if rss - own > self.sampled_children:
            self.sampled_children = rss - own
        if rss:  # 0: the worker is a zombie, not yet reaped
            self.series.add(time.monotonic() - self._start_mono, rss)
        return rss

    def roots(self) -> Sequence[int]:
        return [self.worker.pid] if self.worker is not None else []

    def cpu_time(self, snapshot: _proctree.Snapshot) -> Optional[float]:
        worker = self.worker
        if worker is None:
            return 0.0
        # The worker's whole life so far, less what its earlier calls (and its start) reported.
        pids = _proctree.members(snapshot, [worker.pid])
        return max(0.0, _proctree.cpu_seconds(pids) - worker.reported_cpu)
