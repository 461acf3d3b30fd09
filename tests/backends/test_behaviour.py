"""One behaviour suite, run against every place jobs can run here: the same tests once per
backend, as CPython's and loky's executor tests run one base set per executor.

- "local": this machine, with per-job memory cgroups where this user may make them;
- "local-no-cgroups": the same with MPMSUB_CGROUPS=0 (as for a user without root);
- "dask": a LocalCluster of two worker processes (backend_fixtures.py), skipped without distributed;
- "slurm": a single-node SLURM (backend_fixtures.py), skipped where none can be reached or started.

Each backend gets one executor for the module (`executor`); the tests that end an executor or
need a one-CPU one make their own with `executor_factory`. Functions called in workers are
defined here, at the top level: locally and on SLURM a worker imports this module by name (the
test's path travels with the call), and on Dask cloudpickle sends them by reference too (the
workers' path has the tests' directory, as multiprocessing's spawn gives it).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from support.helpers import alloc_cmd, unique_sleep

import mpmsub

MB = 2**20
WAIT = 60  # seconds any one result may take (a SLURM job's first poll included)
BACKENDS = ["local", "local-no-cgroups", "dask", "slurm"]


# -- what runs in the workers ----------------------------------------------------------------------


def triple(x: int) -> int:
    return 3 * x


def triple_and_pid(x: int) -> Tuple[int, int]:
    return 3 * x, os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


# -- the backends ----------------------------------------------------------------------------------


class ExecutorFactory:
    """Makes executors on one backend: `factory(**options)` is a new MemoryAwareExecutor."""

    def __init__(self, name: str, backend: Callable[[], Any], env: Dict[str, str]) -> None:
        self.name = name
        self._backend = backend
        self._env = env

    def __call__(self, **options: Any) -> mpmsub.MemoryAwareExecutor:
        # The environment counts when the executor starts (its launcher detects cgroups then).
        with pytest.MonkeyPatch.context() as patch:
            for name, value in self._env.items():
                patch.setenv(name, value)
            return mpmsub.MemoryAwareExecutor(backend=self._backend(), history=False, **options)

    def __repr__(self) -> str:
        return f"ExecutorFactory({self.name!r})"


@pytest.fixture(scope="module", params=BACKENDS)
def executor_factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ExecutorFactory:
    name = request.param
    if name == "local":
        return ExecutorFactory(name, lambda: "local", {})
    if name == "local-no-cgroups":
        return ExecutorFactory(name, lambda: "local", {"MPMSUB_CGROUPS": "0"})
    if name == "dask":
        client = request.getfixturevalue("dask_client")
        return ExecutorFactory(name, lambda: mpmsub.DaskBackend(client), {})
    assert name == "slurm"
    request.getfixturevalue("slurm")
    workdir = str(tmp_path_factory.mktemp("slurm-behaviour") / "work")
    # Polls at the shortest interval: the tests wait for one job at a time.
    return ExecutorFactory(name, lambda: mpmsub.SlurmBackend(workdir=workdir, max_poll=0.25), {})


@pytest.fixture(scope="module")
def executor(executor_factory: ExecutorFactory) -> Iterator[mpmsub.MemoryAwareExecutor]:
    """The backend's executor, shared by the tests that leave it as they found it."""
    with executor_factory() as executor:
        yield executor


# -- helpers ---------------------------------------------------------------------------------------


def pgrep(marker: str) -> List[str]:
    """`pgrep -af`: the processes (pid and command line) with `marker` in their command line."""
    done = subprocess.run(["pgrep", "-af", re.escape(marker)], capture_output=True, text=True, timeout=10)
    assert done.returncode in (0, 1), done.stderr  # 1: none found
    return done.stdout.splitlines()


def left_running(marker: str, timeout: float = 3.0) -> List[str]:
    """The processes with `marker` still there after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = pgrep(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.02)


def two_sleeps(marker: str) -> List[str]:
    """A shell with two children, each a sleep with `marker` as its duration."""
    return ["sh", "-c", f"sleep {marker} & sleep {marker}; wait"]


def sleeps_running(marker: str) -> int:
    return sum(1 for line in pgrep(marker) if line.split(None, 1)[1] == f"sleep {marker}")


# -- commands --------------------------------------------------------------------------------------


def test_a_commands_result(executor: mpmsub.MemoryAwareExecutor) -> None:
    result = executor.submit(["sh", "-c", "echo out; echo err >&2"]).result(timeout=WAIT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")
    assert (result.success, result.failure, result.error) == (True, None, None)
    assert result.attempts == 1 and result.end_time >= result.start_time


def test_a_result_says_where_it_ran(
    executor_factory: ExecutorFactory, executor: mpmsub.MemoryAwareExecutor, request: pytest.FixtureRequest
) -> None:
    command, call = executor.submit(["true"]), executor.submit(triple, 1)
    assert command.result(timeout=WAIT).success and call.result(timeout=WAIT) == 3 and call.usage is not None
    hosts = {command.result().host, call.usage.host}
    if executor_factory.name == "dask":  # the worker's address: two workers may share a machine
        assert hosts <= set(request.getfixturevalue("dask_client").scheduler_info()["workers"]), hosts
    else:  # this machine's name (the test SLURM node is this machine too)
        assert hosts == {socket.gethostname()}


def test_a_non_zero_exit(executor: mpmsub.MemoryAwareExecutor) -> None:
    result = executor.submit(["sh", "-c", "echo partial; exit 3"]).result(timeout=WAIT)
    assert (result.success, result.failure, result.returncode) == (False, "exit", 3)
    assert result.error == "exited with status 3"
    assert result.stdout == "partial\n"


def test_a_timeout_leaves_nothing_running(executor: mpmsub.MemoryAwareExecutor, tmp_path: Path) -> None:
    marker = unique_sleep()
    started = tmp_path / "started"
    job = mpmsub.Job(["sh", "-c", f"sleep {marker} & touch {started}; sleep {marker}; wait"]).with_timeout(1)
    result = executor.submit(job).result(timeout=WAIT)
    assert (result.success, result.failure, result.error) == (False, "timeout", "timed out after 1 s")
    assert result.timed_out and 0.9 <= result.runtime < 10
    assert started.exists()  # its children had started
    assert left_running(marker) == []


def test_memory_is_measured(executor: mpmsub.MemoryAwareExecutor) -> None:
    code = "import time; x = bytearray(60 * 2**20); time.sleep(0.3)"
    result = executor.submit(mpmsub.Job([sys.executable, "-c", code]).memory("150M")).result(timeout=WAIT)
    assert result.success, result.error
    assert 60 <= result.memory_used < 100
    assert result.runtime >= 0.3 and result.cpu_used > 0
    assert result.memory_requested == 150


def test_strict_memory_stops_a_job_over_its_m(executor: mpmsub.MemoryAwareExecutor) -> None:
    job = mpmsub.Job(alloc_cmd(150, hold=5)).memory("30M").strict_memory()
    result = executor.submit(job).result(timeout=WAIT)
    assert (result.success, result.failure) == (False, "memory"), result.error
    assert "30M" in (result.error or ""), result.error
    assert result.runtime < 5  # stopped, not ended


def test_a_job_too_large_is_refused_at_submit(executor: mpmsub.MemoryAwareExecutor) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="can never run"):
        executor.submit(mpmsub.Job(["true"]).cpu(executor.cpus + 1))
    with pytest.raises(ValueError, match="can never run"):
        executor.submit(mpmsub.Job(["true"]).memory(f"{2 * executor.memory // MB}M"))
    assert time.monotonic() - started < 5
    status = executor.status()
    assert (status.queued, status.running) == (0, 0)


def test_a_failed_job_is_retried(executor: mpmsub.MemoryAwareExecutor, tmp_path: Path) -> None:
    counter = tmp_path / "attempts"
    script = f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {counter}; test $n -ge 2"
    result = executor.submit(mpmsub.Job(["sh", "-c", script]).with_retries(2)).result(timeout=WAIT)
    assert result.success, result.error
    assert result.attempts == 2
    assert counter.read_text() == "2\n"


def test_a_queued_job_can_be_cancelled(executor_factory: ExecutorFactory, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    executor = executor_factory(cpus=1)  # one job at a time
    try:
        first = executor.submit(["sleep", "0.5"])
        queued = executor.submit(["touch", str(ran)])
        wait_until(lambda: executor.status().running == 1, "the first job did not start")
        assert executor.status().queued == 1
        assert queued.cancel()
        executor.shutdown(wait=True)
    finally:
        executor.terminate()
    assert queued.cancelled()
    assert first.result(timeout=WAIT).success
    assert not ran.exists()


def test_terminate_kills_a_running_jobs_tree(executor_factory: ExecutorFactory) -> None:
    marker = unique_sleep()
    executor = executor_factory()
    try:
        future = executor.submit(two_sleeps(marker))
        wait_until(lambda: sleeps_running(marker) == 2, "the job's two sleeps did not start")
        executor.terminate("stopped by the test")
    finally:
        executor.terminate()
    result = future.result(timeout=WAIT)
    assert (result.failure, result.error) == ("cancelled", "killed: stopped by the test")
    assert left_running(marker) == []


# -- Python calls ----------------------------------------------------------------------------------


def test_a_call_returns_its_value(executor: mpmsub.MemoryAwareExecutor) -> None:
    future = executor.submit(triple_and_pid, 7)
    value, pid = future.result(timeout=WAIT)
    assert value == 21 and pid != os.getpid()
    assert future.usage is not None and future.usage.success and future.usage.value == (21, pid)
    assert future.usage.returncode is None and future.usage.memory_used > 1


def test_a_calls_exception_is_reraised(executor: mpmsub.MemoryAwareExecutor) -> None:
    future = executor.submit(fail, "no good")
    with pytest.raises(ValueError, match="no good") as info:
        future.result(timeout=WAIT)
    assert isinstance(info.value.__cause__, mpmsub.RemoteTraceback)
    assert "in fail" in str(info.value.__cause__)  # the worker's traceback
    assert future.usage is not None
    assert (future.usage.failure, future.usage.error) == ("raised", "raised ValueError: no good")


def test_map(executor: mpmsub.MemoryAwareExecutor) -> None:
    assert list(executor.map(triple, range(5), chunksize=2)) == [0, 3, 6, 9, 12]


# -- killing one job -------------------------------------------------------------------------------


def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_kill_stops_one_running_jobs_whole_tree_and_nothing_else(
    executor_factory: ExecutorFactory, tmp_path: Path
) -> None:
    marker, detached = unique_sleep(), unique_sleep()
    executor = executor_factory(cpus=2)
    try:
        # Two children, one of them in a session of its own (setsid): both are the job's.
        command = f"sleep {marker} & setsid sleep {detached} & sleep {marker}; wait"
        doomed = executor.submit(mpmsub.Job(["sh", "-c", command]).with_id("doomed").with_retries(2))
        sibling = executor.submit(["sh", "-c", "sleep 1.5; echo sibling"])
        wait_until(lambda: sleeps_running(marker) == 2 and sleeps_running(detached) == 1, "its children did not start")
        assert sorted(job.job_id for job in executor.running()) == ["doomed", "job_0001"]
        assert doomed.kill("the wrong input") is True
        assert doomed.kill() is False  # killed already
        result = doomed.result(timeout=WAIT)
        assert (result.failure, result.error) == ("killed", "killed: the wrong input")
        assert result.attempts == 1  # never retried
        assert left_running(marker) == [] and left_running(detached) == []
        assert sibling.result(timeout=WAIT).stdout == "sibling\n"  # its sibling ran on
        assert doomed.kill() is False and executor.kill("doomed") is False  # ended
    finally:
        executor.terminate()


def test_kill_a_queued_job_cancels_it(executor_factory: ExecutorFactory, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    marker = unique_sleep()
    executor = executor_factory(cpus=1)  # one job at a time
    try:
        first = executor.submit(mpmsub.Job(["sleep", marker]).with_id("first"))
        queued = executor.submit(mpmsub.Job(["touch", str(ran)]).with_id("queued"))
        wait_until(lambda: executor.status().running == 1, "the first job did not start")
        assert executor.status().running_jobs == ("first",)
        assert executor.kill("queued", "not needed") is True
        assert queued.cancelled()
        done, _ = concurrent.futures.wait([queued], timeout=WAIT)  # its waiters are woken
        assert done == {queued}
        assert executor.kill(queued) is False
        assert executor.kill("first") is True
        result = first.result(timeout=WAIT)
        assert (result.failure, result.error) == ("killed", "killed on request")
        assert left_running(marker) == []
        executor.shutdown(wait=True)
    finally:
        executor.terminate()
    assert not ran.exists()


def test_kill_a_running_call(executor_factory: ExecutorFactory) -> None:
    executor = executor_factory(cpus=1)
    try:
        future = executor.submit(nap, 60)
        wait_until(lambda: executor.status().running == 1, "the call did not start")
        time.sleep(0.5)  # in the call, not only handed to its worker
        assert future.kill("enough") is True
        with pytest.raises(mpmsub.CallKilledError, match="killed: enough") as info:
            future.result(timeout=WAIT)
        assert isinstance(info.value, mpmsub.CallCancelledError)
        assert future.usage is not None and future.usage.failure == "killed"
        assert executor.submit(nap, 0).result(timeout=WAIT) > 0  # a worker (replaced) runs the next
    finally:
        executor.terminate()


def test_running_says_what_runs_where(executor_factory: ExecutorFactory) -> None:
    marker = unique_sleep()
    executor = executor_factory(cpus=1)
    try:
        busy = f"sleep {marker} & i=0; while [ $i -lt 200000 ]; do i=$((i + 1)); done; wait"
        future = executor.submit(mpmsub.Job(["sh", "-c", busy]).memory("50M").with_id("busy"))
        wait_until(lambda: executor.status().running == 1, "the job did not start")
        time.sleep(0.5)
        (job,) = executor.running()
        assert (job.job_id, job.attempt, job.cpus, job.memory_reserved) == ("busy", 1, 1, 50 * MB)
        assert marker in job.command
        assert 0 < job.runtime < WAIT and abs(job.start_time + job.runtime - time.time()) < 5
        if executor_factory.name.startswith("local"):
            assert job.memory_in_use is not None and job.memory_in_use > 0
            assert job.cpu_time is not None and job.cpu_time > 0.1  # the shell's loop
            assert job.where == os.uname().nodename
        else:
            assert job.memory_in_use is None and job.cpu_time is None
            assert job.where.startswith("SLURM job" if executor_factory.name == "slurm" else "tcp://"), job.where
        assert executor.kill(future) is True
        assert left_running(marker) == []
        assert future.result(timeout=WAIT).failure == "killed"
        assert executor.running() == []
    finally:
        executor.terminate()
