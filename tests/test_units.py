from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmsub._units import MB, format_memory, parse_cpus, parse_duration, parse_memory


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


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["", "K", "M", "G", "T", "k", "mb", "GiB"]))
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
