"""Scanning /proc for job trees: the monitor reads only what may belong to a job."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from mpmsub._launch import proctree as _proctree

pytestmark = pytest.mark.skipif(not _proctree._LINUX, reason="the incremental scan reads /proc")


def test_a_process_unclaimed_twice_is_not_read_again_until_the_full_scan() -> None:
    scanner = _proctree.Scanner(full_every=4)
    other = subprocess.Popen(["sleep", "30"])
    job = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        seen = []
        for _ in range(5):
            snap = scanner.scan()
            seen.append(other.pid in snap)
            assert _proctree.members(snap, [job.pid]) == {job.pid}  # the job is measured every time
            scanner.settle(snap)
        # Read in scans 1 and 2 (unclaimed twice), skipped in 3 and 4, read again in the full scan 5.
        assert seen == [True, True, False, False, True]
    finally:
        for proc in (other, job):
            proc.kill()
            proc.wait()


def test_a_job_started_between_scans_is_found_with_its_children() -> None:
    scanner = _proctree.Scanner()
    scanner.settle(scanner.scan())
    scanner.settle(scanner.scan())  # everything running now is known as foreign
    code = "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    job = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        snap = scanner.scan()
        scanner.settle(snap)  # its processes were not claimed in this scan (not watched yet)
        for _ in range(50):
            snap = scanner.scan()
            found = _proctree.members(snap, [job.pid])
            scanner.settle(snap)
            if len(found) == 2:
                break
            time.sleep(0.05)
        assert len(found) == 2 and _proctree.tree_rss(snap, [job.pid]) > 0
    finally:
        _proctree.signal_tree([job.pid], 9)
        job.wait()
