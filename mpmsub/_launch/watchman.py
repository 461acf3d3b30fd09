"""A watchman process that kills the jobs left running when the process that started them dies
without cleaning up (SIGKILL, the kernel's OOM killer, a crash of the interpreter).

Nothing in a process can act after SIGKILL, so a small separate process (started once per
launcher, at its first job) holds the read end of a pipe from it and is told each job's session
as it starts ("+pid") and ends ("-pid") (see `Watchman`). When the pipe closes without the word to stop ("q"),
the launching process is gone: the watchman SIGKILLs every process of every session still
listed, then exits. It runs in a session of its own, so a Ctrl-C at the terminal reaches the
executor, which cleans up and lets it go, and not the watchman.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import sys
import threading
from typing import Deque, Optional

logger = logging.getLogger("mpmsub")

# The watchman's program. It runs isolated (-I: no environment, no user site, and no module from
# the working directory, which may hold a file named like one of the stdlib's) and without site
# (-S), to start in a few ms.
_PROGRAM = r"""
import os, signal, sys

def sessions_members(sessions):
    found = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and int(fields[3]) in sessions:
            found.append(pid)
    return found

sessions = set()
pending = b""
while True:
    data = os.read(0, 1 << 16)
    if not data:
        break
    *lines, pending = (pending + data).split(b"\n")
    for word in lines:
        if word == b"q":
            os._exit(0)  # nothing to flush: the executor waits for this exit
        if word[:1] == b"+":
            sessions.add(int(word[1:]))
        elif word[:1] == b"-":
            sessions.discard(int(word[1:]))
for sid in sessions:
    try:
        os.killpg(sid, signal.SIGKILL)
    except OSError:
        pass
for pid in sessions_members(sessions):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


class Watchman:
    """The launching process's end of the watchman.

    `watch` and `forget` only queue a word (they run on the event loop, which must not make a
    system call per job: each lets other threads take the interpreter lock and delays the next
    start); the monitor thread passes the queue on at each tick and when its last job is gone
    (`flush`), within 20 ms of a job's start. A job started less than a tick before the launching
    process is killed may therefore be missed. On Linux every process of a listed session is
    killed; elsewhere (no /proc) its process group."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._fd = -1
        self._failed = False
        self._words: Deque[str] = collections.deque()
        self._lock = threading.Lock()  # flush (monitor thread) against close (event loop)

    def watch(self, session: int) -> None:
        """A job's session started."""
        self._words.append(f"+{session}\n")

    def forget(self, session: int) -> None:
        """A job's session is over (its processes reaped and its leftovers killed)."""
        self._words.append(f"-{session}\n")

    def flush(self) -> None:
        """Pass the queued words on (the monitor thread's)."""
        if not self._words:
            return
        with self._lock:
            if not self._failed:
                self._flush()

    def _flush(self) -> None:
        words = []
        with contextlib.suppress(IndexError):
            while True:
                words.append(self._words.popleft())
        if self._fd < 0 and not self._start():
            return
        try:
            os.write(self._fd, "".join(words).encode())
        except OSError as exc:  # it died: jobs are still killed by the executor as usual
            logger.debug("mpmsub: the watchman is gone: %s", exc)
            self._failed = True

    def _start(self) -> bool:
        if getattr(sys, "frozen", False):  # sys.executable is the application, not Python
            self._failed = True
            return False
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _PROGRAM],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            logger.debug("mpmsub: no watchman for jobs left behind: %s", exc)
            self._failed = True
            return False
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()  # not inherited by the jobs (close_fds, O_CLOEXEC)
        return True

    def close(self) -> None:
        """Tell the watchman to stop without killing anything, and reap it."""
        with self._lock:
            self._failed = True  # no more flushes
            proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, b"q\n")
        self._fd = -1
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
