from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mpmsub._policy.enforce import Usage, budget_stops, newest, strict_stops

MB = 2**20


def test_the_job_furthest_over_its_declaration_is_stopped_first() -> None:
    liar = Usage(1, 900 * MB, 200 * MB, False, 1.0)
    honest = Usage(2, 300 * MB, 400 * MB, False, 2.0)
    undeclared = Usage(3, 100 * MB, 0, False, 3.0)
    stops = budget_stops([liar, honest, undeclared], budget=1024 * MB)
    assert [s.key for s in stops] == [1]
    assert stops[0].message == (
        "exceeded memory: used 900M having declared 200M, while the running jobs together used 1300M of the "
        "1024M budget"
    )


def test_nothing_is_stopped_within_the_budget() -> None:
    assert budget_stops([Usage(1, 500 * MB, 0, False, 0.0), Usage(2, 500 * MB, 0, False, 1.0)], 1000 * MB) == []


def test_strict_mode_stops_a_job_over_its_own_declaration() -> None:
    stops = strict_stops([Usage(1, 300 * MB, 200 * MB, True, 0), Usage(2, 300 * MB, 200 * MB, False, 0)])
    assert [s.key for s in stops] == [1]
    assert stops[0].message == "exceeded its memory limit: used 300M of the 200M it declared (strict memory)"


def test_newest_is_the_last_started() -> None:
    assert newest([Usage(1, 0, 0, False, 5.0), Usage(2, 0, 0, False, 9.0)]) == Usage(2, 0, 0, False, 9.0)
    assert newest([]) is None


usage = st.builds(
    Usage, st.integers(0, 10**6), st.integers(0, 4000), st.integers(0, 4000), st.booleans(), st.floats(0, 100)
)


@given(st.lists(usage, max_size=30, unique_by=lambda u: u.key), st.integers(1, 20000))
def test_after_the_stops_the_rest_fit_and_the_furthest_over_went_first(usages: list, budget: int) -> None:
    stops = budget_stops(usages, budget)
    stopped = {s.key for s in stops}
    rest = [u for u in usages if u.key not in stopped]
    assert sum(u.rss for u in rest) <= budget
    if stops:
        worst_kept = max((u.rss - u.declared for u in rest), default=None)
        least_stopped = min(u.rss - u.declared for u in usages if u.key in stopped)
        assert worst_kept is None or worst_kept <= least_stopped
        # no stop was needless: without the last one, the rest would not have fit
        last = next(u for u in usages if u.key == stops[-1].key)
        assert sum(u.rss for u in rest) + last.rss > budget


def test_the_output_held_for_a_job_counts_as_its_use_against_the_budget() -> None:
    quiet = Usage(1, 300 * MB, 100 * MB, False, 1.0)
    loud = Usage(2, 20 * MB, 100 * MB, False, 0.0, held=600 * MB)  # prints a lot: mpmsub holds it
    stops = budget_stops([quiet, loud], 800 * MB)
    assert [s.key for s in stops] == [2]
    assert stops[0].message.startswith("exceeded memory: used 620M (600M of it its captured output, held by mpmsub)")
    assert strict_stops([Usage(3, 20 * MB, 50 * MB, True, 0.0, held=600 * MB)]) == []  # m is the processes'
