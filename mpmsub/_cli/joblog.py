"""The joblog of the command line: one tab-separated row per finished job, GNU parallel's
columns first (so tools that read its joblogs read ours), mpmsub's after them.

A job killed on its own (`mpmsub kill`, Cluster.kill) is written as GNU parallel writes a job it
killed itself: Exitval -1 and the signal that ended it. Only mpmsub's Failure column then tells
it from a job parallel-style timed out; a joblog without that column (GNU parallel's own, or an
older mpmsub's, added to on resume) gets no row for it, as for a cancelled job, so that it runs
again on resume.

Rows are written as jobs end, each in one write and flushed at once, so a driver killed at any
moment leaves whole rows for every job that finished. `--resume` reads them back: a job of the
job file is the job of a row when both its number (Seq) and its command are the same, so a job
file edited since never has a job skipped for a different one's run.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from mpmsub._files import open_private
from mpmsub._result import KILLED, TIMEOUT, JobResult
from mpmsub._system import hostname

PARALLEL_COLUMNS = ("Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal", "Command")
MPMSUB_COLUMNS = ("PeakMemMB", "Cpus", "ReqMemMB", "Attempts", "JobId", "Failure")
COLUMNS = PARALLEL_COLUMNS + MPMSUB_COLUMNS
HEADER = "\t".join(COLUMNS)
LOCAL_HOST = ":"  # GNU parallel's name for this machine
_SIGTERM = 15  # what a kill sends first (signal.SIGTERM, the same number everywhere)

Key = Tuple[int, str]  # (Seq, Command)


def encode(text: str) -> bytes:
    """Text as the bytes it came from: a name that is not UTF-8 (read with surrogateescape, as
    Python reads file names and, in the C locale, standard input) is written back as it was."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte gave (a JSON "\\ud800"): escaped
        return text.encode("utf-8", "backslashreplace")


def escape(command: str) -> str:
    """The command as one tab-free line (a backslash, tab, newline or carriage return becomes
    \\\\, \\t, \\n or \\r)."""
    return command.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def key(seq: int, command: str) -> Key:
    """How `read` names the job of number `seq` running `command`."""
    return (seq, escape(command))


def exit_fields(result: JobResult) -> Tuple[int, int]:
    """(Exitval, Signal) as GNU parallel records them: the exit code and 0 for a process that
    exited, 0 and the signal's number for one killed by a signal; -1 and 0 for a job that never
    ran. A job mpmsub killed (kill(), its timeout) has -1 and the signal that ended it (SIGTERM's
    15 if its first process exited of it), as parallel writes a job it killed (--timeout). A job
    mpmsub counts as failed never has both 0."""
    code = result.returncode
    if code is None:
        return -1, 0
    if result.failure in (KILLED, TIMEOUT):
        return -1, -code if code < 0 else _SIGTERM
    exitval, signal = (0, -code) if code < 0 else (code, 0)
    if not result.success and exitval == 0 and signal == 0:
        exitval = -1  # failed for mpmsub's own reasons (e.g. an error while running it)
    return exitval, signal


def host_field(result: JobResult) -> str:
    """The Host column: GNU parallel's ":" for this machine (and for a job that never started),
    else where the job ran (a SLURM node, a Dask worker's address), without tabs."""
    host = result.host
    return LOCAL_HOST if host is None or host == hostname() else escape(host)


def row(seq: int, command: str, result: JobResult, columns: int = len(COLUMNS)) -> str:
    """A joblog row; with `columns` 9, GNU parallel's columns alone (14: without Failure)."""
    exitval, signal = exit_fields(result)
    received = len(result.stdout.encode("utf-8", "replace")) if result.stdout else 0
    requested = "" if result.memory_requested is None else f"{result.memory_requested:.0f}"
    fields = (
        str(seq),
        host_field(result),
        f"{result.start_time:.3f}",
        f"{result.runtime:.3f}",
        "0",
        str(received),
        str(exitval),
        str(signal),
        escape(command),
        f"{result.memory_used:.1f}",
        str(result.cpus),
        requested,
        str(result.attempts),
        escape(result.job_id),
        result.failure or "",
    )
    return "\t".join(fields[:columns]) + "\n"


def _header(line: str) -> Optional[List[str]]:
    """The column names of a joblog whose header line this is; None if it is not one."""
    names = line.split("\t")
    return names if names[: len(PARALLEL_COLUMNS)] == list(PARALLEL_COLUMNS) else None


def read(path: str) -> Dict[Key, bool]:
    """The jobs a joblog records, each with whether its last row says it succeeded (Exitval and
    Signal both 0). A killed job's row (Failure "killed") records nothing, whatever came before:
    the user stopped that run, and resuming runs it again. An absent or empty file records none.
    Raises ValueError for a file that is not a joblog, naming it; a row that cannot be read (not
    one of ours) is skipped."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            lines = f.read().split("\n")  # rows end with \n alone; other line ends are text
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ValueError(f"cannot read the joblog {path!r}: {exc.strerror}") from None
    if lines == [""]:
        return {}
    names = _header(lines[0])
    if names is None:
        raise ValueError(f"{path!r} is not a joblog: its first line is not the header {HEADER!r}")
    extra = len(names) - len(PARALLEL_COLUMNS)  # mpmsub's columns, if it wrote them
    # Counted from the row's end: a GNU parallel row's command may hold tabs.
    failure_from_end = len(names) - names.index("Failure") if "Failure" in names else None
    done: Dict[Key, bool] = {}
    for line in lines[1:]:
        fields = line.split("\t")  # the last, empty "line" has one field: skipped below
        if len(fields) < len(PARALLEL_COLUMNS) + extra:
            continue
        try:
            seq, exitval, signal = int(fields[0]), int(fields[6]), int(fields[7])
        except ValueError:
            continue
        command = "\t".join(fields[8 : len(fields) - extra])  # GNU parallel does not escape tabs
        if failure_from_end is not None and fields[len(fields) - failure_from_end] == KILLED:
            done.pop((seq, command), None)
        else:
            done[(seq, command)] = exitval == 0 and signal == 0
    return done


class JobLog:
    """A joblog open for writing: a new one (header first), or one that resumed runs add to.
    Added to a joblog GNU parallel wrote (or an older mpmsub), rows keep to its columns, so that
    it stays readable."""

    def __init__(self, path: str, append: bool) -> None:
        self.path = path
        try:  # a new joblog is 0600: it holds command lines
            self._fd = open_private(path, os.O_APPEND | (0 if append else os.O_TRUNC))
        except OSError as exc:
            raise ValueError(f"cannot write the joblog {path!r}: {exc.strerror}") from None
        names = list(COLUMNS)
        if os.fstat(self._fd).st_size == 0:
            self._write(HEADER + "\n")
        else:
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                names = _header(f.readline().rstrip("\n")) or names
        self.columns = len(names)
        self.tells_killed = "Failure" in names  # else a killed job gets no row

    def write(self, seq: int, command: str, result: JobResult) -> None:
        """Add the job's row; none for a killed job where the joblog has no Failure column: its
        Exitval -1 would read as a failure there, and resuming must run it again."""
        if result.failure == KILLED and not self.tells_killed:
            return
        self._write(row(seq, command, result, self.columns))

    def _write(self, text: str) -> None:
        """One unbuffered write (a row is whole or absent after a crash), continued if the
        kernel took part of it. Raises OSError (a full disk, say)."""
        data = encode(text)
        while data:
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
