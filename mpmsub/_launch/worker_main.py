"""The worker process that runs Python calls for an executor, one at a time, for many calls.

Started as `python -c "...; from mpmsub._launch.worker_main import main; main()" READ_FD WRITE_FD` (this
mpmsub's directory first on the path), in a session of its own; it imports only the standard
library (and mpmsub's __init__, which imports nothing) until the parent's import path, working
directory and main module are restored (as the standard library's "spawn" start method does). Then it reads
calls from the parent, runs them and writes back what they returned or raised, with what each
call used: CPU time and, on Linux, its own peak resident memory, reset before every call by
writing 5 to /proc/self/clear_refs (so a call's peak is its own, not the worker's high-water mark).

Frames both ways are an 8-byte big-endian length and a body. The parent's bodies are one kind
byte and a pickle: b"i" (preparation data, initializer) first, then b"c" ((fn, args, kwargs)) or
b"m" ((fn, [args, ...]): a chunk of map()). The worker's are a pickled (reply, usage) pair: a
READY reply once it is prepared (or BROKEN), then one reply per call.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
import types

from mpmsub._protocol import (
    BROKEN,
    CALL,
    FAILED,
    FORK,
    FORKED,
    HEADER,
    INIT,
    MESSAGE_LIMIT,
    NOFORK,
    OK,
    PID,
    PREPARING,
    RAISED,
    READY,
    REAP,
    REQUEST_LIMIT,
    STATUS,
    UNPICKLABLE,
    UNPICKLED,
    ZYGOTE_BROKEN,
    ZYGOTE_READY,
)

TYPE_CHECKING = False  # typing's own, without importing typing in every worker
if TYPE_CHECKING:
    from typing import Any, Optional, Tuple

_LINUX = sys.platform.startswith("linux")
MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def _read_exact(fd: int, size: int) -> Optional[bytearray]:
    """`size` bytes from `fd`, read into one buffer (no copies); None at the end of the pipe."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        count = os.readv(fd, [view[done:]])
        if not count:
            return None
        done += count
    view.release()
    return buffer


def _read_frame(fd: int) -> Optional[bytearray]:
    header = _read_exact(fd, HEADER.size)
    if header is None:
        return None
    return _read_exact(fd, HEADER.unpack(header)[0])


def _write_frame(fd: int, body: bytes) -> None:
    view = memoryview(HEADER.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


def _traceback() -> str:
    """The exception being handled, formatted (the module is imported only when one is)."""
    import traceback

    return traceback.format_exc()


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current resident size; False where that is impossible."""
    if not _LINUX:
        return False
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
        try:
            os.write(fd, b"5")
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def _peak() -> Optional[int]:
    """This process's VmHWM in bytes (Linux), or None."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _describe(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _run(kind: bytes, call: Any) -> Tuple[Any, ...]:
    """Run one unpickled call; return the reply tuple (without the usage figures)."""
    fn, args, kwargs = call if kind == CALL else (*call, None)
    del call
    try:
        value = fn(*args, **kwargs) if kind == CALL else [fn(*a) for a in args]
    except BaseException as exc:
        text = _traceback()
        try:
            data = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
        except BaseException:
            data = None
        summary = f"{type(exc).__name__}: {exc}"
        del exc
        return (RAISED, data, text, summary)
    del fn, args, kwargs
    try:
        data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        return (UNPICKLABLE, f"its return value ({_describe(value)}) could not be pickled: {type(exc).__name__}: {exc}")
    del value
    return (OK, data)


def _serve(read_fd: int, write_fd: int) -> None:
    import resource

    exact = _reset_peak()
    while True:
        frame = _read_frame(read_fd)
        if frame is None:
            return  # the parent closed our pipe: time to go
        kind = bytes(frame[:1])
        started = time.time()
        clock = time.monotonic()
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        exact = exact and _reset_peak()
        try:
            with memoryview(frame) as view:
                call = pickle.loads(view[1:])
        except BaseException as exc:
            reply: Tuple[Any, ...] = (UNPICKLED, f"{type(exc).__name__}: {exc}", _traceback())
        else:
            del frame  # the call holds its arguments; their pickle is not kept while it runs
            reply = _run(kind, call)
            del call
        frame = None
        runtime = time.monotonic() - clock
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (
            self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
            + kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
        )  # fmt: skip
        peak = _peak() if exact else None
        # A child waited for during the call whose peak is the largest yet of this worker's.
        child = kids1.ru_maxrss * MAXRSS_UNIT if kids1.ru_maxrss > kids0.ru_maxrss else 0
        usage = (started, runtime, cpu, peak, child)
        _write_frame(write_fd, pickle.dumps((reply, usage), pickle.HIGHEST_PROTOCOL))
        del reply


def _prepare(body: bytearray) -> Optional[Tuple[Any, Tuple[Any, ...]]]:
    """Restore the parent's state from an INIT frame's body (its import path, directory and main
    module) and unpickle the initializer, which imports its module; return it as (fn, args)."""
    import multiprocessing.process
    import multiprocessing.spawn

    process = multiprocessing.process.current_process()
    preparation, initializer = pickle.loads(body[1:])
    # As in a process started by multiprocessing: starting processes while the main module
    # is being imported is an error (the script lacks `if __name__ == "__main__":`).
    process._inheriting = True  # type: ignore[attr-defined]
    try:
        multiprocessing.spawn.prepare(preparation)
    finally:
        del process._inheriting  # type: ignore[attr-defined]
        os.environ.pop(PREPARING, None)
    return None if initializer is None else pickle.loads(initializer)


def _broken(write_fd: int) -> None:
    text = _traceback()
    _write_frame(write_fd, pickle.dumps(((BROKEN, text), None), pickle.HIGHEST_PROTOCOL))


def _work(read_fd: int, write_fd: int, initializer: Optional[Tuple[Any, Tuple[Any, ...]]]) -> None:
    """Run the initializer, say READY (or BROKEN), and serve calls until the parent closes."""
    if initializer is not None:
        try:
            fn, args = initializer
            fn(*args)
        except BaseException:
            _broken(write_fd)
            return
    _write_frame(write_fd, pickle.dumps(((READY,), None), pickle.HIGHEST_PROTOCOL))
    _serve(read_fd, write_fd)


def main() -> None:
    if sys.argv[1] == "--zygote":
        _zygote(int(sys.argv[2]), int(sys.argv[3]))
        return
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    for fd in (read_fd, write_fd):
        os.set_inheritable(fd, False)  # programs the calls start must not hold our pipes
    # Until the parent's main module is restored, __main__ must not be this script: a call
    # pickled as __main__.main would find this module's main().
    sys.modules["__main__"] = types.ModuleType("__main__")
    body = _read_frame(read_fd)
    if body is None or body[:1] != INIT:
        return
    try:
        initializer = _prepare(body)
    except BaseException:
        _broken(write_fd)
        return
    del body
    _work(read_fd, write_fd, initializer)


# -- the zygote -------------------------------------------------------------------------------------
#
# `main()` with `--zygote SOCKET INIT_FD` (Linux): an interpreter prepared once (the INIT frame read
# from INIT_FD: path, directory, main module, the initializer unpickled), which then forks each
# worker on request, so that a worker costs a fork rather than an interpreter and its imports.
# It is single-threaded when it forks (else it says so and is not used). SOCKET is a
# SOCK_SEQPACKET socket to the executor; each message is one kind byte and a body:
#   executor -> zygote: FORK with the new worker's two pipe ends attached (SCM_RIGHTS);
#                       REAP + pid: reap that worker (it has exited or been killed), reply STATUS.
#   zygote -> executor: READY | NOFORK (threads were started: fork is not safe) | BROKEN + text,
#                       once prepared; then FORKED + pid (or FAILED + text) for each FORK, and
#                       STATUS + pickled (pid, wait status or None, rusage tuple or None) per REAP.
# Workers are reaped only when the executor asks, once it has seen them exit (a pidfd) and
# killed what is left in their process group: until then the zombie keeps its pid, so the
# executor's signals never reach a process that took the number over. Each worker dies with
# the zygote (PR_SET_PDEATHSIG), and the zygote kills its workers and exits when the executor
# closes the socket (or dies).

_PR_SET_PDEATHSIG = 1


def _python_threads() -> int:
    """Threads started from Python besides this one. Those are what make forking unsafe (the
    child would find their locks held forever); the idle pools of numerical libraries (OpenBLAS
    starts one at import) are made for fork, as ProcessPoolExecutor's "fork" has long relied on."""
    import _thread

    return int(_thread._count())  # type: ignore[attr-defined,unused-ignore]


def above_stdio(fd: int) -> int:
    """`fd`, moved to 3 or above if it is 0, 1 or 2 (free when this process was started with
    them closed), where a worker's or the zygote's standard streams would write into it. The
    executor's ends of the workers' pipes and of the zygote's socket go through it too."""
    if fd > 2:
        return fd
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def _die_with_parent() -> Optional[Any]:
    """A prctl(PR_SET_PDEATHSIG, ...) caller, or None where there is no libc to call it with."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    return prctl


def _zygote(sock_fd: int, init_fd: int) -> None:
    import signal
    import socket
    import warnings

    sock = socket.socket(fileno=sock_fd)
    sock.set_inheritable(False)  # what the main module starts must not hold it
    os.set_inheritable(init_fd, False)
    sys.modules["__main__"] = types.ModuleType("__main__")
    body = _read_frame(init_fd)
    os.close(init_fd)
    if body is None or body[:1] != INIT:
        return
    try:
        initializer = _prepare(body)
    except BaseException:
        with contextlib.suppress(OSError):
            sock.send(ZYGOTE_BROKEN + _traceback().encode(errors="replace")[-MESSAGE_LIMIT:])
        return
    del body
    # Workers are reaped when the executor asks, whatever the main module did with SIGCHLD
    # (ignored, or a handler that reaps): their own get it back.
    sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    prctl = _die_with_parent()
    import resource  # noqa: F401  (each worker's _serve needs it: imported once, here)

    me = os.getpid()
    children = set()
    reply: Optional[bytes] = ZYGOTE_READY if _python_threads() == 0 else NOFORK
    while True:
        if reply is not None:
            try:
                sock.send(reply)
            except OSError:  # the executor is gone
                break
            reply = None
        try:
            data, fds, _, _ = socket.recv_fds(sock, REQUEST_LIMIT, 2)
        except OSError:
            break
        if not data:
            break  # the executor closed its end, or died
        if data[:1] == FORK and len(fds) == 2:
            fds = [above_stdio(fd) for fd in fds]
            for fd in fds:
                os.set_inheritable(fd, False)  # programs the calls start must not hold the pipes
            environment = pickle.loads(data[1:]) if len(data) > 1 else None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: "multi-threaded" (a C pool)
                    pid = os.fork()
            except OSError as exc:
                reply = FAILED + f"fork() failed: {exc}".encode()[:MESSAGE_LIMIT]
                pid = -1
            if pid == 0:
                code = 1
                try:
                    sock.close()
                    os.setsid()
                    if prctl is not None:
                        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                    if os.getppid() == me:  # else the zygote died before the line above
                        if sigchld is not None:
                            signal.signal(signal.SIGCHLD, sigchld)
                        if environment is not None:
                            os.environ.clear()
                            os.environ.update(environment)
                        _work(fds[0], fds[1], initializer)
                        code = 0
                        _finish_interpreter()
                finally:
                    for stream in (sys.stdout, sys.stderr):
                        with contextlib.suppress(BaseException):
                            stream.flush()
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            if pid > 0:
                children.add(pid)
                reply = FORKED + PID.pack(pid)
        elif data[:1] == REAP:
            (pid,) = PID.unpack_from(data, 1)
            status: Optional[int] = None
            usage: Optional[Tuple[float, ...]] = None
            if pid in children:
                children.discard(pid)
                try:
                    _, raw, rusage = os.wait4(pid, 0)
                    status, usage = os.waitstatus_to_exitcode(raw), tuple(rusage)
                except ChildProcessError:
                    pass
            reply = STATUS + pickle.dumps((pid, status, usage), pickle.HIGHEST_PROTOCOL)
        else:
            for fd in fds:
                os.close(fd)
            reply = FAILED + (b"a fork request without its two pipes" if data[:1] == FORK else b"an unknown request")
    for pid in children:  # the executor is gone: so are its workers
        for kill, target in ((os.killpg, pid), (os.kill, pid)):
            with contextlib.suppress(OSError):
                kill(target, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _finish_interpreter() -> None:
    """What an interpreter does at its end, for a forked worker about to os._exit: wait for its
    non-daemon threads, then run the exit hooks."""
    threading = sys.modules.get("threading")
    if threading is not None:
        with contextlib.suppress(BaseException):
            threading._shutdown()  # type: ignore[attr-defined,unused-ignore]
    import atexit

    atexit._run_exitfuncs()


if __name__ == "__main__":
    main()
