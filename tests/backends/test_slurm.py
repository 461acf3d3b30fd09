"""The SLURM backend on a real single-node SLURM (started here if SLURM is installed and none is
configured; `.ci/run` installs it)."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import pytest
from support import callees, remote_batch
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


def test_a_runner_signalled_with_its_job_reports_the_stop_not_the_shells_exit(tmp_path: Path) -> None:
    """scancel signals every process of a job at once: the runner, and the job's own processes.
    A shell whose children die of it exits 0; the runner, stopped too, reports the stop. (Without
    that rule this test failed in three of six runs: the shell's exit 0 came back as a success.)"""
    marker = unique_sleep()
    spec = to_spec(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"])
    (tmp_path / "spec").write_bytes(KEY + _remote.pack(spec, strict=False, shared=True))
    runner = subprocess.Popen(
        [sys.executable, "-m", "mpmsub", "_run-job", str(tmp_path / "spec"), str(tmp_path / "result")]
    )
    assert remote_batch.wait_for(lambda: len(wait_gone(marker, 0)) == 2)  # the two sleeps
    for process in wait_gone(marker, 0):  # the children first: without the runner's stop, sh would exit 0
        process.terminate()
    runner.terminate()
    assert runner.wait(timeout=30) == 0
    outcome = pickle.loads(_remote.verify(KEY, (tmp_path / "result").read_bytes())).received()
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
