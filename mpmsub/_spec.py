"""The engine's central types, below everything else: a validated job (`JobSpec`), what it
reserves while it runs (`Request`), and how its command reads in messages. The builders that
make a `JobSpec` from what users write are in `_job`; the ledger counts `Request`s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from mpmsub._units import format_memory

if TYPE_CHECKING:
    from mpmsub._call import CallPayload

Argv = Tuple[str, ...]


Resources = Tuple[Tuple[str, int], ...]  # named pools and counts, sorted by name


@dataclass(frozen=True)
class Request:
    """What one job reserves while it runs: a vector of countable resources (CPUs, bytes of
    memory, 0 for a job without `m`, and the named pools it asks for) and, apart from the vector
    because each device is a place of its own, `gpus` devices: whole ones, or `gpu_memory` bytes
    on each when it shares them."""

    cpus: int
    memory: int = 0
    resources: Resources = ()
    gpus: int = 0
    gpu_memory: int = 0  # bytes on each of its devices; 0: the devices are its alone
    vector: Resources = field(init=False, repr=False, compare=False)  # amounts(), made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", (("cpus", self.cpus), ("memory", self.memory), *self.resources))
        if (
            self.cpus < 1
            or self.memory < 0
            or ((self.resources or self.gpus or self.gpu_memory) and not self._beside())
        ):
            raise ValueError(
                f"invalid request: {self.cpus} CPUs, {self.memory} bytes, resources {self.resources!r}, "
                f"{self.gpus} GPUs of {self.gpu_memory} bytes"
            )

    def _beside(self) -> bool:
        """Whether what it asks beside CPUs and memory is valid."""
        return (
            self.gpus >= 0
            and self.gpu_memory >= 0
            and (self.gpus > 0 or not self.gpu_memory)
            and all(count >= 1 for _, count in self.resources)
            and list(self.resources) == sorted(dict(self.resources).items())
        )

    def amounts(self) -> Resources:
        """The vector: each countable resource by name ('cpus', 'memory', then the pools)."""
        return self.vector


def describe_command(stages: Iterable[Sequence[str]]) -> str:
    """Pipeline stages (argv lists) as one line of text: 'cat x | sort'."""
    return " | ".join(" ".join(stage) for stage in stages)


@dataclass(frozen=True)
class JobSpec:
    """A validated job, as the engine sees it. Bytes and seconds; `memory` None reserves nothing.

    A Python call has no stages and carries its function and arguments in `call`."""

    stages: Tuple[Argv, ...]
    cpus: int = 1
    memory: Optional[int] = None
    job_id: Optional[str] = None
    cwd: Optional[str] = None
    env: Optional[Mapping[str, str]] = None
    timeout: Optional[float] = None
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    retries: int = 0
    memory_growth: float = 2.0
    strict: Optional[bool] = None  # None: the executor's default
    priority: int = 0
    call: Optional[CallPayload] = field(default=None, repr=False)
    auto: bool = False  # m="auto": `memory` is predicted from the run history when it is queued
    key: Optional[str] = None  # the run history's key, given by with_key(); None: from the command
    resources: Resources = ()  # named pools it holds while it runs, sorted by name
    gpus: int = 0  # GPU devices it gets (their ids in its environment)
    gpu_memory: Optional[int] = None  # bytes it reserves on each device, sharing it; None: whole devices
    gpu_strict: bool = False  # stopped when its processes use more GPU memory than gpu_memory
    gpu_auto: bool = False  # gpu(n, memory="auto"): gpu_memory predicted from the run history when queued
    # What the job reserves on the ledger while it runs (no memory without `m`).
    request: Request = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        request = Request(self.cpus, self.memory or 0, self.resources, self.gpus, self.gpu_memory or 0)
        object.__setattr__(self, "request", request)

    @property
    def is_pipeline(self) -> bool:
        return len(self.stages) > 1

    @property
    def cmd(self) -> Union[List[str], List[List[str]]]:
        """The command as users wrote it: an argv list, or a list of argv lists for a pipeline (a
        call's description, alone in a list, for a call)."""
        if self.call is not None:
            return [self.call.description]
        if self.is_pipeline:
            return [list(stage) for stage in self.stages]
        return list(self.stages[0])

    def describe(self) -> str:
        """The command as one line of text, for messages and logs."""
        if self.call is not None:
            return self.call.description
        return describe_command(self.stages)

    def describe_resources(self) -> str:
        """What it reserves, for messages: '2 CPUs, 3G, 1 GPU (20G), licence 1'."""
        if self.memory is not None:
            mem = format_memory(self.memory)
        else:
            mem = "memory from the run history" if self.auto else "no memory reservation"
        parts = [f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}", mem]
        if self.gpus:
            share = "" if self.gpu_memory is None else f" ({format_memory(self.gpu_memory)} each)"
            share = " (GPU memory from the run history)" if self.gpu_auto else share
            parts.append(f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}{share}")
        parts.extend(f"{name} {count}" for name, count in self.resources)
        return ", ".join(parts)
