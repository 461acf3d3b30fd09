"""The SLURM backend: each job is a SLURM job (an array element) that runs it under mpmsub on a node.

A job becomes `sbatch --parsable --cpus-per-task=p --mem=... --time=... [--gres=gpu:N]
[--licenses=NAME:N,...] --wrap "python -m mpmsub _run-job SPEC RESULT"`, with its spec, result and
output files in a run directory under `workdir` (which must be on a filesystem the nodes share).
Jobs handed over together that are alike in those options are one `sbatch --array`, whose element i
finds its files by $SLURM_ARRAY_TASK_ID and is SLURM job ARRAYID_i. On the node, mpmsub runs the
job as it does locally and writes the Outcome; here one thread submits, follows every job with one
`squeue` call per poll (never one per job; polls back off while nothing changes), cancels with
`scancel`, and reads the results. A job no node can hold (from `sinfo`: CPUs, memory, gpu gres), or
asking for more of a license than SLURM has (`scontrol show licenses`), is refused at submit;
SLURM's own memory and time kills, when they come first, are reported as the same memory and
timeout failures. A second thread touches a heartbeat file in the run directory, by which the
runners learn that their driver died (killed with -9: nothing cancelled its jobs) and stop (see
remote.Heartbeat).

The run directory is private (mkdtemp: an unpredictable name, mode 0700) and its files 0600; a
result is trusted only if it is a file of this user signed with the launcher's secret key, which
only the job's spec file carries (see remote): one another user placed is rejected, not unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import pickle
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mpmsub import _files, _threads
from mpmsub._backends import remote as _remote
from mpmsub._backends.base import GPU, Backend, LaunchOptions, Node, largest_fit, most_memory, seconds
from mpmsub._errors import MpmsubError
from mpmsub._launch.base import Handle, Launcher, Outcome, not_started
from mpmsub._result import CANCELLED, ERROR, EXIT, MEMORY, SIGNAL, START, TIMEOUT, FailureKind
from mpmsub._spec import JobSpec
from mpmsub._units import MB, format_memory, parse_memory

logger = logging.getLogger("mpmsub")

# What the runner (python -m mpmsub _run-job: an interpreter, psutil and mpmsub) adds to a job's
# memory in SLURM's count, which sums every process of the job: added to --mem, so that the job
# itself has its whole m. Measured here at 22 MB resident while its job runs; rounded up.
RUNNER_MEMORY = 64 * MB
_MIN_POLL = 0.25  # seconds between polls while jobs change; multiplied by _BACKOFF while none does
_BACKOFF = 1.5
_RESULT_WAIT = 30.0  # seconds a finished job's result file may take to appear (a shared filesystem)
_TIME_MARGIN = 60.0  # seconds of --time beyond a job's timeout: mpmsub's own kill comes first
_TERMINAL = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "TIMEOUT",
}
_SLURM_STOPS = {"DEADLINE", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}  # SLURM's own stops of a running job
_KILL_WAIT = 10.0  # seconds a killed job's result may take to appear (the runner kills its tree first)
_MEMORY_KILL = re.compile(r"exceeded (job )?memory limit|oom[- ]kill", re.IGNORECASE)
_MEMORY_USED = re.compile(r"exceeded memory limit \((\d+) > \d+\)")  # slurmstepd's kill: bytes used > allowed
_ALLOCATED = re.compile(r"\bTRES=\S*?\bmem=(\d+(?:\.\d+)?[KMGT]?)\b")  # scontrol show job: its --mem, as granted
# What a runner reports when SLURM's signal stopped its job, rather than its own verdict.
_STOP_ANSWERS = (CANCELLED, SIGNAL, EXIT)
# sbatch's refusal for a limit on the jobs a user or account may have in SLURM at once.
_SUBMIT_LIMIT = re.compile(r"MaxSubmitJob|job submit limit", re.IGNORECASE)
# A gpu entry of sinfo's gres column (%G): gpu:4, gpu:a100:4 (a socket list in brackets removed).
_GPU_GRES = re.compile(r"^gpu(?::[^:]+)?:(\d+)$")
_LICENSE = re.compile(r"\bLicenseName=(\S+)\s.*?\bTotal=(\d+)")  # scontrol --oneliner show licenses


class SlurmError(MpmsubError, RuntimeError):
    """A SLURM command could not be run or failed."""


class SlurmBackend(Backend):
    """Run each job as a SLURM batch job.

    `partition` and `account` go to sbatch's --partition and --account (None: SLURM's defaults);
    `extra_args` are more sbatch options, as a list of strings (`["--qos=high"]`). `workdir` holds
    the jobs' spec, result and output files and must be on a filesystem the nodes share, which
    keeps files' owners and modes (default: `.mpmsub-slurm` in the current directory, made with
    mode 0700 if absent; each run's files go in a private directory of its own there). `python`
    is the interpreter the nodes run mpmsub with (default: this one, `sys.executable`).
    `max_poll` caps the seconds between two polls. While jobs run, the driver (this process)
    touches a heartbeat file in its run directory every few seconds; a job whose driver has not
    for `heartbeat_timeout` seconds (killed with -9, its machine down) is killed on its node, and
    one that starts later never runs its command (None: jobs outlive their driver).
    """

    name = "slurm"
    # A batch goes to SLURM at once, as a few job arrays (sites ask for that, not a stream of
    # sbatch); SLURM queues it. A site's submit limit (MaxSubmitJobs) refuses what is over it.
    lookahead = 1000

    def __init__(
        self,
        partition: Optional[str] = None,
        account: Optional[str] = None,
        extra_args: Sequence[str] = (),
        workdir: Optional[str] = None,
        *,
        python: Optional[str] = None,
        max_poll: float = 5.0,
        heartbeat_timeout: Optional[float] = 60.0,
    ) -> None:
        for name, value in (("partition", partition), ("account", account), ("workdir", workdir), ("python", python)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TypeError(f"{name} must be a non-empty string or None; got {value!r}")
        if isinstance(extra_args, str) or not all(isinstance(arg, str) for arg in extra_args):
            raise TypeError(f"extra_args must be a list of strings, such as ['--qos=high']; got {extra_args!r}")
        # With inf the wait between polls would grow without end (1.5 times each quiet poll)
        polls = seconds(
            "max_poll", max_poll, lambda s: _MIN_POLL <= s <= 86400, f"a number of seconds, from {_MIN_POLL} to 86400"
        )
        beats = None
        if heartbeat_timeout is not None:
            expected = "a number of seconds, from 1 to 86400, or None"
            beats = seconds("heartbeat_timeout", heartbeat_timeout, lambda s: 1 <= s <= 86400, expected)
        self.partition = partition
        self.account = account
        self.extra_args = tuple(extra_args)
        self.workdir = os.path.abspath(workdir or ".mpmsub-slurm")
        self.python = python or sys.executable
        self.max_poll = polls
        self.heartbeat_timeout = beats
        self.calls: Counter[str] = Counter()  # SLURM commands run, by name (sbatch, squeue, ...)
        self._nodes: Optional[List[Node]] = None
        self._max_array: Optional[int] = None
        self._licenses: Optional[Dict[str, int]] = None
        self._licenses_known = False  # asked once: None above where scontrol could not tell

    def __repr__(self) -> str:
        options = [f"{name}={value!r}" for name, value in (("partition", self.partition), ("account", self.account))]
        if self.extra_args:
            options.append(f"extra_args={list(self.extra_args)!r}")
        return f"mpmsub.SlurmBackend({', '.join(options)})"

    def command(self, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a SLURM command; counted in `calls`. Raises SlurmError if it cannot be run."""
        self.calls[argv[0]] += 1
        try:
            return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]!r} is not on PATH: the SLURM backend needs SLURM's commands here") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise SlurmError(f"cannot run {argv[0]!r}: {exc}") from exc

    def nodes(self, fresh: bool = False) -> List[Node]:
        """The nodes of the partition (or of every partition), from sinfo, with their GPUs (gres)."""
        if self._nodes is None or fresh:
            argv = ["sinfo", "--noheader", "--Node", "--format=%N|%c|%m|%G"]
            if self.partition:
                argv.append(f"--partition={self.partition}")
            done = self.command(argv)
            if done.returncode != 0:
                raise SlurmError(f"sinfo failed: {_last_line(done.stderr) or done.returncode}")
            nodes: Dict[str, Node] = {}
            for line in done.stdout.splitlines():
                fields = line.strip().split("|")
                if len(fields) == 4 and fields[1].isdigit():
                    memory = int(re.sub(r"\D.*", "", fields[2]) or 0) * MB
                    gpus = gres_gpus(fields[3])
                    nodes[fields[0]] = Node(fields[0], int(fields[1]), memory, {GPU: gpus} if gpus else {})
            self._nodes = sorted(nodes.values(), key=lambda node: node.name)
        return self._nodes

    def max_array_size(self) -> int:
        """The most jobs one array may hold: the site's MaxArraySize (scontrol, asked once); 1
        where arrays are off, or it cannot be learned."""
        if self._max_array is None:
            try:
                done = self.command(["scontrol", "show", "config"])
            except SlurmError as exc:
                done = subprocess.CompletedProcess([], 1, "", str(exc))
            found = re.search(r"^MaxArraySize\s*=\s*(\d+)", done.stdout, re.MULTILINE)
            if found is None:
                why = _last_line(done.stderr) or "no MaxArraySize in its output"
                logger.warning("mpmsub: scontrol show config failed (%s): one sbatch per job", why)
            self._max_array = max(1, int(found.group(1))) if found else 1
        return self._max_array

    def licenses(self) -> Optional[Dict[str, int]]:
        """SLURM's licenses and how many of each it has in all (scontrol show licenses, asked
        once); None where scontrol cannot tell."""
        if not self._licenses_known:
            try:
                done = self.command(["scontrol", "--oneliner", "show", "licenses"])
            except SlurmError as exc:
                done = subprocess.CompletedProcess([], 1, "", str(exc))
            if done.returncode == 0:
                self._licenses = {name: int(total) for name, total in _LICENSE.findall(done.stdout)}
            else:
                why = _last_line(done.stderr) or f"exit status {done.returncode}"
                logger.warning("mpmsub: scontrol show licenses failed (%s): sbatch checks the licenses", why)
            self._licenses_known = True
        return self._licenses

    def capacity(self) -> Optional[Tuple[int, int]]:
        nodes = self.nodes(fresh=True)
        if not nodes:
            where = f"partition {self.partition!r}" if self.partition else "this SLURM cluster"
            raise ValueError(f"sinfo lists no node in {where}")
        return sum(node.cpus for node in nodes), sum(node.memory for node in nodes)

    def why_never_fits(self, spec: JobSpec) -> Optional[str]:
        if spec.gpu_memory is not None:
            return (
                f"it asks for {format_memory(spec.gpu_memory)} on each of its GPUs, sharing them, but SLURM "
                "gives a job whole GPUs (--gres=gpu:N): ask gpu(n) without memory"
            )
        if spec.resources:
            why = self._why_no_licenses(spec)
            if why is not None:
                return why
        # Licenses are the cluster's, not a node's: a node holds the job's CPUs, memory and GPUs.
        placed = dataclasses.replace(spec, resources=()) if spec.resources else spec
        return largest_fit(
            placed, self.nodes(), "SLURM node", RUNNER_MEMORY, "has", lambda name, count: f"gres gpu:{count}"
        )

    def _why_no_licenses(self, spec: JobSpec) -> Optional[str]:
        licenses = self.licenses()
        if licenses is None:
            return None  # sbatch refuses an unknown license itself
        for name, count in spec.resources:
            total = licenses.get(name)
            if total is None:
                have = ", ".join(f"{other}:{number}" for other, number in sorted(licenses.items())) or "none"
                return (
                    f"it asks for {count} of resource {name!r} (sbatch --licenses={name}:{count}) but SLURM has "
                    f"no license {name!r} (scontrol show licenses lists {have})"
                )
            if count > total:
                return (
                    f"it asks for {count} of resource {name!r} (sbatch --licenses={name}:{count}) but SLURM's "
                    f"license {name!r} has {total} in all"
                )
        return None

    def place_memory(self, cpus: int) -> Optional[int]:
        return most_memory(self.nodes(), cpus, overhead=RUNNER_MEMORY)

    def launcher(self, options: LaunchOptions) -> Launcher:
        return SlurmLauncher(self, options)


class SlurmLauncher(Launcher):
    """One thread submits, polls and cancels for all of an executor's SLURM jobs."""

    local = False

    def __init__(self, backend: SlurmBackend, options: LaunchOptions) -> None:
        self.backend = backend
        self.kill_grace = options.kill_grace
        self.output_limit = options.output_limit
        self.key = secrets.token_bytes(_remote.KEY_BYTES)  # signs the results; sent only in spec files
        self.directory: Optional[str] = None  # the run directory, made with the first job
        self._files = itertools.count(1)
        self._cond = threading.Condition()
        self._new: List[SlurmHandle] = []  # started, not yet submitted
        self._kills: List[SlurmHandle] = []
        self._active: Dict[str, SlurmHandle] = {}  # by SLURM job id (the thread's)
        # Refused for the site's submit limit (MaxSubmitJobs): submitted again at the next poll
        # that sees jobs end, or at the next poll at all when none of ours is in SLURM (the thread's).
        self._held: List[SlurmHandle] = []
        self._closing = False
        # Started now, with the executor: a job that ends a program without shutdown() is started
        # at interpreter shutdown, when Python 3.12.0-3.12.2 start no thread.
        self._thread = _threads.start(self._run, "mpmsub-slurm")
        self._closed = threading.Event()
        self._heart: Optional[threading.Thread] = None
        if self._thread is not None and backend.heartbeat_timeout is not None:
            # Its own thread: the SLURM thread may wait a minute on a busy controller.
            self._heart = _threads.start(self._beat, "mpmsub-slurm-heartbeat", (backend.heartbeat_timeout,))
        if self._thread is None or (self._heart is None and backend.heartbeat_timeout is not None):
            raise RuntimeError("cannot start mpmsub's SLURM threads: the interpreter is shutting down")

    def why_never_fits(self, spec: JobSpec) -> Optional[str]:
        return self.backend.why_never_fits(spec)

    def start(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> Handle:
        with self._cond:
            if self.directory is None:
                host = socket.gethostname().split(".")[0]
                directory = _files.make_private_directory(self.backend.workdir, f"mpmsub-{host}-{os.getpid()}-")
                if self.backend.heartbeat_timeout is not None:
                    os.close(_files.open_private(os.path.join(directory, _remote.HEARTBEAT), os.O_EXCL))
                self.directory = directory
            handle = SlurmHandle(self, spec, job_id, on_exit, os.path.join(self.directory, f"{next(self._files):06d}"))
            self._new.append(handle)
            self._cond.notify()
        return handle

    def where(self, handles: Sequence[Handle]) -> List[str]:
        """Each job's SLURM id and state, as last polled."""
        places = []
        for handle in handles:
            slurm_id = getattr(handle, "slurm_id", None)
            state = getattr(handle, "state", "?")
            places.append("SLURM (being submitted)" if slurm_id is None else f"SLURM job {slurm_id} ({state})")
        return places

    def kill_later(self, handle: SlurmHandle) -> None:
        with self._cond:
            self._kills.append(handle)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._closed.set()
        if self._heart is not None:
            self._heart.join()
        # Every job has ended: what is left (a result that came after its job was given up on)
        # is nobody's.
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- the threads -------------------------------------------------------------------------------

    def _beat(self, timeout: float) -> None:
        """Touch the run directory's heartbeat file until closed: the runners' sign that this
        driver lives (see remote.Heartbeat)."""
        while not self._closed.wait(_remote.beat_interval(timeout)):
            if self.directory is not None:
                try:
                    os.utime(os.path.join(self.directory, _remote.HEARTBEAT))
                except OSError as exc:  # its jobs will take the driver for gone
                    logger.warning("mpmsub: cannot touch the SLURM jobs' heartbeat file: %s", exc)

    def _run(self) -> None:
        interval = _MIN_POLL
        next_poll = time.monotonic() + interval
        while True:
            with self._cond:
                while not (self._new or self._kills or self._closing):
                    wait = None if not (self._active or self._held) else next_poll - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                new, self._new = self._new, []
                kills, self._kills = self._kills, []
                if self._closing and not new and not self._active:
                    return
            try:
                self._submit(new)
                if kills:
                    self._cancel(kills)
                    for handle in list(self._held):
                        if handle.killed is not None:  # never submitted: it ends now
                            self._held.remove(handle)
                            handle.end(not_started(handle.spec, *handle.killed))
                if new or kills:
                    interval = _MIN_POLL  # something changed: look again soon
                    next_poll = min(next_poll, time.monotonic() + interval)
                if (self._active or self._held) and time.monotonic() >= next_poll:
                    changed = False
                    try:
                        changed = bool(self._active) and self._poll()
                    except SlurmError as exc:  # a busy controller: look again later
                        logger.warning("mpmsub: %s; polling again later", exc)
                    if self._held and (changed or not self._active):
                        held, self._held = self._held, []
                        self._submit(held)
                    interval = _MIN_POLL if changed else min(self.backend.max_poll, interval * _BACKOFF)
                    next_poll = time.monotonic() + interval
            except Exception:  # a bug or a SLURM failure must not leave jobs without an end
                logger.exception("mpmsub: the SLURM thread failed; its jobs end as errors")
                with contextlib.suppress(Exception):
                    self._cancel(list(self._active.values()))
                for handle in list(self._active.values()) + new + self._held:
                    handle.end(not_started(handle.spec, ERROR, "mpmsub's SLURM thread failed"))
                self._active.clear()
                self._held.clear()
                time.sleep(_MIN_POLL)

    def _submit(self, new: List[SlurmHandle]) -> None:
        """Submit the jobs started since the last round: those alike on sbatch's command line
        (their resources) as one job array each, up to the site's MaxArraySize; a job alone as
        itself. Nothing waits to gather more: a dispatch round starts its jobs in one go, and
        those started while sbatch runs make the next round's arrays."""
        groups: Dict[Tuple[str, ...], List[SlurmHandle]] = {}
        for handle in new:
            if handle.killed is not None:  # killed before it was submitted
                handle.end(not_started(handle.spec, *handle.killed))
            else:
                groups.setdefault(sbatch_options(handle.spec, self.backend, self.kill_grace), []).append(handle)
        for resources, handles in groups.items():
            size = self.backend.max_array_size() if len(handles) > 1 else 1
            for first in range(0, len(handles), size):
                self._submit_group(resources, handles[first : first + size])

    def _submit_group(self, resources: Tuple[str, ...], handles: List[SlurmHandle]) -> None:
        """One sbatch: an array whose element i runs the job of the files PREFIX-i, or one job."""
        prefix = handles[0].files
        array = len(handles) > 1
        if array:
            for index, handle in enumerate(handles):
                handle.files = f"{prefix}-{index}"
        try:
            for handle in handles:
                self._write_spec(handle)
            done = self.backend.command(self._sbatch(resources, handles, prefix))
        except Exception as exc:
            self._refused(handles, f"could not submit it to SLURM: {exc}")
            return
        slurm_id = done.stdout.strip().split(";")[0]
        if done.returncode != 0 or not slurm_id.isdigit():
            why = _last_line(done.stderr) or f"sbatch exited with status {done.returncode}"
            if _SUBMIT_LIMIT.search(done.stderr):  # the site's cap on pending jobs: later, not never
                if not self._held:
                    logger.warning("mpmsub: SLURM's submit limit (%s): jobs wait for earlier ones to end", why)
                for handle in handles:
                    handle.remove_files()
                self._held.extend(handles)
                return
            self._refused(handles, f"SLURM refused it: {why}")
            return
        now = time.time()
        for index, handle in enumerate(handles):
            handle.slurm_id = f"{slurm_id}_{index}" if array else slurm_id
            handle.submitted = now
            self._active[handle.slurm_id] = handle
            logger.debug("mpmsub: %s is SLURM job %s", handle.job_id, handle.slurm_id)

    def _write_spec(self, handle: SlurmHandle) -> None:
        timeout = self.backend.heartbeat_timeout
        beating = os.path.join(os.path.dirname(handle.files), _remote.HEARTBEAT)
        packed = _remote.pack(
            handle.spec,
            strict=True,
            shared=True,
            kill_grace=self.kill_grace,
            output_limit=None if self.output_limit is None else self.output_limit / MB,  # a number is MB
            heartbeat=None if timeout is None else (beating, timeout),
        )
        with os.fdopen(_files.open_private(handle.files + ".spec", os.O_EXCL), "wb") as file:
            file.write(self.key + packed)

    @staticmethod
    def _refused(handles: List[SlurmHandle], why: str) -> None:
        for handle in handles:
            handle.end(not_started(handle.spec, START, why))
            handle.remove_files()

    def _sbatch(self, resources: Tuple[str, ...], handles: List[SlurmHandle], prefix: str) -> List[str]:
        first, last = handles[0].job_id, handles[-1].job_id
        argv = ["sbatch", "--parsable"]
        if len(handles) > 1:
            # One name for all the elements (SLURM's); each finds its files by its index.
            argv += [f"--job-name=mpmsub:{first}..{last}"[:128], f"--array=0-{len(handles) - 1}"]
            argv.append(f"--output={prefix}-%a.out")
            files = shlex.quote(prefix + "-") + '"$SLURM_ARRAY_TASK_ID"'
        else:
            argv += [f"--job-name=mpmsub:{first}"[:128], f"--output={prefix}.out"]
            files = shlex.quote(prefix)
        argv.extend(resources)
        runner = shlex.join([self.backend.python, "-m", "mpmsub", "_run-job"])
        argv.append(f"--wrap=exec {runner} {files}.spec {files}.result")
        return argv

    def _cancel(self, handles: List[SlurmHandle]) -> None:
        ids = [handle.slurm_id for handle in handles if handle.slurm_id is not None and not handle.ended]
        if ids:
            try:
                done = self.backend.command(["scancel", *ids])
            except SlurmError as exc:
                logger.warning("mpmsub: scancel %s failed: %s", " ".join(ids), exc)
                return
            if done.returncode != 0:
                logger.warning("mpmsub: scancel %s failed: %s", " ".join(ids), _last_line(done.stderr))

    def _poll(self) -> bool:
        """One squeue call for every active job; end the finished ones. True if any changed."""
        ids = list(self._active)
        # An array's id lists its elements, one a line with --array ("123_4"), pending ones too.
        jobs = ",".join(_submissions(ids))
        argv = ["squeue", "--noheader", "--array", "--states=all", f"--jobs={jobs}", "--format=%i|%T|%N"]
        done = self.backend.command(argv)
        states: Dict[str, Tuple[str, str]] = {}
        if done.returncode == 0:
            states = _states(done.stdout)
        elif "invalid job id" not in done.stderr.lower():  # every id forgotten gives that: all unknown
            logger.warning("mpmsub: squeue failed: %s", _last_line(done.stderr))
            return False
        changed = False
        unknown = [slurm_id for slurm_id in ids if slurm_id not in states]
        if unknown:
            states.update(self._sacct(unknown))
        now = time.time()
        for slurm_id in ids:
            handle = self._active[slurm_id]
            state, node = states.get(slurm_id, ("UNKNOWN", ""))
            handle.node = node or handle.node
            if state != handle.state:
                changed = True
                handle.state = state
                if state == "RUNNING" and handle.running_since is None:
                    handle.running_since = now
            if state in _TERMINAL or state == "UNKNOWN":
                outcome = handle.outcome(state, now)
                if outcome is not None:
                    del self._active[slurm_id]
                    handle.end(outcome)
                    handle.remove_files()
                    changed = True
        return changed

    def _sacct(self, ids: List[str]) -> Dict[str, Tuple[str, str]]:
        """States and nodes of jobs squeue no longer lists (one sacct call); empty where
        accounting is off."""
        jobs = ",".join(_submissions(ids))
        argv = ["sacct", "--noheader", "--parsable2", f"--jobs={jobs}", "--format=JobID,State,NodeList"]
        done = self.backend.command(argv)
        if done.returncode != 0:
            return {}
        return {slurm_id: state for slurm_id, state in _states(done.stdout).items() if slurm_id in ids}


class SlurmHandle(Handle):
    def __init__(
        self, launcher: SlurmLauncher, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None], files: str
    ) -> None:
        self.launcher = launcher
        self.spec = spec
        self.job_id = job_id
        self.files = files  # the path of its files, less .spec, .result, .out
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self.ended = False
        self.killed: Optional[Tuple[FailureKind, str]] = None
        self.slurm_id: Optional[str] = None
        self.state = "SUBMITTING"
        self.submitted = time.time()
        self.running_since: Optional[float] = None
        self.result_missing_since: Optional[float] = None
        self.node = ""  # where SLURM runs it, once squeue names the node

    def kill(self, failure: FailureKind, message: str, grace: Optional[float] = None) -> bool:
        with self._lock:
            if self.ended or self.killed is not None:
                return False
            self.killed = (failure, message)
        self.launcher.kill_later(self)  # scancel: SIGTERM, which the runner turns into its kill
        return True

    def end(self, outcome: Outcome) -> None:
        with self._lock:
            if self.ended:
                return
            self.ended = True
        ran = outcome.failure is None and bool(outcome.returncodes) and all(rc == 0 for rc in outcome.returncodes)
        if self.killed is not None and not ran:  # the kill decides the failure; the runner's measures stay
            outcome.failure, outcome.error = self.killed
        self._on_exit(outcome)

    def outcome(self, state: str, now: float) -> Optional[Outcome]:
        """The Outcome of a job SLURM reports ended: the runner's, or SLURM's reason. None to
        wait for a result file a shared filesystem has not shown yet."""
        path = self.files + ".result"
        try:
            # Owner, mode and signature are checked before anything in it is unpickled.
            data = _files.read_private(path)
            payload = _remote.verify(self.launcher.key, data)
        except FileNotFoundError:
            pass
        except _files.UnsafeFileError as exc:
            logger.warning("mpmsub: rejected the result file %s of %s: %s", path, self.job_id, exc)
            return not_started(self.spec, ERROR, f"its result file was rejected: {exc}")
        except OSError as exc:
            return not_started(self.spec, ERROR, f"its result file could not be read: {exc!r}")
        else:
            try:
                received: Outcome = pickle.loads(payload).received()
            except Exception as exc:
                return not_started(self.spec, ERROR, f"its result file could not be read: {exc!r}")
            if state in _SLURM_STOPS and received.failure in _STOP_ANSWERS and self.killed is None:
                # The runner's answer to SLURM's SIGTERM, or its job's death of that signal, which
                # SLURM sends every process of the job: say why SLURM stopped it.
                received.failure, received.error = self._stopped(state, self._output_tail())
                if received.failure == MEMORY:
                    received.peak_memory = max(received.peak_memory, self._killed_at())
            return received
        # A job killed before it was ever seen running (pending: terminate(), Ctrl-C, kill()) had
        # no runner to write a result: it ends now, whatever SLURM (or sacct's absence) says.
        ran = self.running_since is not None
        waits = state in ("COMPLETED", "UNKNOWN") or (self.killed is not None and state == "CANCELLED")
        if waits and (ran or self.killed is None):
            # The runner writes its result before it exits (also when scancel stopped it): give
            # the filesystem time to show it.
            if self.result_missing_since is None:
                self.result_missing_since = now
            if now - self.result_missing_since < (_RESULT_WAIT if self.killed is None else _KILL_WAIT):
                return None
        began = self.running_since or self.submitted
        outcome = not_started(self.spec, ERROR, "")
        outcome.start_time, outcome.runtime = began, max(0.0, now - began) if ran or self.killed is None else 0.0
        output = self._output_tail()
        outcome.failure, outcome.error = self._stopped(state, output)
        if outcome.failure == MEMORY:
            # The runner died with its job and measured nothing: a retry without an m grows what
            # SLURM saw, not the 0 measured here (it would run strict at 1 MB, and fail again).
            outcome.peak_memory = self._killed_at()
        return outcome

    def _stopped(self, state: str, output: str) -> Tuple[FailureKind, str]:
        """The failure and sentence of a job SLURM ended, by its state and output."""
        job = f"SLURM job {self.slurm_id}"
        if state == "OUT_OF_MEMORY" or _MEMORY_KILL.search(output):
            memory = "" if self.spec.memory is None else f" ({format_memory(self.spec.memory)} and the runner's)"
            return MEMORY, f"killed by SLURM for using more than its --mem{memory}"
        if state in ("TIMEOUT", "DEADLINE"):
            return TIMEOUT, f"killed by SLURM at its time limit ({job})"
        if state == "CANCELLED":
            return CANCELLED, f"cancelled in SLURM ({job}, scancel)"
        if output:
            why = f"; its output: {output}"
        elif state in ("COMPLETED", "FAILED", "UNKNOWN"):
            # Its output file is written on the node: neither file here, the node wrote elsewhere.
            node = f"node {self.node}" if self.node else "the node it ran on"
            why = (
                f"; neither its result nor its output file appeared in {os.path.dirname(self.files)}: the"
                f" workdir {self.launcher.backend.workdir} may not be shared with {node} (it must be on a"
                " filesystem both mount at the same path)"
            )
        else:
            why = ""
        if state == "UNKNOWN":
            return ERROR, f"SLURM no longer lists {job}, and it left no result{why}"
        return ERROR, f"SLURM ended {job}: {state}{why}"

    def _killed_at(self) -> int:
        """The memory SLURM killed the job at: what its kill message says it used, or its
        allocation (scontrol), whichever is more; else the most a node offers it."""
        used = [int(figure) for figure in _MEMORY_USED.findall(self._output_tail(lines=None))]
        backend = self.launcher.backend
        try:
            done = backend.command(["scontrol", "--oneliner", "show", "job", str(self.slurm_id)])
        except SlurmError as exc:
            logger.warning("mpmsub: cannot learn SLURM job %s's allocation: %s", self.slurm_id, exc)
        else:
            allocated = _ALLOCATED.search(done.stdout)
            if allocated is not None:
                used.append(parse_memory(allocated.group(1)))
        return max(used) if used else backend.place_memory(self.spec.cpus) or 0

    def _output_tail(self, lines: Optional[int] = 5) -> str:
        """The end of its output file: its last `lines` lines, joined with ' | ' (None: the text as it is)."""
        try:
            with open(self.files + ".out", "rb") as file:
                file.seek(0, os.SEEK_END)
                file.seek(max(0, file.tell() - 2000))
                text = file.read().decode(errors="replace")
        except OSError:
            return ""
        if lines is None:
            return text
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def remove_files(self) -> None:
        for suffix in (".spec", ".result", ".out"):
            with contextlib.suppress(OSError):
                os.unlink(self.files + suffix)


def sbatch_options(spec: JobSpec, backend: SlurmBackend, kill_grace: float) -> Tuple[str, ...]:
    """The sbatch options of a job's resources (and the backend's): its array's shape. GPUs are
    a gres of the node (`--gres=gpu:N`, whole devices: SLURM sets the job's CUDA_VISIBLE_DEVICES);
    named resources are SLURM licenses (`--licenses=NAME:N,...`), pools the cluster counts, as a
    licence's seats or a database's connections are. The backend's extra_args come last, so that
    a site's own option (`--gres=gpu:a100:1`) wins."""
    options = [f"--cpus-per-task={spec.cpus}"]
    if spec.memory is not None:
        options.append(f"--mem={math.ceil((spec.memory + RUNNER_MEMORY) / MB)}M")
    if spec.timeout is not None:
        options.append(f"--time={math.ceil((spec.timeout + kill_grace + _TIME_MARGIN) / 60)}")
    if spec.gpus:
        options.append(f"--gres=gpu:{spec.gpus}")
    if spec.resources:
        options.append("--licenses=" + ",".join(f"{name}:{count}" for name, count in spec.resources))
    if backend.partition:
        options.append(f"--partition={backend.partition}")
    if backend.account:
        options.append(f"--account={backend.account}")
    options.extend(backend.extra_args)
    return tuple(options)


def gres_gpus(gres: str) -> int:
    """The GPUs in a node's gres as sinfo's %G shows them: 'gpu:4', 'gpu:a100:2(S:0-1)',
    'gpu:a100:2,gpu:v100:2' (4), '(null)' (0)."""
    entries = re.sub(r"\([^)]*\)", "", gres).split(",")
    return sum(int(found.group(1)) for entry in entries if (found := _GPU_GRES.match(entry.strip())))


def _states(text: str) -> Dict[str, Tuple[str, str]]:
    """Job states and nodes from 'ID|STATE|NODES' lines (sacct's 'CANCELLED by 0' read as
    CANCELLED; a pending job's nodes are empty, or sacct's 'None assigned')."""
    states = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[1].strip():
            node = fields[2].strip()
            states[fields[0]] = (fields[1].split()[0], "" if " " in node else node)
    return states


def _submissions(ids: List[str]) -> List[str]:
    """The sbatch ids of SLURM job ids: an array element's ("123_4") is its array's."""
    return sorted({slurm_id.split("_")[0] for slurm_id in ids}, key=int)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
