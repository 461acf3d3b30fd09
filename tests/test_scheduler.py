from __future__ import annotations

from dataclasses import dataclass
from typing import List

from hypothesis import given
from hypothesis import strategies as st

from mpmsub._ledger import Ledger, Request
from mpmsub._scheduler import FifoScheduler


@dataclass(frozen=True)
class E:
    seq: int
    request: Request


def test_first_come_first_served_with_first_fit() -> None:
    sched: FifoScheduler[E] = FifoScheduler()
    jobs = [E(0, Request(1, 800)), E(1, Request(1, 800)), E(2, Request(1, 100))]
    for job in jobs:
        sched.push(job)
    ledger = Ledger(cpus=4, memory=1000)
    assert [e.seq for e in sched.select(ledger)] == [0, 2]
    assert len(sched) == 1
    ledger.release(jobs[0].request)
    assert [e.seq for e in sched.select(ledger)] == [1]


def test_discard_and_clear() -> None:
    sched: FifoScheduler[E] = FifoScheduler()
    a, b = E(0, Request(1)), E(1, Request(1))
    sched.push(a)
    sched.push(b)
    sched.discard(a)
    assert list(sched) == [b]
    assert sched.clear() == [b]
    assert len(sched) == 0


@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(0, 1000)), max_size=60), st.integers(1, 4), st.integers(1, 2000)
)
def test_select_never_exceeds_capacity_and_keeps_order(sizes: list, cpus: int, memory: int) -> None:
    sched: FifoScheduler[E] = FifoScheduler()
    for seq, (c, m) in enumerate(sizes):
        sched.push(E(seq, Request(min(c, cpus), min(m, memory))))
    ledger = Ledger(cpus, memory)
    running: List[E] = []
    while len(sched) or running:
        chosen = sched.select(ledger)
        assert [e.seq for e in chosen] == sorted(e.seq for e in chosen)
        running.extend(chosen)
        assert sum(e.request.cpus for e in running) <= cpus
        assert sum(e.request.memory for e in running) <= memory
        assert running, "a job that fits an idle ledger must start"
        ledger.release(running.pop(0).request)
