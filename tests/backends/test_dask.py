"""The Dask backend on a real LocalCluster of two worker processes with declared resources."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import psutil
import pytest
from support import callees, remote_batch
from support.backend_fixtures import DASK_WORKER_MEMORY, local_dask_cluster
from support.helpers import unique_sleep, wait_gone

import mpmsub

distributed = pytest.importorskip(
    "distributed", reason="the Dask backend's tests need distributed: pip install 'mpmsub[dask]'"
)

MB = 2**20
WORKER_MEMORY = DASK_WORKER_MEMORY  # each worker's declared memory: three 100M jobs at a time


@pytest.fixture(scope="module")
def client(dask_client: Any) -> Any:
    return dask_client


@pytest.fixture
def backend(client: Any) -> mpmsub.DaskBackend:
    return mpmsub.DaskBackend(client)


def worker_pids(client: Any) -> List[int]:
    return sorted(client.run(os.getpid).values())


def test_the_budget_is_the_sum_of_the_workers_resources(backend: mpmsub.DaskBackend) -> None:
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        assert executor.cpus == 8
        assert executor.memory == 2 * WORKER_MEMORY
        assert "DaskBackend" in repr(executor)


def test_results_read_as_local_ones(backend: mpmsub.DaskBackend) -> None:
    local = remote_batch.run("local")
    on_dask = remote_batch.run(backend)
    assert on_dask == local
    assert local["call"][-1] == 49 and local["raises"][-1][0] == "ValueError"
    assert local["raises"][-1][2] == "RemoteTraceback"  # the worker's traceback came along


def test_jobs_run_on_the_workers_and_are_measured(backend: mpmsub.DaskBackend, client: Any, tmp_path: Path) -> None:
    code = "import os, time; x = bytearray(80 * 2**20); time.sleep(0.3); print(os.getppid())"
    trace = tmp_path / "trace.jsonl"
    with mpmsub.MemoryAwareExecutor(backend=backend, trace=trace) as executor:
        result = executor.submit(mpmsub.Job([sys.executable, "-c", code]).memory("150M")).result()
        value = executor.submit(callees.allocate, 120)
        zygote = psutil.Process(value.result()).parent()  # forked from the zygote of a Dask worker's executor
        assert (zygote.ppid() if "--zygote" in zygote.cmdline() else zygote.pid) in worker_pids(client)
    assert result.success, result.error
    assert int(result.stdout) in worker_pids(client)  # started by a Dask worker's executor
    assert 80 <= result.memory_used < 110
    assert result.cpu_used > 0 and result.runtime >= 0.3
    assert value.usage is not None and 120 <= value.usage.memory_used < 180  # the call's own peak
    # The trace has the runs, measured on the workers, and no samples (nothing runs here).
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert "DaskBackend" in events[0]["backend"] and not [e for e in events if e["type"] == "sample"]
    ends = [e for e in events if e["type"] == "end"]
    assert sorted(e["peak"] for e in ends) == sorted(int(r.memory_used * 2**20) for r in (result, value.usage))


def test_each_worker_holds_only_what_it_declared(backend: mpmsub.DaskBackend, client: Any) -> None:
    """Twelve 100M jobs on two workers of 300M (and 4 CPUs) each: never more than three at once
    on one worker, six in all, and both workers used."""
    code = "import os, time; print(os.getppid(), time.time()); time.sleep(0.6); print(time.time())"
    job = mpmsub.Job([sys.executable, "-c", code]).memory("100M")
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        results = [f.result() for f in [executor.submit(job) for _ in range(12)]]
    spans: List[Tuple[int, float, float]] = []
    for result in results:
        assert result.success, result.error
        first, second = result.stdout.split("\n")[:2]
        pid, start = first.split()
        spans.append((int(pid), float(start), float(second)))
    assert {pid for pid, _, _ in spans} == set(worker_pids(client))
    for pid in {pid for pid, _, _ in spans}:
        mine = [(start, end) for p, start, end in spans if p == pid]
        most = max(sum(1 for s, e in mine if s <= start < e) for start, _ in mine)
        assert most <= 3, f"worker {pid} ran {most} jobs of 100M at once in 300M"
    assert max(sum(1 for _, s, e in spans if s <= start < e) for _, start, _ in spans) <= 6


def test_a_job_no_worker_can_hold_is_refused_at_once(backend: mpmsub.DaskBackend) -> None:
    with mpmsub.MemoryAwareExecutor(cpus=8, memory="2G", backend=backend) as executor:
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"needs 1 CPU and 400M on one Dask worker.*offers 4 CPUs and 300M"):
            executor.submit(mpmsub.Job(["true"]).memory("400M"))  # fits the sum (600M), not one worker
        with pytest.raises(ValueError, match=r"needs 5 CPUs on one Dask worker"):
            executor.submit(mpmsub.Job(["true"]).cpu(5))
        assert time.monotonic() - started < 5
    cluster = mpmsub.cluster(backend=backend, progress_bar=False, verbose=False)
    with pytest.raises(ValueError, match="400M"):
        cluster.jobs.append({"cmd": ["true"], "m": "400M"})


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # distributed's sockets
def test_workers_without_resources_are_refused(dask_cluster: Any) -> None:
    bare = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", worker_dashboard_address=":0"
    )
    client = distributed.Client(bare, set_as_default=False)
    try:
        with pytest.raises(ValueError, match=r"declares 'cpus' and 'memory'.*--resources"):
            mpmsub.MemoryAwareExecutor(backend=mpmsub.DaskBackend(client))
    finally:
        client.close()
        bare.close()


@pytest.fixture
def empty_cluster() -> Iterator[Any]:
    """A cluster with no worker yet, as an adaptive one starts: scale() adds workers of 4 CPUs."""
    yield from local_dask_cluster(4, WORKER_MEMORY, n_workers=0)


def test_given_its_size_an_executor_waits_for_workers_and_caps_those_that_join(
    empty_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An adaptive cluster (dask-jobqueue, cluster.adapt()) may have no worker yet: given cpus
    and memory, the executor starts, its jobs wait for workers and it says so; the given size
    is the cap when a larger worker joins (one job at a time on one CPU, on a 4-CPU worker)."""
    code = "import time; print(time.time()); time.sleep(0.3); print(time.time())"
    with distributed.Client(empty_cluster, set_as_default=False) as client:
        backend = mpmsub.DaskBackend(client)
        with pytest.raises(ValueError, match=r"no worker is connected .* give it cpus= and memory="):
            mpmsub.MemoryAwareExecutor(backend=backend)  # nothing to size it by
        with mpmsub.MemoryAwareExecutor(cpus=1, memory="200M", backend=backend, history=False) as executor:
            with caplog.at_level(logging.WARNING, logger="mpmsub"):
                futures = [executor.submit([sys.executable, "-c", code]) for _ in range(3)]
                assert remote_batch.wait_for(lambda: "wait for one to join" in caplog.text)
            assert [job.where for job in executor.running()] == ["waiting for a Dask worker (none is connected)"]
            empty_cluster.scale(1)
            results = [future.result(timeout=60) for future in futures]
    assert all(result.success for result in results), [result.error for result in results]
    spans = sorted(tuple(map(float, result.stdout.split())) for result in results)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans  # one at a time


@contextlib.contextmanager
def worker_processes(client: Any, *resources: str) -> Iterator[Dict[str, int]]:
    """`dask worker` processes without a nanny (a killed one stays dead), one per resources
    string ("cpus=2,memory=1e8": as many threads as CPUs), connected to the client's scheduler:
    their pids by address."""
    address = client.scheduler.address
    bindir = Path(sys.executable).parent
    before = set(client.scheduler_info(n_workers=-1)["workers"])
    threads = lambda each: dict(part.split("=") for part in each.split(","))["cpus"]  # noqa: E731
    daemons = [
        subprocess.Popen(
            [str(bindir / "dask"), "worker", address, "--no-nanny", "--nthreads", threads(each), "--resources", each],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for each in resources
    ]
    try:
        client.wait_for_workers(len(before) + len(daemons), timeout=60)
        pids = client.run(os.getpid)
        yield {worker: pid for worker, pid in pids.items() if worker not in before}
    finally:
        for daemon in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def test_a_bad_worker_grace_is_refused_at_once() -> None:
    for bad in (-1, True, "30", float("nan")):
        with pytest.raises(ValueError, match=rf"invalid worker_grace {bad!r}: expected a number of seconds from 0"):
            mpmsub.DaskBackend("tcp://h:1", worker_grace=bad)


@contextlib.contextmanager
def small_and_big_worker(cluster: Any, grace: float) -> Iterator[Tuple[Any, mpmsub.MemoryAwareExecutor, int]]:
    """A worker of 100M and one of 300M (1 CPU each) on `cluster`, and an executor of 2 CPUs and
    400M with that worker_grace: the client, the executor and the big worker's pid."""
    with distributed.Client(cluster, set_as_default=False) as client:  # noqa: SIM117 (3.9)
        with worker_processes(client, f"cpus=1,memory={100 * MB}", f"cpus=1,memory={300 * MB}") as pids:
            workers = client.scheduler_info(n_workers=-1)["workers"]
            (big,) = [pid for worker, pid in pids.items() if workers[worker]["resources"]["memory"] == 300 * MB]
            backend = mpmsub.DaskBackend(client, worker_grace=grace)
            with mpmsub.MemoryAwareExecutor(cpus=2, memory="400M", backend=backend, history=False) as executor:
                yield client, executor, big


def test_a_job_no_connected_worker_can_hold_fails_after_the_grace(empty_cluster: Any) -> None:
    """A 200M job whose only worker of 300M died, next to a worker of 100M: it fails once no
    worker that can hold it has come back within the grace, naming its size and the worker's."""
    marker = unique_sleep()
    with small_and_big_worker(empty_cluster, 1) as (_, executor, big):
        future = executor.submit(mpmsub.Job(["sleep", marker]).memory("200M").with_retries(1))
        assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 1)
        os.kill(big, signal.SIGKILL)
        result = future.result(timeout=60)
    # Its retry, handed to Dask after the workers were last looked at, failed alike.
    assert (result.failure, result.attempts) == ("error", 2)
    assert result.error is not None and result.error.startswith(
        "no connected Dask worker can hold it any more, and none that can joined within 1 s (DaskBackend's "
        "worker_grace): it needs 1 CPU and 200M on one Dask worker; the largest Dask worker: tcp://"
    )
    assert result.error.endswith("offers 1 CPU and 100M")
    assert wait_gone(marker) == []


def test_a_worker_that_joins_within_the_grace_takes_the_jobs_a_dead_one_held(empty_cluster: Any) -> None:
    """The same with a worker of 300M back in time: the job that waited for the dead worker's
    resources runs on it (the one that ran there is one failed run, as a worker's death is)."""
    marker = unique_sleep()
    with small_and_big_worker(empty_cluster, 60) as (client, executor, big):
        running = executor.submit(mpmsub.Job(["sleep", marker]).memory("200M"))
        waiting = executor.submit(mpmsub.Job(["echo", "ran"]).memory("200M"))
        assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 1)
        os.kill(big, signal.SIGKILL)
        assert wait_gone(marker, timeout=30) == []
        with worker_processes(client, f"cpus=1,memory={300 * MB}"):
            result = waiting.result(timeout=60)
            assert running.result(timeout=60).failure == "error"
    assert result.success and result.stdout == "ran\n", result.error
    assert "died while it ran" in (running.result().error or "")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def scheduler_process(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A `dask scheduler` process listening on `port` (killed with SIGKILL at the end)."""
    dask = Path(sys.executable).parent / "dask"
    scheduler = subprocess.Popen(
        [str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_port(port)
        yield scheduler
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(scheduler.pid, signal.SIGKILL)
        scheduler.wait()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # distributed's sockets
def test_a_lost_scheduler_is_an_error_that_kills_the_jobs_and_retries_decide_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The scheduler killed and started again: each job's run is an error naming the scheduler
    (not a cancel), its tree dies with its worker (which closes), and a retry runs through the
    reconnected client on a worker of the new scheduler. Nothing is logged as an error."""
    marker, port = unique_sleep(), _free_port()
    runs = tmp_path / "runs"
    # The first run sleeps (until killed); a retry ends at once.
    again = f"echo run >> {runs}; if [ $(wc -l < {runs}) -le 2 ]; then sleep {marker}; fi"
    resources = f"cpus=2,memory={200 * MB}"
    with scheduler_process(port) as scheduler:
        client = distributed.Client(f"tcp://127.0.0.1:{port}", timeout=30, set_as_default=False)
        executor = mpmsub.MemoryAwareExecutor(cpus=2, memory="200M", backend=mpmsub.DaskBackend(client), history=False)
        try:
            with worker_processes(client, resources):
                once = executor.submit(["sh", "-c", again])
                retried = executor.submit(mpmsub.Job(["sh", "-c", again]).with_retries(1))
                assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 2)
                os.killpg(scheduler.pid, signal.SIGKILL)
                assert wait_gone(marker, timeout=30) == []  # the workers closed, and killed their jobs
                result = once.result(timeout=60)
                assert (result.failure, result.attempts) == ("error", 1)
                assert result.error == f"the connection to its Dask scheduler at tcp://127.0.0.1:{port} was lost"
            with scheduler_process(port), worker_processes(client, resources):
                result = retried.result(timeout=60)
            assert (result.success, result.attempts) == (True, 2), result.error
        finally:
            executor.terminate()
            client.close()
    assert not [record for record in caplog.records if record.name == "mpmsub" and record.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err


def test_killing_a_running_job_kills_its_tree_on_the_worker(backend: mpmsub.DaskBackend) -> None:
    """Dask's own cancel leaves a task's subprocess running: mpmsub's kill reaches the tree."""
    marker = unique_sleep()
    executor = mpmsub.MemoryAwareExecutor(cpus=1, backend=backend)  # one job at a time
    future = executor.submit(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"])
    queued = executor.submit(["sleep", marker])
    assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 2)
    executor.terminate("stopped by the test")
    result = future.result()
    assert result.failure == "cancelled" and result.error == "killed: stopped by the test"
    assert queued.cancelled()
    assert wait_gone(marker) == []


def test_a_kill_before_the_task_starts_ends_it_when_it_does(client: Any) -> None:
    """A kill that reaches the workers before Dask starts the task is kept and ends it."""
    from mpmsub._backends import node as _node
    from mpmsub._backends import remote as _remote
    from mpmsub._job import to_spec

    key = f"mpmsub-test-{unique_sleep()}"
    client.run(_node.kill_on_worker, [(key, "cancelled", "killed: early", None)])
    data = _remote.pack(to_spec(["sleep", "30"]), strict=False, shared=False)  # as DaskLauncher does
    started = time.monotonic()
    sent = client.submit(_node.run_on_worker, data, key, key=key, resources={"cpus": 1}, pure=False).result()
    outcome = __import__("pickle").loads(sent).received()
    assert (outcome.failure, outcome.error) == ("cancelled", "killed: early")
    assert time.monotonic() - started < 10


def test_a_job_killed_while_it_waits_in_dask_never_runs(backend: mpmsub.DaskBackend, tmp_path: Path) -> None:
    """The executor hands Dask more jobs than the workers hold (its lookahead): one killed while
    Dask holds it ends killed without running, and the running ones are killed on their worker."""
    marker = unique_sleep()
    ran = tmp_path / "ran"
    executor = mpmsub.MemoryAwareExecutor(backend=backend)  # the whole cluster: jobs are handed ahead
    try:
        running = [executor.submit(mpmsub.Job(["sleep", marker]).cpu(4)) for _ in range(2)]  # both workers
        waiting = executor.submit(mpmsub.Job(["sh", "-c", f"touch {ran}; sleep {marker}"]).cpu(4).with_id("w"))
        assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 2)
        assert executor.status().running == 3  # handed to Dask, which holds the third
        assert sorted(job.job_id for job in executor.running())[-1] == "w"  # running, for the executor
        assert waiting.kill("not this one") is True
        result = waiting.result(timeout=60)
        assert (result.failure, result.error) == ("killed", "killed: not this one")
        assert not ran.exists() and result.returncode is None
        for future in running:
            assert future.kill() is True
            assert future.result(timeout=60).failure == "killed"
        assert wait_gone(marker) == []
    finally:
        executor.terminate()


def test_a_job_cancelled_while_it_waits_in_dask_never_runs(backend: mpmsub.DaskBackend, tmp_path: Path) -> None:
    """cancel() as locally for a queued job: a job handed to Dask that no worker has begun is
    cancelled (its future is pending until a worker begins it), and never runs."""
    marker = unique_sleep()
    ran = tmp_path / "ran"
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:  # jobs are handed ahead
        running = [executor.submit(mpmsub.Job(["sleep", marker]).cpu(4)) for _ in range(2)]  # both workers
        waiting = executor.submit(mpmsub.Job(["touch", str(ran)]).cpu(4))
        assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 2)
        assert remote_batch.wait_for(lambda: all(future.running() for future in running))
        assert executor.status().running == 3 and not waiting.running()  # handed to Dask, not begun
        assert waiting.cancel() is True
        assert concurrent.futures.wait([waiting], timeout=10).done == {waiting}  # woken at once
        for future in running:
            assert future.cancel() is False  # begun: kill() stops it
            assert future.kill() is True
    assert waiting.cancelled() and waiting.usage is None and not ran.exists()
    assert [future.result().failure for future in running] == ["killed", "killed"]
    assert wait_gone(marker) == []


DRIVER = """
import sys, time
import mpmsub
executor = mpmsub.MemoryAwareExecutor(backend=mpmsub.DaskBackend(sys.argv[1]), history=False)
marker = sys.argv[2]
futures = [executor.submit(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"]) for _ in range(int(sys.argv[3]))]
print("submitted", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_driver_leaves_no_job_running_on_the_workers(
    dask_cluster: Any, backend: mpmsub.DaskBackend, tmp_path: Path, how: signal.Signals
) -> None:
    """The scheduler takes back a dead client's tasks; each worker then kills their jobs' trees,
    and their resources are free for the next driver's jobs."""
    marker = unique_sleep()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    jobs = 8  # every CPU the two workers declare
    driver = subprocess.Popen([sys.executable, str(script), dask_cluster.scheduler_address, marker, str(jobs)])
    try:
        sleeps = lambda: sum(1 for p in wait_gone(marker, 0) if p.name() == "sleep")  # noqa: E731
        assert remote_batch.wait_for(lambda: sleeps() == 2 * jobs), "the jobs did not start"
        driver.send_signal(how)
        driver.wait(timeout=30)
        assert wait_gone(marker, timeout=30) == []
    finally:
        driver.kill()
        driver.wait()
    with mpmsub.MemoryAwareExecutor(backend=backend, history=False) as executor:  # the next driver
        started = time.monotonic()
        results = [f.result(timeout=30) for f in [executor.submit(["true"]) for _ in range(jobs)]]
        assert all(r.success for r in results) and time.monotonic() - started < 10


@pytest.fixture
def own_cluster() -> Iterator[Any]:
    """Two worker processes of 2 CPUs, of a cluster of the test's own (the test kills one)."""
    yield from local_dask_cluster(2, WORKER_MEMORY)


def _worker_running(marker: str) -> psutil.Process:
    """The Dask worker process whose job's shell is named MARKER (the shell is its child)."""
    (shell,) = wait_gone(marker, 0)
    assert shell.parent() is not None
    return shell.parent()  # type: ignore[return-value]


@pytest.mark.parametrize("retries", [0, 1])
def test_a_worker_that_dies_under_a_job_is_one_failed_run_that_retries_decide_on(
    own_cluster: Any, tmp_path: Path, retries: int
) -> None:
    """Dask runs a task again when its worker dies; mpmsub stops that run and counts a failed
    one: with no retries the job fails, naming the dead worker; with one, it runs once more."""
    marker = unique_sleep()
    runs, go = tmp_path / "runs", tmp_path / "go"
    # Every run waits for `go`, which the test makes only once mpmsub's retry runs alone. (Dask's
    # own rerun may be stopped before its shell writes a line, or just after: one or two lines.)
    script = f"echo run >> {runs}; while [ ! -e {go} ]; do sleep 0.1; done"
    with distributed.Client(own_cluster, set_as_default=False) as client:  # noqa: SIM117 (3.9)
        with mpmsub.MemoryAwareExecutor(backend=mpmsub.DaskBackend(client), history=False) as executor:
            future = executor.submit(mpmsub.Job(["sh", "-c", script, marker]).with_retries(retries))
            assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 1)
            _worker_running(marker).kill()  # its nanny starts another; Dask runs the task again
            if retries:
                retrying = lambda: [job.attempt for job in executor.running()] == [2]  # noqa: E731
                assert remote_batch.wait_for(lambda: retrying() and len(wait_gone(marker, 0)) == 1)
                go.touch()
            result = future.result(timeout=60)
    assert wait_gone(marker) == []
    if retries:
        assert (result.success, result.attempts) == (True, 2), result.error
    else:
        assert (result.failure, result.attempts) == ("error", 1)
        assert "its Dask worker tcp://" in (result.error or "") and "died while it ran" in (result.error or "")
    # The run the worker died under, perhaps Dask's own rerun (stopped), and a retry where allowed.
    assert 1 + retries <= runs.read_text().count("run") <= 2 + retries


def test_a_command_without_cwd_runs_in_the_submitting_directory(
    backend: mpmsub.DaskBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As locally and under SLURM (the README's own example gzips a file of the directory it runs
    in); a directory the worker's machine lacks is a start failure that says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "numbers.txt").write_text("1\n2\n")
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        result = executor.submit(["sh", "-c", "gzip -k numbers.txt && pwd"]).result(timeout=60)
        assert result.success, result.error
        assert result.stdout == f"{tmp_path}\n" and (tmp_path / "numbers.txt.gz").exists()
        gone = tmp_path / "gone"
        gone.mkdir()
        monkeypatch.chdir(gone)
        gone.rmdir()  # this process's directory, which no machine has any more
        result = executor.submit(["true"]).result(timeout=60)
    assert (result.failure, result.error) == (
        "start",
        "this process's working directory is gone (No such file or directory): give the job a cwd",
    )


def test_a_submitting_directory_the_worker_lacks_is_a_start_failure_that_says_so(backend: mpmsub.DaskBackend) -> None:
    """(A worker on another machine without the directory: its runner's answer, as it reads.)"""
    from mpmsub._backends.dask import DaskHandle
    from mpmsub._backends.remote import Returned
    from mpmsub._job import to_spec
    from mpmsub._launch.base import not_started

    spec = to_spec(["true"])
    handle = DaskHandle(None, spec, "j", lambda outcome: None, "mpmsub-j-0")  # type: ignore[arg-type]
    answer = Returned(not_started(spec, "start", "working directory not found: '/home/me/run'"))
    outcome = handle._outcome("finished", __import__("pickle").dumps(answer))
    assert outcome.failure == "start"
    assert outcome.error == (
        "working directory not found: '/home/me/run' on its Dask worker: a job without a cwd runs in the "
        "submitting process's directory, which the worker's machine must have (or give the job a cwd)"
    )


def test_memory_is_enforced_on_the_worker(backend: mpmsub.DaskBackend) -> None:
    with mpmsub.MemoryAwareExecutor(backend=backend, strict_memory=True) as executor:
        future = executor.submit(mpmsub.Call(callees.allocate, 200, 2.0).memory("50M"))
        with pytest.raises(mpmsub.MemoryLimitError, match="of the 50M it declared"):
            future.result()


def test_the_cluster_api_and_retries_run_on_dask(backend: mpmsub.DaskBackend) -> None:
    cluster = mpmsub.cluster(backend=backend, progress_bar=False, verbose=False)
    assert cluster.max_cpus == 8
    cluster.jobs.append({"cmd": ["echo", "one"], "m": "10M"})
    cluster.jobs.append(mpmsub.Job(["sh", "-c", "exit 2"]).with_retries(1))
    stats = cluster.run()
    assert stats["jobs"]["total"] == 2 and stats["jobs"]["completed"] == 1
    assert cluster.failed_jobs[0].attempts == 2  # retried by the sending executor


def test_mpmsub_backend_moves_an_unchanged_script(dask_cluster: Any, client: Any, tmp_path: Any) -> None:
    script = tmp_path / "unchanged.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            import mpmsub

            if __name__ == "__main__":
                with mpmsub.MemoryAwareExecutor() as ex:
                    print(ex.submit([sys.executable, "-c", "import os; print(os.getppid())"]).result().stdout.strip())
                    print(repr(ex))
            """
        )
    )
    address = dask_cluster.scheduler_address.replace("tcp://", "dask://")
    env = dict(os.environ, MPMSUB_BACKEND=address)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pid, description = done.stdout.splitlines()
    assert int(pid) in worker_pids(client)
    assert "DaskBackend" in description
    assert psutil.pid_exists(int(pid))  # the worker lives on; the script closed its own client


def test_calls_take_the_modules_beside_the_script_along(dask_cluster: Any, tmp_path: Path) -> None:
    """A function of a module beside the script (and what it imports from there) runs on workers
    that cannot import it; a module from elsewhere fails saying how to send it."""
    (tmp_path / "mylib.py").write_text("import helpers\n\ndef f(x):\n    return helpers.g(x) + 1\n")
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("def g(x):\n    return 10 * x\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "other.py").write_text("def h(x):\n    return x\n")
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import mpmsub
            from mylib import f

            sys.path.append(sys.path[0] + "/elsewhere")
            from other import h

            if __name__ == "__main__":
                with mpmsub.MemoryAwareExecutor(history=False) as ex:
                    print(ex.submit(f, 2).result())
                    print(ex.submit(h, 1).exception())
            """
        )
    )
    env = dict(os.environ, MPMSUB_BACKEND=dask_cluster.scheduler_address.replace("tcp://", "dask://"))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    value, error = done.stdout.splitlines()
    assert value == "21"
    assert "No module named 'other' on its Dask worker: install the module on the workers, or send it with " in error
    assert "client.upload_file(PATH)" in error


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _documented(prefix: str, port: int) -> List[str]:
    """The docs' console line starting with `prefix`, for a cluster on this machine."""
    page = (Path(__file__).parent.parent.parent / "docs" / "backends.md").read_text()
    line = next(line[2:] for line in page.splitlines() if line.startswith(f"$ {prefix}"))
    line = line.split("  #")[0].replace("HEAD", "127.0.0.1").replace("8786", str(port))
    line = line.replace("--nthreads 16", "--nthreads 2").replace("cpus=16,memory=64e9", "cpus=2,memory=2e9")
    return shlex.split(line)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # distributed's sockets
def test_the_documented_commands_make_a_cluster_mpmsub_uses(tmp_path: Path) -> None:
    """docs/backends.md's commands, run as written (on this machine, on a free port)."""
    port = _free_port()
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    daemons = []
    try:
        for command in ("dask scheduler", "dask worker"):
            daemons.append(
                subprocess.Popen(
                    _documented(command, port),
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=tmp_path,
                    start_new_session=True,
                )
            )
            # The worker and the client start once the scheduler listens (connecting earlier,
            # they would retry with a back-off).
            _wait_for_port(port)
        with distributed.Client(f"tcp://127.0.0.1:{port}", timeout=60, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
            pids = worker_pids(client)
        script = tmp_path / "my_pipeline.py"
        script.write_text(
            "import mpmsub, sys\n"
            "with mpmsub.MemoryAwareExecutor() as ex:\n"
            "    print(ex.submit([sys.executable, '-c', 'import os; print(os.getppid())']).result().stdout.strip())\n"
        )
        words = _documented("MPMSUB_BACKEND=dask", port)
        variable, value = words[0].split("=", 1)
        done = subprocess.run(
            words[1:], env=dict(env, **{variable: value}), cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) in pids
        (tmp_path / "jobs.txt").write_text("echo one\necho two\n")
        done = subprocess.run(
            [*_documented("mpmsub run jobs.txt --backend dask", port), "-q"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    finally:
        # Killed with their process groups (a worker's nanny and its worker process): on SIGTERM
        # the nanny takes 8 s to close.
        for daemon in reversed(daemons):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
