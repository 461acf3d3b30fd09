"""The resource ledger: what the executor has and what running jobs have reserved. Pure logic."""

from __future__ import annotations

from typing import Optional

from mpmsub._errors import MpmsubError
from mpmsub._spec import Request
from mpmsub._units import format_memory


class LedgerError(MpmsubError, RuntimeError):
    """A reservation or release that would break the ledger's invariants (a bug, never user input)."""


class Ledger:
    """Capacity and reservations of CPUs, memory and (optionally) job slots.

    Invariant: 0 <= reserved <= capacity for every resource, after every call.
    """

    def __init__(self, cpus: int, memory: int, slots: Optional[int] = None) -> None:
        if cpus < 1 or memory < 1 or (slots is not None and slots < 1):
            raise ValueError(f"invalid capacity: {cpus} CPUs, {memory} bytes, {slots} slots")
        self.cpus = cpus
        self.memory = memory
        self.slots = slots
        self.used_cpus = 0
        self.used_memory = 0
        self.used_slots = 0

    @property
    def free_cpus(self) -> int:
        return self.cpus - self.used_cpus

    @property
    def free_memory(self) -> int:
        return self.memory - self.used_memory

    @property
    def full(self) -> bool:
        """True when no job at all could start (no CPU or no slot left)."""
        return self.free_cpus < 1 or (self.slots is not None and self.used_slots >= self.slots)

    def why_never_fits(self, request: Request) -> Optional[str]:
        """Say why `request` could never be admitted, even on an idle executor; None if it can be."""
        if request.cpus > self.cpus:
            return f"it asks for {request.cpus} CPUs but the executor has {self.cpus}"
        if request.memory > self.memory:
            return (
                f"it asks for {format_memory(request.memory)} of memory but the executor's budget is "
                f"{format_memory(self.memory)}"
            )
        return None

    def fits(self, request: Request) -> bool:
        return (
            request.cpus <= self.free_cpus
            and request.memory <= self.free_memory
            and (self.slots is None or self.used_slots < self.slots)
        )

    def reserve(self, request: Request) -> None:
        if not self.fits(request):
            raise LedgerError(f"cannot reserve {request}: free {self.free_cpus} CPUs, {self.free_memory} bytes")
        self.used_cpus += request.cpus
        self.used_memory += request.memory
        self.used_slots += 1

    def release(self, request: Request) -> None:
        if request.cpus > self.used_cpus or request.memory > self.used_memory or self.used_slots < 1:
            raise LedgerError(
                f"cannot release {request}: only {self.used_cpus} CPUs, {self.used_memory} bytes reserved"
            )
        self.used_cpus -= request.cpus
        self.used_memory -= request.memory
        self.used_slots -= 1
