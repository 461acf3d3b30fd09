"""The joblog's rows of killed jobs, written and read back: GNU parallel's convention for a job it
killed (Exitval -1, the signal), mpmsub's Failure column, and resuming that runs them again."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Optional

import pytest
from support.helpers import a_result

from mpmsub._cli import joblog as _joblog
from mpmsub._result import JobResult


def result(failure: Optional[str], returncode: Optional[int], job_id: str = "j1") -> JobResult:
    return a_result(failure, returncode, job_id=job_id)


@pytest.mark.parametrize(
    ("returncode", "fields"),
    [
        (-15, (-1, 15)),  # SIGTERM ended it
        (-9, (-1, 9)),  # it outlived the grace: SIGKILL
        (143, (-1, 15)),  # its first process exited of the SIGTERM it was sent (a shell's 128 + 15)
        (0, (-1, 15)),
        (None, (-1, 0)),  # killed before it started
    ],
)
def test_a_killed_job_is_written_as_gnu_parallel_writes_a_job_it_killed(
    returncode: Optional[int], fields: tuple
) -> None:
    assert _joblog.exit_fields(result("killed", returncode)) == fields


def test_the_failure_column_follows_jobid_and_is_empty_for_a_success() -> None:
    assert _joblog.COLUMNS[-2:] == ("JobId", "Failure")
    assert _joblog.HEADER.split("\t") == list(_joblog.COLUMNS)
    assert _joblog.row(1, "echo", result(None, 0)).rstrip("\n").split("\t")[-2:] == ["j1", ""]
    killed = _joblog.row(2, "sleep 9", result("killed", -15)).rstrip("\n").split("\t")
    assert len(killed) == len(_joblog.COLUMNS)
    assert (killed[6], killed[7], killed[-1]) == ("-1", "15", "killed")
    assert _joblog.row(3, "x", result("timeout", -15)).rstrip("\n").split("\t")[-1] == "timeout"


def test_a_killed_row_records_nothing_so_that_resuming_runs_the_job_again(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    joblog = _joblog.JobLog(str(log), append=False)
    joblog.write(1, "sleep 9", result("killed", -15))
    joblog.write(2, "false", result("exit", 1))
    joblog.write(3, "true", result(None, 0))
    joblog.write(4, "slow", result("timeout", -15))
    joblog.write(5, "queued", result("killed", None))
    joblog.close()
    assert _joblog.read(str(log)) == {(2, "false"): False, (3, "true"): True, (4, "slow"): False}
    # The last row of a job wins: killed on its rerun, it runs once more; then it succeeds.
    joblog = _joblog.JobLog(str(log), append=True)
    joblog.write(2, "false", result("killed", -9))
    joblog.write(1, "sleep 9", result(None, 0))
    joblog.close()
    assert _joblog.read(str(log)) == {(1, "sleep 9"): True, (3, "true"): True, (4, "slow"): False}
    assert log.read_text().count("\n") == 8  # the header and every row, killed ones too


def test_a_parallel_style_row_without_the_failure_column_reads_as_a_failure(tmp_path: Path) -> None:
    """GNU parallel writes -1 and 15 for a job it killed (its --timeout, say): without mpmsub's
    Failure column that is a failure like any other, skipped by --resume."""
    log = tmp_path / "log.tsv"
    log.write_text("\t".join(_joblog.PARALLEL_COLUMNS) + "\n" + "1\t:\t1.0\t0.5\t0\t0\t-1\t15\tsleep 9\n")
    assert _joblog.read(str(log)) == {(1, "sleep 9"): False}


@pytest.mark.parametrize("columns", [len(_joblog.PARALLEL_COLUMNS), len(_joblog.COLUMNS) - 1])
def test_an_older_joblog_keeps_its_columns_and_gets_no_row_for_a_killed_job(tmp_path: Path, columns: int) -> None:
    """GNU parallel's 9 columns, or an older mpmsub's 14 (no Failure): rows added on resume keep
    to them, and a killed job, which they could not tell from a failure, is left out, to run
    again on the next resume, as a cancelled one is."""
    log = tmp_path / "log.tsv"
    header = "\t".join(_joblog.COLUMNS[:columns])
    log.write_text(header + "\n" + _joblog.row(1, "echo a", result(None, 0), columns))
    joblog = _joblog.JobLog(str(log), append=True)
    assert not joblog.tells_killed and joblog.columns == columns
    joblog.write(2, "sleep 9", result("killed", -15))
    joblog.write(3, "false", result("exit", 1))
    joblog.close()
    lines = log.read_text().splitlines()
    assert lines[0] == header and len(lines) == 3
    assert all(len(line.split("\t")) == columns for line in lines)
    assert _joblog.read(str(log)) == {(1, "echo a"): True, (3, "false"): False}


def test_a_row_whose_command_holds_tabs_still_has_its_failure_read(tmp_path: Path) -> None:
    """mpmsub escapes a tab; a hand-made or foreign row that did not is still read from its end."""
    log = tmp_path / "log.tsv"
    fields = ["1", ":", "1.0", "0.5", "0", "0", "-1", "15", "printf\ta", "1.0", "1", "", "1", "j1", "killed"]
    log.write_text(_joblog.HEADER + "\n" + "\t".join(fields) + "\n" + _joblog.row(2, "b\tc", result(None, 0)))
    assert _joblog.read(str(log)) == {_joblog.key(2, "b\tc"): True}


def test_the_host_column_is_parallels_colon_here_and_the_node_or_worker_elsewhere() -> None:
    def host(where: Optional[str]) -> str:
        return _joblog.row(1, "true", dataclasses.replace(result(None, 0), host=where)).split("\t")[1]

    assert host(None) == ":" and host(socket.gethostname()) == ":"
    assert host("node7") == "node7" and host("tcp://10.0.0.5:40123") == "tcp://10.0.0.5:40123"
    assert host("a\tb") == "a\\tb"  # one column still
