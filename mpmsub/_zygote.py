"""The executor's zygote: one prepared interpreter that forks the workers for Python calls.

A fresh worker costs an interpreter and the imports of the program's main module; a worker
forked from a zygote costs a fork. The zygote is started as workers were (fork-and-exec, in a
session of its own: the executor's process has threads and must not fork), prepared once (the
parent's import path, directory and main module; the initializer unpickled, which imports its
module), and forks each worker on request; each worker runs the initializer itself. The other
side, and the messages both ways, are in _worker (`_zygote`).

Only where it can be used safely: Linux with pidfds (a forked worker is the zygote's child, not
ours: a pidfd tells us of its exit, and the zygote reaps it when we ask, so that its pid is
never reused while we may signal it), not a frozen application, and not where the executor
was given a "spawn" context or MPMSUB_ZYGOTE=0 is set. A zygote whose main module started
threads says so (forking it would not be safe) and workers start as fresh interpreters.

Everything here runs on the executor's loop thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import resource
import select
import signal
import socket
import subprocess
import sys
from typing import Any, Callable, List, Optional, Tuple

from mpmsub import _worker as wire
from mpmsub._guard import Watchman
from mpmsub._loop import EventLoop

logger = logging.getLogger("mpmsub")

STARTING, READY, GONE = "starting", "ready", "gone"
_REPLY_WAIT = 10.0  # seconds a fork or a reap may take before the zygote is taken for hung
_CLOSE_WAIT = 2.0  # seconds it gets to end its workers and exit once its socket is closed
_OFF = ("0", "off", "no", "false")
_possible: Optional[bool] = None


def possible() -> bool:
    """Whether workers can be forked from a zygote here (Linux, pidfds, an interpreter to start,
    MPMSUB_ZYGOTE not off)."""
    global _possible
    if os.environ.get("MPMSUB_ZYGOTE", "").lower() in _OFF or not hasattr(os, "pidfd_open"):
        return False
    if _possible is None:
        _possible = False
        if sys.platform.startswith("linux") and not getattr(sys, "frozen", False) and hasattr(socket, "send_fds"):
            try:
                os.close(os.pidfd_open(os.getpid()))
                _possible = True
            except OSError:  # an old kernel, a seccomp filter
                pass
    return _possible


class ZygoteError(Exception):
    """The zygote could not fork a worker, or is gone."""


class Zygote:
    """The executor's end of a zygote process.

    `state` is STARTING until the zygote has prepared itself, then READY; GONE once it has
    exited or been closed. `on_state(why)` is called once it leaves STARTING: why is None if
    it is ready to fork, else the reason it is not (its traceback if the main module raised).
    """

    def __init__(
        self,
        loop: EventLoop,
        watchman: Watchman,
        command: List[str],
        init_frame: bytes,
        pipe: Callable[[], Tuple[int, int]],
        on_state: Callable[[Optional[str], bool], None],
    ) -> None:
        self.loop = loop
        self.watchman = watchman
        self.state = STARTING
        self.lost: Optional[str] = None  # why it is gone, if it went on its own
        self._reaped = False
        self._pidfd = -1
        self._on_state = on_state
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._out = bytearray(wire.HEADER.pack(len(init_frame)) + init_frame)
        try:
            init_r, self._init_w = pipe()
        except BaseException:
            self._sock.close()
            theirs.close()
            raise
        try:
            proc = subprocess.Popen(
                [*command, "--zygote", str(theirs.fileno()), str(init_r)],
                pass_fds=(theirs.fileno(), init_r),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                env={**os.environ, wire.PREPARING: "1"},
            )
        except BaseException:
            self._sock.close()
            os.close(self._init_w)
            raise
        finally:
            theirs.close()
            os.close(init_r)
        proc.returncode = 0  # reaped here, with os.waitpid
        self.pid = proc.pid
        try:
            self._pidfd = os.pidfd_open(self.pid)
            watchman.watch(self.pid)
            os.set_blocking(self._init_w, False)
            self._sock.settimeout(_REPLY_WAIT)
            loop.add_reader(self._sock.fileno(), self._on_message)
            loop.add_writer(self._init_w, self._on_writable)
        except BaseException:
            self.close(kill=True)
            raise

    def _on_writable(self) -> None:
        try:
            written = os.write(self._init_w, self._out)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._out)  # it is gone: its socket says so
        del self._out[:written]
        if not self._out:
            self._close_init()

    def _close_init(self) -> None:
        if self._init_w >= 0:
            self.loop.remove_writer(self._init_w)
            os.close(self._init_w)
            self._init_w = -1

    def _on_message(self) -> None:
        """Its socket is readable outside a request: it is prepared, or it has gone."""
        try:
            data = self._sock.recv(wire.MESSAGE_LIMIT + 1)
        except (BlockingIOError, socket.timeout):
            return
        except OSError:
            data = b""
        kind = data[:1]
        if kind == wire.ZYGOTE_READY and self.state == STARTING:
            self.state = READY
            self._on_state(None, False)
        elif kind == wire.NOFORK and self.state == STARTING:
            self.close(kill=True)  # its threads might keep it from exiting
            self._on_state("its main module started threads, so it is not forked from", False)
        elif kind == wire.ZYGOTE_BROKEN and self.state == STARTING:
            self.close()
            self._on_state(data[1:].decode(errors="replace"), True)
        else:  # its end: the zygote exited (its workers die with it)
            starting = self.state == STARTING
            self._gone(f"the worker parent process (zygote) {self.pid} exited{self._status()}")
            if starting:
                self._on_state(self.lost, False)

    def _request(self, message: bytes, fds: Tuple[int, ...] = ()) -> bytes:
        """Send a request and wait for its reply (the zygote answers each at once)."""
        if self.state != READY:
            raise ZygoteError(self.lost or "the worker parent process (zygote) is not running")
        try:
            if fds:
                socket.send_fds(self._sock, [message], list(fds))
            else:
                self._sock.send(message)
            reply = self._sock.recv(wire.MESSAGE_LIMIT + 1)
        except socket.timeout:
            self._gone(f"the worker parent process (zygote) {self.pid} did not answer within {_REPLY_WAIT:g} s")
            raise ZygoteError(self.lost) from None
        except OSError as exc:
            reply = b""
            why = f": {exc}"
        else:
            why = ""
        if not reply:
            self._gone(f"the worker parent process (zygote) {self.pid} exited{self._status() or why}")
            raise ZygoteError(self.lost)
        return reply

    def fork(self, read_fd: int, write_fd: int) -> int:
        """A new worker, forked with these pipe ends (ours stay open); its pid."""
        reply = self._request(wire.FORK, (read_fd, write_fd))
        if reply[:1] == wire.FORKED:
            return int(wire.PID.unpack_from(reply, 1)[0])
        raise ZygoteError(reply[1:].decode(errors="replace"))

    def reap(self, pid: int) -> Tuple[Optional[int], Any]:
        """The exit status and rusage of a worker that has exited (or been SIGKILLed), reaped by
        the zygote; (None, None) where it could not be (the zygote is gone: see `lost`)."""
        try:
            reply = self._request(wire.REAP + wire.PID.pack(pid))
        except ZygoteError:
            return None, None
        _, status, usage = pickle.loads(reply[1:])  # our own zygote's reply
        return status, None if usage is None else resource.struct_rusage(usage)

    def _status(self) -> str:
        """Reap it (its socket has closed: it has exited, or is about to); ', status N' or ''."""
        if self._pidfd >= 0 and select.select([self._pidfd], [], [], _CLOSE_WAIT)[0]:
            with contextlib.suppress(ChildProcessError):
                got, status = os.waitpid(self.pid, os.WNOHANG)
                if got:
                    self._reaped = True
                    return f", status {os.waitstatus_to_exitcode(status)}"
        return ""

    def _gone(self, why: str) -> None:
        if self.state != GONE:
            self.lost = why
            logger.warning("mpmsub: %s; the next worker needed starts a new one", why)
        self.close()

    def close(self, kill: bool = False) -> None:
        """Close its socket (it kills its workers and exits), wait for it a moment (unless `kill`),
        kill it if it is still there, and reap it."""
        if self.state == GONE:
            return
        self.state = GONE
        self._close_init()
        self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if not self._reaped:
            waited = self._pidfd >= 0 and not kill and select.select([self._pidfd], [], [], _CLOSE_WAIT)[0]
            if not waited:
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)  # not yet reaped: the pid is still its own
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self.watchman.forget(self.pid)
