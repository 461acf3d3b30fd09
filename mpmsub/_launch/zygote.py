"""The executor's zygote: one prepared interpreter that forks the workers for Python calls.

A fresh worker costs an interpreter and the imports of the program's main module; a worker
forked from a zygote costs a fork. The zygote is started as workers were (fork-and-exec, in a
session of its own: the executor's process has threads and must not fork), prepared once (the
parent's import path, directory and main module; the initializer unpickled, which imports its
module), and forks each worker on request; each worker runs the initializer itself. The other
side is in worker_main (`_zygote`), the messages both ways in `_protocol`.

Only where it can be used safely (pool.can_fork): Linux with pidfds (a forked worker is the zygote's child, not
ours: a pidfd tells us of its exit, and the zygote reaps it when we ask, so that its pid is
never reused while we may signal it), not a frozen application, and not where the executor
was given a "spawn" context or MPMSUB_ZYGOTE=0 is set. A zygote whose main module started
threads says so (forking it would not be safe) and workers start as fresh interpreters.

Everything here runs on the executor's loop thread.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import pickle
import resource
import select
import signal
import socket
import subprocess
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from mpmsub import _protocol as wire
from mpmsub._errors import MpmsubError
from mpmsub._launch import worker_main
from mpmsub._launch.loop import EventLoop, Timer
from mpmsub._launch.watchman import Watchman

logger = logging.getLogger("mpmsub")

STARTING, READY, GONE = "starting", "ready", "gone"
_REPLY_WAIT = 10.0  # seconds a fork or a reap may take before the zygote is taken for hung
_CLOSE_WAIT = 2.0  # seconds it gets to end its workers and exit once its socket is closed


def _socketpair() -> Tuple[socket.socket, socket.socket]:
    """A SOCK_SEQPACKET pair whose fds are not 0, 1 or 2 (see worker_main.above_stdio)."""
    pair = list(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    try:
        for i, sock in enumerate(pair):
            if sock.fileno() <= 2:
                pair[i] = socket.socket(
                    socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=worker_main.above_stdio(sock.detach())
                )
    except BaseException:
        for sock in pair:
            sock.close()
        raise
    return pair[0], pair[1]


class ZygoteError(MpmsubError):
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
        self.state = STARTING  # then READY, then GONE
        self.lost: Optional[str] = None  # why it is gone, if it went on its own
        self._reaped = False
        self._pidfd = -1
        self._pending: Deque[Callable[[bytes], None]] = collections.deque()  # in request order
        self._outbox: Deque[Tuple[bytes, List[int]]] = collections.deque()  # requests not yet sent
        self._deadline: Optional[Timer] = None  # for the oldest request's reply
        self._write_fd = -1  # the socket's, again: the loop waits on it to send what waits
        self._writing = False
        self._on_state = on_state
        self._sock, theirs = _socketpair()
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
            self._sock.setblocking(False)
            self._write_fd = fcntl.fcntl(self._sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
            loop.add_reader(self._sock.fileno(), self._on_message)
            loop.add_writer(self._init_w, self._on_writable)
        except BaseException:
            self.close(kill=True)
            raise

    @property
    def gone(self) -> bool:
        return self.state == GONE

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
        """Its socket is readable: it is prepared, a reply to the oldest request, or its end."""
        try:
            data = self._sock.recv(wire.MESSAGE_LIMIT + 1)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        kind = data[:1]
        if self.state == STARTING and kind in (wire.ZYGOTE_READY, wire.NOFORK, wire.ZYGOTE_BROKEN):
            if kind == wire.ZYGOTE_READY:
                self.state = READY
                self._on_state(None, False)
            elif kind == wire.NOFORK:
                self.close(kill=True)  # its threads might keep it from exiting
                self._on_state("its main module started threads as it was imported, so it is not forked from", False)
            else:
                self.close(kill=True)
                self._on_state(data[1:].decode(errors="replace"), True)
        elif data and self._pending:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(_REPLY_WAIT, self._expired) if len(self._pending) > 1 else None
            self._pending.popleft()(data)
        elif data:  # a reply to no request: the two ends disagree, and it cannot be trusted
            self._gone(f"the worker parent process (zygote) {self.pid} sent a reply to no request", kill=True)
        else:  # its end: the zygote exited (its workers die with it)
            starting = self.state == STARTING
            self._gone(f"the worker parent process (zygote) {self.pid} exited{self._status()}")
            if starting:
                self._on_state(self.lost, False)

    def _request(self, message: bytes, fds: List[int], on_reply: Callable[[bytes], None]) -> None:
        """Send a request, with `fds` (ours: closed once sent, or when the zygote goes);
        `on_reply` gets its reply (the zygote answers in order), or b"" if the zygote goes
        first, or does not answer within _REPLY_WAIT. Raises ZygoteError (the fds closed) if
        the zygote is not there to ask."""
        if self.state != READY:
            for fd in fds:
                os.close(fd)
            raise ZygoteError(self.lost or "the worker parent process (zygote) is not running")
        self._outbox.append((message, fds))
        self._pending.append(on_reply)
        if self._deadline is None:
            self._deadline = self.loop.call_later(_REPLY_WAIT, self._expired)
        self._flush()

    def _flush(self) -> None:
        """Send what waits to be sent, as far as the socket takes it now (never waiting: the
        zygote's replies, which the loop reads, could otherwise fill its own socket)."""
        while self._outbox and self.state == READY:
            message, fds = self._outbox[0]
            try:
                socket.send_fds(self._sock, [message], fds, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                if not self._writing:  # through a second fd: the loop reads the socket's own
                    self._writing = True
                    self.loop.add_writer(self._write_fd, self._flush)
                return
            except OSError as exc:
                self._gone(f"the worker parent process (zygote) {self.pid} exited{self._status() or f': {exc}'}")
                return
            self._outbox.popleft()
            for fd in fds:
                os.close(fd)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self._write_fd)

    def _expired(self) -> None:
        """The oldest request has waited _REPLY_WAIT for its answer: the zygote is stopped or
        stuck, and is given up (its workers die with it)."""
        self._deadline = None
        if self._pending:
            why = f"the worker parent process (zygote) {self.pid} did not answer within {_REPLY_WAIT:g} s"
            self._gone(why, kill=True)

    def fork(
        self,
        read_fd: int,
        write_fd: int,
        environment: Optional[Dict[str, str]],
        done: Callable[[Optional[int], Optional[str]], None],
    ) -> None:
        """Ask for a new worker with these pipe ends (the zygote's from now on: closed here once
        sent) and, if not None, this environment; `done(pid, None)` once it is
        forked, or `done(None, why)`. Raises ZygoteError if the zygote is gone."""

        def reply(data: bytes) -> None:
            if data[:1] == wire.FORKED:
                done(int(wire.PID.unpack_from(data, 1)[0]), None)
            else:
                done(None, data[1:].decode(errors="replace") if data else self.lost)

        body = b"" if environment is None else pickle.dumps(environment, pickle.HIGHEST_PROTOCOL)
        if len(body) >= wire.REQUEST_LIMIT:
            logger.warning("mpmsub: the environment is too large to send to the zygote; the worker has its own")
            body = b""
        self._request(wire.FORK + body, [read_fd, write_fd], reply)

    def reap(self, pid: int, done: Callable[[Optional[int], Any], None]) -> None:
        """Have the zygote reap a worker that has exited (or been SIGKILLed): `done(status,
        rusage)`, or `done(None, None)` where it could not be (the zygote is gone: see `lost`)."""

        def reply(data: bytes) -> None:
            if data[:1] == wire.STATUS:
                _, status, usage = pickle.loads(data[1:])  # our own zygote's reply
                done(status, None if usage is None else resource.struct_rusage(usage))
            else:
                done(None, None)

        try:
            self._request(wire.REAP + wire.PID.pack(pid), [], reply)
        except ZygoteError:
            done(None, None)

    def _status(self) -> str:
        """Reap it (its socket has closed: it has exited, or is about to); ', status N' or ''."""
        if self._pidfd >= 0 and _ended_within(self._pidfd, _CLOSE_WAIT):
            self._kill_group()
            with contextlib.suppress(ChildProcessError):
                got, status = os.waitpid(self.pid, os.WNOHANG)
                if got:
                    self._reaped = True
                    return f", status {os.waitstatus_to_exitcode(status)}"
        return ""

    def _kill_group(self) -> None:
        """Kill what is left in its process group (what its main module started as it was
        imported); it must not have been reaped (a zombie keeps its group id)."""
        if not self._reaped:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)

    def _gone(self, why: str, kill: bool = False) -> None:
        if self.state != GONE:
            self.lost = why
            logger.warning("mpmsub: %s; the next worker needed starts a new one", why)
        self.close(kill)

    def settle(self, seconds: float) -> None:
        """Take the replies to the requests sent, waiting up to `seconds` for them (at the end,
        when the loop will not run again: the workers are reaped before the zygote goes)."""
        if self.state == GONE:
            return
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while self._pending and self.state != GONE:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                return
            self._on_message()

    def close(self, kill: bool = False) -> None:
        """Close its socket (it kills its workers and exits), wait for it a moment (unless `kill`),
        kill it and its process group, and reap it. Requests not answered get b""."""
        if self.state == GONE:
            return
        self.state = GONE
        self._close_init()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for _, fds in self._outbox:
            for fd in fds:
                os.close(fd)
        self._outbox.clear()
        self.loop.remove_reader(self._sock.fileno())
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self._write_fd)
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        self._sock.close()
        if not self._reaped:
            waited = self._pidfd >= 0 and not kill and _ended_within(self._pidfd, _CLOSE_WAIT)
            if not waited:
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)  # not yet reaped: the pid is still its own
            self._kill_group()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self._reaped = True
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self.watchman.forget(self.pid)
        pending, self._pending = self._pending, collections.deque()
        for on_reply in pending:
            on_reply(b"")


def _ended_within(pidfd: int, seconds: float) -> bool:
    """Whether the process of `pidfd` has exited, waiting up to `seconds` (poll, not select:
    select refuses fds above 1023)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(seconds * 1000)))
