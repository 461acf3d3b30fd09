"""The `mpmsub` command line, driven through the real console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest
from support.helpers import unique_sleep, wait_gone

from mpmsub import parse_memory
from mpmsub._cli import joblog as _joblog

SCRIPT = Path(sys.executable).with_name("mpmsub")


@pytest.fixture(autouse=True)
def _runtime_directory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every run here opens its control socket in a directory of its own, not the user's."""
    base = tempfile.mkdtemp(prefix="mx-", dir="/tmp")  # short: a socket's path has ~104 bytes at most
    monkeypatch.setenv("XDG_RUNTIME_DIR", base)
    yield
    shutil.rmtree(base, ignore_errors=True)


def mpmsub(*args: str, cwd: Path, stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), f"the console script is not installed next to {sys.executable}"
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60)


def rows(joblog: Path) -> List[List[str]]:
    lines = joblog.read_text().splitlines()
    mpmsubs = ["PeakMemMB", "Cpus", "ReqMemMB", "Attempts", "JobId", "Failure"]
    assert lines[0].split("\t") == [*_joblog.PARALLEL_COLUMNS, *mpmsubs]
    parallel = "Seq Host Starttime JobRuntime Send Receive Exitval Signal Command"  # GNU parallel's header
    assert "\t".join(_joblog.PARALLEL_COLUMNS) == parallel.replace(" ", "\t")
    return [line.split("\t") for line in lines[1:]]


def test_a_text_job_file_runs_with_its_output_a_joblog_and_a_summary(tmp_path: Path) -> None:
    (tmp_path / "jobs.txt").write_text("echo one\n# a comment\n\n  echo two >&2\nprintf '%s' \"$PWD\" > where.txt\n")
    out = mpmsub("run", "jobs.txt", "-p", "2", "-m", "1G", "--job-mem", "50M", "--joblog", "log.tsv", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "one\n"
    assert "two\n" in out.stderr and "mpmsub summary" in out.stderr and "3 total, 3 completed" in out.stderr
    assert (tmp_path / "where.txt").read_text() == str(tmp_path)
    logged = sorted(rows(tmp_path / "log.tsv"), key=lambda r: int(r[0]))
    assert [(r[0], r[1], r[6], r[7], r[8]) for r in logged] == [
        ("1", ":", "0", "0", "echo one"),
        ("2", ":", "0", "0", "echo two >&2"),
        ("3", ":", "0", "0", "printf '%s' \"$PWD\" > where.txt"),
    ]
    assert [(r[5], r[10], r[11], r[12], r[13]) for r in logged] == [
        ("4", "1", "50", "1", "job_0001"),
        ("0", "1", "50", "1", "job_0002"),
        ("0", "1", "50", "1", "job_0003"),
    ]


def test_a_jsonl_job_file_gives_each_job_its_own_settings(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    lines = [
        {
            "cmd": ["sh", "-c", 'echo "$WHO in $PWD"'],
            "id": "greet",
            "p": 2,
            "m": "100M",
            "cwd": "sub",
            "env": {"WHO": "me"},
        },
        {"cmd": "sleep 30", "id": "slow", "timeout": 0.5},
        {"cmd": [["printf", "b\\na\\n"], ["sort"]], "memory": "20M"},
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = mpmsub("run", "jobs.jsonl", "--json", "--joblog", "log.tsv", cwd=tmp_path)
    assert out.returncode == 1, out.stderr  # the timed-out job failed
    report = json.loads(out.stdout)
    assert report["stats"]["jobs"]["total"] == 3 and report["stats"]["jobs"]["failed"] == 1
    results = {r["job_id"]: r for r in report["results"]}
    assert results["greet"]["stdout"] == f"me in {tmp_path / 'sub'}\n"
    assert results["greet"]["cpus"] == 2 and results["greet"]["memory_requested"] == 100
    assert results["slow"]["failure"] == "timeout" and not results["slow"]["success"]
    assert results["job_0003"]["stdout"] == "a\nb\n" and results["job_0003"]["command"] == "printf 'b\\na\\n' | sort"
    assert [r["seq"] for r in report["results"]] == [1, 2, 3]
    slow = next(r for r in rows(tmp_path / "log.tsv") if r[13] == "slow")
    assert slow[6] == "-1" and slow[7] in (str(int(signal.SIGTERM)), str(int(signal.SIGKILL)))


def test_a_failed_job_makes_the_exit_status_1(tmp_path: Path) -> None:
    (tmp_path / "jobs.txt").write_text("true\nexit 3\n")
    out = mpmsub("run", "jobs.txt", "--no-progress", "--joblog", "log.tsv", cwd=tmp_path)
    assert out.returncode == 1
    assert "exited with status 3" in out.stderr
    assert sorted((r[0], r[6]) for r in rows(tmp_path / "log.tsv")) == [("1", "0"), ("2", "3")]


@pytest.mark.parametrize(
    ("args", "content", "message"),
    [
        (["-m", "lots"], "true\n", "invalid memory 'lots'"),
        (["-p", "0"], "true\n", "invalid cpus '0'"),
        (["--job-mem", "2X"], "true\n", "invalid job memory '2X'"),
        (["--timeout", "soon"], "true\n", "invalid timeout 'soon'"),
        (["--resume"], "true\n", "--resume and --resume-failed need --joblog FILE"),
        (["-m", "1G", "--job-mem", "2G"], "true\n", "jobs.txt:1: job 'job_0001' can never run"),
    ],
)
def test_a_usage_error_exits_2_naming_the_bad_value(
    tmp_path: Path, args: List[str], content: str, message: str
) -> None:
    (tmp_path / "jobs.txt").write_text(content)
    out = mpmsub("run", "jobs.txt", *args, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "usage: mpmsub run" in out.stderr


def test_a_malformed_line_is_reported_with_its_number_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "jobs.jsonl").write_text('{"cmd": ["touch", "ran"]}\n\n{"cmd": ["true"], "mem": "1G"}\n')
    out = mpmsub("run", "jobs.jsonl", cwd=tmp_path)
    assert out.returncode == 2
    assert "jobs.jsonl:3: unknown job key 'mem' (did you mean 'memory'?)" in out.stderr
    assert not (tmp_path / "ran").exists()
    (tmp_path / "jobs.jsonl").write_text('{"cmd": ["touch", "ran"]}\n{"cmd": ["true"]\n')
    out = mpmsub("run", "jobs.jsonl", cwd=tmp_path)
    assert out.returncode == 2 and "jobs.jsonl:2: not valid JSON" in out.stderr
    assert not (tmp_path / "ran").exists()
    out = mpmsub("run", "missing.txt", cwd=tmp_path)
    assert out.returncode == 2 and "cannot read the job file 'missing.txt'" in out.stderr


def test_jobs_are_read_from_stdin_as_text_or_json_lines(tmp_path: Path) -> None:
    out = mpmsub("run", "-", "-q", cwd=tmp_path, stdin="echo a\n# skipped\necho b\n")
    assert out.returncode == 0 and sorted(out.stdout.split()) == ["a", "b"] and out.stderr == ""
    out = mpmsub("run", "-", "-q", "--json", cwd=tmp_path, stdin='{"cmd": ["echo", "c"], "id": "x"}\n')
    assert out.returncode == 0 and json.loads(out.stdout)["results"][0]["stdout"] == "c\n"


def test_a_driver_killed_by_sigkill_resumes_without_running_a_finished_job_again(tmp_path: Path) -> None:
    """Each job appends its number to runs.txt when it starts. The driver is killed with SIGKILL
    after a few jobs finished; `--resume` must not start any job its joblog records again."""
    count = 10
    (tmp_path / "jobs.txt").write_text("".join(f"echo {n} >> runs.txt; sleep 0.3\n" for n in range(1, count + 1)))
    log = tmp_path / "log.tsv"
    args = [str(SCRIPT), "run", "jobs.txt", "-p", "2", "--schedule", "fifo", "--joblog", "log.tsv", "-q"]
    driver = subprocess.Popen(args, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not (log.exists() and len(log.read_text().splitlines()) > 3):  # 3 jobs done
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.01)
    driver.kill()
    driver.wait()
    done = {int(r[0]) for r in rows(log)}
    assert 3 <= len(done) < count
    time.sleep(0.5)  # the watchman kills the jobs that were running
    started_before = (tmp_path / "runs.txt").read_text().split()
    out = mpmsub("run", "jobs.txt", "-p", "2", "--joblog", "log.tsv", "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{len(done)} job(s) skipped" in out.stderr
    runs = [int(n) for n in (tmp_path / "runs.txt").read_text().split()]
    assert all(runs.count(n) == 1 for n in done), (runs, done)
    assert len(runs) - len(started_before) == count - len(done)
    assert sorted(int(r[0]) for r in rows(log)) == list(range(1, count + 1))  # each recorded once


def test_resume_failed_reruns_only_the_failed_jobs(tmp_path: Path) -> None:
    # A backslash in a command, escaped in the joblog, still names the same job on resume.
    (tmp_path / "jobs.txt").write_text("printf 'x\\n' >> ok.txt\ntest -e second || { touch second; exit 4; }\n")
    first = mpmsub("run", "jobs.txt", "--joblog", "log.tsv", "-q", cwd=tmp_path)
    assert first.returncode == 1
    again = mpmsub("run", "jobs.txt", "--joblog", "log.tsv", "--resume-failed", "-q", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "ok.txt").read_text() == "x\n"
    assert [(r[0], r[6]) for r in rows(tmp_path / "log.tsv")][-1] == ("2", "0")
    resumed = mpmsub("run", "jobs.txt", "--joblog", "log.tsv", "--resume", "--json", cwd=tmp_path)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["skipped"] == 2


def test_profile_recommends_memory_and_writes_a_job_file_to_run(tmp_path: Path) -> None:
    hold = f"{sys.executable} -c 'import time; x = bytearray(60 * 2**20); time.sleep(0.3)'"
    (tmp_path / "jobs.txt").write_text(f"{hold}\necho hi\n")
    out = mpmsub("profile", "jobs.txt", "-o", "sized.jsonl", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "recommend" in out.stdout and "wrote 2 job(s)" in out.stderr
    sized = [json.loads(line) for line in (tmp_path / "sized.jsonl").read_text().splitlines()]
    assert [job["cmd"] for job in sized] == [hold, "echo hi"]
    assert 60 * 2**20 <= parse_memory(sized[0]["m"]) <= 110 * 2**20
    assert all(job["p"] == 1 for job in sized)
    again = mpmsub("run", "sized.jsonl", "-q", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == "hi\n"


def test_sigterm_kills_the_running_jobs_and_exits_143(tmp_path: Path) -> None:
    arg = unique_sleep()
    (tmp_path / "jobs.txt").write_text(f"sleep {arg}\n")
    driver = subprocess.Popen([str(SCRIPT), "run", "jobs.txt", "-q"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not wait_gone(arg, timeout=0):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=20)
    assert driver.returncode == 128 + signal.SIGTERM
    assert "terminated; running jobs were killed" in err
    assert not wait_gone(arg, timeout=3)


def test_python_dash_m_and_the_help_texts() -> None:
    top = subprocess.run([sys.executable, "-m", "mpmsub", "--help"], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0 and "run" in top.stdout and "profile" in top.stdout
    run = subprocess.run([str(SCRIPT), "run", "--help"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "examples:" in run.stdout and "--resume-failed" in run.stdout
    assert "exit status:" in run.stdout
    version = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("mpmsub ")
    none = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert none.returncode == 2 and "COMMAND" in none.stderr
    assert os.access(SCRIPT, os.X_OK)


def test_an_empty_job_file_runs_nothing_and_succeeds(tmp_path: Path) -> None:
    out = mpmsub("run", "-", cwd=tmp_path, stdin="# nothing today\n\n")
    assert out.returncode == 0 and "holds no job" in out.stderr


def test_json_lines_may_hold_comments_and_any_character_in_a_string(tmp_path: Path) -> None:
    line = json.dumps({"cmd": ["printf", "%s", "a\u2028b\x0cc"]}, ensure_ascii=False)
    out = mpmsub("run", "-", "-q", cwd=tmp_path, stdin=f"# my jobs\n{line}\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a\u2028b\x0cc"


def test_a_job_without_an_id_whose_name_is_taken_says_so(tmp_path: Path) -> None:
    (tmp_path / "jobs.jsonl").write_text('{"cmd": ["true"], "id": "job_0002"}\n{"cmd": ["true"]}\n')
    out = mpmsub("run", "jobs.jsonl", cwd=tmp_path)
    assert out.returncode == 2
    assert "jobs.jsonl:2: duplicate job id 'job_0002'" in out.stderr and "taken by line 1's" in out.stderr


def test_a_gnu_parallel_joblog_is_resumed_and_kept_in_its_columns(tmp_path: Path) -> None:
    (tmp_path / "jobs.txt").write_text("echo one >> runs.txt\necho two >> runs.txt\n")
    parallel = "\t".join(_joblog.PARALLEL_COLUMNS) + "\n" + "1\t:\t1.0\t0.1\t0\t0\t0\t0\techo one >> runs.txt\n"
    (tmp_path / "log.tsv").write_text(parallel)
    for _ in range(2):
        out = mpmsub("run", "jobs.txt", "--joblog", "log.tsv", "--resume", "-q", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    assert (tmp_path / "runs.txt").read_text() == "two\n"
    lines = (tmp_path / "log.tsv").read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 9 for line in lines)


def test_a_closed_stdout_stops_the_printing_not_the_jobs(tmp_path: Path) -> None:
    """`mpmsub run jobs.txt | head -n 1`: the jobs that end after the reader is gone still run
    and are recorded; no traceback."""
    (tmp_path / "jobs.txt").write_text("echo first\n" + "sleep 0.5; echo later\n" * 3)
    args = [str(SCRIPT), "run", "jobs.txt", "-p", "1", "--schedule", "fifo", "--joblog", "log.tsv", "-q"]
    driver = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert driver.stdout is not None and driver.stderr is not None
    assert driver.stdout.readline() == "first\n"
    driver.stdout.close()
    err = driver.stderr.read()
    driver.stderr.close()
    assert driver.wait(timeout=30) == 0, err
    assert "Traceback" not in err
    assert len(rows(tmp_path / "log.tsv")) == 4


def test_profile_checks_its_output_file_before_running_anything(tmp_path: Path) -> None:
    (tmp_path / "jobs.txt").write_text("touch ran\n")
    out = mpmsub("profile", "jobs.txt", "-o", "missing/dir/sized.jsonl", cwd=tmp_path)
    assert out.returncode == 2 and "cannot write 'missing/dir/sized.jsonl'" in out.stderr
    assert not (tmp_path / "ran").exists()
    out = mpmsub("profile", "jobs.txt", "-o", "sized.jsonl", "-q", "--timeout", "60", "--job-mem", "5M", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (sized,) = [json.loads(line) for line in (tmp_path / "sized.jsonl").read_text().splitlines()]
    assert sized["timeout"] == 60 and sized["p"] == 1 and sized["m"] != "5M"  # measured, not the default


def test_numbers_too_large_are_usage_errors_naming_them(tmp_path: Path) -> None:
    """Not an OverflowError's traceback and exit 1: argparse's usage error, or the job file's
    line, and exit 2, before anything runs."""
    huge = "9" * 400
    (tmp_path / "jobs.txt").write_text("touch ran\n")
    for args, message in [
        (["--job-mem", huge + "G"], f"argument --job-mem: invalid job memory '{huge}G': too large, at most 1048576T"),
        (["-m", huge + "G"], f"argument -m/--memory: invalid memory '{huge}G'"),
        (["-p", huge], f"argument -p/--cpus: invalid cpus '{huge}': expected a whole number of CPUs, from 1 to"),
        (["--job-cpus", "+-3"], "argument --job-cpus: invalid job cpus '+-3'"),
        (["--timeout", huge + "d"], f"argument --timeout: invalid timeout '{huge}d'"),
    ]:
        out = mpmsub("run", "jobs.txt", *args, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr and "usage: mpmsub run" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    (tmp_path / "jobs.jsonl").write_text(f'{{"cmd": ["touch", "ran"]}}\n{{"cmd": ["true"], "p": {huge}}}\n')
    out = mpmsub("run", "jobs.jsonl", cwd=tmp_path)
    assert out.returncode == 2 and f"jobs.jsonl:2: invalid p (cpus) {huge}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "ran").exists()


def test_sigterm_takes_effect_while_a_large_batch_is_still_being_submitted(tmp_path: Path) -> None:
    jobs = 20_000
    arg = unique_sleep()
    (tmp_path / "jobs.txt").write_text(f"sleep {arg}\n" * jobs)
    command = [str(SCRIPT), "run", "jobs.txt", "-p", "1", "-q", "--json", "--trace", "trace.jsonl"]
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not wait_gone(arg, timeout=0):  # the first job starts as the rest are being submitted
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.005)
    driver.send_signal(signal.SIGTERM)
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert not wait_gone(arg, timeout=3)
    report = json.loads(out)
    stats = report["stats"]["jobs"]
    assert stats["total"] == jobs and stats["cancelled"] == jobs  # the unsubmitted ones too
    errors = {r["error"] for r in report["results"]}
    assert "killed: stopped by SIGTERM" in errors and "cancelled before it started: SIGTERM" in errors, errors
    # Only submitted jobs reach the trace: the signal stopped the submission part way.
    traced = sum(1 for line in (tmp_path / "trace.jsonl").read_text().splitlines() if '"type":"end"' in line)
    assert traced < jobs - 500, traced


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "jobs.txt", "--joblog", "jobs.txt"], "--joblog 'jobs.txt' is the job file"),
        (["run", "jobs.txt", "--joblog", "sub/../jobs.txt"], "is the job file: writing the joblog would overwrite"),
        (["run", "jobs.txt", "--joblog", "link.txt"], "--joblog 'link.txt' is the job file"),
        (["run", "jobs.txt", "--trace", "link.txt"], "--trace 'link.txt' is the job file"),
        (["profile", "jobs.txt", "-o", "jobs.txt"], "-o 'jobs.txt' is the job file: writing the output would"),
        (["profile", "jobs.txt", "-o", "t.jsonl", "--trace", "t.jsonl"], "--trace 't.jsonl' is the output"),
        (["history", "--db", "h.db", "export", "-o", "h.db"], "-o 'h.db' is the run history"),
        (["run", "jobs.txt", "--results", "jobs.txt"], "--results 'jobs.txt' is the job file"),
        (["run", "jobs.txt", "--joblog", "res", "--results", "res"], "--results 'res' is the joblog"),
    ],
)
def test_an_output_that_names_an_input_is_refused_before_it_is_touched(
    argv: List[str], message: str, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "jobs.txt").write_text("true\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "jobs.txt")
    from mpmsub._learn.history import History

    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        history.add([("true", '["true"]', 0, 1, 0.1, 0.0, 0, None, None, "host", "0", 1.0)])
    before = (tmp_path / "h.db").read_bytes()
    out = mpmsub(*argv, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert (tmp_path / "jobs.txt").read_text() == "true\n"
    assert (tmp_path / "h.db").read_bytes() == before
    assert not (tmp_path / "res").exists()


def test_a_command_naming_a_file_that_is_not_utf8_is_logged_as_its_bytes_and_resumed(tmp_path: Path) -> None:
    # A text job file read in the C locale keeps such bytes as surrogates; a JSON string may hold one.
    (tmp_path / "jobs.jsonl").write_text('{"cmd": ["touch", "caf\\udce9"], "id": "json"}\n{"cmd": ["true"]}\n')
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    command = [str(SCRIPT), "run", "-", "--joblog", "text.tsv", "-q"]
    text = subprocess.run(command, cwd=tmp_path, input=b"touch d\xe9j\xe0\ntrue\n", capture_output=True, env=env)
    assert text.returncode == 0, text.stderr
    out = mpmsub("run", "jobs.jsonl", "--joblog", "json.tsv", "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert os.path.exists(tmp_path / b"d\xe9j\xe0".decode("utf-8", "surrogateescape"))
    assert os.path.exists(tmp_path / "caf\udce9")
    logged = {r.split(b"\t")[8] for r in (tmp_path / "text.tsv").read_bytes().splitlines()[1:]}  # in any order
    assert logged == {b"touch d\xe9j\xe0", b"true"}
    assert b"touch 'caf\xe9'" in {r.split(b"\t")[8] for r in (tmp_path / "json.tsv").read_bytes().splitlines()}
    again = subprocess.run(
        [*command[:-1], "--resume"], cwd=tmp_path, input=b"touch d\xe9j\xe0\ntrue\n", capture_output=True, env=env
    )
    assert again.returncode == 0 and b"2 job(s) skipped" in again.stderr
    again = mpmsub("run", "jobs.jsonl", "--joblog", "json.tsv", "--resume", cwd=tmp_path)
    assert again.returncode == 0 and "2 job(s) skipped" in again.stderr


def test_a_joblog_that_cannot_take_every_row_fails_the_run_after_its_jobs(tmp_path: Path) -> None:
    import resource

    (tmp_path / "jobs.txt").write_text("echo ran >> ran.txt\n" * 6)
    room = len(_joblog.HEADER) + 1 + 100  # the header and about one row: then EFBIG (Python ignores SIGXFSZ)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    command = [str(SCRIPT), "run", "jobs.txt", "-p", "1", "--joblog", "log.tsv", "-q"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, preexec_fn=small_files, timeout=60)
    assert out.returncode == 1, out.stderr
    assert (tmp_path / "ran.txt").read_text() == "ran\n" * 6  # every job ran
    written = len(_joblog.read(str(tmp_path / "log.tsv")))  # a row cut short is not one
    assert written < 6 and f"is missing {6 - written} row(s)" in out.stderr
    assert "--resume would run those jobs again" in out.stderr


def test_the_joblog_row_is_written_when_the_job_ends_not_when_the_caller_gets_to_it() -> None:
    import threading

    import mpmsub as api

    second_logged = threading.Event()
    seen = []

    def on_end(result: api.JobResult) -> None:
        if result.job_id == "second":
            second_logged.set()

    def on_result(result: api.JobResult) -> None:
        if result.job_id == "first":  # the caller is busy with the first job while the second ends
            seen.append(second_logged.wait(20))

    batch = api.cluster(p=2, m="1G", verbose=False, progress_bar=False)
    batch.jobs.append({"cmd": ["true"], "id": "first"})
    batch.jobs.append({"cmd": ["sleep", "0.3"], "id": "second"})
    batch._run(on_result=on_result, on_end=on_end)
    assert seen == [True]


def test_files_the_commands_write_are_private_to_the_user(tmp_path: Path) -> None:
    (tmp_path / "jobs.txt").write_text("true\n")
    old = os.umask(0)
    try:
        commands = [
            ("run", "jobs.txt", "--joblog", "log.tsv", "--trace", "trace.jsonl", "-q"),
            ("report", "trace.jsonl", "-o", "report.html", "--no-plots"),
            ("profile", "jobs.txt", "-o", "sized.jsonl", "-q"),
            ("history", "export", "-o", "runs.jsonl"),
        ]
        for command in commands:
            assert mpmsub(*command, cwd=tmp_path).returncode == 0
    finally:
        os.umask(old)
    for name in ("log.tsv", "trace.jsonl", "report.html", "sized.jsonl", "runs.jsonl"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o600), name


def test_results_dir_keeps_each_jobs_output_in_files_of_its_own(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "jobs.jsonl").write_text(
        '{"cmd": "echo one; echo oops >&2"}\n'
        '{"cmd": "echo two", "cwd": "work"}\n'
        '{"cmd": "echo three", "stdout": "own.txt"}\n'
    )
    out = mpmsub("run", "jobs.jsonl", "--results", "res", "--joblog", "log.tsv", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "res" / "1" / "stdout").read_text() == "one\n"
    assert (tmp_path / "res" / "1" / "stderr").read_text() == "oops\n"
    assert (tmp_path / "res" / "2" / "stdout").read_text() == "two\n"  # not under the job's cwd
    assert (tmp_path / "own.txt").read_text() == "three\n"  # a job's own file is kept
    assert not (tmp_path / "res" / "3" / "stdout").exists()
    assert [r["stdout"] for r in json.loads(out.stdout)["results"]] == [None, None, None]
    assert oct(os.stat(tmp_path / "res").st_mode & 0o777) == oct(0o700)


@pytest.mark.skipif(not os.path.exists("/proc/self/wchan"), reason="tells a read of a pipe by /proc/PID/wchan")
def test_ctrl_c_while_the_job_file_is_read_exits_130_without_a_traceback(tmp_path: Path) -> None:
    driver = subprocess.Popen(
        [str(SCRIPT), "run", "-"], cwd=tmp_path, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    # Blocked reading standard input (pipe_read; pipe_wait on kernels before 5.5).
    while not any(w in Path(f"/proc/{driver.pid}/wchan").read_text() for w in ("pipe_read", "pipe_wait")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=20)
    assert driver.returncode == 130 and err == "mpmsub: interrupted\n"


def test_dash_capital_v_is_the_version() -> None:
    out = subprocess.run([str(SCRIPT), "-V"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("mpmsub ")


def test_history_shows_a_key_on_several_lines_on_one_and_takes_it_back_as_shown(tmp_path: Path) -> None:
    from mpmsub._learn.history import History

    key = "python -c import sys\nprint(1)"
    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        history.add([(key, '["python"]', 0, 2**20, 0.1, 0.0, 0, None, None, "host", "0", 1.0)])
    listed = mpmsub("history", "--db", "h.db", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = [line for line in listed.stdout.splitlines() if line.startswith("python")]
    assert len(row) == 1 and row[0].startswith("python -c import sys\\nprint(1)")
    shown = mpmsub("history", "--db", "h.db", "show", "python -c import sys\\nprint(1)", cwd=tmp_path)
    assert shown.returncode == 0 and "runs: 1" in shown.stdout, shown.stderr


# -- command templates (GNU parallel's form) ------------------------------------------------------

HAVE_PARALLEL = subprocess.run(["sh", "-c", "command -v parallel"], capture_output=True).returncode == 0
ODD_VALUES = ["a b", "it's", 'say "hi"', "$HOME", "é ü", "", "*", "x\\y"]


def quiet(*args: str, cwd: Path, stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    return mpmsub("run", "-q", *args, cwd=cwd, stdin=stdin)


def test_a_template_runs_each_value_once_with_every_replacement_string(tmp_path: Path) -> None:
    out = quiet(
        "-k", "echo {} {.} {/} {//} {/.} {#} {1} {1.} {1/} {1//} {1/.}", ":::", "d.x/f.tar.gz", "g", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "d.x/f.tar.gz d.x/f.tar f.tar.gz d.x f.tar 1 d.x/f.tar.gz d.x/f.tar f.tar.gz d.x f.tar\ng g g . g 2 g g g . g\n"
    )


def test_values_with_spaces_quotes_dollars_and_unicode_stay_one_word(tmp_path: Path) -> None:
    out = quiet("-k", "printf '[%s]\\n'", ":::", *ODD_VALUES, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(f"[{v}]\n" for v in ODD_VALUES)


def test_several_and_linked_sources_files_and_stdin(tmp_path: Path) -> None:
    (tmp_path / "nums").write_text("1\n2\n")
    out = quiet("-k", "echo {1}{2}{3}", ":::", "a", "b", "::::", "nums", "::::+", "-", cwd=tmp_path, stdin="x\ny\n")
    assert out.stdout == "a1x\na2y\nb1x\nb2y\n", out.stderr
    out = quiet("-k", "-a", "nums", "echo", cwd=tmp_path)
    assert out.stdout == "1\n2\n", out.stderr


def test_null_separated_input_for_find_print0(tmp_path: Path) -> None:
    out = quiet("-0", "-k", "printf", "[%s]", ":::: ", cwd=tmp_path)  # ":::: " is a word of the command
    assert out.returncode == 2
    out = quiet("-0", "-k", "printf '[%s]\\n'", "::::", "-", cwd=tmp_path, stdin="a\nb\0c d\0")
    assert out.stdout == "[a\nb]\n[c d]\n", out.stderr


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path: Path) -> None:
    out = mpmsub("run", "--dry-run", "touch {}.made", ":::", "a b", "c", cwd=tmp_path)
    assert (out.returncode, out.stdout) == (0, "touch 'a b'.made\ntouch c.made\n"), out.stderr
    assert not list(tmp_path.iterdir())
    (tmp_path / "jobs.txt").write_text("touch x\ntouch y\n")
    out = mpmsub("run", "jobs.txt", "--dry-run", cwd=tmp_path)
    assert (out.stdout, sorted(p.name for p in tmp_path.iterdir())) == ("touch x\ntouch y\n", ["jobs.txt"])


def test_keep_order_and_tag(tmp_path: Path) -> None:
    out = quiet(
        "-j", "4", "-k", "--tag", "sleep {1}; echo {2}", ":::", "0.4", "0", ":::+", "one\ntwo", "three", cwd=tmp_path
    )
    assert out.stdout == "0.4 one\ntwo\tone\n0.4 one\ntwo\ttwo\n0 three\tthree\n", out.stderr
    (tmp_path / "jobs.txt").write_text("sleep 0.3; echo a\necho b\n")
    out = quiet("jobs.txt", "-k", "--tag", cwd=tmp_path)
    assert out.stdout == "sleep 0.3; echo a\ta\necho b\tb\n"


def test_jobs_caps_the_jobs_running_at_once(tmp_path: Path) -> None:
    script = "mkdir lock.{#} && ls -d lock.* | wc -l >> counts; sleep 0.3; rmdir lock.{#}"
    out = quiet("-j", "2", "-m", "1G", script, ":::", *"abcdef", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert max(int(n) for n in (tmp_path / "counts").read_text().split()) <= 2


@pytest.mark.parametrize(
    ("halt", "status", "most"),
    [
        ("now,fail=1", 1, 4),
        ("soon,fail=1", 1, 4),
        ("soon,fail=20%", 1, 4),
        ("now,success=1", 0, 4),
        ("soon,success=2", 0, 4),
    ],
)
def test_halt_stops_the_run_early(tmp_path: Path, halt: str, status: int, most: int) -> None:
    # Jobs 1 and 2 fail or succeed at once, the rest take 2 s: the run stops long before ten ran.
    # The job after one that ends may start while its end is being reported: one or two more.
    code = "1" if "fail" in halt else "0"
    script = f"echo {{#}} >> started; if [ {{#}} -le 2 ]; then exit {code}; fi; sleep 2; exit {1 - int(code)}"
    began = time.monotonic()
    out = quiet("-j", "1", "--halt", halt, script, ":::", *map(str, range(10)), cwd=tmp_path)
    assert out.returncode == status, out.stderr
    assert len((tmp_path / "started").read_text().split()) <= most
    assert time.monotonic() - began < 15


def test_halt_soon_met_while_a_large_batch_is_still_being_submitted(tmp_path: Path) -> None:
    out = mpmsub("run", "--no-progress", "--halt", "soon,fail=1", "exit 1", ":::", *map(str, range(5000)), cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "5000 total, 0 completed, 5000 failed" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["echo", ":::"], "the input source ::: is empty"),
        (["echo", "::::", "missing.txt"], "'missing.txt': No such file"),
        (["echo", "::::", "empty.txt"], "the input source 'empty.txt' is empty"),
        (["echo {3}", ":::", "a", ":::", "b"], "invalid replacement string '{3}'"),
        (["--halt", "never", "echo", ":::", "a"], "invalid --halt 'never'"),
        (["-j", "0", "echo", ":::", "a"], "invalid jobs '0'"),
        (["echo"], "did you mean: mpmsub run echo {} :::: - ?"),
        (["echo", "hi"], "did you mean: mpmsub run echo hi ::: VALUES... ?"),
    ],
)
def test_a_bad_template_is_a_usage_error_before_anything_runs(tmp_path: Path, args: List[str], message: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    out = mpmsub("run", "--joblog", "log.tsv", *args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "log.tsv").exists()


def test_a_nul_byte_in_a_value_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "values").write_bytes(b"a\0b\n")
    out = mpmsub("run", "echo", "::::", "values", cwd=tmp_path)
    assert out.returncode == 2 and "holds a NUL byte" in out.stderr


def test_a_templates_joblog_records_the_expanded_commands_and_resumes(tmp_path: Path) -> None:
    template = ["echo {} >> ran; test {} != b", ":::", "a", "b", "c"]
    out = quiet("--joblog", "log.tsv", *template, cwd=tmp_path)
    assert out.returncode == 1
    logged = sorted(rows(tmp_path / "log.tsv"), key=lambda r: int(r[0]))
    assert [(r[0], r[6], r[8]) for r in logged] == [
        ("1", "0", "echo a >> ran; test a != b"),
        ("2", "1", "echo b >> ran; test b != b"),
        ("3", "0", "echo c >> ran; test c != b"),
    ]
    assert quiet("--joblog", "log.tsv", "--resume", *template, cwd=tmp_path).returncode == 0
    assert sorted((tmp_path / "ran").read_text().split()) == ["a", "b", "c"]
    dry = mpmsub("run", "--dry-run", "--joblog", "log.tsv", "--resume-failed", *template, cwd=tmp_path)
    assert dry.stdout == "echo b >> ran; test b != b\n", dry.stderr
    assert quiet("--joblog", "log.tsv", "--resume-failed", *template, cwd=tmp_path).returncode == 1
    assert sorted((tmp_path / "ran").read_text().split()) == ["a", "b", "b", "c"]


def test_auto_memory_learns_one_key_per_template_with_the_files_as_input(tmp_path: Path) -> None:
    (tmp_path / "big file.txt").write_text("x" * 5000)
    env = {**os.environ, "MPMSUB_HISTORY": str(tmp_path / "h.db")}
    run = [str(SCRIPT), "run", "-q", "--job-mem", "auto", "wc -c {}", ":::", "big file.txt", "big file.txt"]
    out = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    export = subprocess.run([str(SCRIPT), "history", "export"], env=env, capture_output=True, text=True, check=True)
    runs = [json.loads(line) for line in export.stdout.splitlines()]
    assert [(r["key"], r["input_bytes"]) for r in runs] == [("wc -c {}", 5000)] * 2


@pytest.mark.skipif(not HAVE_PARALLEL, reason="GNU parallel is not installed")
@pytest.mark.parametrize(
    "words",
    [
        ["-k", "echo {} {.} {/} {//} {/.} {#}", ":::", "a.b/c", "x/y.tar.gz", "plain", "/f"],
        ["-k", "printf '[%s]\\n'", ":::", *ODD_VALUES],
        ["-k", "--tag", "echo {2}", ":::", "a", "b c", ":::", "1", "2"],
        ["-k", "-j", "3", "sleep {}; echo {}", ":::", "0.3", "0.1", "0.2", ":::+", "x", "y", "z"],
        ["-k", ":::", "echo 'x  y'", "printf '%s-' a b; echo", "echo {}"],
        ["-k", "{} {2}", ":::", "echo", "printf '<%s>'", ":::", "a b"],
    ],
)
def test_the_output_is_gnu_parallels_byte_for_byte(tmp_path: Path, words: List[str]) -> None:
    theirs = subprocess.run(["parallel", *words], cwd=tmp_path, capture_output=True, timeout=60)
    ours = subprocess.run([str(SCRIPT), "run", "-q", *words], cwd=tmp_path, capture_output=True, timeout=60)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout


@pytest.mark.skipif(not HAVE_PARALLEL, reason="GNU parallel is not installed")
def test_a_timed_out_job_is_in_the_joblog_as_gnu_parallel_writes_it(tmp_path: Path) -> None:
    """Exitval and Signal of a job the tool killed for its timeout: -1 and 15, as `parallel
    --timeout --joblog` writes them."""
    words = ["--timeout", "1", "--joblog", "{log}", "sh", "-c", "{}", ":::", "sleep 30", "exit 3", "true"]
    theirs = subprocess.run(
        ["parallel", *[w.replace("{log}", "theirs.tsv") for w in words]], cwd=tmp_path, capture_output=True, timeout=60
    )
    ours = subprocess.run(
        [str(SCRIPT), "run", "-q", *[w.replace("{log}", "ours.tsv") for w in words]],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert theirs.returncode == 2 and ours.returncode == 1, ours.stderr  # (parallel: 2 jobs failed)

    def fields(name: str) -> List[Tuple[str, str, str]]:
        lines = (tmp_path / name).read_text().splitlines()[1:]
        return sorted((row[0], row[6], row[7]) for row in (line.split("\t") for line in lines))

    assert fields("ours.tsv") == fields("theirs.tsv") == [("1", "-1", "15"), ("2", "3", "0"), ("3", "0", "0")]
