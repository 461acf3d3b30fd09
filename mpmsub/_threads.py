"""Starting mpmsub's helper threads, which interpreter shutdown may forbid.

Python 3.12.0 to 3.12.2 refuse to start a thread once the interpreter has begun to shut down
(3.12.3 and 3.13 allow it again in exit hooks), and that is when the jobs of a program that
ended without `shutdown()` finish (the executor's exit hook waits for them). Each thread mpmsub
starts on demand goes through `start`, and its caller does the work another way when it returns
None, so that no exit ever waits for a thread that could not be.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional, Tuple

# Where a process's exit cannot be waited for by a thread: how often to look instead.
EXIT_POLL = 0.05


def start(target: Callable[..., Any], name: str, args: Tuple[Any, ...] = ()) -> Optional[threading.Thread]:
    """A daemon thread running `target(*args)`, started; None where the interpreter is shutting
    down and no new thread may start."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown"
        return None
    return thread


def exited(pid: int) -> Optional[Tuple[Optional[int], Any]]:
    """Without waiting: None while child `pid` runs; once it has exited, (None, None) where it is
    left unreaped (a zombie, which keeps its process group id for killpg: Linux), or its wait
    status and rusage, reaped (macOS, which has no waitid); (None, None) if another part of the
    program reaped it."""
    if hasattr(os, "waitid"):
        try:
            seen = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return (None, None)
        return None if seen is None else (None, None)
    try:
        got, status, usage = os.wait4(pid, os.WNOHANG)
    except ChildProcessError:
        return (None, None)
    return (status, usage) if got else None
