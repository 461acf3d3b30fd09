"""The local launcher's kills leave nothing behind, with per-job cgroups and without them.

Without cgroups (every user without root on most machines) a job's processes are found through
their sessions and parents alone. A child that starts a session of its own (`setsid`) belongs to
the job only through its parent: these tests kill jobs whose children do that, and look for
leftovers at the moment the job's result is there, not some time after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from support.helpers import processes_with, unique_sleep, wait_gone

import mpmsub
from mpmsub import MemoryAwareExecutor
from mpmsub._launch import proctree as _proctree

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mpmsub.__file__).parent.parent), *sys.path])}


@pytest.fixture(params=["cgroups", "no-cgroups"])
def cgroups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test twice: with per-job cgroups where this user may make them, and with them off
    (MPMSUB_CGROUPS=0, as for a user without root: CI runs as root)."""
    if request.param == "no-cgroups":
        monkeypatch.setenv("MPMSUB_CGROUPS", "0")
    yield request.param


def _setsid_job(marker: str, ignore_term: bool = False) -> list:
    """A shell whose child starts a session of its own and waits (optionally deaf to SIGTERM)."""
    inner = f"trap '' TERM; sleep {marker}" if ignore_term else f"sleep {marker}"
    return ["sh", "-c", f'setsid sh -c "{inner}" & wait']


def _wait_started(marker: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(processes_with(marker)) < count:
        assert time.monotonic() < deadline, f"{count} sleeps {marker} did not start"
        time.sleep(0.02)


def test_timed_out_jobs_leave_no_setsid_child(cgroups: str) -> None:
    marker = unique_sleep()
    with MemoryAwareExecutor(cpus=7, memory="1G", kill_grace=1) as ex:
        futures = [ex.submit(mpmsub.Job(_setsid_job(marker)).with_timeout(0.5)) for _ in range(7)]
        results = [f.result(timeout=30) for f in futures]
        assert [r.failure for r in results] == ["timeout"] * 7
        assert not processes_with(marker)  # gone when the results are there


def test_a_setsid_child_deaf_to_sigterm_is_killed_before_the_job_ends(cgroups: str) -> None:
    marker = unique_sleep()
    with MemoryAwareExecutor(cpus=1, memory="1G", kill_grace=0.5) as ex:
        result = ex.submit(mpmsub.Job(_setsid_job(marker, ignore_term=True)).with_timeout(0.5)).result(timeout=30)
        assert result.timed_out
        assert not processes_with(marker)


def test_terminate_leaves_no_setsid_child(cgroups: str) -> None:
    marker = unique_sleep()
    ex = MemoryAwareExecutor(cpus=3, memory="1G", kill_grace=0.3)
    futures = [ex.submit(_setsid_job(marker, ignore_term=i == 0)) for i in range(3)]
    _wait_started(marker, 3)
    ex.terminate()
    assert {f.result().failure for f in futures} == {"cancelled"}
    assert not processes_with(marker)


def test_a_memory_kill_frees_the_memory_of_a_setsid_child(cgroups: str) -> None:
    marker = unique_sleep()
    hog = f"x = bytearray(300 * 2**20); import time; time.sleep({marker})"
    job = mpmsub.Job(["sh", "-c", f"setsid {sys.executable} -c '{hog}' & wait"]).memory("50M").strict_memory()
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        future = ex.submit(job)
        result = future.result(timeout=30)
        assert result.failure == "memory"
        assert not processes_with(marker)
        assert ex.status().memory_in_use == 0


def test_ctrl_c_of_a_driver_leaves_no_setsid_child(cgroups: str, tmp_path: Path) -> None:
    marker = unique_sleep()
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import mpmsub
        with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", kill_grace=0.5) as ex:
            futures = [ex.submit(job) for job in {[_setsid_job(marker, ignore_term=deaf) for deaf in (True, False)]!r}]
            for f in futures:
                f.result()
        """)
    )
    env = {**ENV, "MPMSUB_CGROUPS": "0"} if cgroups == "no-cgroups" else ENV
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        _wait_started(marker, 2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert b"KeyboardInterrupt" in stderr
        assert not processes_with(marker)  # the driver waited for them
    finally:
        proc.kill()
        proc.wait()
        for left in processes_with(marker):
            left.kill()


@pytest.mark.skipif(not _proctree._LINUX, reason="reads /proc")
def test_signal_tree_finds_a_setsid_child_before_its_parent_can_die() -> None:
    marker = unique_sleep()
    for _ in range(5):  # the parent dies at once of SIGKILL: the child must have been found before
        shell = subprocess.Popen(_setsid_job(marker), start_new_session=True)
        try:
            _wait_started(marker, 1)
            sleeps = {p.pid for p in processes_with(marker)}
            found = _proctree.signal_tree([shell.pid], signal.SIGKILL)
            assert shell.pid in found and sleeps <= found  # the setsid sleep (bash execs it in place)
        finally:
            shell.wait()
        assert not wait_gone(marker, timeout=2)


@pytest.mark.skipif(not _proctree._LINUX, reason="reads /proc")
def test_survivors_are_held_after_their_parent_died_and_killed_later() -> None:
    marker = unique_sleep()
    shell = subprocess.Popen(_setsid_job(marker, ignore_term=True), start_new_session=True)
    survivors = _proctree.Survivors()
    try:
        _wait_started(marker, 1)
        survivors.signal([shell.pid], signal.SIGTERM)  # the shell dies; its setsid child does not
        shell.wait(timeout=10)
        time.sleep(0.1)
        assert survivors.alive() and processes_with(marker)  # orphaned: no scan finds it as the job's
        survivors.signal([], signal.SIGKILL)
        assert not wait_gone(marker, timeout=2)
        deadline = time.monotonic() + 5
        while survivors.alive():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        survivors.close()
        for left in processes_with(marker):
            left.kill()


def test_relative_output_files_are_taken_from_the_jobs_working_directory(tmp_path: Path) -> None:
    for name in ("s1", "s2", "s3"):
        (tmp_path / name).mkdir()
    jobs = [
        {"cmd": ["sh", "-c", f"echo {name}; echo {name}-err >&2"], "cwd": str(tmp_path / name)}
        for name in ("s1", "s2", "s3")
    ]
    with MemoryAwareExecutor(cpus=3, memory="1G") as ex:
        results = [ex.submit({**job, "stdout": "result.txt", "stderr": "err.txt"}).result() for job in jobs]
        missing = ex.submit({"cmd": ["true"], "cwd": str(tmp_path / "nowhere"), "stdout": "result.txt"}).result()
    assert all(r.success for r in results)
    for name in ("s1", "s2", "s3"):
        assert (tmp_path / name / "result.txt").read_text() == f"{name}\n"
        assert (tmp_path / name / "err.txt").read_text() == f"{name}-err\n"
    assert missing.failure == "start" and "working directory not found" in (missing.error or "")


def _writer(mb: int, stream: str = "stdout", then: str = "") -> list:
    """A program that writes `mb` MB to a stream in 1 MB pieces, then runs `then`."""
    code = (
        f"import sys, time\nfor _ in range({mb}): sys.{stream}.write('x' * (2**20 - 1) + '\\n')\nsys.{stream}.flush()\n"
    )
    return [sys.executable, "-c", code + then]


def test_captured_output_past_the_limit_is_dropped_with_a_note_at_its_end() -> None:
    with MemoryAwareExecutor(cpus=2, memory="1G", output_limit="2M") as ex:
        big = ex.submit(_writer(5)).result()
        both = ex.submit(_writer(3, "stderr")).result()
        small = ex.submit(_writer(1)).result()
    assert big.success and both.success
    body, note = big.stdout.rsplit("\n", 2)[0], big.stdout.rsplit("\n", 2)[1]
    assert len(body) + 1 == 2 * 2**20  # the first 2M, whole lines here
    assert note == (
        "[mpmsub: stdout cut here: the job wrote about 5M; the first 2M are kept (output_limit); "
        "a file keeps it all (stdout_to, or mpmsub run --results DIR)]"
    )
    assert both.stderr.endswith(
        "the job wrote about 3M; the first 2M are kept (output_limit); a file keeps it all "
        "(stderr_to, or mpmsub run --results DIR)]\n"
    )
    assert small.stdout == ("x" * (2**20 - 1) + "\n")  # within the limit: untouched


def test_output_held_for_running_jobs_counts_in_memory_in_use_and_against_the_budget(tmp_path: Path) -> None:
    # In a process of its own: the output it holds would raise this test process's peak.
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time, mpmsub
        writer = {_writer(60, then="time.sleep(30)")!r}
        with mpmsub.MemoryAwareExecutor(cpus=1, memory="1G", output_limit=None) as ex:
            held = ex.submit(writer)
            while (ex.status().memory_in_use or 0) < 60 * 2**20 and not held.done():
                time.sleep(0.02)
            print("in use", ex.status().memory_in_use >= 60 * 2**20, flush=True)
            held.cancel()
            ex.terminate()
        with mpmsub.MemoryAwareExecutor(cpus=1, memory="50M", output_limit=None) as ex:
            r = ex.submit(writer).result()
        print(r.failure, "|", r.error, flush=True)
        """)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=90)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "in use True"
    failure, error = second.split(" | ")
    assert failure == "memory" and "of it its captured output, held by mpmsub" in error, error


def test_a_kill_works_with_descriptors_numbered_past_1024(cgroups: str) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this process may open at most {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the job's pidfds come after them
    try:
        marker = unique_sleep()
        with MemoryAwareExecutor(cpus=1, memory="1G", kill_grace=0.3) as ex:
            job = mpmsub.Job(_setsid_job(marker, ignore_term=True)).with_timeout(0.5)
            assert ex.submit(job).result(timeout=30).timed_out
        assert not processes_with(marker)
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
