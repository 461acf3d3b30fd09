"""Where jobs run: this machine (the default), a Dask cluster or SLURM.

A Backend makes the launcher an executor uses, and tells the executor how much it offers: the
executor's ledger, scheduler and futures are the same on every backend. The jobs themselves
always run under mpmsub's local launcher (on a Dask worker, or as a SLURM job), so what a result
says is measured and worded alike everywhere (see remote).

`backend=` takes "local", a Backend, or an address: "dask://host:8786", "slurm://partition".
Without it, `MPMSUB_BACKEND` in the environment chooses, so an unchanged script moves.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mpmsub._launch.base import Launcher
from mpmsub._launch.loop import EventLoop
from mpmsub._spec import JobSpec
from mpmsub._system import detect_cpus, detect_memory
from mpmsub._units import format_memory

if TYPE_CHECKING:
    from mpmsub._launch.base import PoolOptions

ENV = "MPMSUB_BACKEND"
GPU = "GPU"  # the name of a place's GPUs among its resources (Dask's custom; SLURM's gres gpu)


@dataclass(frozen=True)
class LaunchOptions:
    """What an executor tells the launcher it makes."""

    loop: EventLoop
    kill_grace: float
    pool: PoolOptions
    strict_memory: bool
    output_limit: Optional[int] = None  # bytes of each stream of a job kept in memory (None: all)


@dataclass(frozen=True)
class Node:
    """One place a job can run: a Dask worker or a SLURM node, and what it offers."""

    name: str
    cpus: int
    memory: int  # bytes
    # Its other countable resources by name: GPU devices as GPU, and a Dask worker's named ones.
    resources: Mapping[str, int] = field(default_factory=dict, compare=False)


class Backend(abc.ABC):
    """Where an executor's jobs run."""

    name = "backend"
    local = False  # True where jobs run on this machine (the live memory gate and OOM counts apply)
    # At the backend's whole size, the executor hands it up to this many times its size, so that
    # its places, which it fills by their own resources, never wait for a round trip to this
    # process for their next job. Given sizes are hard caps.
    lookahead = 1

    @abc.abstractmethod
    def launcher(self, options: LaunchOptions) -> Launcher:
        """A launcher for one executor."""

    def capacity(self) -> Optional[Tuple[int, int]]:
        """CPUs and bytes of memory in all, the executor's budget when it is given none; None for
        this machine's."""
        return None

    def check(self) -> None:
        """Raise ValueError where the backend can place no job at all; asked when the executor is
        given both its CPUs and memory (by default, asking `capacity` checks it)."""
        self.capacity()

    def why_never_fits(self, spec: JobSpec) -> Optional[str]:
        """Why the job can never run here (no single place can hold it), or None."""
        return None

    def place_memory(self, cpus: int) -> Optional[int]:
        """The most memory one place (worker, node) with `cpus` CPUs can give a job; None where
        the budget is the only bound (this machine)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (a connection it opened)."""


class LocalBackend(Backend):
    """This machine: process trees and reused Python workers (the default)."""

    name = "local"
    local = True

    def launcher(self, options: LaunchOptions) -> Launcher:
        from mpmsub._launch.local import LocalLauncher

        return LocalLauncher(options.loop, options.kill_grace, pool=options.pool, output_limit=options.output_limit)

    def __repr__(self) -> str:
        return "'local'"


def seconds(name: str, value: object, ok: Callable[[float], bool], expected: str) -> float:
    """A backend's option of seconds, as a float; ValueError naming it and `expected` where it
    is no plain number (a bool is none) or `ok` refuses it (NaN and infinity fail every bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"invalid {name} {value!r}: expected {expected}")
    return float(value)


def size(backend: Backend, cpus: Optional[int], memory: Optional[int]) -> Tuple[int, int]:
    """CPUs and bytes of memory as given, or by default the remote backend's whole size, else
    this machine's. A remote backend given both is still asked whether it can place jobs at all
    (an adaptive Dask cluster with no worker yet can: its jobs wait for workers)."""
    if not backend.local and cpus is not None and memory is not None:
        backend.check()
        return cpus, memory
    offered = None if backend.local else backend.capacity()
    if cpus is None:
        cpus = offered[0] if offered else detect_cpus()
    if memory is None:
        memory = offered[1] if offered else detect_memory()
    return cpus, memory


def asks(spec: JobSpec) -> Dict[str, int]:
    """What a job needs of one place beside CPUs and memory: its GPUs (as GPU) and named resources."""
    wants = {GPU: spec.gpus} if spec.gpus else {}
    wants.update(spec.resources)
    return wants


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _label(name: str, count: int) -> str:
    return f"{name}={count}"


def largest_fit(
    spec: JobSpec,
    nodes: Sequence[Node],
    kind: str,
    overhead: int = 0,
    declares: str = "declares",
    label: Callable[[str, int], str] = _label,
) -> Optional[str]:
    """None if one of `nodes` can hold the job (its CPUs, its memory plus `overhead`, its GPUs and
    named resources, all on the same one); else a sentence naming what the job asks and what the
    largest places offer. `declares` and `label` word a place's resources ("declares", GPU=2)."""
    need = 0 if spec.memory is None else spec.memory + overhead
    wants = asks(spec)

    def holds(node: Node) -> bool:
        return (
            node.cpus >= spec.cpus
            and node.memory >= need
            and all(node.resources.get(name, 0) >= count for name, count in wants.items())
        )

    if any(holds(node) for node in nodes):
        return None
    if not nodes:
        return f"no {kind} is available"
    for name, count in wants.items():  # one no place has enough of, whatever else it has
        most = max(node.resources.get(name, 0) for node in nodes)
        if most < count:
            what = _plural(count, "GPU") if name == GPU else f"{count} of resource {name!r}"
            has = f"more than {most} ({label(name, most)})" if most else "any" if name == GPU else "it"
            return f"it asks for {what} but no {kind} {declares} {has}"
    parts = [_plural(spec.cpus, "CPU")]
    if need:
        memory = format_memory(need)
        if overhead:
            memory += f" ({format_memory(spec.memory or 0)}, and {format_memory(overhead)} for mpmsub's runner)"
        parts.append(memory)
    parts.extend(_plural(count, "GPU") if name == GPU else label(name, count) for name, count in wants.items())
    biggest: List[Node] = [
        max(nodes, key=lambda node: (node.cpus, node.memory)),
        max(nodes, key=lambda node: (node.memory, node.cpus)),
    ]
    for name in wants:
        biggest.append(max(nodes, key=lambda node: (node.resources.get(name, 0), node.cpus, node.memory)))
    unique = {id(node): node for node in biggest}.values()

    def offers(node: Node) -> str:
        has = [_plural(node.cpus, "CPU"), format_memory(node.memory)]
        has.extend(label(name, node.resources.get(name, 0)) for name in wants)
        return f"{node.name} offers {_and(has)}"

    listed = " and ".join(offers(node) for node in sorted(unique, key=lambda node: node.name))
    return f"it needs {_and(parts)} on one {kind}; the largest {kind}: {listed}"


def most_memory(nodes: Sequence[Node], cpus: int, overhead: int = 0) -> Optional[int]:
    """The most memory a job of `cpus` CPUs can have on one of `nodes`, less `overhead`."""
    return max((node.memory - overhead for node in nodes if node.cpus >= cpus), default=None)


def resolve(backend: Any) -> Backend:
    """The Backend for `backend=`: None (MPMSUB_BACKEND, else local), "local", an address such as
    "dask://host:8786" or "slurm://partition", or a Backend."""
    if isinstance(backend, Backend):
        return backend
    if backend is None:
        text = os.environ.get(ENV, "").strip()
        if not text:
            return LocalBackend()
        try:
            return from_address(text)
        except ValueError as exc:
            raise ValueError(f"invalid {ENV}={text!r}: {exc}") from None
    if isinstance(backend, str):
        return from_address(backend)
    raise TypeError(
        f"backend must be 'local', an address such as 'dask://host:8786' or 'slurm://partition', "
        f"mpmsub.DaskBackend(...) or mpmsub.SlurmBackend(...); got {backend!r} ({type(backend).__name__})"
    )


_ADDRESS_HELP = "expected 'local', 'dask://HOST:PORT', 'slurm' or 'slurm://PARTITION?account=A&workdir=DIR'"


def from_address(text: str) -> Backend:
    """A backend from its address: 'local', 'dask://host:8786' (also 'dask+tls://...'),
    'slurm', 'slurm://partition', with query options ?account=A&workdir=DIR&arg=--qos=x."""
    if text == "local":
        return LocalBackend()
    if text in ("slurm", "slurm://"):
        from mpmsub._backends.slurm import SlurmBackend

        return SlurmBackend()
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(text)
    if parts.scheme in ("dask", "dask+tls"):
        if not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"invalid backend {text!r}: a Dask scheduler's address is 'dask://HOST:PORT'")
        from mpmsub._backends.dask import DaskBackend

        protocol = "tls" if parts.scheme == "dask+tls" else "tcp"
        return DaskBackend(f"{protocol}://{parts.netloc}")
    if parts.scheme == "slurm":
        if parts.path not in ("", "/"):
            raise ValueError(f"invalid backend {text!r}: a SLURM address is 'slurm://PARTITION?option=value'")
        options = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(options) - {"account", "workdir", "arg"})
        if unknown:
            raise ValueError(f"invalid backend {text!r}: unknown option {unknown[0]!r} (known: account, workdir, arg)")
        from mpmsub._backends.slurm import SlurmBackend

        return SlurmBackend(
            partition=parts.netloc or None,
            account=options.get("account", [None])[-1],
            extra_args=tuple(options.get("arg", ())),
            workdir=options.get("workdir", [None])[-1],
        )
    if text in ("dask",):
        raise ValueError(f"invalid backend {text!r}: Dask needs its scheduler's address, 'dask://HOST:PORT'")
    raise ValueError(f"invalid backend {text!r}: {_ADDRESS_HELP}")
