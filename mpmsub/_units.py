"""Parsing and formatting of memory sizes, CPU counts, named resources and durations.

Bytes and seconds inside; megabytes and human strings only at the edges the
seed API fixes (a bare number of memory means megabytes there).

Each parser has an upper bound, so that no value it returns overflows later (a float, a timer,
a 64-bit count elsewhere): too large is a ValueError naming the value, like any bad value.
"""

from __future__ import annotations

import re
import threading
from typing import Dict, Mapping, Union

MB = 1024 * 1024

MemoryLike = Union[int, float, str]

_UNITS = {"K": 1024, "M": MB, "G": 1024 * MB, "T": 1024 * 1024 * MB}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:I?B)?)?\s*$", re.IGNORECASE)
_MEMORY_HELP = "a number of megabytes or a string such as '512M', '4G', '1.5T' (units K, M, G, T)"
# 1 EiB: far more than any machine or cluster offers, and 8 times under what a signed 64-bit
# count of bytes holds (cgroup limits, Dask's msgpack), so sums and retries' growth stay in it.
MAX_MEMORY = 1 << 60
_MEMORY_MOST = f"at most {MAX_MEMORY // _UNITS['T']}T (1 EiB)"

_CPUS_RE = re.compile(r"^\s*\+?(\d+)\s*$")
MAX_CPUS = 10_000_000  # more than the largest cluster has cores
_CPUS_HELP = f"a whole number of CPUs, from 1 to {MAX_CPUS}"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_HELP = "a number of seconds or a string such as '30s', '5m', '2h'"
_YEAR = 365.25 * 86400
# 100 years; lock and Condition waits refuse more than threading.TIMEOUT_MAX (292 years on
# Linux, 49 days on Windows) with an OverflowError.
MAX_SECONDS = min(100 * _YEAR, threading.TIMEOUT_MAX)
_SECONDS_MOST = f"at most {MAX_SECONDS:.0f} ({MAX_SECONDS / _YEAR:.3g} years)"


def shown(value: object) -> str:
    """`repr(value)` for messages; an integer too long for repr (over 4300 digits) by its size."""
    try:
        return repr(value)
    except ValueError:
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else object.__repr__(value)


def parse_memory(value: object, what: str = "memory") -> int:
    """Return the size in bytes of `value` (a number of MB, or a string with a K/M/G/T suffix),
    at most MAX_MEMORY.

    Raises ValueError or TypeError that quotes the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} must be {_MEMORY_HELP}; got {shown(value)} ({type(value).__name__})")
    size: float
    if isinstance(value, str):
        match = _MEMORY_RE.match(value)
        if match is None:
            raise ValueError(f"invalid {what} {value!r}: expected {_MEMORY_HELP}")
        number, unit = match.groups()
        size = float(number) * (_UNITS[unit.upper()] if unit else MB)  # inf when too long
    else:
        if not value >= 0:  # a negative number or nan (an int is compared exactly, never as a float)
            raise ValueError(f"invalid {what} {shown(value)}: expected {_MEMORY_HELP}")
        size = value * MB
    if not size <= MAX_MEMORY:
        raise ValueError(f"invalid {what} {shown(value)}: too large, {_MEMORY_MOST} is accepted")
    return round(size)


def format_memory(size: float) -> str:
    """Format a size in bytes for people: '512M', '1.5G' (binary units)."""
    for unit, factor in (("T", _UNITS["T"]), ("G", _UNITS["G"]), ("M", MB), ("K", 1024)):
        if abs(size) >= factor:
            text = f"{size / factor:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{int(size)}B"


def parse_cpus(value: object, what: str = "cpus") -> int:
    """Return a whole number of CPUs, from 1 to MAX_CPUS, from an int, an integral float or a
    digit string."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be {_CPUS_HELP}; got {value!r}")
    number: float
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        match = _CPUS_RE.match(value)
        if match is None:
            raise ValueError(f"invalid {what} {value!r}: expected {_CPUS_HELP}")
        number = float(match.group(1))  # not int(): no limit on the digits, inf when too long
    else:
        raise TypeError(f"{what} must be {_CPUS_HELP}; got {shown(value)} ({type(value).__name__})")
    # Range first (exact for an int, false for nan): int() of what passes cannot fail.
    if not 1 <= number <= MAX_CPUS or number != int(number):
        raise ValueError(f"invalid {what} {shown(value)}: expected {_CPUS_HELP}")
    return int(number)


def parse_duration(value: object, what: str = "timeout", *, zero: bool = False) -> float:
    """Return a positive number of seconds (0 too with `zero`), at most MAX_SECONDS, from a
    number or a string such as '90', '30s', '5m', '2h'."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} must be {_DURATION_HELP}; got {shown(value)}")
    seconds: float
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(f"invalid {what} {value!r}: expected {_DURATION_HELP}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]  # inf when too long
    else:
        seconds = value
    # Compared before any float(): an int too large for a float is refused, not an OverflowError.
    above_least = seconds >= 0 if zero else seconds > 0  # false for nan
    if not above_least or not seconds <= MAX_SECONDS:
        least = "0 or more" if zero else "more than 0"
        raise ValueError(f"invalid {what} {shown(value)}: expected a number of seconds, {least} and {_SECONDS_MOST}")
    return float(seconds)


def shorten(text: str, width: int) -> str:
    """`text`, cut to `width` characters with an ellipsis where it is longer."""
    return text if len(text) <= width else text[: width - 1] + "…"


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_NAME_HELP = "a name of letters, digits, '_', '.' and '-' that starts with a letter or '_'"
RESERVED_NAMES = ("cpus", "memory", "gpus")  # the vector's own: given by their own options
_COUNT_HELP = "a whole number"


def parse_count(value: object, what: str, least: int = 0) -> int:
    """A whole number of things (GPUs, units of a named resource), at least `least`, from an int,
    an integral float or a digit string; at most MAX_CPUS."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} must be {_COUNT_HELP} from {least}; got {shown(value)} ({type(value).__name__})")
    number: float
    if isinstance(value, str):
        match = _CPUS_RE.match(value)
        if match is None:
            raise ValueError(f"invalid {what} {value!r}: expected {_COUNT_HELP} from {least}")
        number = float(match.group(1))
    else:
        number = value
    if not least <= number <= MAX_CPUS or number != int(number):
        raise ValueError(f"invalid {what} {shown(value)}: expected {_COUNT_HELP} from {least} to {MAX_CPUS}")
    return int(number)


def resource_name(name: object, what: str = "resource") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid {what} name {shown(name)}: expected {_NAME_HELP}")
    if name in RESERVED_NAMES:
        raise ValueError(f"invalid {what} name {name!r}: {name} have an option of their own")
    return name


def parse_resources(value: object, what: str = "resources", least: int = 1, text: bool = False) -> Dict[str, int]:
    """Named resources and counts: a mapping, or with `text` the command line's form such as
    'licence=1,scratch_io=2'; each count a whole number from `least`."""
    if text and isinstance(value, str):
        pairs = []
        for part in value.split(","):
            name, sep, count = part.partition("=")
            if not sep:
                raise ValueError(f"invalid {what} {value!r}: expected NAME=COUNT[,NAME=COUNT...]")
            pairs.append((name.strip(), count.strip()))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise TypeError(f"{what} must be a mapping of names to counts; got {shown(value)} ({type(value).__name__})")
    counts: Dict[str, int] = {}
    for name, count in pairs:
        resource_name(name)
        if name in counts:
            raise ValueError(f"invalid {what}: {name!r} is given twice")
        counts[name] = parse_count(count, f"count of resource {name!r}", least)
    return counts
