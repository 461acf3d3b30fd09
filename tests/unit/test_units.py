from __future__ import annotations

import importlib.util
import math
import re
import sys
import threading
from typing import Any, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mpmsub
from mpmsub import MemoryAwareExecutor
from mpmsub._units import (
    MAX_CPUS,
    MAX_MEMORY,
    MAX_SECONDS,
    MB,
    format_memory,
    parse_cpus,
    parse_duration,
    parse_memory,
    shown,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024 * MB),
        (1024, 1024 * MB),
        (8192, 8192 * MB),
        ("8192M", 8192 * MB),
        ("8G", 8 * 1024 * MB),
        ("8g", 8 * 1024 * MB),
        ("8GB", 8 * 1024 * MB),
        ("8gib", 8 * 1024 * MB),
        ("1024K", MB),
        ("1T", 1024 * 1024 * MB),
        ("1.5G", 1536 * MB),
        (" 512 M ", 512 * MB),
        (0.5, MB // 2),
        ("0", 0),
    ],
)
def test_parse_memory_accepts_the_seed_formats(text: object, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1G", "1X", "G", "1.2.3G", "100B", "1 0M", "nan", "1e3M"])
def test_parse_memory_refuses_bad_strings_and_quotes_them(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("\\", "\\\\").replace(".", r"\.")):
        parse_memory(bad)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_parse_memory_refuses_bad_numbers(bad: float) -> None:
    with pytest.raises(ValueError, match="invalid memory"):
        parse_memory(bad)


@pytest.mark.parametrize("bad", [None, True, [1], b"1G"])
def test_parse_memory_refuses_other_types(bad: object) -> None:
    with pytest.raises(TypeError, match="memory must be"):
        parse_memory(bad)


@given(st.integers(min_value=0, max_value=2**20), st.sampled_from(["", "K", "M", "G", "T", "k", "mb", "GiB"]))
def test_parse_memory_units_are_binary_multiples(number: int, unit: str) -> None:
    factor = {"": MB, "K": 1024, "M": MB, "G": 1024 * MB, "T": 1024**2 * MB}[unit[:1].upper()]
    assert parse_memory(f"{number}{unit}") == number * factor


@given(st.integers(min_value=1, max_value=2**50))
def test_format_then_parse_is_close(size: int) -> None:
    text = format_memory(size)
    if text.endswith("B"):
        return
    assert abs(parse_memory(text) - size) <= 0.05 * size + 1024


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (4, 4), ("2", 2), (2.0, 2)])
def test_parse_cpus(value: object, expected: int) -> None:
    assert parse_cpus(value) == expected


@pytest.mark.parametrize("bad", [0, -1, 1.5, "0", "two", "1.5", float("nan")])
def test_parse_cpus_refuses_and_names_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match=f"invalid cpus {bad!r}".replace(".", r"\.")):
        parse_cpus(bad)


@pytest.mark.parametrize("bad", [True, None, [2]])
def test_parse_cpus_refuses_other_types(bad: object) -> None:
    with pytest.raises(TypeError):
        parse_cpus(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(300, 300.0), (0.5, 0.5), ("90", 90.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0)],
)
def test_parse_duration(value: object, expected: float) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize("bad", [0, -5, "-5", "soon", "5 minutes", float("inf")])
def test_parse_duration_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid timeout"):
        parse_duration(bad)


# What a user, a job file or the command line may hand a parser: numbers of any size (floats with
# nan and inf), digit strings far past a float's range, with or without a unit, and any text.
_huge_ints = st.integers(min_value=-(10**600), max_value=10**600)
_digits = st.text("0123456789", min_size=1, max_size=450)
_number_text = st.builds(
    lambda sign, whole, point, unit, pad: f"{pad}{sign}{whole}{point}{pad}{unit}",
    st.sampled_from(["", "+", "-"]),
    _digits,
    st.sampled_from(["", ".", ".5", "e9"]),
    st.sampled_from(["", "K", "M", "G", "T", "GB", "s", "m", "h", "d"]),
    st.sampled_from(["", " "]),
)
_anything = st.one_of(st.integers(), _huge_ints, st.floats(), _number_text, st.text(max_size=20))


def _parses_or_names_it(parse: Callable[[object], Any], value: object) -> Any:
    """The parser's value, or None after checking that it refused `value` with a ValueError or a
    TypeError whose message quotes it (anything else fails the test)."""
    try:
        return parse(value)
    except (ValueError, TypeError) as exc:
        assert repr(value) in str(exc)
        return None


@given(_anything)
def test_any_memory_parses_within_the_bound_or_is_refused_naming_it(value: object) -> None:
    size = _parses_or_names_it(parse_memory, value)
    assert size is None or (type(size) is int and 0 <= size <= MAX_MEMORY)


@given(_anything)
def test_any_cpus_parse_within_the_bound_or_are_refused_naming_them(value: object) -> None:
    cpus = _parses_or_names_it(parse_cpus, value)
    assert cpus is None or (type(cpus) is int and 1 <= cpus <= MAX_CPUS)


@given(_anything, st.booleans())
def test_any_duration_parses_within_the_bound_or_is_refused_naming_it(value: object, zero: bool) -> None:
    seconds = _parses_or_names_it(lambda v: parse_duration(v, zero=zero), value)
    assert seconds is None or (type(seconds) is float and 0 <= seconds <= MAX_SECONDS and (zero or seconds > 0))
    if seconds is not None:
        assert threading.Lock().acquire(timeout=seconds)  # an OverflowError past threading.TIMEOUT_MAX


@pytest.mark.parametrize(
    ("parse", "value"),
    [
        (parse_memory, "9" * 400 + "G"),
        (parse_memory, "9" * 5000),
        (parse_memory, 1e303),
        (parse_memory, 10**400),
        (parse_memory, "1048577T"),
        (parse_memory, 2**40 + 1),
        (parse_cpus, 10**400),
        (parse_cpus, "9" * 400),
        (parse_cpus, "9" * 5000),
        (parse_cpus, 1e300),
        (parse_cpus, MAX_CPUS + 1),
        (parse_cpus, "+-3"),
        (parse_cpus, "-3"),
        (parse_cpus, "\u00b2"),
        (parse_duration, 10**400),
        (parse_duration, 1e300),
        (parse_duration, "9" * 400 + "d"),
        (parse_duration, "36526d"),
    ],
)
def test_too_large_or_malformed_numbers_are_a_value_error_naming_them(
    parse: Callable[[object], Any], value: object
) -> None:
    with pytest.raises(ValueError) as caught:
        parse(value)
    assert repr(value) in str(caught.value)
    assert "at most" in str(caught.value) or "from 1 to" in str(caught.value)


def test_the_bounds_themselves_are_accepted() -> None:
    assert parse_memory("1048576T") == parse_memory(2**40) == MAX_MEMORY == 2**60
    assert parse_cpus(MAX_CPUS) == parse_cpus(str(MAX_CPUS)) == MAX_CPUS
    assert parse_duration(MAX_SECONDS) == MAX_SECONDS <= threading.TIMEOUT_MAX
    assert parse_duration("36525d") == MAX_SECONDS == 100 * 365.25 * 86400  # on Linux
    assert parse_duration(0, zero=True) == 0.0
    assert parse_cpus("+3") == parse_cpus(" 3 ") == 3


@pytest.mark.skipif(not hasattr(sys, "set_int_max_str_digits"), reason="no limit on int digits here")
def test_an_integer_too_long_to_print_is_described_by_its_size() -> None:
    value = -(10**5000)
    with pytest.raises(ValueError, match=r"invalid memory <an integer of 16610 bits>"):
        parse_memory(value)
    assert shown(value) == "<an integer of 16610 bits>" and shown(3) == "3"


_needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None, reason="needs distributed")


def _executor(**kwargs: Any) -> None:
    MemoryAwareExecutor(cpus=1, memory="1G", **kwargs)  # refused before anything starts


# Every public numeric parameter reaches one of these parsers, or a check with a bound.
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _executor(kill_grace=math.inf), "invalid kill_grace inf"),
        (lambda: _executor(kill_grace=math.nan), "invalid kill_grace nan"),
        (lambda: _executor(kill_grace=10**400), "invalid kill_grace 1000"),
        (lambda: _executor(kill_grace=-1), "invalid kill_grace -1"),
        (lambda: _executor(memory_reserve=10**400), "invalid memory_reserve 1000"),
        (lambda: _executor(probe_memory=10**400), "invalid probe_memory 1000"),
        (lambda: _executor(max_workers=10**400), "invalid max_workers 1000"),
        (lambda: MemoryAwareExecutor(cpus=10**400), "invalid cpus 1000"),
        (lambda: MemoryAwareExecutor(memory="9" * 400 + "G"), "invalid memory '999"),
        (lambda: mpmsub.SlurmBackend(max_poll=math.inf), "invalid max_poll inf"),
        (lambda: mpmsub.SlurmBackend(max_poll=10**400), "invalid max_poll 1000"),
        (lambda: mpmsub.SlurmBackend(max_poll=math.nan), "invalid max_poll nan"),
        pytest.param(
            lambda: mpmsub.DaskBackend("tcp://127.0.0.1:1", timeout=math.inf), "invalid timeout inf", marks=_needs_dask
        ),
        pytest.param(
            lambda: mpmsub.DaskBackend("tcp://127.0.0.1:1", timeout=10**400), "invalid timeout 1000", marks=_needs_dask
        ),
    ],
)
def test_public_numbers_out_of_range_are_refused_at_once(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_map_refuses_a_timeout_no_wait_can_take() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        for timeout in (1e300, 10**400, math.inf):
            with pytest.raises(ValueError, match=re.escape(f"invalid timeout {timeout!r}")):
                ex.map(abs, [1], timeout=timeout)
        assert list(ex.map(abs, [-1], timeout=MAX_SECONDS)) == [1]
