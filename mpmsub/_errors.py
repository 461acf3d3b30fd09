"""The project's exceptions: every exception class mpmsub defines subclasses MpmsubError.

A class defined in another module keeps the base it had before MpmsubError, as its second base,
so that code catching that base still catches it. Beyond these, mpmsub raises Python's own
exceptions where the standard library would: ValueError and TypeError for a wrong argument,
RuntimeError for a job submitted after shutdown, ImportError for a missing optional package,
OSError from the system. The tree, with the module of each class defined elsewhere and the
second bases:

    MpmsubError
        JobFailedError
        CallError
            MemoryLimitError
            CallTimeoutError
            WorkerDiedError       also concurrent.futures.process.BrokenProcessPool
            CallCancelledError
                CallKilledError
            CallPicklingError     also pickle.PicklingError
        RemoteTraceback
        UnsafeFileError           in _files
        HistoryError              in _learn.history
        JobFileError              in _cli.jobfile, also ValueError
        LedgerError               in _policy.ledger, also RuntimeError
        _Stopped                  in _backends.node (SIGTERM or SIGINT in the SLURM runner, caught there)
        SlurmError                in _backends.slurm, also RuntimeError
        TemplateError             in _cli.template, also ValueError
        ZygoteError               in _launch.zygote

_launch.worker_main, the script that worker processes run, imports no mpmsub module and defines no
exception. The command line's _Terminated and _Halted (in _cli.main) derive from BaseException, as
KeyboardInterrupt does, so that no `except Exception` stops them: they end a run, they are not
errors, and they are outside the tree.
"""

from __future__ import annotations

import pickle
import threading
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from concurrent.futures.process import BrokenProcessPool

    from mpmsub._result import JobResult


class MpmsubError(Exception):
    """Base class of mpmsub's own errors."""


class JobFailedError(MpmsubError):
    """Raised by JobResult.check_returncode() for a job that did not succeed."""

    def __init__(self, result: JobResult) -> None:
        self.result = result
        super().__init__(f"job {result.job_id!r} failed: {result.error}")


class CallError(MpmsubError):
    """A Python call that did not return or raise: its worker was stopped or died, or the call
    could not be passed to it. `result` is the call's JobResult (its usage and the reason)."""

    def __init__(self, message: str, result: Optional[JobResult] = None) -> None:
        self.result = result
        super().__init__(message)


class MemoryLimitError(CallError):
    """The call was stopped for memory: over its `m` in strict mode, pushing the executor over
    its budget, or killed by the kernel's out-of-memory killer."""


class CallTimeoutError(CallError):
    """The call ran longer than its timeout and its worker was killed."""


def _worker_died() -> type[CallError]:
    # Made on first use: the module of its base imports multiprocessing, which `import mpmsub`
    # and commands do without.
    base: type[Exception]
    try:
        from concurrent.futures.process import BrokenProcessPool as base
    except (ImportError, RuntimeError):
        # First needed at interpreter exit, where that module cannot be imported any more (it
        # registers an exit hook, refused then): nothing can have caught its class, never imported.
        from concurrent.futures import BrokenExecutor as base

    class WorkerDiedError(CallError, base):  # type: ignore[misc,valid-type]
        """The worker process running the call died (a crash such as a segfault, os._exit(), a
        signal from elsewhere), or could not be started or prepared. It is also a
        `concurrent.futures.process.BrokenProcessPool`, which code written for ProcessPoolExecutor
        catches (here only this call failed: the executor goes on)."""

        __qualname__ = "WorkerDiedError"  # pickled by name, as a class of this module

    return WorkerDiedError


if TYPE_CHECKING:

    class WorkerDiedError(CallError, BrokenProcessPool):
        """See _worker_died."""

else:
    _making = threading.Lock()  # one class, whichever threads ask first

    def __getattr__(name: str) -> Any:
        if name != "WorkerDiedError":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        with _making:
            if name not in globals():
                globals()[name] = _worker_died()
            return globals()[name]


class CallCancelledError(CallError):
    """The call was running when the executor was terminated (Ctrl-C, an exception in its with
    block, terminate()), and its worker was killed."""


class CallKilledError(CallCancelledError):
    """The call was killed on its own (`future.kill(reason)`, `executor.kill`): its worker was
    killed, and replaced; the message names the reason."""


class CallPicklingError(CallError, pickle.PicklingError):
    """The call's function, an argument, or its return value could not be pickled (or unpickled)
    on its way between this process and a worker."""


class RemoteTraceback(MpmsubError):
    """The traceback of an exception raised in a worker, attached as that exception's __cause__."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'
