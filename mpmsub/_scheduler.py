"""Which queued job starts next. Pure logic: no threads, no I/O, no clock.

The policy here is first come, first served with first fit: jobs are considered in submission
order and every one that fits starts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Iterator, List, Optional, TypeVar

from typing_extensions import Protocol

from mpmsub._ledger import Ledger, Request


class Entry(Protocol):
    """What the scheduler needs to know of a queued job."""

    @property
    def seq(self) -> int: ...

    @property
    def request(self) -> Request: ...


E = TypeVar("E", bound=Entry)


class FifoScheduler(Generic[E]):
    """First come, first served, first fit."""

    def __init__(self) -> None:
        self._queue: OrderedDict[int, E] = OrderedDict()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[E]:
        return iter(list(self._queue.values()))

    def push(self, entry: E) -> None:
        self._queue[entry.seq] = entry

    def push_front(self, entry: E) -> None:
        """Put a job back at the head of the queue (a retry, or a job stopped and requeued)."""
        self._queue[entry.seq] = entry
        self._queue.move_to_end(entry.seq, last=False)

    def discard(self, entry: E) -> None:
        self._queue.pop(entry.seq, None)

    def clear(self) -> List[E]:
        entries = list(self._queue.values())
        self._queue.clear()
        return entries

    def select(self, ledger: Ledger, admit: Optional[Callable[[E], bool]] = None) -> List[E]:
        """Remove and return the jobs to start now, reserving their resources on `ledger`.

        `admit`, when given, is a further condition (the live memory gate) asked of a job that
        fits the ledger; it is asked at most once per job and may count what it admits.
        """
        chosen: List[E] = []
        if ledger.full:
            return chosen
        for entry in self._queue.values():
            if ledger.fits(entry.request) and (admit is None or admit(entry)):
                ledger.reserve(entry.request)
                chosen.append(entry)
                if ledger.full:
                    break
        for entry in chosen:
            del self._queue[entry.seq]
        return chosen
