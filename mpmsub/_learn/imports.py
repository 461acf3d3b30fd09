"""Runs measured by other workflow managers, read into the run history (`mpmsub history
import`): Nextflow trace files and Snakemake benchmark files (docs/auto-memory.md, "Importing
runs from Nextflow and Snakemake"). Pure: a file's bytes in, rows of the history out; the
command reads the files and writes the rows.

A row that cannot be read (a ValueError, saying why) is counted and skipped. A row's identity
is in its argv, so that a file imported twice adds its runs once: a Nextflow task's hash (its
work directory, the same in every copy of the trace); else the file's real path, the row's line
and a digest of its text (a benchmark file rewritten by a rerun is new).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

from mpmsub._job import history_key
from mpmsub._result import EXIT, MEMORY
from mpmsub._units import MAX_MEMORY, MAX_SECONDS, MB
from mpmsub._version import __version__

if TYPE_CHECKING:
    from mpmsub._learn.history import Row

NEXTFLOW = "Nextflow trace"
SNAKEMAKE = "Snakemake benchmark"
NEITHER = "not a Nextflow trace (no process/peak_rss columns) nor a Snakemake benchmark (no s/max_rss columns)"
HOST = "imported"  # the host of a run whose file names none

# Nextflow's statuses: a CACHED row repeats an earlier run's figures, an ABORTED task was
# stopped by Nextflow itself; neither is a run of its own.
_RAN = ("COMPLETED", "FAILED")
_PASSED_OVER = ("CACHED", "ABORTED")
# The exit statuses of a task killed for memory: 137 (SIGKILL: the kernel's out-of-memory killer,
# a container's or SLURM's limit), 140 (the limit of SGE and LSF; a time limit may give it too).
_MEMORY_KILLS = (137, 140)
_MISSING = ("", "-", "NA")  # Nextflow writes "-" for a missing value, Snakemake "NA" (or "-")
_SIZE_UNITS = "BKMGTPEZ"  # Nextflow's units, powers of 1024: B, KB, MB, GB, ... ZB
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:\s*([BKMGTPEZ])B?)?", re.IGNORECASE)
_SECONDS = {
    **dict.fromkeys(("ms", "milli", "millis"), 0.001),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*")
_CLOCK = re.compile(r"(\d{1,2}):(\d{1,2}):(\d{1,2})")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_LAST_TIME = 253402300800.0  # 10000-01-01: later "times" are no times (localtime() refuses them)
_MOST_EXIT = 2**31
_TAG = re.compile(r"^(.*?) \(.*\)$")  # a task's name: its process and " (tag)"

T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """How rows become runs: `key`, the name of every row's key (else its process or rule);
    `key_prefix`, put before every key; `input_size`, the column of the input size."""

    key: Optional[str] = None
    key_prefix: str = ""
    input_size: Optional[str] = None


@dataclass(frozen=True)
class ImportedRun:
    """One row of a file as a run of the history (its fields are the history's columns)."""

    key: str
    argv: Tuple[str, ...]
    input_bytes: int
    peak_bytes: int
    runtime: float
    cpu_time: float
    returncode: Optional[int]
    failure: Optional[str]
    memory_requested: Optional[int]
    host: str
    time: float

    @property
    def identity(self) -> str:
        """The argv as the history stores it: a row with this key and argv is this run."""
        return json.dumps(list(self.argv))

    def row(self) -> Row:
        """The run as a row for History.add (in the order of its columns; no GPU measured)."""
        return (
            self.key,
            self.identity,
            self.input_bytes,
            self.peak_bytes,
            self.runtime,
            self.cpu_time,
            self.returncode,
            self.failure,
            self.memory_requested,
            self.host,
            __version__,
            self.time,
            None,
        )


@dataclass
class Imported:
    """What a file holds: its format, its runs, the rows that are no run of their own (Nextflow's
    CACHED and ABORTED), and the malformed rows skipped, with why the first was."""

    kind: str
    runs: List[ImportedRun] = field(default_factory=list)
    passed_over: int = 0
    malformed: int = 0
    first_malformed: str = ""

    def skip(self, line: int, why: str) -> None:
        self.malformed += 1
        if self.malformed == 1:
            self.first_malformed = f"line {line}: {why}"


# -- figures as Nextflow and Snakemake write them ---------------------------------------------


def parse_size(text: str) -> int:
    """Bytes of a size as Nextflow writes it: a number of bytes, or a number and a unit of powers
    of 1024 ('512 B', '3.4 KB', '1.2 GB', up to 'ZB'). ValueError naming the text otherwise."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (bytes, or a number and B, KB, MB, GB, TB, ...)")
    number, unit = match.groups()
    power = _SIZE_UNITS.index(unit.upper()) if unit else 0
    if power == 0 and number.isdigit():
        size: float = int(number)  # exact, where a float would round a count past 2**53
    else:
        size = float(number) * 1024**power
    if not size <= MAX_MEMORY:
        raise ValueError(f"{text!r} is too large a size (at most 1 EB)")
    return round(size)


def parse_duration(text: str) -> float:
    """Seconds of a duration as Nextflow writes it: a number of milliseconds, or parts such as
    '250ms', '4.5s', '3m 4s', '1d 2h 3m 4s' (or 'hh:mm:ss'). ValueError naming the text otherwise."""
    stripped = text.strip()
    clock = _CLOCK.fullmatch(stripped)
    if _NUMBER.fullmatch(stripped):
        seconds = float(stripped) / 1000
    elif clock:
        hours, minutes, secs = (int(part) for part in clock.groups())
        seconds = hours * 3600.0 + minutes * 60.0 + secs
    else:
        seconds, at = 0.0, 0
        while at < len(stripped):
            part = _PART.match(stripped, at)
            if part is None or part.group(2).lower() not in _SECONDS:
                raise ValueError(f"{text!r} is not a duration (milliseconds, or such as '250ms', '4.5s', '1h 2m 3s')")
            seconds += float(part.group(1)) * _SECONDS[part.group(2).lower()]
            at = part.end()
        if not stripped:
            raise ValueError(f"{text!r} is not a duration")
    if not seconds <= MAX_SECONDS:
        raise ValueError(f"{text!r} is too long a duration")
    return seconds


def parse_time(text: str) -> float:
    """Unix time of a moment as Nextflow writes it: milliseconds since the epoch, or
    'yyyy-MM-dd HH:mm:ss.SSS' in local time."""
    stripped = text.strip()
    if stripped.isdigit():
        moment = int(stripped) / 1000
    else:
        whole, _, fraction = stripped.partition(".")
        try:
            moment = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()  # naive: local time
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"{text!r} is not a time (milliseconds since 1970, or yyyy-MM-dd HH:mm:ss.SSS)") from None
        if fraction:
            if not fraction.isdigit():
                raise ValueError(f"{text!r} is not a time")
            moment += float("0." + fraction)
    if not 0 <= moment < _LAST_TIME:
        raise ValueError(f"{text!r} is not a time of this era")
    return moment


def _percent(text: str) -> float:
    number = text.strip().rstrip("%").strip()
    value = float(number) if _NUMBER.fullmatch(number) else math.nan
    if not 0 <= value < math.inf:
        raise ValueError(f"{text!r} is not a percentage")
    return value


def _exit(text: str) -> int:
    stripped = text.strip()
    if not re.fullmatch(r"-?\d{1,10}", stripped) or not -_MOST_EXIT < int(stripped) < _MOST_EXIT:
        raise ValueError(f"{text!r} is not an exit status")
    return int(stripped)


def _megabytes(value: Any) -> int:
    """Bytes of a Snakemake figure in MB (MiB: Snakemake divides bytes by 1024 twice): a number,
    or a dict of them (its `input_size_mb`: each input file's), summed."""
    if isinstance(value, str):
        value = _literal(value)
    if isinstance(value, dict):
        return sum(_megabytes(each) for each in value.values())
    if isinstance(value, list) and len(value) == 1:  # a field Snakemake wrote as a 1-tuple
        return _megabytes(value[0])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value * MB <= MAX_MEMORY:
        raise ValueError(f"{value!r} is not a size in MB")
    return round(value * MB)


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        value = _literal(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"{value!r} is not a number of seconds")
    return float(value)


def _literal(text: str) -> Any:
    """A value of a Snakemake TSV: a number, or the repr of a dict (its extended columns)."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


# -- files ------------------------------------------------------------------------------------


def read(data: bytes, name: str, source: str, when: float, options: Options = Options()) -> Imported:
    """The runs in a file (`name`: the file as the user named it, for messages and the default
    key of a Snakemake file; `source`: its real path, for identities; `when`: the time of the runs
    whose rows carry none, the file's modification time). ValueError naming the file: a file of
    neither format, or one without the input size column asked for."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {NEITHER}: it is not UTF-8 text") from None
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        raise ValueError(f"{name}: empty: expected a Nextflow trace or a Snakemake benchmark")
    file = _File(name, source, when, options)
    if first.lstrip().startswith("{"):
        return file.snakemake_lines(text)
    delimiter = "\t" if "\t" in first else ","
    reader = csv.reader(
        io.StringIO(text), delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    )
    try:
        header = next(cells for cells in reader if any(cell.strip() for cell in cells))
    except csv.Error as exc:  # a NUL in it, say
        raise ValueError(f"{name}: {NEITHER}: {exc}") from None
    header = [column.strip() for column in header]
    if "peak_rss" in header and ("process" in header or "name" in header):
        return file.table(reader, header, NEXTFLOW, file.nextflow_run)
    if "s" in header and "max_rss" in header:
        return file.table(reader, header, SNAKEMAKE, file.snakemake_run)
    raise ValueError(f"{name}: {NEITHER}")


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _field(row: Mapping[str, Any], column: str) -> Optional[str]:
    """A text cell, None where it is missing."""
    value = row.get(column)
    if value is None:
        return None
    text = str(value).strip()
    return None if text in _MISSING else text


def _figure(row: Mapping[str, Any], column: str, parse: Callable[[str], T]) -> Optional[T]:
    """A cell read by `parse`; None where it is missing; ValueError where it cannot be read."""
    text = _field(row, column)
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{column}: {exc}") from None


class _File:
    """One file being read: its names, the options and the input size column."""

    def __init__(self, name: str, source: str, when: float, options: Options) -> None:
        self.name = name
        self.source = source
        self.when = when
        self.options = options
        self.input_column: Optional[str] = None

    def key(self, name: str) -> str:
        return history_key(self.options.key_prefix + (self.options.key if self.options.key is not None else name))

    def choose_input(self, columns: Sequence[str], default: str) -> None:
        """The input size column: the one asked for (which the file must have), else `default`
        where the file has it; None: every input size is 0."""
        asked = self.options.input_size
        if asked is not None and asked not in columns:
            raise ValueError(f"{self.name}: no column {asked!r} for the input size; it has {', '.join(columns)}")
        self.input_column = asked if asked is not None else default if default in columns else None

    def table(
        self,
        reader: Iterator[List[str]],
        header: List[str],
        kind: str,
        parse: Callable[[Dict[str, str], int, str], Optional[ImportedRun]],
    ) -> Imported:
        """The rows of a tab- or comma-separated file after its header."""
        self.choose_input(header, "rchar" if kind == NEXTFLOW else "input_size_mb")
        found = Imported(kind)
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # a NUL, an overlong field: that line alone
                found.skip(getattr(reader, "line_num", 0), str(exc))
                continue
            line = getattr(reader, "line_num", 0)
            if not cells or not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                found.skip(line, f"{len(cells)} fields where the header has {len(header)}")
                continue
            try:
                run = parse(dict(zip(header, cells)), line, "\t".join(cells))
            except ValueError as exc:
                found.skip(line, str(exc))
                continue
            if run is None:
                found.passed_over += 1
            else:
                found.runs.append(run)
        return found

    def identity(self, line: int, text: str) -> str:
        return f"{self.source}:{line}:{_digest(text)}"

    def input_bytes(self, row: Mapping[str, Any], parse: Callable[[Any], int]) -> int:
        if self.input_column is None:
            return 0
        value = row.get(self.input_column)
        if isinstance(value, str):
            value = _field(row, self.input_column)
        if value is None:
            raise ValueError(f"no {self.input_column} (the input size)")
        try:
            return parse(value)
        except ValueError as exc:
            raise ValueError(f"{self.input_column}: {exc}") from None

    def nextflow_run(self, row: Dict[str, str], line: int, text: str) -> Optional[ImportedRun]:
        """A trace row as a run; None for a row that is no run of its own (CACHED, ABORTED)."""
        status = (_field(row, "status") or "COMPLETED").upper()
        if status in _PASSED_OVER:
            return None
        if status not in _RAN:
            raise ValueError(f"status {status!r} is none of COMPLETED, FAILED, CACHED, ABORTED")
        task = _field(row, "name")
        process = _field(row, "process")
        if process is None and task is not None:
            tagged = _TAG.match(task)
            process = tagged.group(1) if tagged else task
        if process is None:
            raise ValueError("no process or name")
        peak = _figure(row, "peak_rss", parse_size)
        if peak is None:
            raise ValueError("no peak_rss")
        returncode = _figure(row, "exit", _exit)
        failure = None if status == "COMPLETED" else MEMORY if returncode in _MEMORY_KILLS else EXIT
        runtime = _figure(row, "realtime", parse_duration) or 0.0
        cpu = _figure(row, "%cpu", _percent)
        digest = _field(row, "hash")
        return ImportedRun(
            key=self.key(process),
            argv=("nextflow", task or process, digest or self.identity(line, text)),
            input_bytes=self.input_bytes(row, lambda value: parse_size(str(value))),
            peak_bytes=peak,
            runtime=runtime,
            cpu_time=0.0 if cpu is None else runtime * cpu / 100,
            returncode=returncode,
            failure=failure,
            memory_requested=_figure(row, "memory", parse_size),
            host=_field(row, "hostname") or HOST,
            time=_figure(row, "complete", parse_time) or self.when,
        )

    def snakemake_run(self, row: Mapping[str, Any], line: int, text: str) -> ImportedRun:
        """A benchmark row (a TSV row, or a JSON Lines object) as a run. Snakemake writes a
        benchmark only for a job that succeeded."""
        peak = _figure(row, "max_rss", _megabytes)
        if peak is None:
            raise ValueError("no max_rss (Snakemake could not measure the job)")
        runtime = _figure(row, "s", _seconds)
        if runtime is None:
            raise ValueError("no s (the runtime)")
        rule = _rule(row.get("rule_name", row.get("rule")))
        stem = os.path.splitext(os.path.basename(self.name))[0]
        return ImportedRun(
            key=self.key(rule or stem),
            argv=("snakemake", rule or stem, self.identity(line, text)),
            input_bytes=self.input_bytes(row, _megabytes),
            peak_bytes=peak,
            runtime=runtime,
            cpu_time=_figure(row, "cpu_time", _seconds) or 0.0,
            returncode=0,
            failure=None,
            memory_requested=_requested(row.get("resources")),
            host=HOST,
            time=self.when,
        )

    def snakemake_lines(self, text: str) -> Imported:
        """A JSON Lines benchmark (`benchmark: "x.jsonl"`, with --benchmark-extended or not)."""
        found = Imported(SNAKEMAKE)
        first = True  # the first object says what the file is
        for line, content in enumerate(text.splitlines(), 1):
            if not content.strip():
                continue
            try:
                record = json.loads(content)
            except ValueError as exc:
                record, why = None, f"not JSON ({exc})"
            else:
                why = "not a JSON object"
            if not isinstance(record, dict):
                if first:
                    raise ValueError(f"{self.name}: {NEITHER}: line {line} is {why}")
                found.skip(line, why)
                continue
            if first:
                if "s" not in record or "max_rss" not in record:
                    raise ValueError(f"{self.name}: {NEITHER}")
                self.choose_input(list(record), "input_size_mb")
                first = False
            try:
                found.runs.append(self.snakemake_run(record, line, content))
            except ValueError as exc:
                found.skip(line, str(exc))
        return found


def _rule(value: Any) -> Optional[str]:
    """A benchmark's rule name (a 1-tuple, written as a list, in some Snakemakes)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or value.strip() in _MISSING:
        return None
    return value.strip()


def _requested(resources: Any) -> Optional[int]:
    """The memory a Snakemake job asked for, from its resources: mem_mib (MiB), else mem_mb
    (MB: Snakemake's are 1000 * 1000 bytes); None where it names none."""
    if isinstance(resources, str):
        resources = _literal(resources)
    if isinstance(resources, list) and len(resources) == 1:
        resources = resources[0]
    if not isinstance(resources, dict):
        return None
    for name, unit in (("mem_mib", MB), ("mem_mb", 1000 * 1000)):
        value = resources.get(name)
        if not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value * unit <= MAX_MEMORY:
            return round(value * unit)
    return None
