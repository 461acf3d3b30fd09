"""One batch run locally and on each backend, whose results must read the same: what every
backend promises is that a job is measured, timed out, killed and explained as locally."""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import Future, wait
from typing import Any, Dict, List, Tuple

import mpmsub
from support import callees
from support.helpers import alloc_cmd


def batch() -> List[Tuple[str, Any]]:
    """(name, job or call) pairs covering success, failures, a pipeline and calls."""
    py = sys.executable
    return [
        ("ok", mpmsub.Job([py, "-c", "print('hello')"]).memory("50M")),
        ("exit", mpmsub.Job(["sh", "-c", "echo out; echo err >&2; exit 3"])),
        ("missing", mpmsub.Job(["mpmsub-no-such-program"])),
        ("timeout", mpmsub.Job(["sleep", "30"]).with_timeout(0.5)),
        ("strict", mpmsub.Job(alloc_cmd(300, hold=3)).memory("60M").strict_memory()),
        ("pipeline", mpmsub.Pipeline([["printf", "b\\na\\n"], ["sort"]])),
        ("signal", mpmsub.Job(["sh", "-c", "kill -TERM $$"])),
        ("call", mpmsub.Call(callees.square, 7)),
        ("raises", mpmsub.Call(callees.fail, "boom")),
    ]


def run(backend: Any) -> Dict[str, Tuple[Any, ...]]:
    """Run the batch on `backend`; what each job's result says, with measured numbers blanked."""
    with mpmsub.MemoryAwareExecutor(cpus=4, memory="2G", backend=backend) as executor:
        futures = {name: executor.submit(job) for name, job in batch()}
        wait(list(futures.values()), timeout=120)
    return {name: _reads(future) for name, future in futures.items()}


def _reads(future: Future[Any]) -> Tuple[Any, ...]:
    usage = future.usage  # type: ignore[attr-defined]
    value: Any
    try:
        value = future.result()
        value = None if isinstance(value, mpmsub.JobResult) else value
    except Exception as exc:
        cause = exc.__cause__
        value = (type(exc).__name__, str(exc), type(cause).__name__ if cause is not None else None)
    return (
        usage.success,
        usage.returncode,
        usage.failure,
        _blank(usage.error),
        usage.stdout,
        usage.stderr,
        usage.stage_returncodes,
        value,
    )


def _blank(text: Any) -> Any:
    return re.sub(r"\d+(\.\d+)?", "N", text) if isinstance(text, str) else text


def wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
