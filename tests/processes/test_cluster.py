from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path
from typing import Callable, List, Set, Tuple, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.helpers import alloc_cmd, processes_with, unique_sleep, wait_gone

import mpmsub
from mpmsub import recommend_memory
from mpmsub._units import parse_memory


def quiet(**kwargs: object) -> mpmsub.Cluster:
    return mpmsub.cluster(verbose=False, progress_bar=False, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "cpus", "memory_mb"),
    [
        ({"p": 4, "m": "8G"}, 4, 8192),
        ({"p": 4, "m": "8192M"}, 4, 8192),
        ({"p": 4, "m": 8192}, 4, 8192),
        ({"cpu": 2, "memory": "1024"}, 2, 1024),
        ({"cpus": 2, "memory": "1048576K"}, 2, 1024),
        ({"p": 1, "m": "1T"}, 1, 1024 * 1024),
    ],
)
def test_cluster_arguments(kwargs: dict, cpus: int, memory_mb: float) -> None:
    p = quiet(**kwargs)
    assert (p.max_cpus, p.max_memory_mb) == (cpus, memory_mb)


def test_cluster_detects_the_machine() -> None:
    p = quiet()
    assert p.max_cpus >= 1 and p.max_memory_mb > 64
    assert mpmsub.Cluster(cpus=3, memory="2G", verbose=False, progress_bar=False).max_cpus == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 0}, "invalid cpus 0"),
        ({"p": -2}, "invalid cpus -2"),
        ({"m": "8Q"}, "invalid memory '8Q'"),
        ({"m": -5}, "invalid memory -5"),
        ({"p": 2, "cpus": 3}, "CPU count once"),
        ({"m": "1G", "memory": "2G"}, "memory once"),
    ],
)
def test_bad_cluster_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quiet(**kwargs)


def test_append_and_extend_return_stable_ids_and_validate_at_once() -> None:
    p = quiet(p=2, m="1G")
    assert p.jobs.append({"cmd": ["echo", "a"]}) == "job_0001"
    assert p.jobs.append(mpmsub.Job(["echo", "b"]).with_id("mine")) == "mine"
    assert p.jobs.extend([["echo", "c"], mpmsub.job(["echo", "d"], p=1)]) == ["job_0002", "job_0003"]
    assert len(p.jobs) == 4
    assert p.jobs.append({"cmd": ["x"], "id": "mine"}) == "mine_2"  # renamed, as the original accepted it
    with pytest.raises(ValueError, match="unknown job key 'comand' \\(did you mean 'cmd'\\?\\)"):
        p.jobs.append({"comand": ["x"]})
    with pytest.raises(ValueError, match="can never run on this cluster: it asks for 3 CPUs but the executor has 2"):
        p.jobs.append({"cmd": ["x"], "p": 3})
    with pytest.raises(ValueError, match="asks for 2G of memory"):
        p.jobs.append({"cmd": ["x"], "m": "2G"})
    with pytest.raises(ValueError, match="cmd is empty"):
        p.jobs.extend([{"cmd": ["ok"]}, {"cmd": []}])
    assert len(p.jobs) == 5  # a failed extend queues nothing
    assert p.jobs.append({"cmd": ["echo", "e"]}) == "job_0004"


def test_run_returns_stats_and_sorts_results() -> None:
    p = quiet(p=2, m="1G")
    p.jobs.append({"cmd": ["echo", "hello"], "p": 1, "m": "10M"})
    p.jobs.append({"cmd": ["sh", "-c", "echo bad >&2; exit 1"]})
    p.jobs.append(mpmsub.Job(alloc_cmd(100, 0.2)).memory("200M"))
    stats = p.run()
    assert len(p.jobs) == 0
    assert stats["jobs"] == {
        "total": 3,
        "completed": 2,
        "failed": 1,
        "cancelled": 0,
        "killed": 0,
        "success_rate": 2 / 3,
        "pending": 0,
        "running": 0,
    }
    assert stats["cluster"]["cpus"] == 2 and stats["cluster"]["memory_mb"] == 1024
    assert stats["time"]["wall"] > 0 and stats["memory"]["peak_job_mb"] >= 100
    assert p.stats == stats or p.stats["jobs"] == stats["jobs"]
    assert sorted(r.job_id for r in p.completed_jobs) == ["job_0001", "job_0003"]
    assert [r.stderr for r in p.failed_jobs] == ["bad\n"]


def test_run_with_max_workers_runs_one_at_a_time() -> None:
    p = quiet(p=2, m="1G")
    p.jobs.extend([["sleep", "0.2"]] * 3)
    p.run(max_workers=1)
    spans = sorted((r.start_time, r.end_time) for r in p.completed_jobs)
    assert all(a[1] <= b[0] + 0.01 for a, b in zip(spans, spans[1:]))


def test_print_summary_and_describe_resources() -> None:
    p = quiet(p=2, m="1G")
    p.jobs.extend([["echo", "x"], {"cmd": ["false"], "id": "falsy"}])
    p.run()
    out = io.StringIO()
    with redirect_stdout(out):
        p.print_summary()
        p.describe_resources()
    text = out.getvalue()
    assert "2 total, 1 completed, 1 failed" in text
    assert "falsy" in text and "exited with status 1" in text
    assert "CPUs:   2 for jobs" in text and "memory: 1G for jobs" in text


def test_profile_runs_one_at_a_time_ignoring_reservations_and_recommends(capsys: pytest.CaptureFixture) -> None:
    p = quiet(p=2, m="1G")
    p.jobs.append(mpmsub.Job(alloc_cmd(150, 0.1)).memory("900M").with_id("big"))
    p.jobs.append(mpmsub.Job(alloc_cmd(60, 0.1)).memory("900M"))  # together they would not fit
    results = p.profile()
    out = capsys.readouterr().out
    assert [r.job_id for r in results] == ["big", "job_0001"]
    assert results[0].end_time <= results[1].start_time + 0.01
    assert 150 <= results[0].memory_used <= 200
    rec = recommend_memory(results[0].memory_used)
    assert f"{rec:>10}" in out and "Ready to paste" in out and "'id': 'big'" in out
    assert parse_memory(rec) >= 1.2 * results[0].memory_used * 2**20
    snippet = out[out.index("import mpmsub") :]
    assert "p.run()" in snippet
    compile(snippet, "snippet", "exec")
    assert len(p.completed_jobs) == 2 and len(p.jobs) == 0


@given(st.floats(min_value=0, max_value=10**7, allow_nan=False))
def test_recommend_memory_is_at_least_peak_plus_buffer(peak: float) -> None:
    rec = recommend_memory(peak)
    assert parse_memory(rec) >= peak * 1.2 * 2**20 - 1
    assert parse_memory(rec) <= max(peak * 1.2 * 1.1 + 1.0, 1.0) * 2**20 + 1  # rounded up by little


def test_recommend_memory_examples() -> None:
    assert [recommend_memory(x) for x in (125, 62.5, 0, 2000, 9.3)] == ["150M", "75M", "1M", "2.4G", "12M"]


def test_verbose_logs_job_ends_and_progress_goes_to_stderr(capsys: pytest.CaptureFixture) -> None:
    logger = logging.getLogger("mpmsub")
    level, handlers = logger.level, list(logger.handlers)
    p = mpmsub.cluster(p=1, m="1G", verbose=True, progress_bar=True)
    p.jobs.extend([["echo", "x"], ["false"]])
    p.run()
    err = capsys.readouterr().err
    assert "job_0001 done" in err and "job_0002 FAILED: exited with status 1" in err
    assert "2/2 (100.0%)" in err
    assert logger.handlers == handlers  # the handler is removed after the run
    assert logger.level == level  # and the logger's level is as it was


def test_quiet_cluster_prints_nothing(capsys: pytest.CaptureFixture) -> None:
    p = quiet(p=1, m="1G")
    p.jobs.append(["echo", "x"])
    p.run()
    assert capsys.readouterr() == ("", "")


def test_ctrl_c_during_run(tmp_path: Path) -> None:
    marker = unique_sleep()
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys, mpmsub
        p = mpmsub.cluster(p=2, m="1G", verbose=False, progress_bar=False)
        p.jobs.append(["echo", "quick"])
        p.jobs.extend([["sh", "-c", "sleep {marker} & sleep {marker}"] for _ in range(5)])
        try:
            p.run()
        except KeyboardInterrupt:
            print(json.dumps(p.stats["jobs"]), flush=True)
            print(json.dumps(sorted(r.error or "" for r in p.failed_jobs)), flush=True)
            raise
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mpmsub.__file__).parent.parent), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    deadline = time.monotonic() + 30
    while len(processes_with(marker)) < 4 and time.monotonic() < deadline:  # two jobs running: echo is done
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    lines = out.splitlines()
    import json

    jobs, errors = json.loads(lines[0]), json.loads(lines[1])
    assert jobs["total"] == 6 and jobs["completed"] == 1 and jobs["failed"] == 5 and jobs["cancelled"] == 5
    assert errors.count("cancelled before it started: KeyboardInterrupt") == 3
    assert errors.count("killed: stopped by KeyboardInterrupt") == 2
    assert not wait_gone(marker)


def test_run_never_overlaps_jobs_past_the_memory_budget() -> None:
    p = quiet(p=4, m="1000M")
    for i in range(4):
        p.jobs.append({"cmd": ["sleep", "0.2"], "m": "400M" if i % 2 else "600M"})
    p.run()
    results = p.completed_jobs
    assert len(results) == 4
    for r in results:
        moment = r.start_time + 1e-3
        in_force = sum(o.memory_requested or 0 for o in results if o.start_time <= moment < o.end_time)
        assert in_force <= 1000, f"{in_force} MB reserved at the start of {r.job_id}"


def test_the_profile_snippet_keeps_the_jobs_options(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    p = quiet(p=1, m="1G")
    p.jobs.append(mpmsub.Job(["echo", "x"]).memory("50M").strict_memory().with_retries(2, 3).working_dir(tmp_path))
    p.profile()
    out = capsys.readouterr().out
    assert f"'cwd': '{tmp_path}'" in out and "'strict': True" in out and "'retries': 2, 'memory_growth': 3.0" in out


def _main_thread_calls(jobs: int) -> int:
    """Function calls (Python and C) the running thread makes while a cluster runs `jobs` jobs."""
    batch = mpmsub.cluster(p=2, m="1G", verbose=False, progress_bar=False)
    batch.jobs.extend([["true"]] * jobs)
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        batch.run()
    finally:
        sys.setprofile(None)
    assert batch.stats["jobs"]["completed"] == jobs
    return calls


def test_waiting_for_a_batch_costs_the_same_per_job_however_large_it_is() -> None:
    # Counted, not timed: waiting on every pending future at each job's end made the work per
    # job grow with the batch (8,000 jobs took 70x as long as 1,000).
    small, large = _main_thread_calls(150), _main_thread_calls(600)
    assert large / small < 5.5, (small, large)  # 4 where the cost per job is constant


# -- killing one job -------------------------------------------------------------------------------

T = TypeVar("T")


def running_ids(p: mpmsub.Cluster) -> Set[str]:
    return {job.job_id for job in p.running()}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.02)


def beside_the_run(work: Callable[[], T]) -> Future[T]:
    """`work` in a thread of its own, while the test's thread runs the cluster."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)


def two_sleeps(marker: str) -> List[str]:
    """A job whose whole tree (a shell and two sleeps of `marker` seconds) kill() must end."""
    return ["sh", "-c", f"sleep {marker} & sleep {marker}; wait"]


def until_file(path: Path) -> List[str]:
    """A job that runs until `path` exists."""
    return ["sh", "-c", f'while [ ! -e "{path}" ]; do sleep 0.02; done']


def test_kill_from_another_thread_kills_one_job_and_its_siblings_finish(tmp_path: Path) -> None:
    marker = unique_sleep()
    release = tmp_path / "release"
    p = quiet(p=3, m="1G")
    p.jobs.append({"cmd": two_sleeps(marker), "id": "long"})
    p.jobs.append({"cmd": until_file(release), "id": "sibling"})  # runs all through the kill
    p.jobs.append({"cmd": ["echo", "quick"], "id": "quick"})

    def kill_long() -> Tuple[bool, bool]:
        try:
            wait_until(lambda: {"long", "sibling"} <= running_ids(p), "long and sibling did not run")
            wait_until(lambda: len(processes_with(marker)) == 2, "long's sleeps did not start")
            return p.kill("long", "enough of it"), p.kill("long", "again")
        finally:  # the sibling ends once long is killed (or the test failed)
            release.touch()

    killer = beside_the_run(kill_long)
    stats = p.run()
    assert killer.result(timeout=30) == (True, False)  # killed once: the second kill finds it killed
    assert not wait_gone(marker)  # the whole tree: the shell and both sleeps
    assert stats["jobs"]["killed"] == 1 and stats["jobs"]["failed"] == 1 and stats["jobs"]["cancelled"] == 0
    assert sorted(r.job_id for r in p.completed_jobs) == ["quick", "sibling"]
    (long,) = p.failed_jobs
    assert (long.job_id, long.failure, long.error) == ("long", "killed", "killed: enough of it")
    assert long.runtime > 0
    out = io.StringIO()
    with redirect_stdout(out):
        p.print_summary()
    text = out.getvalue()
    assert "  jobs:      3 total, 2 completed, 1 failed (1 killed)\n" in text
    assert "Killed jobs (1):\n  long           killed: enough of it" in text
    assert "Failed jobs" not in text  # a kill is the user's own doing, not a failure to look into
    assert any(line.startswith("long           KILLED ") for line in text.splitlines())
    assert not any(" FAILED " in line for line in text.splitlines())
    assert p.kill("long") is False and p.kill("quick") is False  # no run under way: nothing to kill


def test_kill_from_on_result(tmp_path: Path) -> None:
    marker = unique_sleep()
    p = quiet(p=2, m="1G")
    p.jobs.append({"cmd": two_sleeps(marker), "id": "long"})
    p.jobs.append({"cmd": until_file(tmp_path / "go"), "id": "first"})
    killed: List[bool] = []

    def on_result(result: mpmsub.JobResult) -> None:
        if result.job_id == "first":
            killed.append(p.kill("long", "first is done"))

    # first ends once long's sleeps run: long is running when on_result kills it
    waiter = beside_the_run(lambda: wait_until(lambda: len(processes_with(marker)) == 2, "long did not start"))
    waiter.add_done_callback(lambda _: (tmp_path / "go").touch())
    stats = p.run(on_result=on_result)
    waiter.result(timeout=30)
    assert killed == [True]
    assert not wait_gone(marker)
    assert stats["jobs"]["killed"] == 1 and [r.job_id for r in p.completed_jobs] == ["first"]
    (long,) = p.failed_jobs
    assert (long.failure, long.error) == ("killed", "killed: first is done")


def test_kill_a_job_still_queued_it_never_runs(tmp_path: Path) -> None:
    marker = unique_sleep()
    ran = tmp_path / "ran"
    p = quiet(p=1, m="1G", schedule="fifo")
    p.jobs.append({"cmd": two_sleeps(marker), "id": "blocker"})
    p.jobs.append({"cmd": ["touch", str(ran)], "id": "waiting"})  # waits for the one CPU

    def kill_both() -> Tuple[bool, bool, Set[str]]:
        wait_until(lambda: running_ids(p) == {"blocker"}, "blocker did not run")
        queued = p.kill("waiting", "not needed after all")
        return queued, p.kill("blocker"), running_ids(p)

    killer = beside_the_run(kill_both)
    stats = p.run()
    queued, blocker, running = killer.result(timeout=30)
    assert queued and blocker and "waiting" not in running
    assert not wait_gone(marker)
    assert not ran.exists()  # it never started
    assert stats["jobs"]["killed"] == 2 and stats["jobs"]["failed"] == 2 and stats["jobs"]["completed"] == 0
    results = {r.job_id: r for r in p.failed_jobs}
    assert (results["waiting"].failure, results["waiting"].error) == (
        "killed",
        "killed before it started: not needed after all",
    )
    assert results["waiting"].runtime == 0
    assert (results["blocker"].failure, results["blocker"].error) == ("killed", "killed on request")
    text = mpmsub._report.text.summary_text(p.stats, p.failed_jobs)
    assert "2 total, 0 completed, 2 failed (2 killed)" in text
    table = text[text.index("job            status") :]
    assert "blocker" in table and "waiting" not in table  # a job that never ran has no runtime to show
    assert stats["time"]["job_mean"] == results["blocker"].runtime  # over the jobs that ran


def test_kill_of_an_unknown_or_ended_job() -> None:
    p = quiet(p=1, m="1G")
    with pytest.raises(ValueError, match="no job 'nope' was added to this cluster"):
        p.kill("nope")
    with pytest.raises(TypeError, match="takes a job's id"):
        p.kill(3)  # type: ignore[arg-type]
    p.jobs.append({"cmd": ["true"], "id": "a"})
    assert p.kill("a") is False  # queued, but no run is under way
    assert p.running() == []
    p.run()
    assert p.kill("a", "too late") is False
    with pytest.raises(ValueError, match="no job 'nope'"):
        p.kill("nope")
    assert p.stats["jobs"]["killed"] == 0 and [r.job_id for r in p.completed_jobs] == ["a"]


def test_running_lists_the_jobs_running_now() -> None:
    marker = unique_sleep()
    p = quiet(p=2, m="1G")
    p.jobs.append({"cmd": two_sleeps(marker), "id": "one", "m": "100M"})
    p.jobs.append({"cmd": two_sleeps(marker), "id": "two", "m": "100M"})
    p.jobs.append({"cmd": ["true"], "id": "later", "m": "100M"})  # waits for a CPU

    def look_and_kill() -> List[mpmsub.RunningJob]:
        try:
            wait_until(lambda: running_ids(p) == {"one", "two"}, "one and two did not run")
            return p.running()
        finally:
            p.kill("one")
            p.kill("two")

    looker = beside_the_run(look_and_kill)
    p.run()
    rows = looker.result(timeout=30)
    assert sorted(row.job_id for row in rows) == ["one", "two"]
    assert all(marker in row.command and row.cpus == 1 and row.memory_reserved == 100 * 2**20 for row in rows)
    assert all(row.runtime >= 0 and row.attempt == 1 for row in rows)
    assert not wait_gone(marker)
    assert p.running() == [] and [r.job_id for r in p.completed_jobs] == ["later"]
