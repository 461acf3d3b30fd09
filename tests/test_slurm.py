"""The SLURM backend on a real single-node SLURM (started here if SLURM is installed and none is
configured; `.ci/run` installs it)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import callees
import pytest
import remote_batch
from helpers import alloc_cmd, unique_sleep, wait_gone

import mpmsub
from mpmsub import _remote, _slurm
from mpmsub._job import to_spec
from mpmsub._launcher import not_started

NODE = Path(__file__).parent / "slurm" / "node.sh"


def _reachable() -> bool:
    try:
        done = subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: Any) -> Iterator[None]:
    """A SLURM controller: the one configured here, or a single node started for these tests."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed here (apt-get install slurm-wlm munge; .ci/run does)")
    if os.environ.get("SLURM_CONF") and _reachable():
        yield
        return
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip("no SLURM controller is reachable, and one can be started only as root with slurm-wlm")
    directory = tmp_path_factory.mktemp("slurm")
    # Four CPUs (on two cores) let the tests' short jobs run four at a time.
    env = dict(os.environ, NODE_CPUS="4")
    done = subprocess.run(
        ["bash", str(NODE), "start", str(directory)], capture_output=True, text=True, timeout=120, env=env
    )
    if done.returncode != 0:
        subprocess.run(["bash", str(NODE), "stop", str(directory)], capture_output=True, timeout=120)
        pytest.fail(f"the test SLURM did not start: {done.stderr[-2000:]}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(directory / "slurm.conf")
    try:
        yield
    finally:
        subprocess.run(["bash", str(NODE), "stop", str(directory)], capture_output=True, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


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
    assert backend.calls["sbatch"] == len(remote_batch.batch())
    assert os.listdir(backend.workdir) == []  # every job's files read and removed


def test_one_squeue_call_per_poll_for_all_jobs(backend: mpmsub.SlurmBackend) -> None:
    started = time.monotonic()
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = [executor.submit(mpmsub.Job(["true"]).memory("20M")) for _ in range(12)]
        assert all(f.result().success for f in futures)
    elapsed = time.monotonic() - started
    assert backend.calls["sbatch"] == 12
    # Polls come at most every 0.25 s, whatever the number of jobs (never one call per job).
    assert backend.calls["squeue"] <= elapsed / 0.25 + 2
    assert backend.calls["sinfo"] == 1


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


def test_slurms_own_memory_kill_is_a_memory_failure(backend: mpmsub.SlurmBackend) -> None:
    """A job without m runs unbounded under mpmsub; SLURM's --mem (given directly) kills it."""
    low = mpmsub.SlurmBackend(workdir=backend.workdir, extra_args=["--mem=100M"], max_poll=1.0)
    with mpmsub.MemoryAwareExecutor(backend=low) as executor:
        result = executor.submit(mpmsub.Job(alloc_cmd(600, hold=10, steps=6, step_delay=0.3))).result()
    assert result.failure == "memory", result.error
    assert result.error.startswith("killed by SLURM for using more than its --mem")


def test_slurm_states_map_to_mpmsubs_failures(tmp_path: Path) -> None:
    """What an ended job without a result reads as, by its SLURM state and output."""
    launcher: Any = object.__new__(_slurm.SlurmLauncher)
    handle = _slurm.SlurmHandle(launcher, to_spec(["true"]), "job", lambda outcome: None, str(tmp_path / "j"))
    handle.slurm_id = "17"
    (tmp_path / "j.out").write_text("slurmstepd: error: Exceeded job memory limit\n")
    assert handle.outcome("FAILED", time.time()).failure == "memory"
    (tmp_path / "j.out").write_text("")
    timed = handle.outcome("TIMEOUT", time.time())
    assert (timed.failure, timed.error) == ("timeout", "killed by SLURM at its time limit (SLURM job 17)")
    assert handle.outcome("OUT_OF_MEMORY", time.time()).failure == "memory"
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


def test_slurms_stop_answered_by_the_runner_reads_as_slurms_reason(tmp_path: Path) -> None:
    """The runner answers SLURM's SIGTERM at a time limit with a cancelled result: it reads as a
    timeout, with the runner's measurements."""
    launcher: Any = object.__new__(_slurm.SlurmLauncher)
    handle = _slurm.SlurmHandle(launcher, to_spec(["true"]), "job", lambda outcome: None, str(tmp_path / "j"))
    handle.slurm_id = "18"
    runner = not_started(handle.spec, "cancelled", "killed: SLURM sent SIGTERM")
    runner.peak_memory, runner.returncodes = 123 * 2**20, [-15]
    (tmp_path / "j.result").write_bytes(pickle.dumps(_remote.Returned(runner)))
    outcome = handle.outcome("TIMEOUT", time.time())
    assert (outcome.failure, outcome.error) == ("timeout", "killed by SLURM at its time limit (SLURM job 18)")
    assert outcome.peak_memory == 123 * 2**20
    assert handle.outcome("COMPLETED", time.time()).failure == "cancelled"  # not SLURM's stop: as it came


def test_a_runner_signalled_with_its_job_reports_the_stop_not_the_shells_exit(tmp_path: Path) -> None:
    """scancel signals every process of a job at once: the runner, and the job's own processes.
    A shell whose children die of it exits 0; the runner, stopped too, reports the stop. (Without
    that rule this test failed in three of six runs: the shell's exit 0 came back as a success.)"""
    marker = unique_sleep()
    spec = to_spec(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"])
    (tmp_path / "spec").write_bytes(_remote.pack(spec, strict=False, shared=True))
    runner = subprocess.Popen(
        [sys.executable, "-m", "mpmsub", "_run-job", str(tmp_path / "spec"), str(tmp_path / "result")]
    )
    assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 2)  # the two sleeps
    for process in wait_gone(marker, 0):  # the children first: without the runner's stop, sh would exit 0
        process.terminate()
    runner.terminate()
    assert runner.wait(timeout=30) == 0
    outcome = pickle.loads((tmp_path / "result").read_bytes()).received()
    assert outcome.failure == "cancelled", (outcome.returncodes, outcome.error)
    assert outcome.error.startswith("killed: SLURM sent SIGTERM")
    assert wait_gone(marker) == []


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
