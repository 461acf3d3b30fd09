"""The SLURM backend on a real single-node SLURM (started here if SLURM is installed and none is
configured; `.ci/run` installs it)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import pickle
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
from support import callees, remote_batch
from support.fake_nvidia_smi import fake_gpus_on_path
from support.helpers import alloc_cmd, unique_sleep, wait_gone

import mpmsub
from mpmsub._backends import remote as _remote
from mpmsub._backends import slurm as _slurm
from mpmsub._backends.base import Node
from mpmsub._job import to_spec
from mpmsub._launch.base import not_started

KEY = b"k" * _remote.KEY_BYTES  # a launcher's secret key, for tests that drive the runner or a handle


@pytest.fixture
def backend(slurm: None, tmp_path: Path) -> mpmsub.SlurmBackend:
    return mpmsub.SlurmBackend(workdir=str(tmp_path / "work"), max_poll=1.0)


def test_the_budget_is_what_sinfo_lists(backend: mpmsub.SlurmBackend) -> None:
    nodes = backend.nodes()
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        assert executor.cpus == sum(node.cpus for node in nodes)
        assert executor.memory == sum(node.memory for node in nodes)


def test_results_read_as_local_ones(backend: mpmsub.SlurmBackend) -> None:
    local = remote_batch.run("local")
    on_slurm = remote_batch.run(backend)
    assert on_slurm == local
    assert os.listdir(backend.workdir) == []  # every job's files read and removed


def _submit_at_once(executor: mpmsub.MemoryAwareExecutor, jobs: Sequence[mpmsub.Job]) -> List[Any]:
    """Submit `jobs` in one dispatch round, as a program's burst of submits usually is: the
    executor's loop is held until all are in."""
    held = threading.Event()
    executor._loop.call_soon_threadsafe(held.wait, 10)
    try:
        return [executor.submit(job) for job in jobs]
    finally:
        held.set()


def test_one_squeue_call_per_poll_for_all_jobs(backend: mpmsub.SlurmBackend) -> None:
    started = time.monotonic()
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = _submit_at_once(executor, [mpmsub.Job(["true"]).memory("20M") for _ in range(12)])
        assert all(f.result().success for f in futures)
    elapsed = time.monotonic() - started
    assert backend.calls["sbatch"] == 1  # one array
    # Polls come at most every 0.25 s, whatever the number of jobs (never one call per job).
    assert backend.calls["squeue"] <= elapsed / 0.25 + 2
    assert backend.calls["sinfo"] == 1


def test_jobs_alike_go_out_as_one_job_array_each(backend: mpmsub.SlurmBackend) -> None:
    """Jobs of one shape (resources) are one `sbatch --array`; each element runs its own job."""
    small = [mpmsub.Job(["sh", "-c", f"echo small {i}"]).memory("20M") for i in range(12)]
    large = [mpmsub.Job(["sh", "-c", f"echo large {i}"]).memory("30M").cpu(2) for i in range(3)]
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = _submit_at_once(executor, small + large)
        results = [future.result(timeout=60) for future in futures]
    assert [result.stdout for result in results] == [f"small {i}\n" for i in range(12)] + [
        f"large {i}\n" for i in range(3)
    ]
    assert backend.calls["sbatch"] == 2
    assert backend.calls["scontrol"] == 1  # MaxArraySize, asked once
    assert os.listdir(backend.workdir) == []


SBATCH_OVER_LIMIT = """#!/bin/sh
# The site's submit limit the first time (as sbatch says it), then the real sbatch.
if [ ! -e "{seen}" ]; then
    touch "{seen}"
    echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2
    echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, \\
user's size and/or time limits)" >&2
    exit 1
fi
exec {sbatch} "$@"
"""


def test_jobs_refused_for_the_sites_submit_limit_are_submitted_again_later(
    backend: mpmsub.SlurmBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal for MaxSubmitJobs is not the jobs' failure: they wait, and go out again."""
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(SBATCH_OVER_LIMIT.format(seen=tmp_path / "seen", sbatch=shutil.which("sbatch")))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = _submit_at_once(executor, [mpmsub.Job(["echo", str(i)]) for i in range(3)])
        assert [future.result(timeout=60).stdout for future in futures] == [f"{i}\n" for i in range(3)]
    assert backend.calls["sbatch"] == 2  # refused, then one array


def test_an_array_larger_than_maxarraysize_is_split(backend: mpmsub.SlurmBackend) -> None:
    assert backend.max_array_size() == 1001  # SLURM's default, read from scontrol show config
    backend._max_array = 2
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = _submit_at_once(executor, [mpmsub.Job(["echo", str(i)]) for i in range(5)])
        assert [future.result(timeout=60).stdout for future in futures] == [f"{i}\n" for i in range(5)]
    assert backend.calls["sbatch"] == 3  # 2 + 2 + 1
    assert backend.calls["scontrol"] == 1


def test_an_element_of_an_array_is_killed_alone_running_or_pending(
    backend: mpmsub.SlurmBackend, tmp_path: Path
) -> None:
    """scancel of one element (123_4): the running one and the pending one end killed, the
    pending one at once and without running; their siblings run to the end."""
    marker, ran = unique_sleep(), tmp_path / "ran"
    half = sum(node.cpus for node in backend.nodes()) // 2  # two elements run, two pend
    commands = [f"sleep {marker}", "sleep 3; echo one", f"touch {ran}; sleep {marker}", "echo three"]
    jobs = [mpmsub.Job(["sh", "-c", command]).cpu(half).with_id(f"e{i}") for i, command in enumerate(commands)]
    executor = mpmsub.MemoryAwareExecutor(backend=backend)
    try:
        running, one, pending, three = _submit_at_once(executor, jobs)
        assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 1)

        def places() -> Dict[str, str]:
            return {job.job_id: job.where for job in executor.running()}

        assert remote_batch.wait_for(lambda: places()["e0"].endswith("(RUNNING)")), places()
        assert re.fullmatch(r"SLURM job \d+_0 \(RUNNING\)", places()["e0"]), places()
        assert re.fullmatch(r"SLURM job \d+_2 \(PENDING\)", places()["e2"]), places()
        started = time.monotonic()
        assert pending.kill("not needed") is True
        result = pending.result(timeout=60)
        assert (result.failure, result.error, result.runtime) == ("killed", "killed: not needed", 0.0)
        assert time.monotonic() - started < 5
        assert running.kill() is True and running.result(timeout=60).failure == "killed"
        assert wait_gone(marker) == []
        assert (one.result(timeout=60).stdout, three.result(timeout=60).stdout) == ("one\n", "three\n")
        assert not ran.exists()
    finally:
        executor.terminate()
    assert (backend.calls["sbatch"], backend.calls["scancel"]) == (1, 2)


def test_an_element_of_an_array_times_out_alone(backend: mpmsub.SlurmBackend) -> None:
    marker = unique_sleep()
    jobs = [mpmsub.Job(["sleep", marker]).with_timeout(1)] + [
        mpmsub.Job(["echo", str(i)]).with_timeout(1) for i in range(2)
    ]
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = _submit_at_once(executor, jobs)
        results = [future.result(timeout=60) for future in futures]
    assert results[0].failure == "timeout", results[0].error
    assert [result.stdout for result in results[1:]] == ["0\n", "1\n"]
    assert backend.calls["sbatch"] == 1
    assert wait_gone(marker) == []


def test_a_job_no_node_can_hold_is_refused_at_submit(backend: mpmsub.SlurmBackend) -> None:
    node = max(backend.nodes(), key=lambda n: n.memory)
    with mpmsub.MemoryAwareExecutor(cpus=64, memory="1T", backend=backend) as executor:
        with pytest.raises(ValueError, match=r"needs 1 CPU and .* on one SLURM node.*localhost offers"):
            executor.submit(mpmsub.Job(["true"]).memory(node.memory // 2**20 + 1))
        with pytest.raises(ValueError, match=r"needs 64 CPUs on one SLURM node"):
            executor.submit(mpmsub.Job(["true"]).cpu(64))
    assert backend.calls["sbatch"] == 0


def test_terminate_kills_the_job_tree_on_the_node(backend: mpmsub.SlurmBackend) -> None:
    marker = unique_sleep()
    executor = mpmsub.MemoryAwareExecutor(backend=backend)
    future = executor.submit(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"])
    assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 2)
    executor.terminate("stopped by the test")
    result = future.result()
    assert result.failure == "cancelled" and result.error == "killed: stopped by the test"
    assert wait_gone(marker) == []
    assert backend.calls["scancel"] == 1
    assert os.listdir(backend.workdir) == []  # the killed job's files went with its run directory


def test_a_job_killed_while_pending_in_slurm_ends_at_once(backend: mpmsub.SlurmBackend, tmp_path: Path) -> None:
    """A job SLURM holds pending (the executor hands it jobs ahead) is scancelled and ends
    killed as soon as SLURM says so: it has no result file to wait for."""
    marker = unique_sleep()
    ran = tmp_path / "ran"
    whole = sum(node.cpus for node in backend.nodes())
    executor = mpmsub.MemoryAwareExecutor(backend=backend)
    try:
        first = executor.submit(mpmsub.Job(["sleep", marker]).cpu(whole))
        pending = executor.submit(mpmsub.Job(["sh", "-c", f"touch {ran}; sleep {marker}"]).cpu(whole))
        assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 1)
        assert remote_batch.wait_for(lambda: "PENDING" in " ".join(j.where for j in executor.running()))
        started = time.monotonic()
        assert pending.kill("not needed") is True
        result = pending.result(timeout=60)
        assert (result.failure, result.error, result.runtime) == ("killed", "killed: not needed", 0.0)
        assert time.monotonic() - started < 5  # not the 10 s a running job's result may take
        assert not ran.exists()
        assert first.kill() is True and first.result(timeout=60).failure == "killed"
        assert wait_gone(marker) == []
    finally:
        executor.terminate()
    assert backend.calls["scancel"] == 2


def test_terminate_with_jobs_pending_in_slurm_ends_at_once(backend: mpmsub.SlurmBackend) -> None:
    """Ctrl-C or terminate() with jobs SLURM holds pending: they end cancelled at once, without
    waiting for result files that no runner will write."""
    marker = unique_sleep()
    whole = sum(node.cpus for node in backend.nodes())
    executor = mpmsub.MemoryAwareExecutor(backend=backend)
    try:
        running = executor.submit(mpmsub.Job(["sleep", marker]).cpu(whole))
        pending = executor.submit(mpmsub.Job(["sleep", marker]).cpu(whole))
        assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 1)
        assert remote_batch.wait_for(lambda: "PENDING" in " ".join(j.where for j in executor.running()))
        started = time.monotonic()
        executor.terminate("stopped by the test")
        assert time.monotonic() - started < 5  # was 10 s and more: a pending job's result was awaited
    finally:
        executor.terminate()
    assert (pending.result().failure, pending.result().runtime) == ("cancelled", 0.0)
    assert running.result().failure == "cancelled"
    assert wait_gone(marker) == []


def test_slurms_own_memory_kill_is_a_memory_failure(backend: mpmsub.SlurmBackend) -> None:
    """A job without m runs unbounded under mpmsub; SLURM's --mem (given directly) kills it."""
    low = mpmsub.SlurmBackend(workdir=backend.workdir, extra_args=["--mem=100M"], max_poll=1.0)
    with mpmsub.MemoryAwareExecutor(backend=low) as executor:
        result = executor.submit(mpmsub.Job(alloc_cmd(600, hold=10, steps=6, step_delay=0.3))).result()
    assert result.failure == "memory", result.error
    assert result.error.startswith("killed by SLURM for using more than its --mem")


def test_slurm_states_map_to_mpmsubs_failures(tmp_path: Path) -> None:
    """What an ended job without a result reads as, by its SLURM state and output. A memory kill
    keeps the memory SLURM saw it use (the runner died with it and measured nothing)."""
    launcher: Any = object.__new__(_slurm.SlurmLauncher)
    launcher.backend = _Here(tmp_path / "work")  # scontrol knows no job 17: its largest node decides
    handle = _slurm.SlurmHandle(launcher, to_spec(["true"]), "job", lambda outcome: None, str(tmp_path / "j"))
    handle.slurm_id = "17"
    (tmp_path / "j.out").write_text(
        "slurmstepd-n1: error: StepId=17.batch exceeded memory limit (629145600 > 524288000), being killed\n"
        "slurmstepd-n1: error: Exceeded job memory limit\n"
        "slurmstepd-n1: error: *** JOB 17 ON n1 CANCELLED AT 2026-12-05T01:23:15 ***\n"
    )
    killed = handle.outcome("FAILED", time.time())
    assert (killed.failure, killed.peak_memory) == ("memory", 600 * 2**20)
    (tmp_path / "j.out").write_text("")
    timed = handle.outcome("TIMEOUT", time.time())
    assert (timed.failure, timed.error) == ("timeout", "killed by SLURM at its time limit (SLURM job 17)")
    out_of_memory = handle.outcome("OUT_OF_MEMORY", time.time())
    assert (out_of_memory.failure, out_of_memory.peak_memory) == ("memory", 2**30 - _slurm.RUNNER_MEMORY)
    assert handle.outcome("NODE_FAIL", time.time()).error == "SLURM ended SLURM job 17: NODE_FAIL"
    assert handle.outcome("COMPLETED", time.time()) is None  # the result file may yet appear
    # A killed job's result: the kill's failure, unless the job had succeeded before it landed.
    ended: list = []
    handle = _slurm.SlurmHandle(launcher, to_spec(["true"]), "job", ended.append, str(tmp_path / "k"))
    handle.killed = ("timeout", "timed out after 5 s")
    failed = not_started(handle.spec, "exit", "exited with status 1")
    failed.returncodes = [1]
    handle.end(failed)
    assert (ended[0].failure, ended[0].error) == ("timeout", "timed out after 5 s")
    handle = _slurm.SlurmHandle(launcher, to_spec(["true"]), "job", ended.append, str(tmp_path / "s"))
    handle.killed = ("cancelled", "killed: too late")
    succeeded = not_started(handle.spec, "exit", "")
    succeeded.returncodes, succeeded.failure, succeeded.error = [0], None, None
    handle.end(succeeded)
    assert ended[1].failure is None


@pytest.mark.parametrize("array", [False, True])
def test_a_memory_kill_without_output_keeps_the_memory_slurm_granted(
    backend: mpmsub.SlurmBackend, tmp_path: Path, array: bool
) -> None:
    """A kill by SLURM's cgroup (OUT_OF_MEMORY) writes no figure: the job's allocation, from
    scontrol, is what it was killed at; an array's element's too (scontrol show job 123_1).
    (This node kills by JobAcctGather, not cgroups, so the state is given here, for a real job.)"""
    argv = ["sbatch", "--parsable", "--mem=300M", "--output=/dev/null", "--wrap=true"]
    done = backend.command([*argv, "--array=0-1"] if array else argv)
    assert done.returncode == 0, done.stderr
    launcher: Any = object.__new__(_slurm.SlurmLauncher)
    launcher.backend = backend
    handle = _slurm.SlurmHandle(launcher, to_spec(["true"]), "job", lambda outcome: None, str(tmp_path / "j"))
    handle.slurm_id = done.stdout.strip() + ("_1" if array else "")
    outcome = handle.outcome("OUT_OF_MEMORY", time.time())
    assert (outcome.failure, outcome.peak_memory) == ("memory", 300 * 2**20)


def test_a_job_without_m_killed_by_slurm_for_memory_is_retried_with_more(backend: mpmsub.SlurmBackend) -> None:
    """A job without m runs under the partition's default memory (500M a CPU on this node);
    SLURM kills it over that, and its retry asks for what SLURM saw it use, grown (was: 1M, made
    strict, so the retry failed at once)."""
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        job = mpmsub.Job(alloc_cmd(700, hold=2, steps=7, step_delay=0.2)).with_retries(1, memory_growth=1.5)
        result = executor.submit(job).result()
    assert result.success, result.error
    assert result.attempts == 2
    assert result.memory_requested is not None and result.memory_requested > 500 * 1.5  # what it was killed over, grown


def test_a_job_dead_of_slurms_time_limit_signal_reads_as_a_timeout(tmp_path: Path) -> None:
    """At a time limit SLURM sends SIGTERM to every process of the job: the job's own may die of
    it before the runner sees its signal, and the runner's result says "killed by signal
    SIGTERM". With SLURM's TIMEOUT that is SLURM's timeout. (SLURM enforces a limit, of a minute
    at least, up to 30 s late: the signal is sent here, to the real runner; a real limit, tried
    by hand with `scontrol update JobId=N EndTime=now`, ended the same way.)"""
    marker = unique_sleep()
    (tmp_path / "j.spec").write_bytes(KEY + _remote.pack(to_spec(["sleep", marker]), strict=False, shared=True))
    runner = subprocess.Popen(
        [sys.executable, "-m", "mpmsub", "_run-job", str(tmp_path / "j.spec"), str(tmp_path / "j.result")]
    )
    assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 1)
    for process in wait_gone(marker, 0):
        process.terminate()
    assert runner.wait(timeout=30) == 0
    launcher: Any = object.__new__(_slurm.SlurmLauncher)
    launcher.key = KEY
    handle = _slurm.SlurmHandle(launcher, to_spec(["sleep", marker]), "job", lambda outcome: None, str(tmp_path / "j"))
    handle.slurm_id = "19"
    assert handle.outcome("COMPLETED", time.time()).error == "killed by signal SIGTERM"  # what the runner says
    outcome = handle.outcome("TIMEOUT", time.time())
    assert (outcome.failure, outcome.error) == ("timeout", "killed by SLURM at its time limit (SLURM job 19)")
    assert outcome.returncodes == [-15] and outcome.runtime > 0


def test_slurms_stop_answered_by_the_runner_reads_as_slurms_reason(tmp_path: Path) -> None:
    """The runner answers SLURM's SIGTERM at a time limit with a cancelled result: it reads as a
    timeout, with the runner's measurements."""
    launcher: Any = object.__new__(_slurm.SlurmLauncher)
    launcher.key = KEY
    handle = _slurm.SlurmHandle(launcher, to_spec(["true"]), "job", lambda outcome: None, str(tmp_path / "j"))
    handle.slurm_id = "18"
    runner = not_started(handle.spec, "cancelled", "killed: SLURM sent SIGTERM")
    runner.peak_memory, runner.returncodes = 123 * 2**20, [-15]
    (tmp_path / "j.result").write_bytes(_remote.sign(KEY, pickle.dumps(_remote.Returned(runner))))
    outcome = handle.outcome("TIMEOUT", time.time())
    assert (outcome.failure, outcome.error) == ("timeout", "killed by SLURM at its time limit (SLURM job 18)")
    assert outcome.peak_memory == 123 * 2**20
    assert handle.outcome("COMPLETED", time.time()).failure == "cancelled"  # not SLURM's stop: as it came


@pytest.mark.parametrize("shell", [True, False])
def test_a_runner_signalled_with_its_job_reports_the_stop_not_the_jobs_end(tmp_path: Path, shell: bool) -> None:
    """scancel (or a time limit) signals every process of a job at once: the runner, and the
    job's own processes. A shell whose children die of it exits 0, a job that dies of it is a
    signal failure; the runner, stopped too, reports the stop. (Without that rule the shell's
    exit 0 came back as a success in three of six runs.)"""
    marker = unique_sleep()
    spec = to_spec(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"] if shell else ["sleep", marker])
    (tmp_path / "spec").write_bytes(KEY + _remote.pack(spec, strict=False, shared=True))
    runner = subprocess.Popen(
        [sys.executable, "-m", "mpmsub", "_run-job", str(tmp_path / "spec"), str(tmp_path / "result")]
    )
    assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == (2 if shell else 1))  # the sleeps
    for process in wait_gone(marker, 0):  # the children first: without the runner's stop, sh would exit 0
        process.terminate()
    runner.terminate()
    assert runner.wait(timeout=30) == 0
    outcome = pickle.loads(_remote.verify(KEY, (tmp_path / "result").read_bytes())).received()
    assert outcome.failure == "cancelled", (outcome.returncodes, outcome.error)
    assert outcome.error.startswith("killed: SLURM sent SIGTERM")
    assert wait_gone(marker) == []


def test_a_result_that_never_appears_names_the_workdir_and_the_node(
    backend: mpmsub.SlurmBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that does not share the workdir writes the job's files elsewhere: played here by
    an "interpreter" that removes its output file and exits 0. The job completes in SLURM, and
    no file appears: the error says where they were awaited, and which node may not share it."""
    monkeypatch.setattr(_slurm, "_RESULT_WAIT", 1.0)  # 30 s for a slow shared filesystem
    elsewhere = tmp_path / "elsewhere.sh"
    elsewhere.write_text('#!/bin/sh\nrm -f "${4%.spec}.out"\n')
    elsewhere.chmod(0o700)
    unshared = mpmsub.SlurmBackend(workdir=backend.workdir, python=str(elsewhere), max_poll=1.0)
    with mpmsub.MemoryAwareExecutor(backend=unshared) as executor:
        result = executor.submit(["true"]).result()
    node = unshared.nodes()[0].name
    assert result.failure == "error"
    assert re.fullmatch(
        rf"SLURM ended SLURM job \d+: COMPLETED; neither its result nor its output file appeared in"
        rf" {re.escape(backend.workdir)}/mpmsub-\S+: the workdir {re.escape(backend.workdir)} may not be shared"
        rf" with node {node} \(it must be on a filesystem both mount at the same path\)",
        result.error,
    ), result.error


_DRIVER = """
import sys, time, mpmsub
workdir, marker, ran = sys.argv[1:]
backend = mpmsub.SlurmBackend(workdir=workdir, heartbeat_timeout=2, max_poll=1.0)
whole = sum(node.cpus for node in backend.nodes())
executor = mpmsub.MemoryAwareExecutor(backend=backend)
executor.submit(mpmsub.Job(["sleep", marker]).cpu(whole).with_id("orphan-" + marker))
executor.submit(mpmsub.Job(["sh", "-c", f"touch {ran}; sleep {marker}"]).cpu(whole).with_id("pending-" + marker))
time.sleep(600)
"""


def test_the_jobs_of_a_driver_killed_with_sigkill_end_on_their_own(slurm: None, tmp_path: Path) -> None:
    """A driver killed with -9 cancels nothing: its running job stops once the heartbeat is older
    than heartbeat_timeout, and its pending job, when it starts, never runs its command."""
    marker, ran = unique_sleep(), tmp_path / "ran"
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path / "work"), marker, str(ran)])

    def states() -> List[str]:
        listed = subprocess.run(
            ["squeue", "-h", "-t", "all", "--array", "-o", "%i %j %T"], capture_output=True, text=True
        )
        return sorted(line for line in listed.stdout.split("\n") if marker in line)  # one array, or two jobs

    try:
        assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 1)
        assert remote_batch.wait_for(lambda: any(line.endswith("PENDING") for line in states()))
        driver.kill()
        driver.wait()
        assert remote_batch.wait_for(lambda: all(line.endswith("COMPLETED") for line in states())), states()
        assert wait_gone(marker, 0) == []
        assert len(states()) == 2 and not ran.exists()
    finally:
        driver.kill()
        driver.wait()
        for line in states():
            subprocess.run(["scancel", line.split()[0]], check=False)


@pytest.mark.parametrize("value", [0, 0.5, -1, 86401, float("inf"), float("nan"), True, "60"])
def test_a_bad_heartbeat_timeout_is_refused_naming_it(value: Any) -> None:
    with pytest.raises(ValueError, match=rf"invalid heartbeat_timeout {re.escape(repr(value))}: expected a number"):
        mpmsub.SlurmBackend(heartbeat_timeout=value)


def test_a_refused_submission_is_a_start_failure(backend: mpmsub.SlurmBackend) -> None:
    odd = mpmsub.SlurmBackend(workdir=backend.workdir, extra_args=["--gres=mpmsubnothing:1"])
    with mpmsub.MemoryAwareExecutor(backend=odd) as executor:
        result = executor.submit(["true"]).result()
    assert result.failure == "start"
    assert result.error.startswith("SLURM refused it: sbatch: error:")


def test_calls_of_the_main_script_run_under_slurm(slurm: None, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import mpmsub, os\n"
        "def triple(x):\n"
        "    return 3 * x\n"
        "if __name__ == '__main__':\n"
        f"    backend = mpmsub.SlurmBackend(workdir={str(tmp_path / 'work')!r})\n"
        "    with mpmsub.MemoryAwareExecutor(backend=backend) as ex:\n"
        "        print(list(ex.map(triple, range(5), chunksize=2)))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 3, 6, 9, 12]"


def test_a_call_is_measured_on_the_node(backend: mpmsub.SlurmBackend) -> None:
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        future = executor.submit(mpmsub.Call(callees.allocate, 150).memory("400M"))
        assert future.result() != os.getpid()
    assert future.usage is not None and 150 <= future.usage.memory_used < 220


def test_the_command_line_runs_jobs_on_slurm(slurm: None, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("echo one\necho two\nsh -c 'exit 4'\n")
    argv = [sys.executable, "-m", "mpmsub", "run", str(jobs), "--backend", "slurm", "--workdir", str(tmp_path / "w")]
    done = subprocess.run([*argv, "--json", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # one job failed
    report = json.loads(done.stdout)
    assert report["stats"]["jobs"]["completed"] == 2
    assert sorted(row["stdout"] for row in report["results"])[1:] == ["one\n", "two\n"]


# -- the run's files are private to this user (no SLURM needed) -----------------------------------

OTHER_USER = 65534  # nobody: as root, files are given to it to play another local user
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file another user's")


class _Here(mpmsub.SlurmBackend):
    """SLURM played here: sbatch runs the job's --wrap command (the real runner) at once, or,
    with `forge`, lets it write the result file in the runner's stead; squeue then says the job
    completed. What the spec and its directory were at submit is kept in `submitted`."""

    def __init__(self, workdir: Path, forge: Optional[Callable[[Path, Path], None]] = None) -> None:
        super().__init__(workdir=str(workdir), max_poll=1.0)
        self.forge = forge
        self.submitted: List[Tuple[Path, os.stat_result, os.stat_result]] = []
        self._ids = itertools.count(100)

    def nodes(self, fresh: bool = False) -> List[Node]:
        return [Node("here", 2, 2**30)]

    def command(self, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        self.calls[argv[0]] += 1
        options = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
        if argv[0] == "sbatch":
            spec, result = (Path(word) for word in shlex.split(options["wrap"])[-2:])
            self.submitted.append((spec, os.lstat(spec), os.lstat(spec.parent)))
            if self.forge is not None:
                self.forge(spec, result)
            else:
                with open(options["output"], "wb") as out:
                    subprocess.run(["sh", "-c", options["wrap"]], stdout=out, stderr=out, timeout=60, check=False)
            return subprocess.CompletedProcess(list(argv), 0, f"{next(self._ids)}\n", "")
        if argv[0] == "squeue":
            states = "".join(f"{slurm_id}|COMPLETED\n" for slurm_id in options["jobs"].split(","))
            return subprocess.CompletedProcess(list(argv), 0, states, "")
        return subprocess.CompletedProcess(list(argv), 0, "", "")


class _Payload:
    """A pickle that makes a directory when it is unpickled: the code another user would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _one_job(backend: _Here) -> mpmsub.JobResult:
    with mpmsub.MemoryAwareExecutor(backend=backend, history=False) as executor:
        return executor.submit(["true"]).result(timeout=60)


def test_a_run_directory_made_in_advance_under_the_old_name_is_not_used(tmp_path: Path) -> None:
    """In a shared (1777) workdir another user can make the directory a run's name would be: the
    run makes its own, private, with a name no one can guess; its spec is 0600 even under umask 0,
    and the real runner's signed result is accepted."""
    workdir = tmp_path / "shared"
    workdir.mkdir()
    os.chmod(workdir, 0o1777)
    host, now = socket.gethostname().split(".")[0], int(time.time())
    planted = set()
    for second in range(now - 1, now + 10):
        for run in range(1, 21):
            planted.add(workdir / f"mpmsub-{host}-{os.getpid()}-{second}-{run}")
    for directory in planted:
        directory.mkdir(mode=0o777)
        os.chmod(directory, 0o777)
        if os.geteuid() == 0:
            os.chown(directory, OTHER_USER, OTHER_USER)
    backend = _Here(workdir)
    previous = os.umask(0)
    try:
        result = _one_job(backend)
    finally:
        os.umask(previous)
    assert result.success, result.error
    [(spec, spec_status, directory_status)] = backend.submitted
    assert spec.parent.parent == workdir and spec.parent not in planted
    assert stat.S_IMODE(directory_status.st_mode) == 0o700 and directory_status.st_uid == os.geteuid()
    assert stat.S_IMODE(spec_status.st_mode) == 0o600 and spec_status.st_uid == os.geteuid()
    assert not spec.parent.exists()  # removed at the end of the run
    assert all(not any(directory.iterdir()) for directory in planted)  # nothing put in theirs


def test_a_missing_workdir_is_made_private(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        assert _one_job(_Here(tmp_path / "work")).success
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "work").st_mode) == 0o700


def test_without_a_heartbeat_jobs_run_as_before(tmp_path: Path) -> None:
    backend = _Here(tmp_path / "work")
    backend.heartbeat_timeout = None
    assert _one_job(backend).success


def _unsigned(spec: Path, result: Path) -> None:
    result.write_bytes(pickle.dumps(_Payload(spec.parent.parent.parent / "unpickled")))


def _signed_with_another_key(spec: Path, result: Path) -> None:
    payload = pickle.dumps(_Payload(spec.parent.parent.parent / "unpickled"))
    result.write_bytes(_remote.sign(b"x" * _remote.KEY_BYTES, payload))


def _a_symlink(spec: Path, result: Path) -> None:
    elsewhere = spec.parent.parent.parent / "elsewhere.result"
    _unsigned(spec, elsewhere)
    result.symlink_to(elsewhere)


def _signed_but_writable_by_others(spec: Path, result: Path) -> None:
    key = spec.read_bytes()[: _remote.KEY_BYTES]  # what no other user can read: the file checks alone
    result.write_bytes(_remote.sign(key, pickle.dumps(_Payload(spec.parent.parent.parent / "unpickled"))))
    os.chmod(result, 0o666)


def _signed_but_another_users(spec: Path, result: Path) -> None:
    _signed_but_writable_by_others(spec, result)
    os.chmod(result, 0o644)
    os.chown(result, OTHER_USER, OTHER_USER)


@pytest.mark.parametrize(
    ("forge", "why"),
    [
        (_unsigned, "it is not signed with this run's key"),
        (_signed_with_another_key, "it is not signed with this run's key"),
        (_a_symlink, "is a symbolic link"),
        (_signed_but_writable_by_others, "can be written by other users (mode 0666)"),
        pytest.param(_signed_but_another_users, f"belongs to user id {OTHER_USER}", marks=as_root),
    ],
)
def test_a_result_file_the_runner_did_not_write_is_rejected_never_unpickled(
    tmp_path: Path, forge: Callable[[Path, Path], None], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    result = _one_job(_Here(tmp_path / "work", forge))
    assert (result.success, result.failure) == (False, "error")
    assert result.error.startswith("its result file was rejected: ") and why in result.error, result.error
    assert not (tmp_path / "unpickled").exists()  # its code never ran
    assert any("rejected the result file" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("spec writable by others", "can be written by other users (mode 0622)"),
        ("directory others can enter", "is open to other users (mode 0755; expected 0700)"),
        ("spec a symlink", "is a symbolic link"),
        pytest.param("spec of another user", f"belongs to user id {OTHER_USER}", marks=as_root),
        pytest.param("directory of another user", f"belongs to user id {OTHER_USER}", marks=as_root),
    ],
)
def test_the_runner_refuses_a_spec_file_others_could_have_written(tmp_path: Path, case: str, why: str) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    spec = run / "000001.spec"
    spec.write_bytes(KEY + pickle.dumps(_Payload(tmp_path / "unpickled")))
    os.chmod(spec, 0o600)
    if case == "spec writable by others":
        os.chmod(spec, 0o622)
    elif case == "directory others can enter":
        os.chmod(run, 0o755)
    elif case == "spec a symlink":
        spec.rename(tmp_path / "real.spec")
        spec.symlink_to(tmp_path / "real.spec")
    elif case == "spec of another user":
        os.chown(spec, OTHER_USER, OTHER_USER)
    else:
        os.chown(run, OTHER_USER, OTHER_USER)
    argv = [sys.executable, "-m", "mpmsub", "_run-job", str(spec), str(run / "000001.result")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == _remote.REFUSED, done.stderr
    assert "refused the spec file, which is not private to this user" in done.stderr and why in done.stderr
    assert not (tmp_path / "unpickled").exists() and not (run / "000001.result").exists()


@pytest.mark.parametrize(("limit", "kept"), [("1K", 1024), (None, 4999)])
def test_the_runner_keeps_as_much_output_as_the_sending_executor_would(
    limit: Optional[str], kept: int, tmp_path: Path
) -> None:
    job = [sys.executable, "-c", "print('x' * 4999)"]
    with mpmsub.MemoryAwareExecutor(backend=_Here(tmp_path / "work"), history=False, output_limit=limit) as ex:
        result = ex.submit(job).result(timeout=60)
    assert result.success, result.error
    assert result.stdout.split("\n")[0] == "x" * kept
    assert ("stdout cut here" in result.stdout) == (limit is not None)


class _HereWithGpus(_Here):
    """SLURM played here, on a node of four GPUs and a license of two seats."""

    def nodes(self, fresh: bool = False) -> List[Node]:
        return [Node("here", 2, 2**30, {"GPU": 4})]

    def licenses(self) -> Optional[Dict[str, int]]:
        return {"licence": 2}


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="the runner would ask NVML, not nvidia-smi")
def test_the_runner_gives_a_job_the_gpus_slurm_granted_and_reports_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --gres, SLURM sets the job's CUDA_VISIBLE_DEVICES (played here: 2,3 of the four devices
    a fake nvidia-smi lists): the runner's executor hands the job those devices, and the result
    names them. The license was SLURM's to count: the runner's executor never sees it."""
    fake_gpus_on_path(monkeypatch, tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
    backend = _HereWithGpus(tmp_path / "work")
    with mpmsub.MemoryAwareExecutor(backend=backend, history=False, resources={"licence": 2}) as executor:
        both = executor.submit(mpmsub.Job([sys.executable, "-c", show]).gpu(2).resources(licence=1))
        one = executor.submit(mpmsub.Job([sys.executable, "-c", show]).gpu(1))
        results = [both.result(timeout=60), one.result(timeout=60)]
    for result in results:
        assert result.success, result.error
    assert [(result.stdout, result.gpus) for result in results] == [("2,3\n", (2, 3)), ("2\n", (2,))]
    assert results[0].resources == {"licence": 1}
