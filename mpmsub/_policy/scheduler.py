"""Which queued jobs start next. Pure logic: no threads, no I/O, and the time is an argument.

Three policies share one queue:

- ``fifo``: jobs in order of priority (higher first), then of submission. The first job that
  does not fit is the *head*: it holds a reservation, and a later job may start before it
  (backfill) only if that cannot delay the head's start (see `Reservation`).
- ``pack``: the same, but within a priority the largest memory comes first (then the most
  CPUs, then submission order): big jobs run one after another while smaller ones fill the
  memory left beside them. Good for a batch known in advance.
- ``greedy``: first fit in fifo order, no reservation: every job that fits starts. It keeps the
  machine busiest now, but a large job can wait for as long as small ones keep coming.

The queue is kept in buckets of identical jobs (same priority, request and time bound, which
is all a decision looks at), so choosing costs O(log B) per bucket looked at, where B is the
number of distinct kinds of job queued, not the number of jobs.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Generic,
    Hashable,
    Iterable,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
)

from mpmsub._policy.ledger import Ledger
from mpmsub._spec import Request

POLICIES = ("fifo", "pack", "greedy")

_UNITS = 1 << 16  # resolution of the memory subset sums (see _least_release)
_WHOLE = 1 << 62  # pack's figure of a whole GPU device, above any share of one


class Entry(Protocol):
    """What the scheduler needs to know of a queued job."""

    @property
    def seq(self) -> int: ...  # submission order, unique

    @property
    def request(self) -> Request: ...

    @property
    def priority(self) -> int: ...

    @property
    def bound(self) -> Optional[float]: ...  # the longest it can run, in seconds (None: unknown)


class Running(Protocol):
    """What the scheduler needs to know of a running job."""

    @property
    def request(self) -> Request: ...

    @property
    def ends_by(self) -> Optional[float]: ...  # the latest time it can end (None: unknown)


E = TypeVar("E", bound=Entry)
Shape = Tuple[int, Request, Optional[float]]  # priority, request, bound
# Running jobs: request, latest end and (where it holds GPU devices) the ledger's holder of them.
Held = Sequence[Union[Tuple[Request, Optional[float]], Tuple[Request, Optional[float], Hashable]]]


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown schedule {policy!r}: choose one of {', '.join(repr(p) for p in POLICIES)}")
    return str(policy)


class _Bucket(Generic[E]):
    __slots__ = ("entries", "version")

    def __init__(self) -> None:
        self.entries: Deque[E] = deque()
        self.version = -1  # which entry of the index is current (numbers never reused)


@dataclass
class Reservation:
    """The head job's claim while later jobs are considered.

    `slack` (per resource of the vector) and `slots`: what later jobs may take without delaying
    the head at all, whatever the running jobs' run times. When the running jobs end, in whatever
    order, the head fits at the first moment it would have fitted with no backfill, because each
    resource is then free by at least its smallest possible surplus, and backfilled jobs hold no
    more. GPU devices are places, not a count: while the head needs GPUs, `gpus` is False and a
    later job that needs one starts only by the shadow rule; a head without GPUs leaves them free.

    `shadow`: when the head is sure to fit, from the running jobs' time bounds (start plus
    timeout); infinite if one it needs has none. A job sure to end by then may also start, as in
    SLURM's backfill: it may delay the head, but never past this time.
    """

    slack: Dict[str, int]
    slots: int
    shadow: float
    gpus: bool = True  # later jobs may take GPU devices
    before_shadow: int = 0  # jobs admitted because they end before the shadow time

    def admits(self, entry: Entry, now: float) -> bool:
        request = entry.request
        slack = self.slack
        # (A resource the ledger does not count, a remote backend's, limits nothing here.)
        if (
            self.slots >= 1
            and (self.gpus or not request.gpus)
            and all(amount <= slack.get(name, amount) for name, amount in request.amounts())
        ):
            for name, amount in request.amounts():
                if name in slack:
                    slack[name] -= amount
            self.slots -= 1
            return True
        if entry.bound is not None and not math.isinf(self.shadow) and now + entry.bound <= self.shadow:
            self.before_shadow += 1
            return True
        return False

    @property
    def closed(self) -> bool:
        """True when no later job could be admitted."""
        return (self.slack["cpus"] < 1 or self.slots < 1) and math.isinf(self.shadow)


def reserve_for(head: Request, ledger: Ledger, running: Held) -> Reservation:
    """The reservation of `head` given the ledger and the running jobs (request, latest end and,
    for the GPU devices they hold, who holds them)."""
    slots_free = ledger.slots - ledger.used_slots if ledger.slots is not None else 1 << 30
    need = dict(head.amounts())
    holding = [dict(held[0].amounts()) for held in running]
    slack = {
        name: _surplus(ledger.free(name), need.get(name, 0), [amounts.get(name, 0) for amounts in holding])
        for name in ledger.capacity
    }
    slots = _surplus(slots_free, 1, [1] * len(running))
    # (GPUs a remote backend places are no concern of this ledger's: they never wait here.)
    return Reservation(slack, slots, _shadow(head, ledger, slots_free, running), gpus=not head.gpus or not ledger.here)


def _surplus(free: int, need: int, held: List[int]) -> int:
    """What is sure to be left of a resource after `need` at the moment enough of it is free."""
    if free >= need:
        return free - need
    return free - need + _least_release(held, need - free)


def _least_release(values: List[int], target: int) -> int:
    """A lower bound on the smallest sum of some of `values` that reaches `target` (exact for
    small whole numbers such as CPU counts; within len(values) units of 1/65536 of the total for
    memory, rounded the safe way)."""
    values = [v for v in values if v > 0]
    total = sum(values)
    if total <= target:
        return total
    unit = max(1, -(-total // _UNITS))
    reach = 1  # bit i set: some subset sums to i units (each value rounded up)
    for v in values:
        reach |= reach << -(-v // unit)
    goal = -(-target // unit)
    above = reach >> goal
    least = goal + (above & -above).bit_length() - 1
    if unit == 1:
        return least
    return max(target, least * unit - len(values) * unit)


def _shadow(head: Request, ledger: Ledger, slots_free: int, running: Held) -> float:
    """When `head` is sure to fit if every running job ends by its bound; infinity if unsure."""
    free = {name: ledger.free(name) for name in ledger.capacity}
    slots = slots_free
    pool = ledger.gpus.copy() if head.gpus else None
    need = list(head.amounts())
    for held in sorted((h for h in running if h[1] is not None), key=lambda h: h[1] or 0.0):
        for name, amount in held[0].amounts():
            if name in free:
                free[name] += amount
        slots += 1
        if pool is not None and len(held) > 2:
            pool.release(held[2])
        if (
            slots >= 1
            and all(amount <= free.get(name, amount) for name, amount in need)
            and (pool is None or pool.place(head.gpus, head.gpu_memory) is not None)
        ):
            return held[1] or 0.0
    return math.inf


class Scheduler(Generic[E]):
    """The queue of jobs waiting to start, and the policy that picks them."""

    def __init__(self, policy: str = "fifo") -> None:
        self.policy = check_policy(policy)
        self._buckets: Dict[Shape, _Bucket[E]] = {}
        self._heap: List[Tuple[Tuple[int, ...], int, Shape]] = []
        self._front: Set[int] = set()  # seqs put back at the head of the queue
        self._count = 0
        self._versions = itertools.count()
        self.head: Optional[E] = None  # the job that held the reservation in the last select
        self.reservation: Optional[Reservation] = None  # and its reservation

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[E]:
        """The queued jobs, in no particular order."""
        return iter([entry for bucket in self._buckets.values() for entry in bucket.entries])

    def push(self, entry: E) -> None:
        bucket = self._bucket(entry)
        bucket.entries.append(entry)
        self._count += 1
        if len(bucket.entries) == 1:
            self._index(_shape(entry), bucket)

    def push_front(self, entry: E) -> None:
        """Put a job back at the head of its priority (a retry, or a job stopped and requeued).
        Jobs put back come before the others, in the order they were first submitted."""
        bucket = self._bucket(entry)
        entries = bucket.entries
        at = 0
        while at < len(entries) and entries[at].seq in self._front and entries[at].seq < entry.seq:
            at += 1
        entries.insert(at, entry)
        self._front.add(entry.seq)
        self._count += 1
        self._index(_shape(entry), bucket)

    def remove(self, entry: E) -> bool:
        """Take one job out of the queue (one killed while it waits); False if it is not queued."""
        shape = _shape(entry)
        bucket = self._buckets.get(shape)
        if bucket is None:
            return False
        first = bucket.entries[0] is entry
        try:
            bucket.entries.remove(entry)  # (one scan of its bucket)
        except ValueError:
            return False
        self._front.discard(entry.seq)
        self._count -= 1
        if not bucket.entries:
            del self._buckets[shape]  # its entry in the index is outdated now, and skipped
        elif first:
            self._index(shape, bucket)
        return True

    def clear(self) -> List[E]:
        entries = list(self)
        self._buckets.clear()
        self._heap.clear()
        self._front.clear()
        self._count = 0
        return entries

    def select(
        self,
        ledger: Ledger,
        running: Iterable[Running] = (),
        now: float = 0.0,
        admit: Optional[Callable[[E], bool]] = None,
        dropped: Optional[Callable[[E], bool]] = None,
    ) -> Tuple[List[E], List[E]]:
        """Remove and return the jobs to start now (their resources reserved on `ledger`), and the
        jobs found `dropped` (cancelled while queued; removed, nothing reserved).

        `admit`, when given, is a further condition (the live memory gate) asked of a job that
        fits; it is asked at most once per job and may count what it admits. A job it refuses
        becomes the head, as one that does not fit.
        """
        chosen: List[E] = []
        gone: List[E] = []
        visited: List[Tuple[Tuple[int, ...], int, Shape]] = []
        reservation: Optional[Reservation] = None
        reserving = self.policy != "greedy"
        self.head = self.reservation = None
        while self._heap and not ledger.full and not (reservation is not None and reservation.closed):
            _, version, shape = heapq.heappop(self._heap)
            bucket = self._buckets.get(shape)
            if bucket is None or bucket.version != version:
                continue  # an outdated entry of the index
            entries = bucket.entries
            blocked = False
            first = True
            while entries and not ledger.full:
                entry = entries[0]
                if not first and self._heap and self._key(entry) > self._heap[0][0]:
                    break  # another bucket's job comes next: this one is taken up again in its turn
                first = False
                if dropped is not None and dropped(entry):
                    self._pop(entries)
                    gone.append(entry)
                    continue
                request = entry.request
                fits = ledger.fits(request)
                if fits and reservation is not None and not reservation.admits(entry, now):
                    blocked = True
                    break
                if not fits or (admit is not None and not admit(entry)):
                    if reserving and reservation is None:
                        held: List[Any] = [(r.request, r.ends_by, getattr(r, "seq", None)) for r in running]
                        held += [(c.request, None if c.bound is None else now + c.bound, c.seq) for c in chosen]
                        reservation = reserve_for(request, ledger, held)
                        self.head, self.reservation = entry, reservation
                    blocked = True
                    break
                ledger.reserve(request, entry.seq)
                self._pop(entries)
                chosen.append(entry)
            if entries:
                bucket.version = next(self._versions)
                item = (self._key(entries[0]), bucket.version, shape)
                if blocked:
                    visited.append(item)  # nothing more of this bucket can start in this round
                else:
                    heapq.heappush(self._heap, item)
            else:
                del self._buckets[shape]
        for item in visited:
            heapq.heappush(self._heap, item)
        return chosen, gone

    # -- the index of buckets -------------------------------------------------------------------

    def _bucket(self, entry: E) -> _Bucket[E]:
        shape = _shape(entry)
        bucket = self._buckets.get(shape)
        if bucket is None:
            bucket = self._buckets[shape] = _Bucket()
        return bucket

    def _pop(self, entries: Deque[E]) -> None:
        entry = entries.popleft()
        self._front.discard(entry.seq)
        self._count -= 1

    def _index(self, shape: Shape, bucket: _Bucket[E]) -> None:
        """(Re)enter a bucket in the order after its first job changed."""
        bucket.version = next(self._versions)
        heapq.heappush(self._heap, (self._key(bucket.entries[0]), bucket.version, shape))

    def _key(self, entry: E) -> Tuple[int, ...]:
        """The order of jobs: smaller first."""
        front = 0 if entry.seq in self._front else 1
        if self.policy == "pack":
            request = entry.request
            share = request.gpu_memory or _WHOLE  # a whole device before any share of one
            size = (-request.memory, -request.cpus, -request.gpus, -share, -sum(c for _, c in request.resources))
            return (-entry.priority, front, *size, entry.seq)
        return (-entry.priority, front, entry.seq)


def _shape(entry: Entry) -> Shape:
    return (entry.priority, entry.request, entry.bound)
