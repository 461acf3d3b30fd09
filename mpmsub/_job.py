"""Job descriptions: the seed's `Job` builder, `Pipeline`, `job()`/`pipeline()` helpers, and the
normalisation of a Job, a dict or an argv list into one validated, immutable `JobSpec`."""

from __future__ import annotations

import abc
import os
import sys
from collections import abc as collections_abc
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover - Python 3.9 and 3.10
    from typing_extensions import Self

from mpmsub._spec import Argv, JobSpec
from mpmsub._units import MB, MemoryLike, parse_count, parse_cpus, parse_duration, parse_memory, parse_resources, shown

if TYPE_CHECKING:
    pass

StrPath = Union[str, "os.PathLike[str]"]
CommandLike = Union[Sequence[StrPath], "Pipeline"]


def _argv(cmd: object, what: str = "cmd") -> Argv:
    """Validate one command: a non-empty list or tuple of strings or paths."""
    if isinstance(cmd, (str, bytes)):
        raise TypeError(
            f"{what} must be a list of arguments, not the string {cmd!r}; "
            f"split it (e.g. {str(cmd).split()!r}) or run it through a shell: ['sh', '-c', {cmd!r}]"
        )
    if not isinstance(cmd, (list, tuple)):
        raise TypeError(f"{what} must be a list of strings; got {cmd!r} ({type(cmd).__name__})")
    if not cmd:
        raise ValueError(f"{what} is empty: give the program to run and its arguments")
    argv = []
    for index, arg in enumerate(cmd):
        if type(arg) is str and "\0" not in arg:  # the common case, first
            argv.append(arg)
            continue
        if isinstance(arg, os.PathLike):
            arg = os.fspath(arg)
        if isinstance(arg, str) and "\0" in arg:
            raise ValueError(f"{what}[{index}] contains a NUL byte, which no program can receive: {arg!r}")
        if not isinstance(arg, str):
            raise TypeError(
                f"{what}[{index}] must be a string or a path; got {arg!r} ({type(arg).__name__}) in {list(cmd)!r}"
            )
        argv.append(arg)
    if not argv[0]:
        raise ValueError(f"{what} names no program: its first argument is empty in {argv!r}")
    return tuple(argv)


def _optional_path(value: object, what: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty path string; got {value!r}")
    if "\0" in value:
        raise ValueError(f"{what} contains a NUL byte: {value!r}")
    return value


def _env(value: object) -> Optional[Dict[str, str]]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"env must be a dict of variable names to string values; got {value!r}")
    env = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ValueError(f"env has an invalid variable name {key!r}")
        if not isinstance(item, str):
            raise TypeError(f"env[{key!r}] must be a string; got {item!r} ({type(item).__name__})")
        if "\0" in item:
            raise ValueError(f"env[{key!r}] contains a NUL byte: {item!r}")
        env[key] = item
    return env


def _retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"retries must be a whole number, 0 or more; got {value!r}")
    if value < 0:
        raise ValueError(f"invalid retries {shown(value)}: expected a whole number, 0 or more")
    return value


# A retry's memory is m times the growth, then cut to the budget: any larger factor than this
# is the budget anyway, and m (at most MAX_MEMORY) times it is still a finite float.
MAX_GROWTH = 1_000_000


def _growth(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"memory_growth must be a number, from 1 to {MAX_GROWTH}; got {value!r}")
    if not 1 <= value <= MAX_GROWTH:  # nan and inf too; an int is compared exactly, never as a float
        raise ValueError(
            f"invalid memory_growth {shown(value)}: expected a number from 1 to {MAX_GROWTH} "
            "(2 doubles m on each retry)"
        )
    return float(value)


def _priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"priority must be a whole number (higher runs first); got {value!r}")
    return value


def _job_id(value: object) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        raise TypeError(f"id must be a non-empty string; got {value!r}")
    return str(value)


AUTO = "auto"


def is_auto(memory: object) -> bool:
    """True for m="auto" (any case, surrounding spaces allowed)."""
    return isinstance(memory, str) and memory.strip().lower() == AUTO


def history_key(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"key must be a non-empty string naming the tool; got {value!r} ({type(value).__name__})")
    if not value.strip() or "\0" in value:
        raise ValueError(f"invalid key {value!r}: expected a non-empty string naming the tool (e.g. 'bwa-mem')")
    return value


# The options of the original's job dict besides cmd, p, m and id, all present in its dicts.
SEED_OPTIONS = ("cwd", "env", "timeout", "stdout", "stderr")


def optional_fields(job: Union[Job, JobSpec]) -> Dict[str, Any]:
    """The options of a job dict that are set, beyond its command, CPUs, memory and id."""
    data: Dict[str, Any] = {}
    for key in (*SEED_OPTIONS, "strict"):
        value = getattr(job, key)
        if value is not None:
            data[key] = dict(value) if key == "env" else value
    if job.priority:
        data["priority"] = job.priority
    if job.key is not None:
        data["key"] = job.key
    gpu_memory: Optional[MemoryLike]
    if isinstance(job, Resources):
        pools, gpu_memory = job.pools, job.gpu_memory
    else:  # a spec's bytes as the MB a job dict's number means
        pools, gpu_memory = dict(job.resources), AUTO if job.gpu_auto else job.gpu_memory
        if isinstance(gpu_memory, int):
            gpu_memory = gpu_memory // MB if gpu_memory % MB == 0 else gpu_memory / MB
    if pools:
        data["resources"] = dict(pools)
    if job.gpus:
        data["gpus"] = job.gpus
        if gpu_memory is not None:
            data["gpu_memory"] = gpu_memory
        if job.gpu_strict:
            data["gpu_strict"] = True
    if job.retries:
        data.update(retries=job.retries, memory_growth=job.memory_growth)
    return data


class Pipeline:
    """Commands connected like a shell pipe: each stage's stdout feeds the next one's stdin.

    The pipeline fails if any stage fails (as `set -o pipefail`).
    """

    def __init__(self, commands: Iterable[Sequence[StrPath]]) -> None:
        if isinstance(commands, (str, bytes)) or not isinstance(commands, Iterable):
            raise TypeError(f"Pipeline takes a list of commands (each a list of strings); got {commands!r}")
        self.commands: List[List[str]] = [list(_argv(c, f"pipeline stage {i}")) for i, c in enumerate(commands)]
        if not self.commands:
            raise ValueError("a Pipeline needs at least one command")

    def pipe_to(self, cmd: Sequence[StrPath]) -> Pipeline:
        """Return a new pipeline with `cmd` added as its last stage."""
        return Pipeline([*self.commands, cmd])

    def __len__(self) -> int:
        return len(self.commands)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and other.commands == self.commands

    def __hash__(self) -> int:
        return hash(tuple(tuple(c) for c in self.commands))

    def __repr__(self) -> str:
        return f"Pipeline({self.commands!r})"

    def __str__(self) -> str:
        return " | ".join(" ".join(c) for c in self.commands)


class Resources(abc.ABC):
    """What a job or a call needs and how it is run: the builder methods `Job` and `Call` share.
    Each validates its value at once and returns the object, so calls chain."""

    def __init__(self) -> None:
        self.p: Optional[int] = None  # None until set: 1 CPU, as the original's `p`
        self.m: Optional[MemoryLike] = None
        self.id: Optional[str] = None
        self.timeout: Optional[float] = None
        self.retries: int = 0
        self.memory_growth: float = 2.0
        self.strict: Optional[bool] = None
        self.priority: int = 0
        self.key: Optional[str] = None
        self.pools: Dict[str, int] = {}  # named resources: resources()
        self.gpus: int = 0
        self.gpu_memory: Optional[MemoryLike] = None
        self.gpu_strict: bool = False

    def _configure(
        self,
        p: Optional[int],
        m: Optional[MemoryLike],
        id: Optional[str],
        timeout: Optional[float],
        retries: Optional[int],
        memory_growth: Optional[float],
        strict: Optional[bool],
        priority: Optional[int],
        key: Optional[str] = None,
    ) -> None:
        if key is not None:
            self.with_key(key)
        if priority is not None:
            self.with_priority(priority)
        if retries is not None or memory_growth is not None:
            self.with_retries(0 if retries is None else retries, 2.0 if memory_growth is None else memory_growth)
        if strict is not None:
            self.strict_memory(strict)
        if p is not None:
            self.cpu(p)
        if m is not None:
            self.memory(m)
        if id is not None:
            self.with_id(id)
        if timeout is not None:
            self.with_timeout(timeout)

    def cpu(self, cores: int) -> Self:
        """Set the number of CPUs it needs (a whole number, at least 1)."""
        self.p = parse_cpus(cores, "p (cpus)")
        return self

    def memory(self, mem: Optional[MemoryLike]) -> Self:
        """Set the memory it needs: MB as a number, or '500M', '4G', ...; None for no reservation;
        "auto" to have it predicted from the run history (see docs/auto-memory.md)."""
        if is_auto(mem):
            mem = AUTO
        elif mem is not None:
            parse_memory(mem, "m (memory)")
        self.m = mem
        return self

    def with_key(self, key: str) -> Self:
        """Name the tool for the run history (m="auto"): runs with the same key share their
        measurements. By default the key comes from the command (see docs/auto-memory.md)."""
        self.key = history_key(key)
        return self

    def with_timeout(self, seconds: Optional[float]) -> Self:
        """Stop it if it runs longer than `seconds`: a job's whole process tree, a call's worker."""
        self.timeout = None if seconds is None else parse_duration(seconds)
        return self

    def with_id(self, job_id: str) -> Self:
        """Name it; ids must be unique within one executor or cluster."""
        self.id = _job_id(job_id)
        return self

    def with_retries(self, retries: int, memory_growth: float = 2.0) -> Self:
        """Run the job again, up to `retries` more times, if it fails. A job stopped for memory
        is retried with its `m` multiplied by `memory_growth`; other failures as they were."""
        self.retries = _retries(retries)
        self.memory_growth = _growth(memory_growth)
        return self

    def strict_memory(self, enabled: bool = True) -> Self:
        """Stop the job as soon as it uses more than its `m` (needs `m`), room or not."""
        if not isinstance(enabled, bool):
            raise TypeError(f"strict must be True or False; got {enabled!r}")
        self.strict = enabled
        return self

    def resources(self, counts: Optional[Mapping[str, int]] = None, /, **more: int) -> Self:
        """Hold units of the executor's named resources while it runs: `.resources(licence=1)`
        (or a mapping). The executor must have them (`resources=` on it)."""
        if counts is not None and not isinstance(counts, Mapping):
            raise TypeError(f"resources() takes a mapping or NAME=COUNT arguments; got {shown(counts)}")
        self.pools = parse_resources({**(counts or {}), **more})
        return self

    def gpu(self, n: int = 1, memory: Optional[MemoryLike] = None, strict: bool = False) -> Self:
        """Give it `n` GPU devices of its own, named in its CUDA_VISIBLE_DEVICES; with `memory`,
        that much GPU memory on each instead, sharing devices with other jobs whose reservations
        fit ("auto": predicted from the GPU peaks of its past runs, whole devices until one was
        measured). `strict` stops it when its processes use more GPU memory than that (measured
        with NVML). `gpu(0)` asks for none."""
        gpus = parse_count(n, "gpus (number of GPUs)")
        if is_auto(memory):
            memory = AUTO
            if strict:
                raise ValueError("gpu strict needs a GPU memory to hold the job to, not 'auto'")
        elif memory is not None and not parse_memory(memory, "gpu memory"):
            raise ValueError(f"invalid gpu memory {memory!r}: a share of a device is above 0 (None: the whole device)")
        if memory is not None and not gpus:
            raise ValueError(f"gpu memory {memory!r} is given for 0 GPUs: ask for at least 1")
        if not isinstance(strict, bool):
            raise TypeError(f"gpu strict must be True or False; got {strict!r}")
        if strict and memory is None:
            raise ValueError(
                "gpu strict needs the job's GPU memory (gpu(n, memory=...)): there is nothing to hold it to"
            )
        self.gpus, self.gpu_memory, self.gpu_strict = gpus, memory, strict
        return self

    def with_priority(self, priority: int) -> Self:
        """Start this job before queued jobs of lower priority (default 0; negative runs later)."""
        self.priority = _priority(priority)
        return self

    @abc.abstractmethod
    def spec(self) -> JobSpec:
        """Validate the whole job or call and return its immutable engine form."""

    def _spec_fields(self) -> Dict[str, Any]:
        """The JobSpec fields these settings give, validated together."""
        if self.strict and self.m is None:
            raise ValueError("strict memory needs the job's memory (m): there is nothing to hold it to")
        auto = self.m == AUTO
        return {
            "cpus": 1 if self.p is None else self.p,
            "memory": None if self.m is None or auto else parse_memory(self.m, "m (memory)"),
            "auto": auto,
            "key": self.key,
            "job_id": self.id,
            "timeout": self.timeout,
            "retries": self.retries,
            "memory_growth": self.memory_growth,
            "strict": self.strict,
            "priority": self.priority,
            "resources": tuple(sorted(self.pools.items())),
            "gpus": self.gpus,
            "gpu_memory": None if self.gpu_memory in (None, AUTO) else parse_memory(self.gpu_memory, "gpu memory"),
            "gpu_strict": self.gpu_strict,
            "gpu_auto": self.gpu_memory == AUTO,
        }


class Job(Resources):
    """A command and what it needs, built step by step (each builder validates and returns the job).

    >>> Job(["echo", "hi"]).cpu(2).memory("1G").with_timeout(60).with_id("greet").to_dict()["p"]
    2
    """

    def __init__(
        self,
        cmd: Optional[CommandLike] = None,
        p: Optional[int] = None,
        m: Optional[MemoryLike] = None,
        id: Optional[str] = None,
        cwd: Optional[StrPath] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        pipeline: Optional[Union[Pipeline, Sequence[Sequence[StrPath]]]] = None,
        stdout: Optional[StrPath] = None,
        stderr: Optional[StrPath] = None,
        retries: Optional[int] = None,
        memory_growth: Optional[float] = None,
        strict: Optional[bool] = None,
        priority: Optional[int] = None,
        key: Optional[str] = None,
        resources: Optional[Mapping[str, int]] = None,
        gpus: Optional[int] = None,
        gpu_memory: Optional[MemoryLike] = None,
        gpu_strict: Optional[bool] = None,
    ) -> None:
        if cmd is not None and pipeline is not None:
            raise ValueError("give a Job either cmd or pipeline, not both")
        self.cmd: Union[List[str], Pipeline]
        if isinstance(pipeline, Pipeline) or isinstance(cmd, Pipeline):
            self.cmd = pipeline if isinstance(pipeline, Pipeline) else cmd  # type: ignore[assignment]
        elif pipeline is not None:
            self.cmd = Pipeline(pipeline)
        elif cmd is not None:
            self.cmd = list(_argv(cmd))
        else:
            raise ValueError("a Job needs a command: Job(['program', 'arg', ...]) or Job(pipeline=[[...], [...]])")
        super().__init__()
        self.cwd: Optional[str] = None
        self.env: Optional[Dict[str, str]] = None
        self.stdout: Optional[str] = None
        self.stderr: Optional[str] = None
        self._configure(p, m, id, timeout, retries, memory_growth, strict, priority, key)
        if resources is not None:
            self.resources(resources)
        if gpus is not None or gpu_memory is not None or gpu_strict:  # (gpu_strict False asks for nothing)
            self.gpu(1 if gpus is None else gpus, gpu_memory, bool(gpu_strict))
        if cwd is not None:
            self.working_dir(cwd)
        if env is not None:
            self.environment(env)
        if stdout is not None:
            self.stdout_to(stdout)
        if stderr is not None:
            self.stderr_to(stderr)

    def working_dir(self, path: StrPath) -> Self:
        """Run the job in `path`."""
        self.cwd = _optional_path(path, "cwd")
        return self

    def environment(self, env_vars: Mapping[str, str]) -> Self:
        """Add (or override) environment variables for the job; the rest is inherited."""
        self.env = _env(env_vars)
        return self

    def stdout_to(self, file_path: StrPath) -> Self:
        """Write the job's stdout to a file instead of capturing it (the cheap path for big output);
        a relative path is taken from the job's working directory, as its command sees it."""
        self.stdout = _optional_path(file_path, "stdout")
        return self

    def stderr_to(self, file_path: StrPath) -> Self:
        """Write the job's stderr to a file instead of capturing it."""
        self.stderr = _optional_path(file_path, "stderr")
        return self

    def pipe_to(self, next_cmd: Sequence[StrPath]) -> Self:
        """Send this job's stdout into another command, like a shell `|`."""
        base = self.cmd if isinstance(self.cmd, Pipeline) else Pipeline([self.cmd])
        self.cmd = base.pipe_to(next_cmd)
        return self

    def to_dict(self) -> Dict[str, Any]:
        """The job as a seed-style dict: keys cmd (or pipeline), p, m, id, cwd, env, timeout, stdout
        and stderr, None where unset (as the original's), then the other options that are set."""
        if isinstance(self.cmd, Pipeline):
            data: Dict[str, Any] = {"pipeline": [list(c) for c in self.cmd.commands]}
        else:
            data = {"cmd": list(self.cmd)}
        data.update(p=self.p, m=self.m, id=self.id)
        data.update(dict.fromkeys(SEED_OPTIONS))
        data.update(optional_fields(self))
        return data

    def spec(self) -> JobSpec:
        """Validate the whole job and return its immutable engine form."""
        stages = tuple(tuple(c) for c in self.cmd.commands) if isinstance(self.cmd, Pipeline) else (tuple(self.cmd),)
        return JobSpec(
            stages=stages,
            cwd=self.cwd,
            env=dict(self.env) if self.env is not None else None,
            stdout=self.stdout,
            stderr=self.stderr,
            **self._spec_fields(),
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if v is not None or k in ("p", "m"))
        return f"Job({fields})"


# Keys a job dict may carry; aliases map the original library's alternative spellings.
_DICT_KEYS = (
    "cmd",
    "p",
    "m",
    "id",
    "cwd",
    "env",
    "timeout",
    "stdout",
    "stderr",
    "pipeline",
    "retries",
    "memory_growth",
    "strict",
    "priority",
    "key",
    "resources",
    "gpus",
    "gpu_memory",
    "gpu_strict",
)
_DICT_ALIASES = {"cpu": "p", "cpus": "p", "memory": "m"}


def job_from_dict(data: Mapping[str, Any]) -> Job:
    """Build a Job from a seed-style dict; an unknown key is an error that names it."""
    known = set(_DICT_KEYS) | set(_DICT_ALIASES)
    for key in data:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            aliases = ", ".join(f"{alias} (for {name})" for alias, name in _DICT_ALIASES.items())
            raise ValueError(f"unknown job key {key!r}{hint}; accepted keys: {', '.join(_DICT_KEYS)}, {aliases}")
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        name = _DICT_ALIASES.get(key, key)
        if name in kwargs:
            raise ValueError(f"job dict gives {name!r} twice (as {key!r} and another spelling)")
        kwargs[name] = value
    if "cmd" not in kwargs and "pipeline" not in kwargs:
        raise ValueError(f"job dict has no 'cmd': {dict(data)!r}")
    cmd = kwargs.get("cmd")
    if isinstance(cmd, list) and cmd and all(isinstance(c, (list, tuple)) for c in cmd):
        kwargs["pipeline"] = kwargs.pop("cmd")  # a list of commands is a pipeline
    return Job(**kwargs)


def to_spec(item: object) -> JobSpec:
    """Normalise what `submit` accepts (Job, dict, argv list, Pipeline) into a validated JobSpec."""
    if type(item) is list:  # the common case, first: an argv list
        return JobSpec((_argv(item),))
    if isinstance(item, JobSpec):
        return item
    if isinstance(item, Resources):  # a Job or a Call
        return item.spec()
    if isinstance(item, (dict, collections_abc.Mapping)):
        return job_from_dict(item).spec()
    if isinstance(item, Pipeline):
        return Job(pipeline=item).spec()
    if isinstance(item, (list, tuple)):
        return Job(list(item)).spec()
    if isinstance(item, (str, bytes)):
        _argv(item)  # raises with a message that explains the string case
    raise TypeError(
        f"cannot run {item!r}: submit a Job, a job dict, a Pipeline, a list of strings, a Call or a function"
    )


def pick_one(what: str, **given: Any) -> Any:
    """The one value given under one of several names (p, cpu, cpus); None if none was given."""
    values = {name: value for name, value in given.items() if value is not None}
    if len(values) > 1:
        spelled = ", ".join(f"{name}={value!r}" for name, value in values.items())
        raise ValueError(f"give the {what} once, under one of {', '.join(given)}; got {spelled}")
    return next(iter(values.values()), None)


def job(
    cmd: CommandLike,
    p: Optional[int] = None,
    m: Optional[MemoryLike] = None,
    *,
    cpu: Optional[int] = None,
    cpus: Optional[int] = None,
    memory: Optional[MemoryLike] = None,
    id: Optional[str] = None,
    cwd: Optional[StrPath] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: Optional[float] = None,
    stdout: Optional[StrPath] = None,
    stderr: Optional[StrPath] = None,
    retries: Optional[int] = None,
    memory_growth: Optional[float] = None,
    strict: Optional[bool] = None,
    priority: Optional[int] = None,
    key: Optional[str] = None,
) -> Job:
    """Create a Job in one call: `job(["sort", "x"], p=1, m="100M", timeout=60)`."""
    return Job(
        cmd,
        p=pick_one("CPU count", p=p, cpu=cpu, cpus=cpus),
        m=pick_one("memory", m=m, memory=memory),
        id=id,
        cwd=cwd,
        env=env,
        timeout=timeout,
        stdout=stdout,
        stderr=stderr,
        retries=retries,
        memory_growth=memory_growth,
        strict=strict,
        priority=priority,
        key=key,
    )


def pipeline(commands: Iterable[Sequence[StrPath]], **kwargs: Any) -> Job:
    """Create a pipeline Job: `pipeline([["cat", f], ["sort"]], p=1, m="200M", stdout="out.txt")`."""
    return job(Pipeline(commands), **kwargs)
