"""The engine's pure rules (mpmsub._policy.runs), with plain data in and decisions out."""

from __future__ import annotations

import math
from collections import deque
from typing import Deque, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpmsub._learn.estimate import RETRY_GROWTH
from mpmsub._policy.enforce import strict_overuse
from mpmsub._policy.runs import (
    AUTO_RETRIES,
    AVAILABLE_LAG,
    MAX_REQUEUES,
    PROFILE_BUFFER,
    Ended,
    NextRun,
    choose_probe,
    final_peak_failure,
    floor,
    gate_admits,
    gate_room,
    grabbed_memory,
    grown_memory,
    most_memory,
    need,
    next_run,
    oom_failure,
    probe_reservation,
    shortage_stop,
)
from mpmsub._result import CANCELLED, ERROR, EXIT, MEMORY, PICKLE, RAISED, SIGNAL, START, TIMEOUT
from mpmsub._units import MB, format_memory

GB = 1024 * MB
FAST = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

ALL_FAILURES = [
    None,
    EXIT,
    SIGNAL,
    TIMEOUT,
    MEMORY,
    START,
    CANCELLED,
    ERROR,
    RAISED,
    PICKLE,
]


def ended(**changes: object) -> Ended:
    """A plain run's end: a 1G job that peaked at 1G and failed for memory, with one retry left."""
    base = Ended(
        failure=MEMORY,
        peak=GB,
        memory=GB,
        growth=2.0,
        auto=False,
        auto_retries=0,
        retries_left=1,
        requeue=False,
        requeue_need=0,
        most=16 * GB,
    )
    return base._replace(**changes)  # type: ignore[arg-type]


sizes = st.integers(min_value=0, max_value=64 * GB)
ends = st.builds(
    Ended,
    failure=st.sampled_from(ALL_FAILURES),
    peak=sizes,
    memory=st.none() | sizes,
    growth=st.floats(min_value=1.0, max_value=8.0),
    auto=st.booleans(),
    auto_retries=st.integers(min_value=0, max_value=AUTO_RETRIES + 2),
    retries_left=st.integers(min_value=0, max_value=5),
    requeue=st.booleans(),
    requeue_need=sizes,
    most=st.integers(min_value=1, max_value=64 * GB),
    final=st.booleans(),
    after_miss=st.just(0) | sizes,
)


# -- next_run ---------------------------------------------------------------------------------------


def test_a_success_is_final() -> None:
    assert next_run(ended(failure=None)) is None
    assert next_run(ended(failure=None, auto=True, memory=MB)) is None


@pytest.mark.parametrize("failure", [START, CANCELLED, PICKLE])
def test_failures_that_a_retry_cannot_mend_are_final(failure: str) -> None:
    assert next_run(ended(failure=failure, retries_left=5)) is None


@pytest.mark.parametrize("failure", [EXIT, SIGNAL, TIMEOUT, ERROR, RAISED])
def test_other_failures_retry_with_the_same_memory(failure: str) -> None:
    assert next_run(ended(failure=failure, requeue_need=7)) == NextRun("retry", GB, 7)
    assert next_run(ended(failure=failure, retries_left=0)) is None


def test_final_is_always_final() -> None:
    assert next_run(ended(final=True)) is None
    assert next_run(ended(final=True, requeue=True)) is None
    assert next_run(ended(final=True, auto=True, memory=MB)) is None


def test_a_requeue_keeps_its_memory_and_waits_for_its_peak_with_the_profile_margin() -> None:
    decision = next_run(ended(requeue=True, retries_left=0, peak=1000 * MB, memory=500 * MB))
    assert decision == NextRun("requeue", 500 * MB, math.ceil(1000 * MB * (1 + PROFILE_BUFFER)))
    # Not beyond what the job may be given, but never below its peak or an earlier need.
    assert next_run(ended(requeue=True, peak=1000 * MB, most=1100 * MB)) == NextRun("requeue", GB, 1100 * MB)
    assert next_run(ended(requeue=True, peak=1000 * MB, most=900 * MB)) == NextRun("requeue", GB, 1000 * MB)
    assert next_run(ended(requeue=True, peak=MB, requeue_need=3 * GB)) == NextRun("requeue", GB, 3 * GB)
    # A requeue is not the job's failure: whatever failure it carries, and with no retries left.
    assert next_run(ended(requeue=True, failure=MEMORY, retries_left=0, memory=None, peak=0)) == NextRun(
        "requeue", None, 0
    )


def test_a_memory_failure_retries_with_grown_memory() -> None:
    end = ended(memory=GB, growth=1.5, retries_left=2, requeue_need=5)
    assert next_run(end) == NextRun("retry", grown_memory(end), 5)
    assert grown_memory(end) == math.ceil(1.5 * GB)
    assert next_run(ended(retries_left=0)) is None


def test_an_auto_memory_failure_below_most_runs_again_without_retries() -> None:
    end = ended(auto=True, memory=GB, peak=GB, retries_left=0, auto_retries=AUTO_RETRIES - 1)
    grown = math.ceil(GB * RETRY_GROWTH)  # what it reached, grown by the estimate's retry rule
    assert next_run(end) == NextRun("auto", grown, 0)
    # Out of auto runs: the job's own retries.
    assert next_run(end._replace(auto_retries=AUTO_RETRIES)) is None
    assert next_run(end._replace(auto_retries=AUTO_RETRIES, retries_left=1)) == NextRun("retry", grown, 0)
    # Only a memory failure is a prediction too small.
    assert next_run(end._replace(failure=EXIT)) is None


def test_an_auto_memory_failure_at_most_falls_to_its_own_retries() -> None:
    end = ended(auto=True, memory=16 * GB, most=16 * GB, retries_left=0)
    assert next_run(end) is None
    assert next_run(end._replace(retries_left=1)) == NextRun("retry", 16 * GB, 0)


@FAST
@given(ends)
def test_why_is_requeue_exactly_for_a_requeue_that_is_not_final(end: Ended) -> None:
    decision = next_run(end)
    assert (decision is not None and decision.why == "requeue") == (end.requeue and not end.final)
    if end.final:
        assert decision is None
    if decision is not None and decision.why == "requeue":
        assert decision.memory == end.memory
        margin = min(math.ceil(end.peak * (1 + PROFILE_BUFFER)), end.most)
        assert decision.requeue_need == max(end.requeue_need, end.peak, margin)
    elif decision is not None:
        assert decision.requeue_need == end.requeue_need
        assert decision.why in ("retry", "auto")
        assert end.retries_left > 0 or decision.why == "auto"
        if decision.why == "auto":
            assert end.auto and end.failure == MEMORY and end.auto_retries < AUTO_RETRIES


@FAST
@given(ends)
def test_a_memory_failure_runs_again_with_more_memory_within_most(end: Ended) -> None:
    end = end._replace(failure=MEMORY, requeue=False, final=False)
    decision = next_run(end)
    if decision is None:
        return
    assert decision.memory == grown_memory(end)
    assert decision.memory is not None
    old = end.memory
    base = old if old is not None else end.peak
    if end.auto:
        base = max(base, end.peak)
    if base <= end.most:
        assert decision.memory <= end.most
    if old is not None and old < end.most:
        assert decision.memory > old


@FAST
@given(
    start=ends,
    retries=st.integers(min_value=0, max_value=5),
    peaks=st.lists(sizes, min_size=1, max_size=20),
)
def test_repeated_memory_failures_end(start: Ended, retries: int, peaks: List[int]) -> None:
    end = start._replace(failure=MEMORY, requeue=False, final=False, retries_left=retries)
    steps = 0
    while True:
        steps += 1
        assert steps <= retries + AUTO_RETRIES + 1
        decision = next_run(end)
        if decision is None:
            break
        assert decision.why in ("retry", "auto")
        end = end._replace(
            memory=decision.memory,
            requeue_need=decision.requeue_need,
            peak=peaks[steps % len(peaks)],
            retries_left=end.retries_left - (decision.why == "retry"),
            auto_retries=end.auto_retries + (decision.why == "auto"),
        )
        assert end.retries_left >= 0


# -- grown_memory --------------------------------------------------------------------------------


def test_grown_memory_examples() -> None:
    assert grown_memory(ended(memory=GB, growth=2.0)) == 2 * GB
    assert grown_memory(ended(memory=10 * MB, growth=1.0)) == 11 * MB  # at least 1 MB more
    assert grown_memory(ended(memory=None, peak=300 * MB, growth=2.0)) == 600 * MB  # from the peak
    assert grown_memory(ended(memory=None, peak=0, growth=2.0)) == MB
    assert grown_memory(ended(memory=GB, peak=3 * GB, growth=2.0)) == 2 * GB  # a fixed m ignores the peak
    # m="auto": what it reached (the larger of its m and its peak) times RETRY_GROWTH, not doubled.
    assert grown_memory(ended(memory=GB, peak=3 * GB, growth=2.0, auto=True)) == math.ceil(3 * GB * RETRY_GROWTH)
    assert grown_memory(ended(memory=3 * GB, peak=GB, growth=2.0, auto=True)) == math.ceil(3 * GB * RETRY_GROWTH)
    assert grown_memory(ended(memory=10 * GB, growth=2.0, most=16 * GB)) == 16 * GB  # capped
    # ...or, where more, what its estimate says a miss goes to (capped; a fixed m ignores it).
    assert grown_memory(ended(memory=GB, peak=GB, auto=True, after_miss=5 * GB)) == 5 * GB
    assert grown_memory(ended(memory=GB, peak=GB, auto=True, after_miss=GB)) == math.ceil(GB * RETRY_GROWTH)
    assert grown_memory(ended(memory=GB, peak=GB, auto=True, after_miss=20 * GB)) == 16 * GB
    assert grown_memory(ended(memory=GB, peak=GB, growth=2.0, after_miss=5 * GB)) == 2 * GB


@FAST
@given(ends)
def test_grown_memory_grows_by_a_megabyte_at_least_unless_capped(end: Ended) -> None:
    grown = grown_memory(end)
    base = end.memory if end.memory is not None else end.peak
    growth, after = end.growth, 0
    if end.auto:  # what it reached, grown by the estimate's retry rule, or its after_miss
        base, growth, after = max(end.memory or 0, end.peak), RETRY_GROWTH, end.after_miss
    assert grown <= end.most
    if grown < end.most:
        assert grown >= base + MB
        assert grown >= math.ceil(base * growth)
        assert grown >= after
        assert grown in (base + MB, math.ceil(base * growth), after)
    else:
        assert max(base + MB, math.ceil(base * growth), after) >= end.most


# -- shortage_stop -------------------------------------------------------------------------------

STOP = "stopped and requeued: the machine ran short of memory"


def test_a_shortage_stop_requeues_until_max_requeues() -> None:
    for requeued in range(MAX_REQUEUES):
        assert shortage_stop(STOP, requeued) == (STOP, False)
    for requeued in (MAX_REQUEUES, MAX_REQUEUES + 1):
        assert shortage_stop(STOP, requeued) == (
            "stopped: the machine ran short of memory (3 times; giving up)",
            True,
        )


@FAST
@given(message=st.text(max_size=40), requeued=st.integers(min_value=0, max_value=10))
def test_shortage_stop_is_final_from_max_requeues(message: str, requeued: int) -> None:
    text, final = shortage_stop(message, requeued)
    assert final == (requeued >= MAX_REQUEUES)
    if not final:
        assert text == message
    else:
        assert text == message.replace("stopped and requeued", "stopped") + f" ({MAX_REQUEUES} times; giving up)"
        if "stopped and requeued" not in message:
            assert text == message + " (3 times; giving up)"


# -- oom_failure ---------------------------------------------------------------------------------

USED = format_memory(GB)
SIGKILL_WORDS = f"killed by the kernel's out-of-memory killer (SIGKILL) after using {USED}"
FAILED_WORDS = f"failed after the kernel's out-of-memory killer killed one of its processes; it used {USED}"


def test_oom_failure_keeps_a_known_failure_and_a_clean_exit() -> None:
    assert oom_failure([-9], TIMEOUT, 1, GB, 0, 5) is None
    assert oom_failure([0, 0], None, 3, GB, 0, 5) is None
    assert oom_failure([], None, 3, GB, 0, 5) is None


def test_oom_failure_with_kills_in_the_jobs_cgroup() -> None:
    assert oom_failure([0, -9], None, 1, GB, None, None) == SIGKILL_WORDS
    assert oom_failure([137], None, 1, GB, None, None) == SIGKILL_WORDS
    assert oom_failure([1], None, 2, GB, None, None) == FAILED_WORDS
    assert oom_failure([0, -15], None, 1, GB, None, None) == FAILED_WORDS
    # A stage without a return code is not an exit 0.
    assert oom_failure([0, None], None, 1, GB, None, None) == FAILED_WORDS


def test_oom_failure_from_the_machines_kill_count() -> None:
    assert oom_failure([-9], None, 0, GB, 4, 5) == SIGKILL_WORDS
    assert oom_failure([0, 137], None, 0, GB, 4, 5) == SIGKILL_WORDS
    assert oom_failure([-9], None, 0, GB, 5, 5) is None  # no kill since the start
    assert oom_failure([-9], None, 0, GB, None, 5) is None  # count not known
    assert oom_failure([-9], None, 0, GB, 4, None) is None
    assert oom_failure([1], None, 0, GB, 4, 5) is None  # not a SIGKILL
    assert oom_failure([None], None, 0, GB, 4, 5) is None


returncodes = st.lists(st.none() | st.sampled_from([0, 1, 2, -9, 137, -15, 143]), max_size=4)
counts = st.none() | st.integers(min_value=0, max_value=10)


@FAST
@given(
    rcs=returncodes,
    failure=st.sampled_from(ALL_FAILURES),
    oom_kills=st.integers(min_value=0, max_value=3),
    peak=sizes,
    baseline=counts,
    count=counts,
)
def test_oom_failure_rule(
    rcs: List[Optional[int]],
    failure: Optional[str],
    oom_kills: int,
    peak: int,
    baseline: Optional[int],
    count: Optional[int],
) -> None:
    why = oom_failure(rcs, failure, oom_kills, peak, baseline, count)
    killed = any(rc in (-9, 137) for rc in rcs)
    if failure is not None or all(rc == 0 for rc in rcs):
        assert why is None
    elif oom_kills:
        used = format_memory(peak)
        if killed:
            assert why == f"killed by the kernel's out-of-memory killer (SIGKILL) after using {used}"
        else:
            assert why == f"failed after the kernel's out-of-memory killer killed one of its processes; it used {used}"
    else:
        known = baseline is not None and count is not None and count > baseline
        assert (why is not None) == (known and killed)
    # Never a memory error for a run with no non-zero return code and no kill in its cgroup; a
    # stage without a return code (None) counts as not clean only where its cgroup saw a kill.
    if not any(rc not in (0, None) for rc in rcs) and not oom_kills:
        assert why is None


# -- final_peak_failure --------------------------------------------------------------------------


def test_final_peak_failure_examples() -> None:
    assert final_peak_failure(True, 200 * MB, None, 300 * MB) == strict_overuse(300 * MB, 200 * MB, ended=True)
    assert final_peak_failure(True, 200 * MB, None, 300 * MB) == (
        "exceeded its memory limit: used 300M of the 200M it declared (strict memory; measured at its end)"
    )
    assert final_peak_failure(False, 200 * MB, None, 300 * MB) is None
    assert final_peak_failure(True, None, None, 300 * MB) is None
    assert final_peak_failure(True, 200 * MB, EXIT, 300 * MB) is None
    assert final_peak_failure(True, 200 * MB, None, None) is None
    assert final_peak_failure(True, 200 * MB, None, 200 * MB) is None


@FAST
@given(
    strict=st.booleans(),
    memory=st.none() | sizes,
    failure=st.sampled_from(ALL_FAILURES),
    peak=st.none() | sizes,
)
def test_final_peak_failure_rule(
    strict: bool, memory: Optional[int], failure: Optional[str], peak: Optional[int]
) -> None:
    why = final_peak_failure(strict, memory, failure, peak)
    if strict and memory is not None and failure is None and peak is not None and peak > memory:
        assert why == strict_overuse(peak, memory, ended=True)
    else:
        assert why is None


# -- the live memory gate ------------------------------------------------------------------------


def test_need_examples() -> None:
    assert need(None, 0) == 0
    assert need(GB, 0) == GB
    assert need(GB, 2 * GB) == 2 * GB
    assert need(None, 5) == 5


def test_gate_room_subtracts_the_reserve_and_what_running_jobs_do_not_show_yet() -> None:
    assert gate_room(10 * GB, GB, []) == 9 * GB
    assert gate_room(10 * GB, GB, [(4 * GB, GB), (2 * GB, 3 * GB)]) == 6 * GB  # a floor above need: 0
    assert gate_room(GB, GB, [(GB, 0)]) == -GB


def test_gate_admits_at_the_room_or_alone() -> None:
    assert gate_admits(GB, GB, False)
    assert not gate_admits(GB + 1, GB, False)
    assert gate_admits(GB + 1, GB, True)
    assert gate_admits(GB, -GB, True)
    assert not gate_admits(0, -1, False)


pairs = st.lists(st.tuples(sizes, sizes), max_size=6)


@FAST
@given(available=sizes, reserve=sizes, running=pairs)
def test_gate_room_rule(available: int, reserve: int, running: List[Tuple[int, int]]) -> None:
    room = gate_room(available, reserve, running)
    assert room == available - reserve - sum(max(0, n - f) for n, f in running)
    assert room <= available - reserve


@FAST
@given(job_need=sizes, room=st.integers(min_value=-GB, max_value=64 * GB), alone=st.booleans())
def test_gate_admits_rule(job_need: int, room: int, alone: bool) -> None:
    assert gate_admits(job_need, room, alone) == (job_need <= room or alone)


@FAST
@given(room=st.integers(min_value=-GB, max_value=64 * GB), needs=st.lists(sizes, max_size=10), alone=st.booleans())
def test_a_round_of_admissions_never_hands_out_more_than_the_room(room: int, needs: List[int], alone: bool) -> None:
    left = room
    admitted: List[int] = []
    for job_need in needs:
        if gate_admits(job_need, left, alone and not admitted):
            admitted.append(job_need)
            left -= job_need
    if alone and admitted:
        # Only the first may go beyond the room; the rest fit in what it left.
        assert sum(admitted[1:]) <= max(0, room - admitted[0])
    elif admitted:
        assert sum(admitted) <= room


# -- floor ---------------------------------------------------------------------------------------


def test_floor_is_zero_for_a_young_run() -> None:
    window: Deque[Tuple[float, int]] = deque()
    assert floor(window, 500, 10.0, 10.0) == 0
    assert floor(window, 400, 10.0 + AVAILABLE_LAG - 0.01, 10.0) == 0
    assert list(window) == [(10.0, 500), (10.0 + AVAILABLE_LAG - 0.01, 400)]


def test_floor_is_the_least_sample_of_the_window_with_the_one_before_it() -> None:
    window: Deque[Tuple[float, int]] = deque()
    floor(window, 100, 0.0, 0.0)
    floor(window, 900, 0.5, 0.0)
    floor(window, 800, 1.0, 0.0)
    # At 2.0 the window starts at 0.5: the sample at 0.5 is kept, the one at 0.0 dropped.
    assert floor(window, 700, 2.0, 0.0) == 700
    assert list(window) == [(0.5, 900), (1.0, 800), (2.0, 700)]
    # At 2.2 the window starts at 0.7: the sample at 0.5 still holds at its start.
    assert floor(window, 950, 2.2, 0.0) == 700
    assert window[0] == (0.5, 900)
    # At 3.0 the window starts at 1.5: the sample at 1.0 holds until 2.0.
    assert floor(window, 990, 3.0, 0.0) == 700
    assert list(window) == [(1.0, 800), (2.0, 700), (2.2, 950), (3.0, 990)]
    # At 5.0 (window from 3.5) only the sample at 3.0 is left before it.
    assert floor(window, 995, 5.0, 0.0) == 990
    assert list(window) == [(3.0, 990), (5.0, 995)]


@FAST
@given(
    started=st.floats(min_value=0, max_value=100, allow_nan=False),
    samples=st.lists(
        st.tuples(st.floats(min_value=0, max_value=1.0, allow_nan=False), st.integers(min_value=0, max_value=10**9)),
        min_size=1,
        max_size=40,
    ),
)
def test_floor_keeps_only_the_samples_it_needs(started: float, samples: List[Tuple[float, int]]) -> None:
    window: Deque[Tuple[float, int]] = deque()
    seen: List[Tuple[float, int]] = []
    now = started
    for gap, rss in samples:
        now += gap
        result = floor(window, rss, now, started)
        seen.append((now, rss))
        start = now - AVAILABLE_LAG
        inside = [s for s in seen if s[0] > start]
        before = [s for s in seen if s[0] <= start]
        expected = ([before[-1]] if before else []) + inside
        assert list(window) == expected
        if now - started < AVAILABLE_LAG:
            assert result == 0
        else:
            assert result == min(r for _, r in expected)


# -- m="auto" ------------------------------------------------------------------------------------


def test_choose_probe_takes_the_most_input_then_the_first_submitted() -> None:
    held = [(3, 100), (1, 500), (2, 500), (4, 20)]
    assert choose_probe(held, lambda j: j[1], lambda j: j[0]) == (1, 500)
    assert choose_probe([(7, 0)], lambda j: j[1], lambda j: j[0]) == (7, 0)


@FAST
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 5)), min_size=1, max_size=10, unique_by=lambda j: j[0]))
def test_choose_probe_rule(held: List[Tuple[int, int]]) -> None:
    chosen = choose_probe(held, lambda j: j[1], lambda j: j[0])
    most = max(size for _, size in held)
    assert chosen[1] == most
    assert chosen[0] == min(seq for seq, size in held if size == most)


def test_probe_reservation_examples() -> None:
    assert probe_reservation(2 * GB, 16 * GB, 2, 8, 16 * GB) == (2 * GB, False)
    assert probe_reservation(32 * GB, 16 * GB, 2, 8, 16 * GB) == (16 * GB, False)
    assert probe_reservation(None, 16 * GB, 2, 8, 16 * GB) == (4 * GB, True)
    assert probe_reservation(None, 16 * GB, 8, 8, 3 * GB) == (3 * GB, True)
    assert probe_reservation(None, 10, 1, 3, 100) == (3, True)  # rounded down


@FAST
@given(
    probe_memory=st.none() | sizes,
    budget=sizes,
    total_cpus=st.integers(min_value=1, max_value=256),
    data=st.data(),
    most=sizes,
)
def test_probe_reservation_rule(
    probe_memory: Optional[int], budget: int, total_cpus: int, data: st.DataObject, most: int
) -> None:
    cpus = data.draw(st.integers(min_value=1, max_value=total_cpus))
    memory, grabs = probe_reservation(probe_memory, budget, cpus, total_cpus, most)
    assert memory <= most
    if probe_memory is not None:
        assert (memory, grabs) == (min(probe_memory, most), False)
    else:
        assert (memory, grabs) == (min(budget * cpus // total_cpus, most), True)
        assert memory <= budget


def test_grabbed_memory_and_most_memory() -> None:
    assert grabbed_memory(GB, 2 * GB, 16 * GB) == 3 * GB
    assert grabbed_memory(GB, 20 * GB, 16 * GB) == 16 * GB
    assert most_memory(16 * GB, None) == 16 * GB
    assert most_memory(16 * GB, 4 * GB) == 4 * GB
    assert most_memory(16 * GB, 32 * GB) == 16 * GB


@FAST
@given(reserved=sizes, free=sizes, most=sizes, budget=sizes, place=st.none() | sizes)
def test_grabbed_memory_and_most_memory_rules(
    reserved: int, free: int, most: int, budget: int, place: Optional[int]
) -> None:
    assert grabbed_memory(reserved, free, most) == min(reserved + free, most)
    assert most_memory(budget, place) == min(budget, place or budget)
    assert most_memory(budget, place) <= budget
