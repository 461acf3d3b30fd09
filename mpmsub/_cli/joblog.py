"""The joblog of the command line: one tab-separated row per finished job, GNU parallel's
columns first (so tools that read its joblogs read ours), mpmsub's after them.

Rows are written as jobs end, each in one write and flushed at once, so a driver killed at any
moment leaves whole rows for every job that finished. `--resume` reads them back: a job of the
job file is the job of a row when both its number (Seq) and its command are the same, so a job
file edited since never has a job skipped for a different one's run.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from mpmsub._files import open_private
from mpmsub._result import JobResult

PARALLEL_COLUMNS = ("Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal", "Command")
MPMSUB_COLUMNS = ("PeakMemMB", "Cpus", "ReqMemMB", "Attempts", "JobId")
HEADER = "\t".join(PARALLEL_COLUMNS + MPMSUB_COLUMNS)
LOCAL_HOST = ":"  # GNU parallel's name for this machine

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
    ran. A job mpmsub counts as failed never has both 0."""
    code = result.returncode
    if code is None:
        return -1, 0
    exitval, signal = (0, -code) if code < 0 else (code, 0)
    if not result.success and exitval == 0 and signal == 0:
        exitval = -1  # failed for mpmsub's own reasons (e.g. an error while running it)
    return exitval, signal


def row(seq: int, command: str, result: JobResult, columns: int = len(PARALLEL_COLUMNS + MPMSUB_COLUMNS)) -> str:
    """A joblog row; with `columns` 9, GNU parallel's columns alone."""
    exitval, signal = exit_fields(result)
    received = len(result.stdout.encode("utf-8", "replace")) if result.stdout else 0
    requested = "" if result.memory_requested is None else f"{result.memory_requested:.0f}"
    fields = (
        str(seq),
        LOCAL_HOST,
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
    )
    return "\t".join(fields[:columns]) + "\n"


def _width(header: str) -> Optional[int]:
    """The number of columns of a joblog whose header line this is; None if it is not one."""
    fields = header.split("\t")
    return len(fields) if fields[: len(PARALLEL_COLUMNS)] == list(PARALLEL_COLUMNS) else None


def read(path: str) -> Dict[Key, bool]:
    """The jobs a joblog records, each with whether its last row says it succeeded (Exitval and
    Signal both 0). An absent or empty file records none. Raises ValueError for a file that is not
    a joblog, naming it; a row that cannot be read (not one of ours) is skipped."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            lines = f.read().split("\n")  # rows end with \n alone; other line ends are text
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ValueError(f"cannot read the joblog {path!r}: {exc.strerror}") from None
    if lines == [""]:
        return {}
    columns = _width(lines[0])
    if columns is None:
        raise ValueError(f"{path!r} is not a joblog: its first line is not the header {HEADER!r}")
    extra = columns - len(PARALLEL_COLUMNS)  # mpmsub's columns, if it wrote them
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
        done[(seq, command)] = exitval == 0 and signal == 0
    return done


class JobLog:
    """A joblog open for writing: a new one (header first), or one that resumed runs add to.
    Added to a joblog GNU parallel wrote, rows keep to its columns, so that it stays readable."""

    def __init__(self, path: str, append: bool) -> None:
        self.path = path
        try:  # a new joblog is 0600: it holds command lines
            self._fd = open_private(path, os.O_APPEND | (0 if append else os.O_TRUNC))
        except OSError as exc:
            raise ValueError(f"cannot write the joblog {path!r}: {exc.strerror}") from None
        self.columns = len(PARALLEL_COLUMNS + MPMSUB_COLUMNS)
        if os.fstat(self._fd).st_size == 0:
            self._write(HEADER + "\n")
        else:
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                self.columns = _width(f.readline().rstrip("\n")) or self.columns

    def write(self, seq: int, command: str, result: JobResult) -> None:
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
