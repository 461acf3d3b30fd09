"""`--halt` values and when they stop a run, as pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmsub._cli.halt import Halt, parse_halt


@pytest.mark.parametrize(
    ("text", "halt"),
    [
        ("now,fail=1", Halt("now", "fail", 1)),
        ("soon,fail=3", Halt("soon", "fail", 3)),
        ("now,success=2", Halt("now", "success", 2)),
        (" soon,success=10% ", Halt("soon", "success", 10, percent=True)),
    ],
)
def test_each_form_parses(text: str, halt: Halt) -> None:
    assert parse_halt(text) == halt
    assert parse_halt(str(halt)) == halt


@pytest.mark.parametrize("text", ["", "now", "fail=1", "later,fail=1", "now,fail=0", "now,fail=101%", "now,fail=-1"])
def test_a_bad_value_is_an_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid --halt {text!r}"):
        parse_halt(text)


def test_counts_and_percentages_of_all_the_jobs() -> None:
    assert not Halt("now", "fail", 2).reached(failed=1, succeeded=5, total=10)
    assert Halt("now", "fail", 2).reached(failed=2, succeeded=0, total=10)
    assert Halt("soon", "success", 1).reached(failed=3, succeeded=1, total=10)
    assert not Halt("now", "fail", 10, percent=True).reached(failed=1, succeeded=0, total=11)
    assert Halt("now", "fail", 10, percent=True).reached(failed=2, succeeded=0, total=11)


@given(st.integers(0, 100), st.integers(1, 100), st.integers(1, 1000))
def test_a_percentage_is_reached_exactly_when_that_share_has_ended(ended: int, percent: int, total: int) -> None:
    ended = min(ended, total)
    assert Halt("now", "fail", percent, True).reached(ended, 0, total) == (ended / total * 100 >= percent - 1e-9)
