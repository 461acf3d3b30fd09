"""Job files for the command line: shell lines, or JSON Lines of seed-style job dicts.

A text file holds one shell command per line, run with `/bin/sh -c`; blank lines and lines whose
first non-blank character is `#` are skipped (in both formats). A JSON Lines file (`.jsonl`, `.ndjson`) holds one
job dict per line, with the keys `cluster.jobs.append` accepts; its `cmd` may also be a string,
then run with `/bin/sh -c` as a text line is. Every line is checked when the file is read, and
the first bad one is reported with its line number before anything runs.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from mpmsub._errors import MpmsubError
from mpmsub._job import to_spec
from mpmsub._spec import JobSpec

SHELL = "/bin/sh"
FORMATS = ("auto", "text", "jsonl")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Where a file's line does not say, these defaults apply; a line may name them under any alias.
ALIASES = {
    "p": ("p", "cpu", "cpus"),
    "m": ("m", "memory"),
    "timeout": ("timeout",),
    "retries": ("retries",),
    "resources": ("resources",),
    "gpus": ("gpus",),
    "gpu_memory": ("gpu_memory",),
}


class JobFileError(MpmsubError, ValueError):
    """A job file that cannot be run as it is: names the file and line."""


@dataclass(frozen=True)
class FileJob:
    """One job of a job file."""

    seq: int  # its place among the file's jobs, from 1 (GNU parallel's job sequence number)
    line: int  # its line in the file, from 1
    command: str  # the command as the joblog records it: the shell line, or the argv as text
    given: Dict[str, Any]  # what the line said, as a job dict ({"cmd": line} for a text line)
    job: Dict[str, Any] = field(repr=False)  # the job dict to run: `given` with the defaults filled in
    spec: JobSpec = field(repr=False, compare=False)
    values: Optional[Tuple[str, ...]] = None  # a template job's input values (None: a job file's)

    @property
    def tag(self) -> str:
        """What --tag prefixes the job's output lines with: its values, or its command."""
        return self.command if self.values is None else " ".join(self.values)


def detect_format(name: str, text: str) -> str:
    """ "jsonl" for a .jsonl/.ndjson file, or for standard input whose first job line is a JSON
    object; "text" otherwise."""
    if name.lower().endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name != "-":
        return "text"
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            return "jsonl" if isinstance(json.loads(stripped), dict) else "text"
        except ValueError:
            return "text"
    return "text"


def read_jobs(text: str, name: str, fmt: str = "auto", defaults: Optional[Mapping[str, Any]] = None) -> List[FileJob]:
    """The jobs of a job file's text. `name` is the file's name for messages ("-" for standard
    input); `defaults` fills `p`, `m`, `timeout` and `retries` where a line leaves them out (None
    values are ignored). Raises JobFileError naming the first bad line."""
    if fmt not in FORMATS:
        raise ValueError(f"invalid job file format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(name, text)
    for key in defaults or {}:
        if key not in ALIASES:
            raise ValueError(f"invalid default {key!r}: expected one of {', '.join(ALIASES)}")
    jobs: List[FileJob] = []
    # Lines end at "\n" (or "\r\n") alone: other characters splitlines() breaks at may be text.
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            if fmt == "text":
                given: Dict[str, Any] = {"cmd": stripped}
            else:
                given = _json_job(stripped)
            job, command = _to_job(given, defaults or {})
            spec = to_spec(job)
        except (ValueError, TypeError) as exc:
            raise JobFileError(f"{label(name)}:{number}: {exc}") from None
        if command is None:  # an argv list (or pipeline) as a shell would take it
            command = " | ".join(shlex.join(stage) for stage in spec.stages)
        jobs.append(FileJob(len(jobs) + 1, number, command, given, job, spec))
    return jobs


def shell_job(
    seq: int, command: str, values: Tuple[str, ...], defaults: Mapping[str, Any], key: Optional[str] = None
) -> FileJob:
    """A template's job: the shell command `command`, job number `seq` (also its "line"), with
    the defaults and, given `key`, the run history's key its template's jobs share."""
    given: Dict[str, Any] = {"cmd": command}
    if key is not None:
        given["key"] = key
    job, _ = _to_job(given, defaults)
    return FileJob(seq, seq, command, given, job, to_spec(job), values)


def label(name: str) -> str:
    """A job file's name in messages."""
    return "<stdin>" if name == "-" else name


def with_defaults(job: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """`job` with the defaults (p, m, timeout, retries) for the keys it gives under no alias;
    None defaults are left out."""
    filled = dict(job)
    for key, value in defaults.items():
        if value is not None and not any(alias in filled for alias in ALIASES[key]):
            if key == "gpu_memory" and not filled.get("gpus"):
                continue  # a share of the GPUs a job gets: none for a job that gets none
            filled[key] = value
    return filled


def _json_job(line: str) -> Dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc}): {line[:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f'expected a job object such as {{"cmd": [...], "m": "2G"}}; got {line[:80]!r}')
    return value


def _to_job(given: Dict[str, Any], defaults: Mapping[str, Any]) -> Tuple[Dict[str, Any], Optional[str]]:
    """The job dict to run, and the command's text when it is a shell line."""
    job = with_defaults(given, defaults)
    command = None
    if isinstance(job.get("cmd"), str):
        command = job["cmd"]
        job["cmd"] = [SHELL, "-c", command]
    return job, command
