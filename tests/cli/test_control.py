"""`mpmsub ps` and `mpmsub kill` against real `mpmsub run` processes, through their control socket.

Each test has an XDG_RUNTIME_DIR (and XDG_STATE_HOME) of its own, short enough for a Unix
socket's path, so that no test sees another's runs or touches the user's own directories."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import psutil
import pytest
from support.helpers import unique_sleep, wait_gone

from mpmsub._cli import control
from mpmsub._cluster import Cluster

SCRIPT = Path(sys.executable).with_name("mpmsub")


@pytest.fixture
def env() -> Iterator[Dict[str, str]]:
    base = tempfile.mkdtemp(prefix="mx-", dir="/tmp")  # short: a socket's path has ~104 bytes at most
    os.mkdir(os.path.join(base, "run"), 0o700)
    yield {**os.environ, "XDG_RUNTIME_DIR": os.path.join(base, "run"), "XDG_STATE_HOME": os.path.join(base, "state")}
    shutil.rmtree(base, ignore_errors=True)


def sockets(env: Dict[str, str]) -> Path:
    return Path(env["XDG_RUNTIME_DIR"]) / "mpmsub"


def mpmsub(*args: str, env: Dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def start(*args: str, env: Dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    command = [str(SCRIPT), "run", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def long_job(arg: str) -> str:
    """A job whose tree has two processes sleeping `arg` seconds (a shell's child and its own)."""
    return f"sh -c 'sleep {arg} & sleep {arg}; wait'"


def listed(job: str, env: Dict[str, str], cwd: Path, *run: str, timeout: float = 30) -> Dict[str, Any]:
    """`mpmsub ps --json`'s answer once it lists `job` as running."""
    deadline = time.monotonic() + timeout
    while True:
        out = mpmsub("ps", "--json", *run, env=env, cwd=cwd)
        if out.returncode == 0:
            answer: Dict[str, Any] = json.loads(out.stdout)
            if job in [j["job_id"] for j in answer["jobs"]]:
                return answer
        assert time.monotonic() < deadline, f"{job} not listed: {out.stdout}{out.stderr}"
        time.sleep(0.05)


def joblog(path: Path) -> Dict[str, Dict[str, str]]:
    """The joblog's rows by JobId, each by column name."""
    lines = path.read_text().splitlines()
    names = lines[0].split("\t")
    return {row["JobId"]: row for row in (dict(zip(names, line.split("\t"))) for line in lines[1:])}


def test_a_killed_job_is_logged_as_killed_and_resuming_runs_it_alone_again(env: Dict[str, str], tmp_path: Path) -> None:
    """The long job is killed while the others run: the run goes on (--halt now,fail=1 does not
    count it), nothing of its tree is left, its row says killed, and --resume and
    --resume-failed run it, and only it, again."""
    arg = unique_sleep()
    (tmp_path / "jobs.txt").write_text(
        f"echo 1 >> ran.txt; test -e again || {long_job(arg)}\necho 2 >> ran.txt\necho 3 >> ran.txt; sleep 2\n"
    )
    run = start(
        "jobs.txt", "-j", "3", "--joblog", "log.tsv", "--halt", "now,fail=1", "--no-progress", env=env, cwd=tmp_path
    )
    answer = listed("job_0001", env, tmp_path)
    assert answer["run"]["pid"] == run.pid and answer["run"]["jobfile"] == str(tmp_path / "jobs.txt")
    assert answer["counts"]["total"] == 3
    (job,) = [j for j in answer["jobs"] if j["job_id"] == "job_0001"]
    assert job["seq"] == 1 and arg in job["command"] and job["cpus"] == 1 and not job["stopping"]
    table = mpmsub("ps", env=env, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert f"pid {run.pid}" in table.stdout and "ID" in table.stdout.splitlines()[2]
    assert any(line.split()[:3] == ["job_0001", "1", "running"] for line in table.stdout.splitlines())

    unknown = mpmsub("kill", "job_9999", env=env, cwd=tmp_path)
    assert unknown.returncode == 1 and "no job 'job_9999' in this run" in unknown.stderr

    killed = mpmsub("kill", "job_0001", "--reason", "stuck on bad input", env=env, cwd=tmp_path)
    assert (killed.returncode, killed.stdout) == (0, "job_0001: killed\n"), killed.stderr
    _, err = run.communicate(timeout=30)
    assert run.returncode == 1, err  # a killed job counts as failed
    assert "1 killed" in err and "killed: stuck on bad input" in err
    assert "--halt" not in err
    assert not wait_gone(arg, timeout=3)
    rows = joblog(tmp_path / "log.tsv")
    assert (rows["job_0001"]["Exitval"], rows["job_0001"]["Failure"]) == ("-1", "killed")
    assert rows["job_0001"]["Signal"] in (str(int(signal.SIGTERM)), str(int(signal.SIGKILL)))
    # Not halted: the others ran to their end and succeeded.
    assert [(rows[j]["Exitval"], rows[j]["Signal"], rows[j]["Failure"]) for j in ("job_0002", "job_0003")] == [
        ("0", "0", ""),
        ("0", "0", ""),
    ]
    assert list(sockets(env).iterdir()) == []  # the socket went with the run

    for resume in ("--resume", "--resume-failed"):
        dry = mpmsub("run", "jobs.txt", "--joblog", "log.tsv", resume, "--dry-run", env=env, cwd=tmp_path)
        assert dry.stdout == f"echo 1 >> ran.txt; test -e again || {long_job(arg)}\n", dry.stderr
    shutil.copy(tmp_path / "log.tsv", tmp_path / "copy.tsv")
    (tmp_path / "again").touch()
    for resume, log in (("--resume", "log.tsv"), ("--resume-failed", "copy.tsv")):
        again = mpmsub("run", "jobs.txt", "--joblog", log, resume, env=env, cwd=tmp_path)
        assert again.returncode == 0 and "2 job(s) skipped" in again.stderr, again.stderr
        assert joblog(tmp_path / log)["job_0001"]["Failure"] == ""  # its last row: a success
    assert sorted((tmp_path / "ran.txt").read_text().split()) == ["1", "1", "1", "2", "3"]
    done = mpmsub("run", "jobs.txt", "--joblog", "log.tsv", "--resume-failed", "--dry-run", env=env, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "")


def test_ps_and_kill_without_a_run_say_so(env: Dict[str, str], tmp_path: Path) -> None:
    for args in (["ps"], ["kill", "job_0001"], ["ps", "--run", "1"]):
        out = mpmsub(*args, env=env, cwd=tmp_path)
        assert out.returncode == 1 and out.stdout == "", out.stderr
        assert "no mpmsub run of yours" in out.stderr and "Traceback" not in out.stderr
    out = mpmsub("kill", "--run", "x", "job_0001", env=env, cwd=tmp_path)
    assert out.returncode == 2 and "invalid pid 'x'" in out.stderr


def test_several_runs_are_told_apart_by_pid_and_no_other_user_can_connect(env: Dict[str, str], tmp_path: Path) -> None:
    args = [unique_sleep(), unique_sleep()]
    runs: List[subprocess.Popen[str]] = []
    for n, arg in enumerate(args):
        (tmp_path / f"jobs{n}.txt").write_text(long_job(arg) + "\n")
        runs.append(start(f"jobs{n}.txt", "-q", env=env, cwd=tmp_path))
    try:
        for run in runs:
            listed("job_0001", env, tmp_path, "--run", str(run.pid))
        both = mpmsub("ps", env=env, cwd=tmp_path)
        assert both.returncode == 1 and "2 mpmsub runs of yours are going; pick one with --run PID" in both.stderr
        for n, run in enumerate(runs):
            assert f"pid {run.pid}, started " in both.stderr and str(tmp_path / f"jobs{n}.txt") in both.stderr
        directory = sockets(env)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        paths = sorted(str(p) for p in directory.iterdir())
        assert paths == sorted(str(directory / f"run-{run.pid}.sock") for run in runs)
        if os.geteuid() == 0:  # another user cannot even reach the socket: the directory keeps them out
            assert connect_as(65534, paths[0]) == "PermissionError"
        killed = mpmsub("kill", "--run", str(runs[1].pid), "1", env=env, cwd=tmp_path)  # its number in the file
        assert (killed.returncode, killed.stdout) == (0, "1: killed\n"), killed.stderr
        assert runs[1].wait(timeout=30) == 1
        assert not wait_gone(args[1], timeout=3) and wait_gone(args[0], timeout=0)  # the other run's job runs on
        again = mpmsub("kill", "--run", str(runs[0].pid), "job_0001", "job_0001", env=env, cwd=tmp_path)
        assert again.returncode == 1, again.stderr  # the second could not be killed again
        first, second = again.stdout.splitlines()
        assert first == "job_0001: killed"
        assert second in ("job_0001: not killed (it was being stopped already)", "job_0001: not running (it had ended)")
        assert runs[0].wait(timeout=30) == 1
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
            run.communicate()
    assert not wait_gone(args[0], timeout=3)
    assert list(sockets(env).iterdir()) == []


def connect_as(uid: int, path: str) -> str:
    """What asking the run at `path` does for a process of user `uid` (forked: this test's
    Python may be in a directory that user cannot enter): "answered", "refused" (the run hung
    up without an answer) or the exception's name."""
    outcomes = ["answered", "refused", "PermissionError", "other"]
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 3
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(10)
                conn.connect(path)
                conn.sendall(b'{"op": "info"}\n')
                code = 0 if conn.recv(100) else 1
        except (ConnectionResetError, BrokenPipeError):  # hung up on, the request unread
            code = 1
        except PermissionError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return outcomes[os.waitstatus_to_exitcode(status)]


@pytest.mark.skipif(os.geteuid() != 0 or not hasattr(socket, "SO_PEERCRED"), reason="needs root, and Linux")
def test_the_run_refuses_another_users_connection_that_got_through(
    env: Dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The private directory keeps other users out; were it opened (by hand), the run still
    hangs up on them (SO_PEERCRED) and answers only its own user."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    state = control.RunState(Cluster(cpus=1, memory="100M", verbose=False, progress_bar=False), {}, {}, dict)
    server, why = control.serve(state)
    assert server is not None, why
    try:
        directory = Path(server.path).parent
        for opened in (directory, directory.parent, directory.parent.parent):  # down to /tmp/mx-...
            os.chmod(opened, 0o711)
        os.chmod(server.path, 0o666)
        assert connect_as(65534, server.path) == "refused"
        assert connect_as(0, server.path) == "answered"
    finally:
        server.close()
    assert not os.path.exists(server.path)


def test_a_run_killed_outright_leaves_a_socket_that_ps_clears(env: Dict[str, str], tmp_path: Path) -> None:
    arg = unique_sleep()
    (tmp_path / "jobs.txt").write_text(long_job(arg) + "\n")
    run = start("jobs.txt", "-q", env=env, cwd=tmp_path)
    listed("job_0001", env, tmp_path)
    run.kill()  # SIGKILL: no finally runs; the watchman kills the jobs
    run.communicate()
    left = sockets(env) / f"run-{run.pid}.sock"
    assert left.exists()
    out = mpmsub("ps", env=env, cwd=tmp_path)
    assert out.returncode == 1 and "no mpmsub run of yours is going" in out.stderr
    assert not left.exists()
    assert not wait_gone(arg, timeout=5)


def test_a_run_without_control_has_no_socket(env: Dict[str, str], tmp_path: Path) -> None:
    arg = unique_sleep()
    (tmp_path / "jobs.txt").write_text(f"sleep {arg}\n")
    run = start("jobs.txt", "-q", "--no-control", env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not wait_gone(arg, timeout=0):
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.02)
        assert not sockets(env).exists() or list(sockets(env).iterdir()) == []
        out = mpmsub("ps", env=env, cwd=tmp_path)
        assert out.returncode == 1 and "no mpmsub run of yours is going" in out.stderr
    finally:
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=30)
    assert run.returncode == 128 + signal.SIGTERM
    assert not wait_gone(arg, timeout=3)


def test_a_socket_path_too_long_or_an_unsafe_directory_leaves_the_run_without_control(
    env: Dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "jobs.txt").write_text("echo ran\n")
    deep = Path(env["XDG_RUNTIME_DIR"]) / ("d" * 100)
    deep.mkdir(mode=0o700)
    out = mpmsub("run", "jobs.txt", "--no-progress", env={**env, "XDG_RUNTIME_DIR": str(deep)}, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "ran\n", out.stderr
    assert "mpmsub ps and kill will not see this run: no control socket" in out.stderr
    assert "is longer than a Unix socket's" in out.stderr
    assert not (deep / "mpmsub").exists()

    sockets(env).mkdir(mode=0o700)
    os.chmod(sockets(env), 0o755)  # whatever the umask
    out = mpmsub("run", "jobs.txt", "--no-progress", env=env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "ran\n", out.stderr
    assert "open to other users (mode 0755; expected 0700)" in out.stderr
    assert list(sockets(env).iterdir()) == []
    quiet = mpmsub("run", "jobs.txt", "-q", env=env, cwd=tmp_path)
    assert (quiet.returncode, quiet.stderr) == (0, "")
    ps = mpmsub("ps", env=env, cwd=tmp_path)
    assert ps.returncode == 1 and "open to other users" in ps.stderr and "Traceback" not in ps.stderr


def test_a_request_that_is_not_one_is_answered_with_an_error(env: Dict[str, str], tmp_path: Path) -> None:
    """The socket takes one JSON line, bounded, and answers anything else with an error (never a
    traceback, never the run's end)."""
    arg = unique_sleep()
    (tmp_path / "jobs.txt").write_text(long_job(arg) + "\n")
    run = start("jobs.txt", "-q", env=env, cwd=tmp_path)
    try:
        listed("job_0001", env, tmp_path)
        path = str(sockets(env) / f"run-{run.pid}.sock")
        for sent, error in [
            (b"not json\n", "a request is a JSON object"),
            (b'{"op": "drop"}\n', "expected {"),
            (b'{"op": "kill", "jobs": "job_0001"}\n', "expected a list of job ids"),
            (b"x" * (64 * 1024 + 1), "a request is one line of at most 65536 bytes"),
        ]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(10)
                conn.connect(path)
                try:
                    conn.sendall(sent)
                    conn.shutdown(socket.SHUT_WR)
                except BrokenPipeError:  # refused before it was all sent
                    pass
                reply = json.loads(conn.makefile("rb").read())
            assert reply["ok"] is False and error in reply["error"], reply
        assert run.poll() is None
        assert listed("job_0001", env, tmp_path)["counts"]["running"] == 1
    finally:
        run.send_signal(signal.SIGINT)  # Ctrl-C
        run.communicate(timeout=30)
    assert run.returncode == 128 + signal.SIGINT
    assert not wait_gone(arg, timeout=3)
    assert list(sockets(env).iterdir()) == []  # removed on Ctrl-C too


def test_a_stopped_run_is_named_as_not_answering(
    env: Dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped with Ctrl-Z keeps its socket but cannot answer: ps and kill say so after
    their wait (shortened here), instead of saying no run is going; continued, it answers."""
    arg = unique_sleep()
    (tmp_path / "jobs.txt").write_text(long_job(arg) + "\n")
    run = start("jobs.txt", "-q", env=env, cwd=tmp_path)
    try:
        listed("job_0001", env, tmp_path)
        monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
        monkeypatch.setattr(control, "TIMEOUT", 0.3)
        run.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while psutil.Process(run.pid).status() != psutil.STATUS_STOPPED:  # every thread of it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(TimeoutError, match=f"the run of pid {run.pid} did not answer within 0.3 s"):
            control.pick_run(None)
        assert [(r.pid, r.describe()) for r in control.find_runs()] == [(run.pid, f"pid {run.pid}: not answering")]
        run.send_signal(signal.SIGCONT)
        assert control.pick_run(run.pid).pid == run.pid
        killed = mpmsub("kill", "job_0001", env=env, cwd=tmp_path)
        assert (killed.returncode, killed.stdout) == (0, "job_0001: killed\n"), killed.stderr
        run.communicate(timeout=30)
        assert run.returncode == 1
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGCONT)
            run.kill()  # its watchman kills the job
            run.communicate()
    assert not wait_gone(arg, timeout=5)
