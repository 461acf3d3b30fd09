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


def test_a_device_is_shared_while_the_shares_fit_its_memory() -> None:
    """An H200 shows about 139G: six 20G shares fit on it, a seventh waits; a whole-device
    request waits for every share to end, and no share is placed beside it."""
    gib = 2**30
    ledger = Ledger(cpus=16, memory=gib, gpus=[(0, 139 * gib)])
    share = Request(1, 0, (), 1, 20 * gib)
    for holder in range(6):
        assert ledger.reserve(share, holder) == (0,)
    assert not ledger.fits(share) and not ledger.fits(Request(1, 0, (), 1))
    for holder in range(6):
        ledger.release(share, holder)
    assert ledger.reserve(Request(1, 0, (), 1), "whole") == (0,)
    assert not ledger.fits(share)
    assert ledger.why_never_fits(Request(1, 0, (), 1, 140 * gib)) == (
        "it asks for 140G on a GPU but the executor's largest GPU has 139G"
    )
    assert ledger.why_never_fits(Request(1, 0, (("licence", 1),))) == (
        "it asks for 1 of resource 'licence' but the executor has none (its resources: none)"
    )


def test_a_ledger_of_a_remote_backend_leaves_gpus_and_unnamed_pools_to_it() -> None:
    ledger = Ledger(cpus=4, memory=100, resources={"licence": 1}, here=False)
    asks = Request(1, 0, (("db", 5), ("licence", 1)), 8)
    assert ledger.why_never_fits(asks) is None and ledger.fits(asks)
    ledger.reserve(asks, "a")
    assert not ledger.fits(asks)  # the licence it was given is a cap
    ledger.release(asks, "a")
    assert ledger.used == {"cpus": 0, "memory": 0, "licence": 0}
