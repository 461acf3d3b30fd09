"""Parsing and formatting of memory sizes, CPU counts and durations.

Bytes and seconds inside; megabytes and human strings only at the edges the
seed API fixes (a bare number of memory means megabytes there).
"""

from __future__ import annotations

import math
import re
from typing import Union

MB = 1024 * 1024

MemoryLike = Union[int, float, str]

_UNITS = {"K": 1024, "M": MB, "G": 1024 * MB, "T": 1024 * 1024 * MB}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:I?B)?)?\s*$", re.IGNORECASE)
_MEMORY_HELP = "a number of megabytes or a string such as '512M', '4G', '1.5T' (units K, M, G, T)"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_HELP = "a number of seconds or a string such as '30s', '5m', '2h'"


def parse_memory(value: object, what: str = "memory") -> int:
    """Return the size in bytes of `value` (a number of MB, or a string with a K/M/G/T suffix).

    Raises ValueError or TypeError that quotes the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} must be {_MEMORY_HELP}; got {value!r} ({type(value).__name__})")
    if isinstance(value, str):
        match = _MEMORY_RE.match(value)
        if match is None:
            raise ValueError(f"invalid {what} {value!r}: expected {_MEMORY_HELP}")
        number, unit = match.groups()
        size = float(number) * (_UNITS[unit.upper()] if unit else MB)
    else:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid {what} {value!r}: expected {_MEMORY_HELP}")
        size = float(value) * MB
    return round(size)


def format_memory(size: float) -> str:
    """Format a size in bytes for people: '512M', '1.5G' (binary units)."""
    for unit, factor in (("T", _UNITS["T"]), ("G", _UNITS["G"]), ("M", MB), ("K", 1024)):
        if abs(size) >= factor:
            text = f"{size / factor:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{int(size)}B"


def parse_cpus(value: object, what: str = "cpus") -> int:
    """Return a whole, positive number of CPUs from an int, an integral float or a digit string."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a whole number of CPUs, at least 1; got {value!r}")
    number: float
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    elif isinstance(value, str):
        raise ValueError(f"invalid {what} {value!r}: expected a whole number of CPUs, at least 1")
    else:
        raise TypeError(f"{what} must be a whole number of CPUs, at least 1; got {value!r} ({type(value).__name__})")
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise ValueError(f"invalid {what} {value!r}: expected a whole number of CPUs, at least 1")
    return int(number)


def parse_duration(value: object, what: str = "timeout") -> float:
    """Return a positive number of seconds from a number or a string such as '90', '30s', '5m', '2h'."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} must be {_DURATION_HELP}; got {value!r}")
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(f"invalid {what} {value!r}: expected {_DURATION_HELP}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"invalid {what} {value!r}: expected a positive number of seconds")
    return seconds
