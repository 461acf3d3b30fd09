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


@dataclass(frozen=True)
class Request:
    """What one job reserves while it runs: CPUs and bytes of memory (0 for a job without `m`)."""

    cpus: int
    memory: int = 0

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.memory < 0:
            raise ValueError(f"invalid request: {self.cpus} CPUs, {self.memory} bytes")


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
    # What the job reserves on the ledger while it runs (no memory without `m`).
    request: Request = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "request", Request(self.cpus, self.memory or 0))

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

    def resources(self) -> str:
        if self.memory is not None:
            mem = format_memory(self.memory)
        else:
            mem = "memory from the run history" if self.auto else "no memory reservation"
        return f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}, {mem}"
