"""Functions the call tests run in worker processes (a light module: every worker imports it)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import Any, Iterator, List, Optional

_initialized: Optional[str] = None


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0) -> int:
    return x + y


def pid(_: Any = None) -> int:
    return os.getpid()


def parent(_: Any = None) -> int:
    """The worker's parent: the executor's zygote, or the executor's process."""
    return os.getppid()


def write_later(path: str, seconds: float) -> None:
    """Start a thread (not a daemon) that writes "done" to `path` after `seconds`."""
    import threading

    def write() -> None:
        time.sleep(seconds)
        with open(path, "w") as f:
            f.write("done")

    threading.Thread(target=write).start()


def parent_then_sleep(marker: str) -> None:
    """Say which process is the worker's parent (in a file named `marker`), then sleep."""
    with open(marker, "w") as f:
        f.write(str(os.getppid()))
    time.sleep(60)


def fail(message: str) -> None:
    raise ValueError(message)


def allocate(mb: int, hold: float = 0.0) -> int:
    """Touch `mb` MB, hold it, free it; return this worker's pid."""
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(hold)
    del block
    return os.getpid()


def allocate_slowly(mb: int, seconds: float) -> int:
    """Grow to `mb` MB over `seconds` (so that sampling sees it grow), then free it."""
    chunks: List[bytearray] = []
    for _ in range(10):
        chunks.append(bytearray(mb * 2**20 // 10))
        time.sleep(seconds / 10)
    del chunks
    return os.getpid()


def segfault() -> None:
    ctypes.string_at(0)


def abort() -> None:
    os.abort()


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def exit_hard(status: int) -> None:
    os._exit(status)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def sleep_in_child(seconds: float, marker: str) -> None:
    """Start a program that sleeps (its command line carries `marker`) and wait for it."""
    import subprocess

    subprocess.run([sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", str(seconds), marker])


def generator() -> Iterator[int]:
    return iter(range(3)) if False else (i for i in range(3))  # a generator does not pickle


class Unloadable:
    """Pickles fine, fails to unpickle (its reconstructor raises)."""

    def __reduce__(self) -> Any:
        return (_refuse, ())


def _refuse() -> None:
    raise RuntimeError("this object refuses to be unpickled")


def returns_unloadable() -> Unloadable:
    return Unloadable()


class OddError(Exception):
    """An exception that pickles but cannot be rebuilt (its __init__ needs two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"odd {a} {b}")


def raise_odd() -> None:
    raise OddError(1, 2)


def initialize(value: str) -> None:
    global _initialized
    _initialized = value


def initialized(_: Any = None) -> Optional[str]:
    return _initialized


def broken_initializer() -> None:
    raise RuntimeError("the initializer fails")


def flaky(marker: str) -> str:
    """Fail the first time (creating `marker`), succeed the next."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first try fails")
    return "second try"


def fork_and_die(pid_file: str) -> None:
    """Leave a forked child that holds the worker's pipes (it does not exec), write its pid to
    `pid_file`, and end the worker abruptly."""
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    with open(pid_file, "w") as f:
        f.write(str(child))
    os._exit(7)
