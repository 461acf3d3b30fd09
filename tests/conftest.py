from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest
from hypothesis import settings

# Tests import their helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# The remote backends' fixtures (a Dask LocalCluster, a SLURM node), for every module that asks.
from support.backend_fixtures import dask_client, dask_cluster, slurm, slurm_node  # noqa: F401

# The run history goes to a file of the test session's own, never the user's (a test that
# needs one of its own sets MPMSUB_HISTORY or history=).
if "MPMSUB_HISTORY" not in os.environ:
    import tempfile

    os.environ["MPMSUB_HISTORY"] = os.path.join(tempfile.mkdtemp(prefix="mpmsub-history-"), "history.db")

# So do the control sockets of the `mpmsub run`s tests start (mkdtemp: 0700, short enough for a
# socket's path).
os.environ["XDG_RUNTIME_DIR"] = __import__("tempfile").mkdtemp(prefix="mpmsub-run-")

# Tests send SIGINT (a Ctrl-C) to Python programs they start. A shell without job control starts
# a background command with SIGINT ignored, and an ignored signal stays ignored across exec, so
# under `pytest &` those programs would never hear it. A handler (unlike "ignore") is reset on
# exec: the programs start with the default, as under a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Property tests: no per-example deadline (a loaded machine may stall any example for longer
# than hypothesis's default 200 ms; a slow example is not a failure here).
settings.register_profile("mpmsub", deadline=None)
settings.load_profile("mpmsub")

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
