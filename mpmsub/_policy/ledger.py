"""The resource ledger: what the executor has and what running jobs have reserved. Pure logic.

What a job reserves is a vector of countable resources (CPUs, memory, the named pools of the
executor's `resources=`), counted alike, and GPU devices, each a place of its own: a job gets
whole devices, or a share of the memory of each device it gets (`GpuPool`)."""

from __future__ import annotations

from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

from mpmsub._errors import MpmsubError
from mpmsub._spec import Request
from mpmsub._units import RESERVED_NAMES, format_memory


class LedgerError(MpmsubError, RuntimeError):
    """A reservation or release that would break the ledger's invariants (a bug, never user input)."""


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class GpuPool:
    """GPU devices by id, each with its memory (bytes; None: unknown), and who holds what.

    A job asking for whole devices (`gpu_memory` 0) takes devices nobody else holds; one asking
    for `gpu_memory` on each of its devices shares devices with other such jobs while their
    reservations fit each device's memory, and never shares one held whole.

    Invariant: on each device, either one holder of it whole, or shares that sum to at most its
    memory."""

    def __init__(self, devices: Sequence[Tuple[int, Optional[int]]] = (), counted: bool = True) -> None:
        ids = [device for device, _ in devices]
        # Not counted: the devices are elsewhere (a remote backend's), and their own scheduler
        # (Dask's resources, SLURM's gres) places jobs on them; every request fits here.
        self.counted = counted
        if len(set(ids)) != len(ids) or any(device < 0 for device in ids):
            raise ValueError(f"invalid GPU devices {list(devices)!r}: expected distinct ids from 0")
        self.memory: Dict[int, Optional[int]] = dict(devices)
        self.shared: Dict[int, int] = dict.fromkeys(ids, 0)  # bytes reserved by sharers
        self.sharers: Dict[int, int] = dict.fromkeys(ids, 0)
        self.whole: Dict[int, bool] = dict.fromkeys(ids, False)
        self.held: Dict[Hashable, Tuple[Tuple[int, ...], int]] = {}  # holder: devices, bytes each

    def __len__(self) -> int:
        return len(self.memory)

    def copy(self) -> GpuPool:
        pool = GpuPool(counted=self.counted)
        pool.memory, pool.shared, pool.sharers = dict(self.memory), dict(self.shared), dict(self.sharers)
        pool.whole, pool.held = dict(self.whole), dict(self.held)
        return pool

    @property
    def largest(self) -> Optional[int]:
        """The memory of the largest device (None: none, or none's memory known)."""
        return max((memory for memory in self.memory.values() if memory is not None), default=None)

    def why_never_fits(self, gpus: int, each: int) -> Optional[str]:
        if not self.counted:
            return None
        if gpus > len(self.memory):
            has = _plural(len(self.memory), "GPU")
            return f"it asks for {_plural(gpus, 'GPU')} but the executor has {has}"
        if each:
            sizes = [memory for memory in self.memory.values() if memory is not None]
            if not sizes:
                return (
                    f"it asks for {format_memory(each)} on each GPU but the memory of the executor's GPUs "
                    "is unknown (given by id, not detected): ask for whole GPUs"
                )
            if sum(1 for memory in sizes if memory >= each) < gpus:
                where = "a GPU" if gpus == 1 else f"each of {gpus} GPUs"
                largest = sorted(sizes)[-gpus] if gpus <= len(sizes) else max(sizes)
                which = "largest GPU has" if gpus == 1 else f"{gpus} largest GPUs have"
                return (
                    f"it asks for {format_memory(each)} on {where} but the executor's {which} {format_memory(largest)}"
                )
        return None

    def place(self, gpus: int, each: int) -> Optional[Tuple[int, ...]]:
        """The devices a request would get now (None: it does not fit). Whole devices: the free
        ones of lowest id. Shares: the devices with the least room that still fits (best fit), so
        that small jobs fill the devices already shared and leave whole ones for whole requests."""
        if not gpus or not self.counted:
            return ()
        if not each:
            free = [device for device in self.memory if not self.whole[device] and not self.sharers[device]]
            return tuple(sorted(free)[:gpus]) if len(free) >= gpus else None
        rooms = []
        for device, memory in self.memory.items():
            if memory is None or self.whole[device]:
                continue
            room = memory - self.shared[device]
            if room >= each:
                rooms.append((room, device))
        if len(rooms) < gpus:
            return None
        return tuple(sorted(device for _, device in sorted(rooms)[:gpus]))

    def reserve(self, holder: Hashable, gpus: int, each: int) -> Tuple[int, ...]:
        devices = self.place(gpus, each)
        if devices is None or holder in self.held:
            raise LedgerError(f"cannot reserve {gpus} GPUs of {each} bytes for {holder!r}")
        for device in devices:
            if each:
                self.shared[device] += each
                self.sharers[device] += 1
            else:
                self.whole[device] = True
        if devices:
            self.held[holder] = (devices, each)
        return devices

    def release(self, holder: Hashable) -> Tuple[int, ...]:
        devices, each = self.held.pop(holder, ((), 0))
        for device in devices:
            if each:
                self.shared[device] -= each
                self.sharers[device] -= 1
            else:
                self.whole[device] = False
        return devices


class Ledger:
    """Capacity and reservations of the resource vector (CPUs, memory, named pools), GPU devices
    and (optionally) job slots.

    Invariant: 0 <= reserved <= capacity for every resource, after every call.
    """

    def __init__(
        self,
        cpus: int,
        memory: int,
        slots: Optional[int] = None,
        resources: Optional[Mapping[str, int]] = None,
        gpus: Sequence[Tuple[int, Optional[int]]] = (),
        here: bool = True,
    ) -> None:
        named = dict(resources or {})
        if (
            cpus < 1
            or memory < 1
            or (slots is not None and slots < 1)
            or any(count < 1 or name in RESERVED_NAMES for name, count in named.items())
        ):
            raise ValueError(f"invalid capacity: {cpus} CPUs, {memory} bytes, {slots} slots, resources {named!r}")
        self.capacity: Dict[str, int] = {"cpus": cpus, "memory": memory, **named}
        self.used: Dict[str, int] = dict.fromkeys(self.capacity, 0)
        self.slots = slots
        self.used_slots = 0
        self.gpus = GpuPool(gpus, here)
        # Not `here`: jobs run on a remote backend, whose own scheduler (Dask's resources, SLURM's
        # gres and licenses) places them by their GPUs and by the named resources this ledger
        # was not given (those it was given are a cap on what runs at once, as CPUs are).
        self.here = here

    # The two resources every executor has, by name (the engine's figures and messages).
    @property
    def cpus(self) -> int:
        return self.capacity["cpus"]

    @property
    def memory(self) -> int:
        return self.capacity["memory"]

    @property
    def used_cpus(self) -> int:
        return self.used["cpus"]

    @property
    def used_memory(self) -> int:
        return self.used["memory"]

    @property
    def free_cpus(self) -> int:
        return self.free("cpus")

    @property
    def free_memory(self) -> int:
        return self.free("memory")

    def free(self, name: str) -> int:
        return self.capacity[name] - self.used[name]

    @property
    def named(self) -> List[str]:
        """The named pools, in order of name."""
        return sorted(name for name in self.capacity if name not in RESERVED_NAMES)

    @property
    def full(self) -> bool:
        """True when no job at all could start (no CPU or no slot left)."""
        return self.free_cpus < 1 or (self.slots is not None and self.used_slots >= self.slots)

    def why_never_fits(self, request: Request) -> Optional[str]:
        """Say why `request` could never be admitted, even on an idle executor; None if it can be."""
        for name, amount in request.amounts():
            has = self.capacity.get(name)
            if has is None and not self.here:
                continue  # the backend says (its refusal names what it has)
            if has is None:
                pools = ", ".join(f"{pool} {self.capacity[pool]}" for pool in self.named) or "none"
                return f"it asks for {amount} of resource {name!r} but the executor has none (its resources: {pools})"
            if amount <= has:
                continue
            if name == "cpus":
                return f"it asks for {amount} CPUs but the executor has {has}"
            if name == "memory":
                return (
                    f"it asks for {format_memory(amount)} of memory but the executor's budget is {format_memory(has)}"
                )
            return f"it asks for {amount} of resource {name!r} but the executor has {has}"
        return self.gpus.why_never_fits(request.gpus, request.gpu_memory)

    def fits(self, request: Request) -> bool:
        capacity, used = self.capacity, self.used
        for name, amount in request.amounts():
            has = capacity.get(name)
            if has is None:
                if self.here:
                    return False
            elif amount > has - used[name]:
                return False
        return (self.slots is None or self.used_slots < self.slots) and (
            not request.gpus or self.gpus.place(request.gpus, request.gpu_memory) is not None
        )

    def reserve(self, request: Request, holder: Hashable = None) -> Tuple[int, ...]:
        """Reserve `request`; return the GPU devices it gets (held for `holder` until released)."""
        if not self.fits(request):
            raise LedgerError(f"cannot reserve {request}: free {self.free_cpus} CPUs, {self.free_memory} bytes")
        used = self.used
        for name, amount in request.amounts():
            if name in used:
                used[name] += amount
        self.used_slots += 1
        return self.gpus.reserve(holder, request.gpus, request.gpu_memory) if request.gpus else ()

    def release(self, request: Request, holder: Hashable = None) -> None:
        used = self.used
        amounts = request.amounts()
        if self.used_slots < 1 or any(amount > used.get(name, 0) for name, amount in amounts if name in used):
            raise LedgerError(
                f"cannot release {request}: only {self.used_cpus} CPUs, {self.used_memory} bytes reserved"
            )
        if request.gpus and self.gpus.counted and holder not in self.gpus.held:
            raise LedgerError(f"cannot release {request}: {holder!r} holds no GPU")
        for name, amount in amounts:
            if name in used:
                used[name] -= amount
        self.used_slots -= 1
        if request.gpus:
            self.gpus.release(holder)

    def devices(self, holder: Hashable) -> Tuple[int, ...]:
        """The GPU devices `holder` has now."""
        return self.gpus.held.get(holder, ((), 0))[0]
