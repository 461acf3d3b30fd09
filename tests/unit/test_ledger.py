from __future__ import annotations

from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmsub._policy.ledger import Ledger, LedgerError
from mpmsub._spec import Request


def test_fits_counts_cpus_memory_and_slots() -> None:
    ledger = Ledger(cpus=4, memory=1000, slots=2)
    ledger.reserve(Request(2, 600))
    assert not ledger.fits(Request(1, 500))  # memory
    assert not ledger.fits(Request(3, 0))  # cpus
    ledger.reserve(Request(1, 0))  # a job without m reserves no memory
    assert not ledger.fits(Request(1, 0))  # no slot left
    assert ledger.full
    ledger.release(Request(1, 0))
    assert ledger.fits(Request(1, 400))


def test_why_never_fits_names_both_numbers() -> None:
    ledger = Ledger(cpus=2, memory=1024**3)
    assert ledger.why_never_fits(Request(3, 0)) == "it asks for 3 CPUs but the executor has 2"
    message = ledger.why_never_fits(Request(1, 2 * 1024**3))
    assert message is not None and "2G" in message and "1G" in message
    assert ledger.why_never_fits(Request(2, 1024**3)) is None


def test_reserve_beyond_capacity_and_release_of_nothing_are_refused() -> None:
    ledger = Ledger(cpus=1, memory=10)
    with pytest.raises(LedgerError):
        ledger.reserve(Request(2, 0))
    with pytest.raises(LedgerError):
        ledger.release(Request(1, 0))


requests = st.builds(Request, st.integers(1, 8), st.integers(0, 2000))


@given(
    st.lists(st.tuples(st.booleans(), requests), max_size=200),
    st.integers(1, 8),
    st.integers(1, 4000),
    st.one_of(st.none(), st.integers(1, 6)),
)
def test_ledger_never_goes_negative_or_over_capacity(ops: list, cpus: int, memory: int, slots: object) -> None:
    ledger = Ledger(cpus, memory, slots)  # type: ignore[arg-type]
    held: List[Request] = []
    for reserve, request in ops:
        if reserve:
            if ledger.fits(request):
                ledger.reserve(request)
                held.append(request)
            else:
                with pytest.raises(LedgerError):
                    ledger.reserve(request)
        elif held:
            ledger.release(held.pop(0))
        assert 0 <= ledger.used_cpus <= ledger.cpus
        assert 0 <= ledger.used_memory <= ledger.memory
        assert ledger.used_slots == len(held)
        assert slots is None or ledger.used_slots <= slots  # type: ignore[operator]
        assert ledger.used_cpus == sum(r.cpus for r in held)
        assert ledger.used_memory == sum(r.memory for r in held)
