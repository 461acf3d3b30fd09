"""The scheduling policy as pure functions: a simulated clock, no processes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpmsub._policy.ledger import Ledger
from mpmsub._policy.scheduler import Scheduler, _least_release, check_policy
from mpmsub._spec import Request


@dataclass(eq=False)
class J:
    """A simulated job: what the scheduler sees, and how long it really runs."""

    seq: int
    request: Request
    priority: int = 0
    bound: Optional[float] = None
    duration: float = 1.0
    started: float = -1.0
    cancelled: bool = False
    ahead: Optional[List[J]] = None  # set by simulate(): the running jobs when it became the head
    shadows: List[float] = field(default_factory=list)  # its shadow times when jobs started before it

    @property
    def ends_by(self) -> Optional[float]:
        return None if self.bound is None else self.started + self.bound

    @property
    def ends(self) -> float:
        return self.started + self.duration


def order_key(policy: str, job: J) -> Tuple[int, ...]:
    if policy == "pack":
        return (-job.priority, -job.request.memory, -job.request.cpus, job.seq)
    return (-job.priority, job.seq)


def simulate(policy: str, jobs: List[J], cpus: int, memory: int, slots: Optional[int] = None) -> List[J]:
    """Run `jobs` (all queued at time 0) to the end; check capacity at every step, and record
    for each job that held the reservation the jobs that had started when it first did."""
    sched: Scheduler[J] = Scheduler(policy)
    for job in jobs:
        sched.push(job)
    ledger = Ledger(cpus, memory, slots)
    running: List[J] = []
    now = 0.0
    while len(sched) or running:
        before = list(running)
        chosen, dropped = sched.select(ledger, running, now, dropped=lambda j: j.cancelled)
        assert all(j.cancelled for j in dropped)
        head = sched.head
        if head is not None and head.ahead is None:
            head.ahead = before + [j for j in chosen if order_key(policy, j) < order_key(policy, head)]
        reservation = sched.reservation
        # A job let past an unknown (infinite) shadow time would be a bug: only finite ones count.
        if head is not None and reservation is not None and reservation.before_shadow and reservation.shadow < 1e300:
            head.shadows.append(reservation.shadow)
        for job in chosen:
            job.started = now
        running += chosen
        assert sum(j.request.cpus for j in running) <= cpus
        assert sum(j.request.memory for j in running) <= memory
        assert slots is None or len(running) <= slots
        if not running:
            assert not len(sched), "jobs wait while nothing runs: a deadlock"
            break
        now = min(j.ends for j in running)
        for job in [j for j in running if j.ends <= now]:
            running.remove(job)
            ledger.release(job.request)
    return jobs


def first_fit_time(head: J, cpus: int, memory: int, slots: Optional[int], ends: List[float]) -> float:
    """When `head` fits if only the jobs ahead of it had started (ending at `ends`)."""
    ahead = head.ahead or []
    for t in sorted(set(ends)):
        still = [j for j, e in zip(ahead, ends) if e > t]
        if (
            cpus - sum(j.request.cpus for j in still) >= head.request.cpus
            and memory - sum(j.request.memory for j in still) >= head.request.memory
            and (slots is None or slots - len(still) >= 1)
        ):
            return t
    raise AssertionError("the head never fits")


def beside(policy: str, running: List[J], queued: List[J]) -> Tuple[Scheduler[J], Ledger]:
    """A scheduler with `queued` waiting, on a 4-CPU, 1000-memory ledger where `running` run."""
    sched: Scheduler[J] = Scheduler(policy)
    ledger = Ledger(cpus=4, memory=1000)
    for job in running:
        ledger.reserve(job.request)
    for job in queued:
        sched.push(job)
    return sched, ledger


# -- ordering ----------------------------------------------------------------------------------


def test_fifo_starts_in_submission_order_and_first_fit_beyond_the_head_is_bounded() -> None:
    jobs = [J(0, Request(1, 800)), J(1, Request(1, 800)), J(2, Request(1, 100))]
    sched: Scheduler[J] = Scheduler("fifo")
    for job in jobs:
        sched.push(job)
    ledger = Ledger(cpus=4, memory=1000)
    chosen, _ = sched.select(ledger, [], 0.0)
    # Job 1 is the head and waits for job 0's 800; job 2 fits in the 200 left beyond it.
    assert [j.seq for j in chosen] == [0, 2]
    ledger.release(jobs[0].request)
    assert [j.seq for j in sched.select(ledger, [jobs[2]], 1.0)[0]] == [1]


def test_backfill_never_takes_what_the_head_waits_for() -> None:
    # 1000 of memory: A (500) and B (300) run, 200 is free; the head H needs 500. A small job S
    # (100) fits now, but if B ends first H would start at once with 500 free: S would delay it.
    a, b, h, s = J(0, Request(1, 500)), J(1, Request(1, 300)), J(2, Request(1, 500)), J(3, Request(1, 100))
    sched, ledger = beside("fifo", [a, b], [h, s])
    assert sched.select(ledger, [a, b], 0.0)[0] == []
    # With a timeout S has a latest end, but H's start is unknown (A and B have none): still no.
    sched.push(J(4, Request(1, 100), bound=3600.0))
    assert sched.select(ledger, [a, b], 0.0)[0] == []


def test_backfill_takes_what_is_sure_to_be_left_beside_the_head() -> None:
    # A (600) runs and H needs 600: when H fits, 400 is sure to be left. S (300) may go first;
    # then T (200) may not, as 100 is left.
    a, h, s, t = J(0, Request(1, 600)), J(1, Request(1, 600)), J(2, Request(1, 300)), J(3, Request(1, 200))
    sched, ledger = beside("fifo", [a], [h, s, t])
    assert sched.select(ledger, [a], 0.0)[0] == [s]


def test_greedy_lets_small_jobs_pass_a_big_one() -> None:
    a, h, s = J(0, Request(1, 600)), J(1, Request(1, 600)), J(2, Request(1, 300))
    sched, ledger = beside("greedy", [a], [h, s])
    assert sched.select(ledger, [a], 0.0)[0] == [s]


def test_pack_puts_the_largest_memory_first() -> None:
    jobs = [J(i, Request(1, m)) for i, m in enumerate([100, 300, 200, 300, 0])]
    started = simulate("pack", jobs, cpus=1, memory=1000)
    assert [j.seq for j in sorted(started, key=lambda j: j.started)] == [1, 3, 2, 0, 4]


@pytest.mark.parametrize("policy", ["fifo", "pack", "greedy"])
def test_priority_comes_first(policy: str) -> None:
    jobs = [J(0, Request(1, 10)), J(1, Request(1, 10), priority=5), J(2, Request(1, 10), priority=-1)]
    jobs.append(J(3, Request(1, 10), priority=5))
    simulate(policy, jobs, cpus=1, memory=100)
    assert [j.seq for j in sorted(jobs, key=lambda j: j.started)] == [1, 3, 0, 2]


def test_a_job_put_back_goes_first_within_its_priority() -> None:
    sched: Scheduler[J] = Scheduler("fifo")
    jobs = [J(i, Request(1)) for i in range(3)]
    for job in jobs:
        sched.push(job)
    urgent = J(9, Request(1), priority=1)
    sched.push(urgent)
    # Put back in another order than submitted, two of them alike: they go first, by submission.
    for seq, memory in ((7, 0), (5, 10), (6, 0)):
        sched.push_front(J(seq, Request(1, memory)))
    ledger = Ledger(cpus=1, memory=10)
    order = []
    while len(sched):
        chosen, _ = sched.select(ledger, [], 0.0)
        order += [j.seq for j in chosen]
        ledger.release(chosen[0].request)
    assert order == [9, 5, 6, 7, 0, 1, 2]


def test_time_bounds_let_a_short_job_run_before_the_heads_reservation() -> None:
    # A (600, ends by t=10) runs; the head H needs 600, sure to fit at t=10. S (300) fits now
    # and is sure to end by t=5: it may start. L (300) might run until t=20: it may not.
    a = J(0, Request(1, 600), bound=10.0, started=0.0)
    h, s, long = J(1, Request(1, 600)), J(2, Request(1, 300), bound=5.0), J(3, Request(1, 300), bound=20.0)
    sched, ledger = beside("fifo", [a], [h, long, s])
    assert sched.select(ledger, [a], 0.0)[0] == [s]


def test_cancelled_jobs_are_dropped_and_do_not_hold_a_reservation() -> None:
    a, big, small = J(0, Request(1, 600)), J(1, Request(1, 900), cancelled=True), J(2, Request(1, 300))
    sched, ledger = beside("fifo", [a], [big, small])
    chosen, dropped = sched.select(ledger, [a], 0.0, dropped=lambda j: j.cancelled)
    assert chosen == [small] and dropped == [big] and len(sched) == 0


def test_a_refusal_by_the_admit_condition_makes_the_head() -> None:
    a, b, c = J(0, Request(1, 100)), J(1, Request(1, 90)), J(2, Request(1, 50))
    sched: Scheduler[J] = Scheduler("fifo")
    for job in (a, b, c):
        sched.push(job)
    ledger = Ledger(cpus=4, memory=1000)
    asked = []

    def admit(job: J) -> bool:
        asked.append(job.seq)
        return job.seq != 0

    # A is refused: it holds the reservation (its 100 stays free), the others start beside it.
    assert sched.select(ledger, [], 0.0, admit)[0] == [b, c]
    assert asked == [0, 1, 2]
    # A job like the refused one is not asked again in the same round: it would be refused too.
    sched.push(J(3, Request(1, 100)))
    asked.clear()
    assert sched.select(ledger, [], 0.0, admit)[0] == [] and asked == [0]


def test_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'lifo'.*'fifo', 'pack', 'greedy'"):
        check_policy("lifo")


def test_many_identical_jobs_are_one_bucket() -> None:
    sched: Scheduler[J] = Scheduler("fifo")
    for i in range(10_000):
        sched.push(J(i, Request(1, 10)))
    assert len(sched._buckets) == 1 and len(sched._heap) == 1
    ledger = Ledger(cpus=2, memory=100)
    chosen, _ = sched.select(ledger, [], 0.0)
    assert [j.seq for j in chosen] == [0, 1] and len(sched) == 9_998


# -- properties --------------------------------------------------------------------------------

sizes = st.tuples(st.integers(1, 4), st.integers(0, 1000), st.integers(-1, 1), st.integers(1, 50))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(sizes, min_size=1, max_size=25),
    st.sampled_from(["fifo", "pack", "greedy"]),
    st.integers(1, 4),
    st.integers(1, 2000),
    st.one_of(st.none(), st.integers(1, 4)),
)
def test_no_schedule_exceeds_capacity_and_every_job_runs(
    shapes: list, policy: str, cpus: int, memory: int, slots: Optional[int]
) -> None:
    jobs = [
        J(i, Request(min(c, cpus), min(m, memory)), priority=p, duration=float(d))
        for i, (c, m, p, d) in enumerate(shapes)
    ]
    simulate(policy, jobs, cpus, memory, slots)
    assert all(j.started >= 0 for j in jobs)


heads = st.tuples(st.integers(1, 3), st.integers(0, 10), st.integers(1, 20))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(heads, min_size=2, max_size=14),
    st.sampled_from(["fifo", "pack"]),
    st.integers(1, 6),
    st.one_of(st.none(), st.integers(1, 6)),
)
def test_backfill_never_delays_the_head(shapes: list, policy: str, cpus: int, slots: Optional[int]) -> None:
    """Without time bounds, every job that held the reservation starts at the very moment it
    would have if no job had started after it became the head."""
    jobs = [J(i, Request(min(c, cpus), 100 * m), duration=float(d)) for i, (c, m, d) in enumerate(shapes)]
    simulate(policy, jobs, cpus, 1000, slots)
    for job in jobs:
        if job.ahead is not None:
            assert job.started == first_fit_time(job, cpus, 1000, slots, [j.ends for j in job.ahead])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(heads, st.integers(0, 10)), min_size=2, max_size=14),
    st.sampled_from(["fifo", "pack"]),
    st.integers(1, 6),
)
def test_with_time_bounds_the_head_starts_by_its_reservation(shapes: list, policy: str, cpus: int) -> None:
    """Jobs that may run at most `bound` (a timeout), and run at most that long: each job that
    held the reservation starts no later than the time it was then sure to fit."""
    jobs = [
        J(i, Request(min(c, cpus), 100 * m), duration=float(d), bound=float(d + extra))
        for i, ((c, m, d), extra) in enumerate(shapes)
    ]
    simulate(policy, jobs, cpus, 1000)
    for job in jobs:
        if job.ahead is not None:
            sure = first_fit_time(job, cpus, 1000, None, [j.started + (j.bound or 0) for j in job.ahead])
            assert job.started <= sure


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(heads, st.one_of(st.none(), st.integers(0, 10))), min_size=2, max_size=14),
    st.sampled_from(["fifo", "pack"]),
    st.integers(1, 6),
)
def test_with_some_time_bounds_the_head_starts_by_the_later_of_both_guarantees(
    shapes: list, policy: str, cpus: int
) -> None:
    """Some jobs have a time bound, some not: each head starts no later than when it would have
    with no backfill, or than the latest shadow time that let a job start before it."""
    jobs = [
        J(i, Request(min(c, cpus), 100 * m), duration=float(d), bound=None if extra is None else float(d + extra))
        for i, ((c, m, d), extra) in enumerate(shapes)
    ]
    simulate(policy, jobs, cpus, 1000)
    for job in jobs:
        if job.ahead is not None:
            alone = first_fit_time(job, cpus, 1000, None, [j.ends for j in job.ahead])
            assert job.started <= max([alone, *job.shadows])


@given(st.lists(st.integers(0, 40), max_size=8), st.integers(1, 150))
def test_least_release_is_exact_for_small_numbers(values: List[int], target: int) -> None:
    sums = [sum(c) for n in range(len(values) + 1) for c in itertools.combinations(values, n)]
    reaching = [s for s in sums if s >= target]
    expected = min(reaching) if reaching else sum(values)
    assert _least_release(values, target) == expected


@given(st.lists(st.integers(0, 2**40), min_size=1, max_size=8), st.integers(1, 2**41))
def test_least_release_for_memory_is_a_safe_lower_bound(values: List[int], target: int) -> None:
    sums = [sum(c) for n in range(len(values) + 1) for c in itertools.combinations(values, n)]
    reaching = [s for s in sums if s >= target]
    if not reaching:
        return
    bound = _least_release(values, target)
    assert target <= bound <= min(reaching)  # never more than what is sure to be released


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(0, 3), st.integers(-1, 1), st.booleans()), max_size=25),
    st.sampled_from(["fifo", "pack", "greedy"]),
    st.data(),
)
def test_a_removed_job_never_starts_and_the_others_keep_their_order(
    shapes: list, policy: str, data: st.DataObject
) -> None:
    sched: Scheduler[J] = Scheduler(policy)
    jobs = [J(i, Request(c, m), priority=p) for i, (c, m, p, _) in enumerate(shapes)]
    for job, (*_, front) in zip(jobs, shapes):
        (sched.push_front if front else sched.push)(job)
    removed = data.draw(st.lists(st.sampled_from(jobs), unique=True) if jobs else st.just([]))
    for job in removed:
        assert sched.remove(job)
        assert not sched.remove(job)  # once only
    assert len(sched) == len(jobs) - len(removed)
    reference: Scheduler[J] = Scheduler(policy)
    for job, (*_, front) in zip(jobs, shapes):
        if job not in removed:
            (reference.push_front if front else reference.push)(job)
    big = Ledger(cpus=1000, memory=10**6)
    chosen = sched.select(big, [], 0.0)[0]
    assert chosen == reference.select(Ledger(cpus=1000, memory=10**6), [], 0.0)[0]
    assert len(sched) == 0


def vector_order_key(policy: str, job: J) -> Tuple[int, ...]:
    """`order_key` where requests hold GPUs and named pools: pack sorts by memory, CPUs, GPUs,
    GPU memory (a whole device first), then the sum of the named pools' units, each largest first."""
    if policy != "pack":
        return order_key(policy, job)
    r = job.request
    units = sum(count for _, count in r.resources)
    return (-job.priority, -r.memory, -r.cpus, -r.gpus, -(r.gpu_memory or 1 << 62), -units, job.seq)


def simulate_devices(policy: str, jobs: List[J], cpus: int, devices: int, device_memory: int, seats: int) -> None:
    """As `simulate`, on a ledger with GPU devices and a pool of `seats`: at every step no device
    is held whole beside another holder, its shares fit its memory, and the seats are counted."""
    sched: Scheduler[J] = Scheduler(policy)
    for job in jobs:
        sched.push(job)
    ledger = Ledger(cpus, 1000, None, {"seat": seats}, [(d, device_memory) for d in range(devices)])
    running: List[J] = []
    held: dict = {}
    now = 0.0
    while len(sched) or running:
        before = list(running)
        chosen, _ = sched.select(ledger, running, now)
        head = sched.head
        if head is not None and head.ahead is None:
            head.ahead = before + [j for j in chosen if vector_order_key(policy, j) < vector_order_key(policy, head)]
        for job in chosen:
            job.started = now
            held[job.seq] = ledger.devices(job.seq)
            assert len(held[job.seq]) == job.request.gpus
        running += chosen
        for device in range(devices):
            on = [j for j in running if device in held[j.seq]]
            wholes = [j for j in on if not j.request.gpu_memory]
            assert not wholes or len(on) == 1, f"device {device} double-booked"
            assert sum(j.request.gpu_memory for j in on) <= device_memory
        assert sum(dict(j.request.resources).get("seat", 0) for j in running) <= seats
        assert sum(j.request.cpus for j in running) <= cpus
        if not running:
            assert not len(sched), "jobs wait while nothing runs: a deadlock"
            break
        now = min(j.ends for j in running)
        for job in [j for j in running if j.ends <= now]:
            running.remove(job)
            ledger.release(job.request, job.seq)


gpu_shapes = st.tuples(
    st.integers(1, 3),  # cpus
    st.integers(0, 3),  # gpus
    st.sampled_from([0, 0, 20, 50, 90]),  # gpu memory on each (0: whole devices)
    st.integers(0, 2),  # seats
    st.integers(1, 20),  # duration
)


@settings(max_examples=300, deadline=None)
@given(st.lists(gpu_shapes, min_size=1, max_size=20), st.sampled_from(["fifo", "pack", "greedy"]), st.integers(1, 4))
def test_no_gpu_device_is_double_booked_and_every_job_runs(shapes: list, policy: str, cpus: int) -> None:
    jobs = []
    for i, (c, g, share, seats, d) in enumerate(shapes):
        resources = (("seat", seats),) if seats else ()
        jobs.append(J(i, Request(min(c, cpus), 0, resources, g, share if g else 0), duration=float(d)))
    simulate_devices(policy, jobs, cpus, 3, 100, 2)
    assert all(j.started >= 0 for j in jobs)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 2), st.integers(0, 3), st.integers(1, 20)), min_size=2, max_size=14),
    st.sampled_from(["fifo", "pack"]),
)
def test_backfill_never_delays_a_head_that_needs_gpus(shapes: list, policy: str) -> None:
    """Whole devices and CPUs: each job that held the reservation starts at the very moment it
    would have if no job had started after it became the head."""
    jobs = [J(i, Request(c, 0, (), g), duration=float(d)) for i, (c, g, d) in enumerate(shapes)]
    simulate_devices(policy, jobs, 4, 3, 100, 1)
    for job in jobs:
        if job.ahead is None:
            continue
        ahead, ends = job.ahead, [j.ends for j in job.ahead]
        for t in sorted(set(ends)):
            still = [j for j, e in zip(ahead, ends) if e > t]
            if (
                4 - sum(j.request.cpus for j in still) >= job.request.cpus
                and 3 - sum(j.request.gpus for j in still) >= job.request.gpus
            ):
                assert job.started == t
                break


def test_on_a_remote_backend_a_gpu_head_lets_gpu_jobs_backfill() -> None:
    """Its ledger does not count GPUs (the backend places them): a head short of CPUs keeps only
    the CPUs it needs, whatever the later jobs' GPUs."""
    sched: Scheduler[J] = Scheduler("fifo")
    ledger = Ledger(cpus=4, memory=1000, here=False)
    running = [J(0, Request(3, 0))]
    ledger.reserve(running[0].request, 0)
    head, later = J(1, Request(2, 0, (), 1)), J(2, Request(1, 0, (), 1))
    for job in (head, later):
        sched.push(job)
    chosen, _ = sched.select(ledger, running, 0.0)
    assert chosen == [later] and sched.head is head
