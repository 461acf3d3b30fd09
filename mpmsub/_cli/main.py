"""The `mpmsub` command: run a command template or a job file like GNU parallel, under a CPU and
memory budget."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import time
import warnings
from types import FrameType
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple, Union

from mpmsub._cli import control as _control
from mpmsub._cli import joblog as _joblog
from mpmsub._cli.halt import FORMS, NOW, SUCCESS, Halt, parse_halt
from mpmsub._cli.jobfile import FORMATS, FileJob, JobFileError, label, read_jobs, shell_job, with_defaults
from mpmsub._cli.template import SEPARATORS, TemplateError, is_template
from mpmsub._cli.template import parse as parse_template
from mpmsub._cluster import Cluster
from mpmsub._files import UnsafeFileError, open_private
from mpmsub._job import AUTO, is_auto
from mpmsub._learn.estimate import Estimate, Run, estimate
from mpmsub._learn.history import History, HistoryError, default_path
from mpmsub._learn.history import resolve as resolve_history
from mpmsub._policy.scheduler import POLICIES
from mpmsub._report import text as _report
from mpmsub._result import CANCELLED, KILLED, JobResult
from mpmsub._units import format_memory, parse_count, parse_cpus, parse_duration, parse_memory, parse_resources
from mpmsub._version import __version__
from mpmsub.utils import format_duration

# Exit statuses. GNU parallel exits with the number of failed jobs, but there 2 would also mean
# two failed jobs; mpmsub keeps 2 for usage errors alone, as argparse does.
OK, FAILED, USAGE = 0, 1, 2
INTERRUPTED = 128 + signal.SIGINT
TERMINATED = 128 + signal.SIGTERM

_USAGE = """mpmsub {name} [OPTIONS] COMMAND [WORDS...] ::: VALUES... [(::: | :::: | :::+ | ::::+) VALUES...]...
       mpmsub {name} [OPTIONS] JOBFILE"""

_EPILOG_RUN = """\
command templates:
  COMMAND [WORDS...] then input sources, each started by a separator:
    ::: VALUES...   the values given       :::: FILES...  the lines of the files (- is standard input)
    :::+ / ::::+    linked to the source before: values paired by position, not combined
  several sources give every combination, the first varying slowest (as GNU parallel does).
  replacement strings: {} the value, {.} without extension, {/} base name, {//} directory,
  {/.} base name without extension, {#} the job's number; {N} {N.} {N/} {N//} {N/.} the N-th
  source's value. Without any, the values are appended. Values are shell-quoted; the command
  runs with /bin/sh -c.

job files:
  text   one shell command per line, run with /bin/sh -c; blank lines and # comments skipped;
         every job gets --job-cpus and --job-mem
  jsonl  (.jsonl, .ndjson) one job object per line with the keys of the Python API:
         {"cmd": ["bwa", "mem", "ref.fa", "r1.fq"], "p": 4, "m": "6G", "id": "s1", "timeout": 3600}
         "cmd" may also be a shell command string; --job-cpus etc. fill keys a line leaves out

memory sizes: a number of MB, or 512M, 4G, 1.5T.   durations: seconds, or 30s, 5m, 2h.

exit status: 0 all jobs succeeded (or --halt ...,success=N was met); 1 one or more failed (a
job killed with mpmsub kill too), or the joblog missed rows; 2 usage, template or job file
error; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Running jobs are killed on either.

while it runs: mpmsub ps lists its running jobs, mpmsub kill JOBID kills one (see their -h;
--no-control: not this run).

examples:
  mpmsub run -j 8 gzip -k {} ::: *.txt
  mpmsub run -m 32G --job-mem auto 'bwa mem ref.fa {1} {2} > {1/.}.sam' ::: *_1.fq :::+ *_2.fq
  find . -name '*.log' -print0 | mpmsub run -0 -k --tag wc -l {} :::: -
  mpmsub run jobs.txt -p 8 -m 32G --job-mem 2G
  mpmsub run samples.jsonl --joblog run.log          # then, after a crash or kill:
  mpmsub run samples.jsonl --joblog run.log --resume
  printf 'gzip -k a.txt\\ngzip -k b.txt\\n' | mpmsub run - --job-mem 100M
  mpmsub run jobs.txt --json > results.json
"""

_EPILOG_PROFILE = """\
Jobs run one at a time with no memory reserved, and each job's peak is measured over its whole
process tree. The recommended memory is the peak plus 20%%, rounded up.

examples:
  mpmsub profile sample_jobs.txt
  mpmsub profile sample_jobs.jsonl -o sized.jsonl && mpmsub run sized.jsonl -m 64G
"""


_EPILOG_HISTORY = """\
Every finished job adds a row: its key (the program and its options, paths and numbers
normalised; see the docs), argv, input size, peak memory, runtime, CPU time, exit status and
failure, host, mpmsub version and time. MPMSUB_HISTORY=off turns recording off.

examples:
  mpmsub history list
  mpmsub history show 'bwa mem -t # *.fa *.fq'
  mpmsub history forget 'bwa mem -t # *.fa *.fq'
  mpmsub history export -o runs.jsonl
  mpmsub history import --key-prefix nf: results/pipeline_info/execution_trace_*.txt
  mpmsub history import --key bwa_map benchmarks/bwa_map/*.tsv
"""


_EPILOG_REPORT = """\
Figures need matplotlib: pip install 'mpmsub[plot]'. Without it the report has the tables alone.

examples:
  mpmsub run jobs.txt -m 16G --job-mem 2G --trace run.jsonl
  mpmsub report run.jsonl -o report.html
"""


_EPILOG_PS = """\
The run answers on a Unix socket in a directory only you can enter ($XDG_RUNTIME_DIR/mpmsub,
else beside the run history); mpmsub run --no-control opens none. With several runs of yours
going, --run PID picks one.

examples:
  mpmsub ps
  mpmsub ps --run 12345 --json
"""


_EPILOG_KILL = """\
A job is named by its id (mpmsub ps shows it; job_0001... for a line without one) or its
number in the job file. Its whole process tree is killed (SIGTERM, then SIGKILL); a job not
yet started never starts. It is not retried, counts as failed in the exit status (but not for
--halt), and its joblog row (Exitval -1, Signal 15 or 9, Failure killed) makes --resume and
--resume-failed run it again.

exit status: 0 every job named was killed; 1 otherwise (one had ended, no such job, no run).

examples:
  mpmsub kill job_0007
  mpmsub kill 7 12 --reason 'stuck on bad input'
  mpmsub kill --run 12345 sample_3
"""


class _Terminated(BaseException):
    """SIGTERM: the running jobs are killed as on Ctrl-C."""


class _Halted(BaseException):
    """--halt now: the running jobs are killed."""


_Halted.__name__ = "--halt now"  # the killed and cancelled jobs' errors name what stopped them
_Terminated.__name__ = "SIGTERM"  # "stopped by SIGTERM", not by the class's own name


def _halt_arg(text: str) -> Halt:
    try:
        return parse_halt(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_halt_arg.__name__ = "halt"


def _arg(parse: Callable[[object, str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text, what)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what  # argparse names the type in its message
    return convert


def _resources_text(text: object, what: str) -> Dict[str, int]:
    """--resources, --job-res: NAME=N[,NAME=N...]."""
    return parse_resources(text, what, text=True)


def _gpus_option(text: object, what: str) -> Union[int, List[int]]:
    """--gpus: a number of devices ('4'), or their ids ('0,2')."""
    words = str(text).split(",")
    if len(words) == 1:
        return parse_count(words[0], what)
    return [parse_count(word, f"{what} device id") for word in words]


def _memory(what: str, auto: bool = False) -> Callable[[str], str]:
    """A memory size, checked here and kept as written (a bare number means MB to the API too);
    with `auto`, also "auto"."""
    check = _arg(parse_memory, what)

    def convert(text: str) -> str:
        if auto and is_auto(text):
            return AUTO
        check(text)
        return text.strip()

    convert.__name__ = what
    return convert


def _count(text: str) -> int:
    if not re.fullmatch(r"\s*\d{1,9}\s*", text, re.ASCII):
        raise argparse.ArgumentTypeError(f"invalid retries {text!r}: expected a whole number, 0 to 999999999")
    return int(text)


_count.__name__ = "retries"  # argparse names the type in its message


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobfile", metavar="JOBFILE", nargs="?", help="the job file; - reads standard input")
    template = parser.add_argument_group(
        "command templates (COMMAND [WORDS...] ::: VALUES..., as GNU parallel takes them)"
    )
    template.add_argument(
        "-a", "--arg-file", metavar="FILE", action="append", default=[], help="an input source: the lines of FILE"
    )
    template.add_argument("-0", "--null", action="store_true", help=":::: and -a input is split at NUL bytes")
    parser.add_argument("-p", "--cpus", type=_arg(parse_cpus, "cpus"), help="CPUs to use (default: all)")
    parser.add_argument("-m", "--memory", type=_memory("memory"), help="memory to use (default: all, less a reserve)")
    parser.add_argument("--job-cpus", type=_arg(parse_cpus, "job cpus"), default=1, help="CPUs of each job (1)")
    parser.add_argument(
        "--job-mem",
        type=_memory("job memory", auto=True),
        help="memory each job reserves (default: none); auto: predicted from the run history",
    )
    parser.add_argument("--timeout", type=_arg(parse_duration, "timeout"), help="kill a job running longer")
    parser.add_argument(
        "--job-res",
        metavar="NAME=N[,...]",
        type=_arg(_resources_text, "job resources"),
        help="named resources each job holds (of --resources)",
    )
    parser.add_argument(
        "--job-gpus", metavar="N", type=_arg(parse_count, "job gpus"), help="GPU devices each job gets, its own"
    )
    parser.add_argument(
        "--job-gpu-mem",
        metavar="SIZE",
        type=_memory("job gpu memory", auto=True),
        help="GPU memory each job reserves on each of its devices, sharing them; auto: from the run history",
    )
    parser.add_argument(
        "--resources",
        metavar="NAME=N[,...]",
        type=_arg(_resources_text, "resources"),
        help="named resources to share out, such as licence=2,scratch_io=4",
    )
    parser.add_argument(
        "--gpus",
        metavar="N|IDS",
        type=_arg(_gpus_option, "gpus"),
        help="GPU devices to use: a number, or ids such as 0,2 (default: those nvidia-smi lists)",
    )
    parser.add_argument("--format", choices=FORMATS, default="auto", help="job file format (default: by extension)")
    parser.add_argument("--trace", metavar="FILE", help="write the run's trace to FILE (JSON Lines), for mpmsub report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    where = parser.add_argument_group("where jobs run (default: $MPMSUB_BACKEND, else this machine)")
    where.add_argument(
        "--backend",
        metavar="NAME",
        help="local, dask, slurm, or an address: dask://HOST:PORT, slurm://PARTITION",
    )
    where.add_argument("--scheduler", metavar="ADDRESS", help="dask: the scheduler's address (tcp://HOST:8786)")
    where.add_argument("--partition", help="slurm: the partition (default: SLURM's)")
    where.add_argument("--account", help="slurm: the account to charge")
    where.add_argument(
        "--sbatch-arg", metavar="ARG", action="append", default=[], help="slurm: one more sbatch option (repeatable)"
    )
    where.add_argument("--workdir", metavar="DIR", help="slurm: a shared directory for job files (./.mpmsub-slurm)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mpmsub",
        description="Run many commands in parallel without running the machine out of memory.",
        epilog="Run 'mpmsub run -h' or 'mpmsub profile -h' for their options and examples.",
    )
    top.add_argument("-V", "--version", action="version", version=f"mpmsub {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
        sub = _add_command(commands, name, summary, description, epilog)
        _common(sub)
        sub.usage = _USAGE.format(name=name)
        return sub

    run = command(
        "run",
        "run a command on many values, or the jobs of a job file",
        "Run a command template's jobs, or a job file's, in parallel, each admitted only when its CPUs and memory fit.",
        _EPILOG_RUN,
    )
    run.add_argument(
        "-j", "--jobs", type=_arg(parse_cpus, "jobs"), help="run at most N jobs at once (and, without -p, on N CPUs)"
    )
    run.add_argument("-k", "--keep-order", action="store_true", help="print the jobs' output in input order")
    run.add_argument("--tag", action="store_true", help="prefix each output line with the job's values and a tab")
    run.add_argument("--dry-run", action="store_true", help="print the commands that would run; run nothing")
    run.add_argument("--halt", type=_halt_arg, metavar="WHEN,WHAT=N", help="stop early: " + FORMS.replace("%", "%%"))
    run.add_argument("--retries", type=_count, default=None, help="rerun a failed job up to N times")
    run.add_argument("--schedule", choices=POLICIES, default="pack", help="start order (default: pack)")
    run.add_argument("--joblog", metavar="FILE", help="record each finished job in FILE (GNU parallel's format)")
    resume = run.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="skip the jobs the joblog records")
    resume.add_argument(
        "--resume-failed", action="store_true", help="skip the jobs the joblog records as succeeded; rerun the rest"
    )
    run.add_argument("--json", action="store_true", help="print stats and per-job results as JSON on stdout")
    run.add_argument(
        "--results",
        metavar="DIR",
        help="write each job's stdout and stderr to DIR/SEQ/stdout and DIR/SEQ/stderr instead of capturing them",
    )
    run.add_argument(
        "--no-control", action="store_true", help="open no control socket: mpmsub ps and mpmsub kill do not see the run"
    )
    profile = command(
        "profile",
        "measure each job's peak memory and recommend a request",
        "Run the jobs of a job file one at a time and recommend each one's memory.",
        _EPILOG_PROFILE,
    )
    profile.add_argument("-o", "--output", metavar="FILE", help="write the jobs as JSON Lines with memory filled in")
    _history_parser(commands)
    _control_parsers(commands)
    report = _add_command(
        commands,
        "report",
        "write an HTML report of a run's trace",
        "Write a self-contained HTML report of a trace that mpmsub run --trace wrote: a timeline of the jobs, "
        "memory and CPUs over time, requested versus used memory, the slowest and failed jobs, and memory advice.",
        _EPILOG_REPORT,
    )
    report.add_argument("trace", metavar="TRACE", help="the trace file (mpmsub run --trace TRACE)")
    report.add_argument("-o", "--output", metavar="FILE", help="the HTML file (default: TRACE with .html)")
    report.add_argument("--no-plots", action="store_true", help="tables only, without figures")
    return top


def _add_command(commands: Any, name: str, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A command of `mpmsub` whose help ends with its epilog as written (examples, notes)."""
    sub: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(parser=sub)
    return sub


def _history_parser(commands: Any) -> None:
    history = _add_command(
        commands,
        "history",
        "list, show, forget, export or import the run history m='auto' learns from",
        "The run history: a row per finished job, which m='auto' predicts memory from.",
        _EPILOG_HISTORY,
    )
    history.add_argument(
        "--db", metavar="FILE", help="the history database (default: $MPMSUB_HISTORY, else " + default_path() + ")"
    )
    actions = history.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="keys with their run counts and predicted memory")
    show = actions.add_parser("show", help="the runs of one key and its prediction")
    show.add_argument("key", metavar="KEY")
    forget = actions.add_parser("forget", help="delete the runs of a key (or of every key with --all)")
    target = forget.add_mutually_exclusive_group(required=True)
    target.add_argument("key", metavar="KEY", nargs="?")
    target.add_argument("--all", action="store_true", help="delete every run")
    export = actions.add_parser("export", help="every run as JSON Lines")
    export.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: standard output)")
    imports = actions.add_parser(
        "import",
        help="add the runs of Nextflow trace files and Snakemake benchmark files",
        description="Add the tasks of Nextflow trace files and the jobs of Snakemake benchmark files (TSV or "
        "JSON Lines) to the run history, each as a run of its process's or rule's key. CACHED and ABORTED "
        "tasks are passed over, malformed rows skipped; a run already imported is not added again.",
    )
    imports.add_argument(
        "files", metavar="FILE", nargs="+", help="a trace.txt, a trace CSV, or a benchmark .tsv/.jsonl"
    )
    imports.add_argument(
        "--key",
        metavar="NAME",
        help="every run's key (default: the process, the rule, else the file's name less its extension)",
    )
    imports.add_argument("--key-prefix", metavar="PREFIX", default="", help="put PREFIX before every key, such as nf:")
    imports.add_argument(
        "--input-size",
        metavar="COLUMN",
        help="the input size's column (default: Nextflow's rchar; Snakemake's input_size_mb where present, else 0)",
    )


def _control_parsers(commands: Any) -> None:
    ps = _add_command(
        commands,
        "ps",
        "list the running jobs of a run under way",
        "List the jobs an mpmsub run of yours on this machine runs now: id, runtime, CPUs, memory reserved "
        "and in use, CPU time, where and command.",
        _EPILOG_PS,
    )
    ps.add_argument("--json", action="store_true", help="print the run's answer as JSON")
    kill = _add_command(
        commands,
        "kill",
        "kill jobs of a run under way",
        "Kill jobs of an mpmsub run of yours on this machine; the run goes on with the others.",
        _EPILOG_KILL,
    )
    kill.add_argument("jobs", metavar="JOBID", nargs="+", help="a job's id, or its number in the job file")
    kill.add_argument("--reason", metavar="TEXT", help="why: in the job's error, the summary and --json")
    for sub in (ps, kill):
        sub.add_argument("--run", metavar="PID", type=_pid, help="the run's process id (with several runs going)")


def _pid(text: str) -> int:
    if not re.fullmatch(r"\s*\d{1,10}\s*", text, re.ASCII) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}: expected a process id, such as mpmsub ps shows")
    return int(text)


_pid.__name__ = "pid"  # argparse names the type in its message


def _command_errors() -> Tuple[type[BaseException], ...]:
    """What is wrong with a command line: its usage and the message are printed. With the SLURM
    backend's error where that backend is in use (only then imported: a command line on this
    machine does without it and its imports)."""
    errors: Tuple[type[BaseException], ...] = (JobFileError, TemplateError, ValueError, TypeError, ImportError, OSError)
    slurm = sys.modules.get("mpmsub._backends.slurm")
    return errors if slurm is None else (*errors, slurm.SlurmError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line's entry point; returns the exit status."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["_run-job"]:  # a backend's job on this machine (see _backends.node); not for people
        from mpmsub._backends import node as _node

        return _node.main(words[1:])
    args = _parse(parser(), words)
    if args.command == "history":
        return _history(args)
    if args.command == "report":
        return _report_command(args)
    if args.command == "ps":
        return _ps(args)
    if args.command == "kill":
        return _kill(args)
    if args.command == "run" and (args.resume or args.resume_failed) and not args.joblog:
        args.parser.error("--resume and --resume-failed need --joblog FILE")
    try:  # everything that can be wrong with the command is found before any job runs
        jobs = _read(args)
        if getattr(args, "dry_run", False):
            _dry_run(_to_run(args, jobs))
            return OK
        if not jobs:
            if not args.quiet:
                print(f"mpmsub: the job file {label(args.jobfile)} holds no job", file=sys.stderr)
            return OK
        cluster = Cluster(
            cpus=args.cpus if args.cpus is not None or args.command != "run" else args.jobs,
            memory=args.memory,
            verbose=False,
            progress_bar=not (args.no_progress or args.quiet),
            schedule=getattr(args, "schedule", "pack"),
            backend=_backend(args),
            trace=args.trace,
            resources=args.resources,
            gpus=args.gpus,
        )
        cluster._refuse_duplicate_ids = True  # the joblog and --resume find a job by its id
        _admit(cluster, jobs, _name(args), getattr(args, "results", None))
        _check_apart(_outputs(args), {"the job file": args.jobfile})
        if args.command == "run":
            plan = _plan_run(args, cluster, jobs)
        elif args.output:
            _check_writable(args.output)
    except _command_errors() as exc:
        command: argparse.ArgumentParser = args.parser
        command.error(str(exc))  # prints the command's usage and the message; exits 2
    if args.command == "run":
        return _run(args, cluster, plan)
    return _profile(args, cluster, jobs)


def _parse(top: argparse.ArgumentParser, words: List[str]) -> argparse.Namespace:
    """The command line's options. `run` and `profile` take a command template when a separator
    (:::, ::::, :::+, ::::+) or -a FILE is given: their options end at COMMAND, the first word
    that is not an option (or after --), and every word from there on is the template's."""
    name = words[0] if words else None
    if name not in ("run", "profile"):
        return top.parse_args(words)
    sub = _subparser(top, name)
    options, rest = _split_options(sub, words[1:])
    early = top.parse_args([name, *options])
    if is_template(rest) or early.arg_file:
        if early.jobfile is not None:  # options alone were parsed: no positional can be here
            sub.error(f"unexpected {early.jobfile!r} before the command template")
        early.template = rest
        return early
    args, extra = top.parse_known_args(words)
    if extra:
        message = f"unrecognized arguments: {' '.join(extra)}"
        if args.jobfile is not None and not os.path.exists(args.jobfile) and not extra[0].startswith("-"):
            words_given = " ".join(rest[:3])
            message += f"; to run a command on values, give them after a separator: did you mean: mpmsub {name} "
            message += f"{words_given} ::: VALUES... ?"
        sub.error(message)
    args.template = None
    if args.jobfile is None:
        sub.error("give a job file, or a command template: COMMAND [WORDS...] ::: VALUES...")
    return args


def _subparser(top: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in top._subparsers._group_actions if top._subparsers else []:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and name in choices:
            found: argparse.ArgumentParser = choices[name]
            return found
    raise ValueError(f"no command {name!r}")


def _split_options(sub: argparse.ArgumentParser, words: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The words before COMMAND (options and their values) and those from COMMAND on."""
    actions = sub._option_string_actions
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            return list(words[:i]), list(words[i + 1 :])
        if word in SEPARATORS or not word.startswith("-") or word == "-":
            break
        if word.startswith("--"):
            action = actions.get(word.split("=", 1)[0])
            takes = action is not None and action.nargs != 0 and "=" not in word
        else:  # -j 2, -j2, -k0j 2: a value follows when the last flag of the cluster takes one
            takes = False
            for at in range(1, len(word)):
                action = actions.get("-" + word[at])
                if action is None or action.nargs != 0:
                    takes = action is not None and at == len(word) - 1
                    break
        i += 2 if takes else 1
    return list(words[:i]), list(words[i:])


def _name(args: argparse.Namespace) -> str:
    """What messages name the jobs' source: the job file, or the template."""
    return "the template's job" if args.template is not None else str(args.jobfile)


def _dry_run(jobs: List[FileJob]) -> None:
    """--dry-run: each command that would run, one per line, in order."""
    sys.stdout.writelines(job.command + "\n" for job in jobs)


def _backend(args: argparse.Namespace) -> Any:
    """The backend the options name: None (MPMSUB_BACKEND, else local), a name or a Backend."""
    slurm = {
        "--partition": args.partition,
        "--account": args.account,
        "--sbatch-arg": args.sbatch_arg,
        "--workdir": args.workdir,
    }
    slurm_given = [option for option, value in slurm.items() if value]
    name = args.backend
    if name is None:
        name = "dask" if args.scheduler else "slurm" if slurm_given else None
    if name == "dask":
        if not args.scheduler:
            raise ValueError("--backend dask needs the scheduler's address: --scheduler tcp://HOST:8786")
        if slurm_given:
            raise ValueError(f"{slurm_given[0]} is an option of the slurm backend, not of dask")
        from mpmsub._backends.dask import DaskBackend

        return DaskBackend(args.scheduler)
    if args.scheduler:
        raise ValueError(f"--scheduler is an option of the dask backend; the backend here is {name!r}")
    if name == "slurm":
        from mpmsub._backends.slurm import SlurmBackend

        return SlurmBackend(
            partition=args.partition, account=args.account, extra_args=args.sbatch_arg, workdir=args.workdir
        )
    if slurm_given:
        if name.startswith("slurm://"):
            raise ValueError(
                f"{slurm_given[0]} goes with --backend slurm; with an address, give the options in it "
                "(slurm://PARTITION?account=A&workdir=DIR&arg=OPTION)"
            )
        raise ValueError(f"{slurm_given[0]} is an option of the slurm backend; the backend here is {name!r}")
    return name


def _admit(cluster: Cluster, jobs: List[FileJob], name: str, results: Optional[str] = None) -> None:
    """Queue every job, checked against the budget; an error names the job's line. With
    `results`, each job's stdout and stderr go to files there."""
    given = {str(job.job["id"]): job for job in jobs if "id" in job.job}
    for job in jobs:
        named = _named(job, results)
        try:
            cluster.jobs.append(named)
        except (ValueError, TypeError) as exc:
            message = f"{label(name)}:{job.line}: {exc}"
            if "id" not in job.job and named["id"] in given:
                other = given[named["id"]].line
                message += f" (the name mpmsub gives this job, which has no id, is taken by line {other}'s)"
            raise JobFileError(message) from None


def _check_writable(path: str) -> None:
    try:
        os.close(open_private(path, os.O_APPEND))
    except OSError as exc:
        raise ValueError(f"cannot write {path!r}: {exc.strerror}") from None


def _check_apart(outputs: Dict[str, Tuple[str, Optional[str]]], inputs: Dict[str, Optional[str]]) -> None:
    """No file a command writes may be a file it reads, nor another file it writes.

    `outputs` maps an option to what it writes and its path (in the order given, each checked
    against those before it); `inputs` maps what the command reads to its path."""
    seen = {what: path for what, path in inputs.items() if path and path != "-"}
    for option, (noun, path) in outputs.items():
        if not path or path == "-":
            continue
        for what, other in seen.items():
            if _same_file(path, other):
                raise ValueError(f"{option} {path!r} is {what}: writing {noun} would overwrite it")
        seen[noun] = path


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (through links too), existing or not."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist yet: it can only be the other by name
        return os.path.realpath(a) == os.path.realpath(b)


def _outputs(args: argparse.Namespace) -> Dict[str, Tuple[str, Optional[str]]]:
    """The files `mpmsub run` or `mpmsub profile` writes, by option."""
    return {
        "--joblog": ("the joblog", getattr(args, "joblog", None)),
        "-o": ("the output", getattr(args, "output", None)),
        "--trace": ("the trace", args.trace),
        "--results": ("the results", getattr(args, "results", None)),
    }


def _named(job: FileJob, results: Optional[str] = None) -> Dict[str, Any]:
    """The job's dict with an id: its own, or job_0001... by its number in the file, so that a
    resumed run names a job as the first run did. With `results` (--results DIR), its stdout
    and stderr go to DIR/SEQ/stdout and DIR/SEQ/stderr, unless the job names files of its own."""
    named = job.job if "id" in job.job else {**job.job, "id": f"job_{job.seq:04d}"}
    if results is None:
        return named
    where = _result_dir(results, job)
    return {"stdout": os.path.join(where, "stdout"), "stderr": os.path.join(where, "stderr"), **named}


def _result_dir(results: str, job: FileJob) -> str:
    return os.path.join(os.path.abspath(results), str(job.seq))


def _by_id(jobs: List[FileJob]) -> Dict[str, FileJob]:
    """The jobs by the id they run under."""
    return {str(_named(job)["id"]): job for job in jobs}


def _read(args: argparse.Namespace) -> List[FileJob]:
    if args.template is not None:
        return _template_jobs(args)
    try:
        if args.jobfile == "-":
            text = sys.stdin.read()
        else:
            with open(args.jobfile, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError as exc:
        raise ValueError(
            f"cannot read the job file {args.jobfile!r}: {exc.strerror}; to run it as a command on values, "
            f"give them after a separator; did you mean: mpmsub {args.command} {args.jobfile} {{}} :::: - ?"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read the job file {args.jobfile!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read the job file {args.jobfile!r}: not UTF-8 text ({exc.reason})") from None
    return read_jobs(text, args.jobfile, args.format, _defaults(args))


def _template_jobs(args: argparse.Namespace) -> List[FileJob]:
    """The jobs of a command template: one per combination of its sources' values. They share
    a run-history key, the template itself, so that --job-mem auto learns across its jobs."""

    def read(name: str) -> bytes:
        if name == "-":
            return sys.stdin.buffer.read()
        with open(name, "rb") as f:
            return f.read()

    template = parse_template(args.template, read, args.arg_file, args.null)
    defaults = _defaults(args)
    key = template.command
    return [
        shell_job(seq, template.expand(values, seq), values, defaults, key)
        for seq, values in enumerate(template.jobs(), 1)
    ]


def _defaults(args: argparse.Namespace) -> Dict[str, Any]:
    """What the options give the jobs whose lines leave it out."""
    retries = getattr(args, "retries", None)
    gpus = args.job_gpus
    if args.job_gpu_mem is not None:
        if gpus == 0:
            raise ValueError(f"--job-gpu-mem {args.job_gpu_mem} is a share of each job's GPUs, and --job-gpus is 0")
        gpus = 1 if gpus is None else gpus  # a share of one device, as gpu(memory=...) in Python
    return {
        "p": args.job_cpus,
        "m": args.job_mem,
        "timeout": args.timeout,
        "retries": retries,
        "resources": args.job_res,
        "gpus": gpus,
        "gpu_memory": args.job_gpu_mem,
    }


@dataclasses.dataclass
class _Run:
    """What the run prints and records as each job ends."""

    cluster: Cluster
    jobs: List[FileJob]  # those to run
    by_id: Dict[str, FileJob]
    skipped: int
    joblog: Optional[_joblog.JobLog]
    echo: bool  # print each job's captured output as it ends
    keep_order: bool = False  # -k: print each job's output once every earlier job's is printed
    tag: bool = False  # --tag: prefix each output line with the job's values
    halt: Optional[Halt] = None
    unlogged: int = 0  # rows the joblog could not take
    joblog_error: Optional[str] = None  # why, the first time
    halted: bool = False  # --halt's condition was met
    failed: int = 0  # --halt's counts: the jobs that ended on their own
    succeeded: int = 0
    ended: Dict[str, int] = dataclasses.field(default_factory=dict)  # mpmsub ps's counts, by outcome
    held: Dict[int, JobResult] = dataclasses.field(default_factory=dict)  # -k: ended, not yet printed
    printed: int = 0  # -k: how many of `jobs`, in order, have had their output printed

    def logged(self, result: JobResult) -> None:
        """Write the job's joblog row, as soon as it has ended (on mpmsub's results thread): a
        driver killed a moment later must not run it again on --resume. A row that cannot be
        written is counted, and the run then fails, after its jobs."""
        outcome = (
            "succeeded" if result.success else result.failure if result.failure in (KILLED, CANCELLED) else "failed"
        )
        self.ended[outcome] = self.ended.get(outcome, 0) + 1
        self._check_halt(result)
        if self.joblog is None or result.failure == CANCELLED:  # cancelled jobs run again
            return
        job = self.by_id[result.job_id]
        try:
            self.joblog.write(job.seq, job.command, result)
        except (OSError, ValueError) as exc:  # the jobs go on; a later row may still fit
            self.unlogged += 1
            if self.joblog_error is None:
                self.joblog_error = str(exc)

    def finished(self, result: JobResult) -> None:
        """A job's end, on the run's thread: print its output, and halt the run if --halt says so."""
        if self.keep_order:
            self.held[self.by_id[result.job_id].seq] = result
            while self.printed < len(self.jobs) and self.jobs[self.printed].seq in self.held:
                self._show(self.held.pop(self.jobs[self.printed].seq))
                self.printed += 1
        else:
            self._show(result)

    def _check_halt(self, result: JobResult) -> None:
        """--halt, the moment a job's end is known (on the results thread, so that as few jobs as
        can be start after the condition is met): now stops the run through the cluster, as a
        signal does; soon cancels the queued jobs and lets the running ones finish. A job
        cancelled or killed (mpmsub kill) is not counted: the user stopped it, it did not fail."""
        if self.halt is None or self.halted or result.failure in (CANCELLED, KILLED):
            return
        self.failed += not result.success
        self.succeeded += result.success
        if self.halt.reached(self.failed, self.succeeded, len(self.jobs)):
            self.halted = True
            if self.halt.when == NOW:
                self.cluster._stop = _Halted()
            else:
                self.cluster._cancel_queued()

    def flush(self) -> None:
        """-k: print what is still held (the jobs before it never ended: cancelled or killed)."""
        for seq in sorted(self.held):
            self._show(self.held.pop(seq))

    def _show(self, result: JobResult) -> None:
        if self.echo:
            try:
                self._print(result.stdout, sys.stdout, result)
                self._print(result.stderr, sys.stderr, result)
            except BrokenPipeError:  # e.g. `mpmsub run jobs.txt | head`: the jobs go on, unprinted
                self.echo = False
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # so that Python's final flush is quiet
                os.close(devnull)

    def _print(self, text: Optional[str], stream: TextIO, result: JobResult) -> None:
        if text:
            if self.tag:
                prefix = self.by_id[result.job_id].tag + "\t"
                text = "".join(prefix + line for line in text.splitlines(keepends=True))
            self.cluster._echo(text, stream)


def _to_run(args: argparse.Namespace, jobs: List[FileJob]) -> List[FileJob]:
    """The jobs that run: all, or, when resuming, those the joblog does not record as done."""
    if not (args.resume or args.resume_failed):
        return jobs
    recorded = _joblog.read(args.joblog)
    return [j for j in jobs if not _done(recorded.get(_joblog.key(j.seq, j.command)), args.resume_failed)]


def _plan_run(args: argparse.Namespace, cluster: Cluster, jobs: List[FileJob]) -> _Run:
    """The jobs to run (those the joblog does not record, when resuming) and the open joblog."""
    skipped = 0
    resuming = args.resume or args.resume_failed
    if resuming:
        run = _to_run(args, jobs)
        skipped = len(jobs) - len(run)
        if skipped:
            cluster.jobs.clear()
            cluster.jobs.extend(_named(j, args.results) for j in run)
        jobs = run
    if args.results:  # made once nothing else can refuse the run (0700: the jobs' output is yours)
        os.makedirs(args.results, mode=0o700, exist_ok=True)
        for job in jobs:
            os.makedirs(_result_dir(args.results, job), mode=0o700, exist_ok=True)
    log = _joblog.JobLog(args.joblog, append=resuming) if args.joblog else None
    return _Run(
        cluster,
        jobs,
        _by_id(jobs),
        skipped,
        log,
        echo=not args.json,
        keep_order=args.keep_order,
        tag=args.tag,
        halt=args.halt,
    )


def _run(args: argparse.Namespace, cluster: Cluster, plan: _Run) -> int:
    if plan.skipped and not args.quiet:
        print(f"mpmsub: {plan.skipped} job(s) skipped: the joblog records them", file=sys.stderr)
    status = OK
    if plan.jobs:
        control = None if args.no_control else _serve(args, plan)
        try:
            status = _execute(
                cluster, lambda: cluster._run(max_workers=args.jobs, on_result=plan.finished, on_end=plan.logged)
            )
        finally:  # the socket goes with the run, however it ends
            if control is not None:
                control.close()
        plan.flush()
        if plan.halted and not args.quiet:
            print(f"mpmsub: --halt {plan.halt}: the run was halted", file=sys.stderr)
    if plan.joblog is not None:
        plan.joblog.close()
        if plan.unlogged:
            print(
                f"mpmsub: the joblog {plan.joblog.path!r} is missing {plan.unlogged} row(s) ({plan.joblog_error}): "
                "--resume would run those jobs again",
                file=sys.stderr,
            )
    results = cluster.completed_jobs + cluster.failed_jobs
    results.sort(key=lambda r: plan.by_id[r.job_id].seq)
    if args.json:
        _print_json(cluster, results, plan.by_id, plan.skipped)
    elif not args.quiet and plan.jobs:
        print(_report.summary_text(cluster.stats, results), file=sys.stderr)
    if status != OK:
        return status
    if plan.halted and plan.halt is not None and plan.halt.what == SUCCESS and not plan.unlogged:
        return OK  # as GNU parallel: halting on success is a success, whatever was stopped
    return OK if all(r.success for r in results) and not plan.unlogged else FAILED


def _serve(args: argparse.Namespace, plan: _Run) -> Optional[_control.Server]:
    """The run's control socket for mpmsub ps and kill; None, said on stderr, where it cannot
    have one (the run goes on without it)."""
    if args.template is not None:
        source = "template: " + _report.one_line(" ".join(args.template))
    else:
        source = "standard input" if args.jobfile == "-" else os.path.abspath(args.jobfile)
    info = {"jobfile": source, "cwd": os.getcwd(), "version": __version__}
    state = _control.RunState(
        plan.cluster, {job_id: job.seq for job_id, job in plan.by_id.items()}, info, plan.ended.copy
    )
    server, why = _control.serve(state)
    if server is None and not args.quiet:
        print(f"mpmsub: mpmsub ps and kill will not see this run: no control socket ({why})", file=sys.stderr)
    return server


def _done(success: Optional[bool], only_succeeded: bool) -> bool:
    """Whether the joblog's record of a job (None: no record) means it is not run again."""
    return success is not None and (success or not only_succeeded)


def _execute(cluster: Cluster, run: Callable[[], Any]) -> int:
    """Run with Ctrl-C and SIGTERM killing the running jobs; OK or the interrupted status.

    The signal handlers only ask the cluster to stop: it raises between two waits for results,
    where no lock is half taken (an exception raised by a handler at any point could leave one
    held and the shutdown waiting on it)."""

    def stop(signum: int, frame: Optional[FrameType]) -> None:
        cluster._stop = KeyboardInterrupt() if signum == signal.SIGINT else _Terminated()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run()
    except KeyboardInterrupt:
        print("mpmsub: interrupted; running jobs were killed", file=sys.stderr)
        return INTERRUPTED
    except _Terminated:
        print("mpmsub: terminated; running jobs were killed", file=sys.stderr)
        return TERMINATED
    except _Halted:  # --halt now: the jobs were killed; the run's report and status follow
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return OK


def _print_json(cluster: Cluster, results: List[JobResult], by_id: Dict[str, FileJob], skipped: int) -> None:
    rows = []
    for result in results:
        job = by_id[result.job_id]
        row: Dict[str, Any] = {"seq": job.seq, "line": job.line, "command": job.command}
        row.update(dataclasses.asdict(result))
        row["success"] = result.success
        rows.append(row)
    json.dump({"stats": cluster.stats, "skipped": skipped, "results": rows}, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _profile(args: argparse.Namespace, cluster: Cluster, jobs: List[FileJob]) -> int:
    by_id = _by_id(jobs)
    outcome: List[JobResult] = []
    status = _execute(cluster, lambda: outcome.extend(cluster.profile(verbose=False)))
    if status != OK:
        return status
    quiet = args.quiet
    if not quiet:
        specs = {r.job_id: by_id[r.job_id].spec for r in outcome}
        print(_report.profile_text(outcome, specs, set(), cluster.max_cpus, cluster.max_memory, snippet=False))
        if not args.output:
            print("\nmpmsub profile -o FILE writes the jobs with this memory filled in, for mpmsub run.")
    failed = [r for r in outcome if not r.success]
    if args.output:
        ordered = sorted(outcome, key=lambda r: by_id[r.job_id].seq)
        rows = [_sized(by_id[r.job_id], r, _defaults(args)) for r in ordered]
        try:
            with open(open_private(args.output, os.O_TRUNC), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        except OSError as exc:
            print(f"mpmsub: cannot write {args.output!r}: {exc.strerror}", file=sys.stderr)
            return FAILED
        if not quiet:
            print(f"mpmsub: wrote {len(rows)} job(s) with measured memory to {args.output}", file=sys.stderr)
    for r in failed:
        job = by_id[r.job_id]
        message = f"mpmsub: job {job.seq} (line {job.line}) failed: {r.error}; its memory is left as given"
        print(message, file=sys.stderr)
    return FAILED if failed else OK


def _sized(job: FileJob, result: JobResult, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The job's line as a JSON object, with what the options gave it, and its memory the
    recommendation (kept as it was if the job failed)."""
    row = with_defaults(job.given, defaults)
    if result.success:
        row.pop("memory", None)
        row["m"] = _report.recommend_memory(result.memory_used)
    return row


def _report_command(args: argparse.Namespace) -> int:
    """`mpmsub report TRACE [-o FILE]`."""
    from mpmsub._report.html import INSTALL_HINT, write_report

    command: argparse.ArgumentParser = args.parser
    output = args.output or os.path.splitext(args.trace)[0] + ".html"
    if _same_file(output, args.trace):
        command.error(f"the report would overwrite its trace {args.trace!r}: give -o FILE")
    try:
        with warnings.catch_warnings(record=True):  # said below, in the command's words
            warnings.simplefilter("always")
            plotted = write_report(args.trace, output, plots=False if args.no_plots else None)
    except FileNotFoundError as exc:
        command.error(f"no trace file {args.trace!r}" if exc.filename == args.trace else str(exc))
    except UnicodeDecodeError:
        command.error(f"{args.trace}: not an mpmsub trace (not UTF-8 text)")
    except (OSError, ValueError) as exc:
        command.error(str(exc))
    if not plotted and not args.no_plots:
        print(
            f"mpmsub: matplotlib is not installed: the report has tables but no figures ({INSTALL_HINT})",
            file=sys.stderr,
        )
    print(f"mpmsub: wrote {output}", file=sys.stderr)
    return OK


def _history(args: argparse.Namespace) -> int:
    """`mpmsub history ...`."""
    command: argparse.ArgumentParser = args.parser
    try:
        path = resolve_history(True) if args.db is None else resolve_history(args.db)
    except (ValueError, TypeError) as exc:
        command.error(str(exc))
    if path is None:
        command.error("the run history is off (MPMSUB_HISTORY=off); give --db FILE to read one")
    if not os.path.exists(path) and args.action != "import":  # an import makes it
        print(f"mpmsub: no run history at {path}", file=sys.stderr)
        return OK if args.action in ("list", "export") else FAILED
    if getattr(args, "output", None):
        try:
            _check_apart({"-o": ("the export", args.output)}, {"the run history": path})
        except ValueError as exc:
            command.error(str(exc))
    history = History(path, tolerant=False)
    try:
        return _history_action(args, history)
    except HistoryError as exc:
        print(f"mpmsub: {exc}", file=sys.stderr)
        return FAILED
    finally:
        history.close()


def _history_action(args: argparse.Namespace, history: History) -> int:
    if args.action == "import":
        return _history_import(args, history)
    if args.action == "list":
        summaries = history.summaries()
        if not summaries:
            print(f"mpmsub: the run history at {history.path} holds no run", file=sys.stderr)
            return OK
        rows: List[Tuple[str, ...]] = [("KEY", "RUNS", "PREDICTED", "FOR INPUT", "HOW", "LAST RUN")]
        for summary in summaries:
            size, guess = _prediction(summary.recent)
            rows.append(
                (
                    _report.one_line(summary.key),
                    str(summary.runs),
                    "-" if guess is None else format_memory(guess.memory),
                    "-" if guess is None else format_memory(size),
                    "-" if guess is None else f"{guess.method}, {guess.runs} run(s)",
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.last)),
                )
            )
        _table(rows)
        return OK
    if args.action in ("show", "forget") and args.key is not None:
        args.key = _stored_key(history, args.key)
    if args.action == "show":
        runs = list(history.rows(args.key))
        if not runs:
            print(f"mpmsub: the run history holds no run of the key {args.key!r}", file=sys.stderr)
            return FAILED
        size, guess = _prediction(history.runs(args.key))
        print(f"key: {_report.one_line(args.key)}\nruns: {len(runs)}")
        if guess is not None:
            print(
                f"predicted: {format_memory(guess.memory)} for {format_memory(size)} of input "
                f"({guess.method} of the last {guess.runs} run(s), margin included)"
            )
        print(f"last command: {_report.one_line(_report.command_line(runs[-1]['argv']))}\n")
        table: List[Tuple[str, ...]] = [("ENDED", "INPUT", "PEAK", "REQUESTED", "RUNTIME", "CPU", "RESULT", "HOST")]
        for run in runs:
            requested = run["memory_requested"]
            outcome = "ok" if run["failure"] is None else run["failure"]
            if run["returncode"] not in (None, 0):
                outcome += f" ({run['returncode']})"
            table.append(
                (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["time"])),
                    format_memory(run["input_bytes"]),
                    format_memory(run["peak_bytes"]),
                    "-" if requested is None else format_memory(requested),
                    f"{run['runtime']:.1f}s",
                    f"{run['cpu_time']:.1f}s",
                    outcome,
                    run["host"],
                )
            )
        _table(table)
        return OK
    if args.action == "forget":
        count = history.forget(None if args.all else args.key)
        what = "every key" if args.all else f"the key {args.key!r}"
        print(f"mpmsub: forgot {count} run(s) of {what}", file=sys.stderr)
        return OK if count or args.all else FAILED
    lines = [json.dumps(run) + "\n" for run in history.rows()]  # all read before a file is touched
    if not args.output:
        sys.stdout.writelines(lines)
        return OK
    try:
        with open(open_private(args.output, os.O_TRUNC), "w", encoding="utf-8") as out:
            out.writelines(lines)
    except OSError as exc:
        print(f"mpmsub: cannot write {args.output!r}: {exc.strerror}", file=sys.stderr)
        return FAILED
    print(f"mpmsub: wrote {len(lines)} run(s) to {args.output}", file=sys.stderr)
    return OK


def _history_import(args: argparse.Namespace, history: History) -> int:
    """`mpmsub history import FILE...`: every file read before any run is added (a file of
    neither format adds nothing), then the runs not yet in the history, in one transaction."""
    from collections import Counter

    from mpmsub._job import history_key
    from mpmsub._learn import imports

    try:
        history_key(args.key_prefix + ("x" if args.key is None else args.key))
    except ValueError as exc:
        args.parser.error(str(exc))
    options = imports.Options(key=args.key, key_prefix=args.key_prefix, input_size=args.input_size)
    files = []
    for name in args.files:
        try:
            with open(name, "rb") as file:
                data, when = file.read(), os.fstat(file.fileno()).st_mtime
            files.append((name, imports.read(data, name, os.path.realpath(name), when, options)))
        except OSError as exc:
            print(f"mpmsub: cannot read {name!r}: {exc.strerror}", file=sys.stderr)
            return FAILED
        except ValueError as exc:
            print(f"mpmsub: {exc}", file=sys.stderr)
            return FAILED
    known: Dict[str, set[str]] = {}  # each key's runs in the history, by identity
    added: List[imports.ImportedRun] = []
    lines = []
    for name, found in files:
        keys: Counter[str] = Counter()
        again = 0
        for run in found.runs:
            if run.key not in known:
                known[run.key] = {json.dumps(row["argv"]) for row in history.rows(run.key)}
            if run.identity in known[run.key]:
                again += 1
                continue
            known[run.key].add(run.identity)
            added.append(run)
            keys[run.key] += 1
        counts = [f"{sum(keys.values())} run(s) of {len(keys)} key(s) imported"]
        counts += [f"{again} already imported"] if again else []
        counts += [f"{found.passed_over} cached or aborted"] if found.passed_over else []
        counts += [f"{found.malformed} malformed"] if found.malformed else []
        lines.append(f"{name} ({found.kind}): {', '.join(counts)}")
        lines += [f"  {count:6d}  {_report.one_line(key)}" for key, count in sorted(keys.items())]
        if found.malformed:
            print(
                f"mpmsub: {name}: skipped {found.malformed} malformed row(s); the first, {found.first_malformed}",
                file=sys.stderr,
            )
    if added:
        history.add([run.row() for run in added])
    print("\n".join(lines))
    return OK


def _ps(args: argparse.Namespace) -> int:
    """`mpmsub ps [--run PID] [--json]`."""
    asked = _ask_run(args.run, {"op": "ps"})
    if asked is None:
        return FAILED
    run, reply = asked
    if args.json:
        json.dump(reply, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return OK
    counts = reply["counts"]
    tally = ", ".join(
        f"{counts[what]} {what}"
        for what in ("running", "queued", "succeeded", "failed", "killed", "cancelled")
        if counts.get(what) or what in ("running", "queued")
    )
    print(f"mpmsub run {run.describe()}\n{tally} of {counts['total']} job(s)")
    if not reply["jobs"]:
        return OK
    held = [_control.held_text(job) for job in reply["jobs"]]  # GPUs, named resources
    holds = any(held)  # a column only where some job holds some
    rows: List[Tuple[str, ...]] = [
        ("ID", "SEQ", "STATE", "RUNTIME", "CPUS", "RESERVED", "IN USE", "CPU TIME")
        + (("HOLDS",) if holds else ())
        + ("WHERE", "COMMAND")
    ]
    for job, also in zip(reply["jobs"], held):
        rows.append(
            (
                _report.one_line(job["job_id"]),
                "-" if job["seq"] is None else str(job["seq"]),
                "stopping" if job["stopping"] else "running",
                format_duration(job["runtime"]),
                str(job["cpus"]),
                format_memory(job["memory_reserved"]) if job["memory_reserved"] else "-",
                "-" if job["memory_in_use"] is None else format_memory(job["memory_in_use"]),
                "-" if job["cpu_time"] is None else format_duration(job["cpu_time"]),
            )
            + ((also or "-",) if holds else ())
            + (job["where"], _shorten(_report.one_line(job["command"]), 60))
        )
    _table(rows)
    return OK


def _kill(args: argparse.Namespace) -> int:
    """`mpmsub kill JOBID... [--reason TEXT] [--run PID]`: 0 when every job named was killed."""
    asked = _ask_run(args.run, {"op": "kill", "jobs": args.jobs, "reason": args.reason})
    if asked is None:
        return FAILED
    _, reply = asked
    status = OK
    for result in reply["results"]:
        name = _report.one_line(result["job"])
        if result.get("killed"):
            print(f"{name}: killed" + ("" if result["started"] else " (before it started)"))
            continue
        status = FAILED
        if "error" in result:
            print(f"mpmsub: {name}: {result['error']}", file=sys.stderr)
        elif result.get("stopping"):
            print(f"{name}: not killed (it was being stopped already)")
        else:
            print(f"{name}: not running (it had ended)")
    return status


def _ask_run(pid: Optional[int], message: Dict[str, Any]) -> Optional[Tuple[_control.RunInfo, Dict[str, Any]]]:
    """The run (the one of `pid`, or the only one) and its answer to `message`; None, said on
    stderr, where there is no such run or it did not answer or refused."""
    try:
        run = _control.pick_run(pid)
        reply = _control.request(run.path, message)
    except (LookupError, UnsafeFileError, OSError, ValueError) as exc:
        reason = str(exc)
        if isinstance(exc, OSError) and exc.strerror:  # the reason, without the error's number
            reason = f"cannot reach the run: {exc.strerror}" + (f" {exc.filename!r}" if exc.filename else "")
        print(f"mpmsub: {reason}", file=sys.stderr)
        return None
    if not reply["ok"]:
        print(f"mpmsub: the run refused: {reply.get('error')}", file=sys.stderr)
        return None
    return run, reply


def _shorten(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _stored_key(history: History, key: str) -> str:
    """The key as the history holds it: as given, or with the line breaks `history list` shows
    as \\n written back."""
    stored = _report.from_one_line(key)
    if stored == key or next(history.rows(key), None) is not None:
        return key
    return stored if next(history.rows(stored), None) is not None else key


def _prediction(runs: Sequence[Run]) -> Tuple[int, Optional[Estimate]]:
    """A key's prediction for the largest input of its recent runs: that size, and the estimate."""
    size = max((run.size for run in runs), default=0)
    return size, estimate(runs, size)


def _table(rows: List[Tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def entry() -> None:
    """The console script."""
    try:
        status = main()
    except KeyboardInterrupt:  # while the job file was read, before any job ran
        print("mpmsub: interrupted", file=sys.stderr)
        status = INTERRUPTED
    sys.exit(status)
