"""`--halt`: when a run stops early, as GNU parallel's option says it.

`now,fail=N`, `soon,fail=N`, `now,success=N`, `soon,success=N`, with N a count of jobs or a
percentage of all the jobs (`fail=10%`). `now` kills the running jobs; `soon` lets them finish
and starts no more. Pure: the run counts, this module decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NOW, SOON = "now", "soon"
FAIL, SUCCESS = "fail", "success"
_FORM = re.compile(r"(now|soon),(fail|success)=(\d{1,9})(%?)", re.ASCII)
FORMS = "now,fail=N, soon,fail=N, now,success=N or soon,success=N (N a count, or a percentage such as 10%)"


@dataclass(frozen=True)
class Halt:
    """When to stop: `when` is "now" or "soon", `what` "fail" or "success"; `count` jobs, or
    `percent` of all the jobs when `percent` is set."""

    when: str
    what: str
    count: int
    percent: bool = False

    def reached(self, failed: int, succeeded: int, total: int) -> bool:
        """Whether the run stops, with so many jobs ended failed and succeeded out of `total`."""
        ended = failed if self.what == FAIL else succeeded
        if self.percent:
            return total > 0 and ended * 100 >= self.count * total
        return ended >= self.count

    def __str__(self) -> str:
        return f"{self.when},{self.what}={self.count}{'%' if self.percent else ''}"


def parse_halt(text: str) -> Halt:
    """A --halt value; ValueError naming it otherwise."""
    match = _FORM.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid --halt {text!r}: expected {FORMS}")
    when, what, number, percent = match.groups()
    count = int(number)
    if count < 1 or (percent and count > 100):
        raise ValueError(f"invalid --halt {text!r}: N must be 1 or more (a percentage at most 100%)")
    return Halt(when, what, count, bool(percent))
