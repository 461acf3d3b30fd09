"""The project's exceptions: every error mpmsub raises on its own subclasses MpmsubError."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpmsub._result import JobResult


class MpmsubError(Exception):
    """Base class of mpmsub's own errors."""


class JobFailedError(MpmsubError):
    """Raised by JobResult.check_returncode() for a job that did not succeed."""

    def __init__(self, result: JobResult) -> None:
        self.result = result
        super().__init__(f"job {result.job_id!r} failed: {result.error}")
