"""Job files and joblogs as pure functions: parsing and the round trip, with hypothesis."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.helpers import a_result

from mpmsub import JobResult
from mpmsub._cli import joblog as _joblog
from mpmsub._cli.jobfile import JobFileError, detect_format, read_jobs

# Characters str.splitlines() treats as line ends, and NUL (no argument may hold one).
_NOT_IN_A_LINE = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00"
line_text = st.text(st.characters(blacklist_characters=_NOT_IN_A_LINE, blacklist_categories=("Cs",)), max_size=40)


@given(st.lists(line_text, max_size=30))
def test_every_text_line_but_blanks_and_comments_is_a_shell_job_numbered_in_order(lines: List[str]) -> None:
    jobs = read_jobs("\n".join(lines), "jobs.txt", defaults={"p": 2, "m": "1G", "timeout": None})
    stripped = [(n, line.strip()) for n, line in enumerate(lines, 1)]
    expected = [(n, text) for n, text in stripped if text and not text.startswith("#")]
    assert [(job.line, job.command) for job in jobs] == expected
    assert [job.seq for job in jobs] == list(range(1, len(expected) + 1))
    for job in jobs:
        assert job.job == {"cmd": ["/bin/sh", "-c", job.command], "p": 2, "m": "1G"}
        assert job.spec.cpus == 2 and job.spec.memory == 2**30 and job.spec.timeout is None


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "p": st.integers(1, 8),
            "cpus": st.integers(1, 8),
            "m": st.sampled_from(["1M", "2G"]),
            "timeout": st.just(5),
        },
    )
)
def test_json_lines_keep_what_they_give_and_take_defaults_for_the_rest(extra: dict) -> None:
    line = json.dumps({"cmd": ["true"], **extra})
    if "p" in extra and "cpus" in extra:
        with pytest.raises(JobFileError, match=r"jobs\.jsonl:1: job dict gives 'p' twice"):
            read_jobs(line, "jobs.jsonl", defaults={"p": 3})
        return
    (job,) = read_jobs(line, "jobs.jsonl", defaults={"p": 3, "m": "5M", "timeout": 9, "retries": 1})
    assert job.spec.cpus == extra.get("p", extra.get("cpus", 3))
    assert job.spec.memory == {"1M": 2**20, "2G": 2**31, None: 5 * 2**20}[extra.get("m")]
    assert job.spec.timeout == extra.get("timeout", 9) and job.spec.retries == 1
    assert job.given == {"cmd": ["true"], **extra}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "jobs.jsonl:1: expected a job object"),
        ('{"cmd": []}', "jobs.jsonl:1: "),
        ('{"cmd": ["x"], "p": 0}', "jobs.jsonl:1: invalid"),
        ('\n\n{"cmd": ["x"], "m": "lots"}', "jobs.jsonl:3: invalid m (memory) 'lots'"),
        ('{"p": 1}', "jobs.jsonl:1: job dict has no 'cmd'"),
    ],
)
def test_a_bad_json_line_is_named_by_its_number(text: str, message: str) -> None:
    with pytest.raises(JobFileError, match=re.escape(message)):
        read_jobs(text, "jobs.jsonl")


_HUGE = "9" * 400  # a JSON integer far past a float's range


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("p", _HUGE, f"invalid p (cpus) {_HUGE}: expected a whole number of CPUs, from 1 to 10000000"),
        ("cpus", "1e400", "invalid p (cpus) inf"),  # JSON's overflowing float is inf
        ("m", _HUGE, f"invalid m (memory) {_HUGE}: too large, at most 1048576T (1 EiB) is accepted"),
        ("m", f'"{_HUGE}G"', f"invalid m (memory) '{_HUGE}G': too large"),
        ("timeout", _HUGE, f"invalid timeout {_HUGE}: expected a number of seconds, more than 0 and at most"),
        ("timeout", "Infinity", "invalid timeout inf"),
        ("memory_growth", _HUGE, f"invalid memory_growth {_HUGE}: expected a number from 1 to 1000000"),
        ("memory_growth", "NaN", "invalid memory_growth nan"),
    ],
)
def test_a_number_out_of_range_is_refused_naming_its_line(key: str, value: str, message: str) -> None:
    text = f'{{"cmd": ["true"]}}\n{{"cmd": ["true"], "retries": 1, "{key}": {value}}}\n'
    with pytest.raises(JobFileError, match=re.escape(f"jobs.jsonl:2: {message}")):
        read_jobs(text, "jobs.jsonl")
    with pytest.raises(JobFileError, match=re.escape(f"<stdin>:2: {message}")):
        read_jobs(text, "-")


def test_a_default_out_of_range_is_refused_at_the_first_line() -> None:
    with pytest.raises(JobFileError, match=re.escape(f"jobs.txt:1: invalid p (cpus) {10**400}")):
        read_jobs("true\n", "jobs.txt", defaults={"p": 10**400})


def test_the_format_follows_the_extension_or_stdins_first_job_line() -> None:
    assert detect_format("a.jsonl", "echo") == "jsonl" and detect_format("a.NDJSON", "") == "jsonl"
    assert detect_format("a.txt", '{"cmd": ["x"]}') == "text"
    assert detect_format("-", '# note\n{"cmd": ["x"]}') == "jsonl"
    assert detect_format("-", "{ echo a; }") == "text"
    with pytest.raises(ValueError, match="invalid job file format 'yaml'"):
        read_jobs("", "x", "yaml")


def _result(success: bool, returncode: int) -> JobResult:
    return a_result(None if success else "exit", returncode, job_id="j\t1", stdout="out")


@given(st.integers(1, 10**6), st.text(max_size=30), st.sampled_from([(True, 0), (False, 3), (False, -9), (False, 0)]))
def test_a_joblog_row_reads_back_as_the_same_job_and_outcome(seq: int, command: str, outcome: tuple) -> None:
    success, code = outcome
    text = _joblog.HEADER + "\n" + _joblog.row(seq, command, _result(success, code))
    assert text.count("\n") == 2  # one line, whatever the command holds
    with tempfile.TemporaryDirectory() as directory:  # not a fixed name in /tmp, which others can take
        path = Path(directory) / "joblog"
        path.write_text(text, encoding="utf-8")
        assert _joblog.read(str(path)) == {_joblog.key(seq, command): success}


def test_gnu_parallel_joblogs_read_and_the_last_row_of_a_job_wins(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text(
        "\t".join(_joblog.PARALLEL_COLUMNS) + "\n"
        "1\t:\t1.0\t0.1\t0\t0\t1\t0\techo a\n"
        "2\t:\t1.0\t0.1\t0\t0\t0\t0\techo\tb\n"  # GNU parallel does not escape a tab
        "1\t:\t2.0\t0.1\t0\t0\t0\t0\techo a\n"
        "3\t:\t2.0\n"  # cut short: skipped
    )
    assert _joblog.read(str(log)) == {(1, "echo a"): True, (2, "echo\tb"): True}
    (tmp_path / "other").write_text("not a joblog\n")
    with pytest.raises(ValueError, match="is not a joblog"):
        _joblog.read(str(tmp_path / "other"))
    assert _joblog.read(str(tmp_path / "absent")) == {}


def test_a_new_joblog_is_private_to_its_user(tmp_path: Path) -> None:
    """It holds every command line run: a new joblog is 0600 whatever the umask; one that resumed
    runs add to keeps its mode (it is the user's)."""
    path = tmp_path / "log.tsv"
    previous = os.umask(0)
    try:
        log = _joblog.JobLog(str(path), append=False)
        log.write(1, "tool --token=secret", _result(True, 0))
        log.close()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o640)
    log = _joblog.JobLog(str(path), append=True)
    log.write(2, "tool", _result(True, 0))
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert _joblog.read(str(path)) == {(1, "tool --token=secret"): True, (2, "tool"): True}
