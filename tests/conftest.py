from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Tuple

import pytest

# Tests import their helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# The run history goes to a file of the test session's own, never the user's (a test that
# needs one of its own sets MPMSUB_HISTORY or history=).
if "MPMSUB_HISTORY" not in os.environ:
    import tempfile

    os.environ["MPMSUB_HISTORY"] = os.path.join(tempfile.mkdtemp(prefix="mpmsub-history-"), "history.db")


ROOT = Path(__file__).resolve().parent.parent


class ExampleRun:
    """examples/report_example.py running in a process of its own, its output in `out`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
        self._proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "report_example.py"), "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._output: Tuple[str, str] = ("", "")
        self._done = False

    def wait(self) -> Tuple[int, str, str]:
        """Its exit status, standard output and standard error, once it has ended."""
        if not self._done:
            self._output = self._proc.communicate(timeout=120)
            self._done = True
        return self._proc.returncode, self._output[0], self._output[1]

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self.wait()


@pytest.fixture(scope="session")
def report_example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExampleRun]:
    """The report example's batch, run once for the session (started by the first test that
    asks, which may go on meanwhile: the examples' test starts it beside the other examples)."""
    run = ExampleRun(tmp_path_factory.mktemp("report-example"))
    try:
        yield run
    finally:
        run.stop()


class SlurmNode:
    """A single-node SLURM for tests/test_slurm.py (tests/slurm/node.sh), started in the
    background as soon as those tests are collected, and stopped in the background after them:
    its start (about 3 s: the controller first schedules some 3 s after it starts) and its stop
    overlap other tests instead of adding to the session."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mpmsub-slurm-"))
        self.node = ROOT / "tests" / "slurm" / "node.sh"
        # Four CPUs (on two cores) let the tests' short jobs run four at a time.
        self._start: Optional[subprocess.Popen[str]] = self._run("start", NODE_CPUS="4")
        self._stop: Optional[subprocess.Popen[str]] = None

    def _run(self, action: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", str(self.node), action, str(self.directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    def ready(self) -> Optional[str]:
        """None once the node is up; else why it did not start."""
        assert self._start is not None
        _, err = self._start.communicate(timeout=120)
        return None if self._start.returncode == 0 else err[-2000:] or f"exit status {self._start.returncode}"

    def stop(self) -> None:
        """Stop the node, in the background (finish() waits)."""
        if self._stop is None:
            self._stop = self._run("stop")

    def finish(self) -> None:
        if self._start is not None and self._start.poll() is None:
            self._start.communicate(timeout=120)
        self.stop()
        assert self._stop is not None
        self._stop.communicate(timeout=120)
        shutil.rmtree(self.directory, ignore_errors=True)


slurm_node: Optional[SlurmNode] = None  # the tests' own SLURM, where one is started


def slurm_reachable() -> bool:
    try:
        done = subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def pytest_collection_finish(session: pytest.Session) -> None:
    global slurm_node
    if not any(item.nodeid.startswith("tests/test_slurm.py") for item in session.items):
        return
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None or os.geteuid() != 0:
        return  # test_slurm.py says why it skips
    if os.environ.get("SLURM_CONF") and slurm_reachable():
        return  # a configured SLURM: the tests use it
    slurm_node = SlurmNode()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if slurm_node is not None:
        slurm_node.finish()
