"""The Dask and SLURM backends.

1. Dask: 1000 `true` jobs on a LocalCluster of 2 worker processes (2 threads each, declaring
   cpus=2 and memory=4e9): mpmsub's Dask backend (each job run under mpmsub on a worker:
   measured, with its timeout and kill) / plain `client.submit(subprocess.run, ["true"])` of the
   same 1000, in the same run, alternating, median of --runs; again with a separate `dask
   scheduler` and two `dask worker` processes, as a cluster is run (target: at most 1.5x on both).
2. SLURM: 100 and then 200 jobs of `sleep 0.1` through a single-node SLURM (2 CPUs; started here
   with tests/support/slurm/node.sh when none is configured and this runs as root): mpmsub's
   SlurmBackend / plain `sbatch --wrap 'sleep 0.1'` per job and one squeue call every 0.25 s
   until all have ended, alternating, median of --runs (target for 100: <= 1.1x), and the
   sbatch, squeue, sacct and scancel calls mpmsub made. Its jobs of one shape go out as job
   arrays (a handful of sbatch); squeue is one per poll for all jobs, so it follows the run's
   length, not the number of jobs (target: squeue calls per second of run at most 4, one poll
   every 0.25 s at the most).

Usage: python benchmarks/backends.py [--runs 5] [--record] [--only dask|slurm]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import wait
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, median, show

import mpmsub

JOBS = 1000
COUNTS = (100, 200)  # SLURM jobs of a batch
NODE = Path(__file__).parent.parent / "tests" / "support" / "slurm" / "node.sh"


def plain(client: Any) -> float:
    started = time.perf_counter()
    futures = [client.submit(subprocess.run, ["true"], pure=False) for _ in range(JOBS)]
    assert all(done.returncode == 0 for done in client.gather(futures))
    return time.perf_counter() - started


def ours(backend: mpmsub.DaskBackend) -> float:
    started = time.perf_counter()
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = [executor.submit(["true"]) for _ in range(JOBS)]
    assert all(future.result().success for future in futures)
    return time.perf_counter() - started


@contextlib.contextmanager
def _separate_processes() -> Iterator[str]:
    """A `dask scheduler` and two `dask worker` processes (2 threads, cpus=2, memory=4e9 each),
    as a cluster is run: the scheduler's address."""
    bindir = Path(sys.executable).parent
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    quiet: Dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    daemons = [
        subprocess.Popen(
            [
                str(bindir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
            **quiet,
        )
    ]
    try:
        time.sleep(1)
        for _ in range(2):
            argv = [str(bindir / "dask"), "worker", address, "--nthreads", "2", "--resources", "cpus=2,memory=4e9"]
            daemons.append(subprocess.Popen(argv, **quiet))
        yield address
    finally:
        for daemon in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def _dask_times(client: Any, runs: int) -> Tuple[float, float]:
    """Median seconds of plain client.submit and of mpmsub's DaskBackend, alternating."""
    backend = mpmsub.DaskBackend(client)
    times: Dict[str, List[float]] = {"plain": [], "mpmsub": []}
    ours(backend), plain(client)  # warm up: the workers' executors and imports
    for _ in range(runs):
        times["plain"].append(plain(client))
        times["mpmsub"].append(ours(backend))
    return median(times["plain"]), median(times["mpmsub"])


def measure_dask(runs: int = 5) -> Figure:
    try:
        import distributed
    except ImportError:
        return Figure("dask: 1000 true jobs", "distributed is not installed", "<= 1.5", False, [])
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=True,
        resources={"cpus": 2, "memory": 4e9},
        dashboard_address=":0",
        worker_dashboard_address=":0",
    )
    try:
        with distributed.Client(cluster, set_as_default=False) as client:
            local = _dask_times(client, runs)
    finally:
        cluster.close()
    with _separate_processes() as address, distributed.Client(address, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        separate = _dask_times(client, runs)
    rows = []
    for name, (plain_s, ours_s) in (("LocalCluster", local), ("separate processes", separate)):
        rows.append(f"| {name} | {plain_s:.2f} s | {ours_s:.2f} s | {ours_s / plain_s:.2f}x |")
    detail = [
        f"{JOBS} `true` jobs, 2 workers x 2 threads, median of {runs}",
        "",
        "| cluster | `client.submit(subprocess.run, ['true'])` | mpmsub, DaskBackend | ratio |",
        "|---|---|---|---|",
        *rows,
    ]
    worst = max(local[1] / local[0], separate[1] / separate[0])
    return Figure(
        "dask: 1000 true jobs",
        f"{worst:.2f}x client.submit (the worse of two clusters)",
        "<= 1.5",
        worst <= 1.5,
        detail,
    )


def _reachable() -> bool:
    try:
        return subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class _Slurm:
    """A SLURM to measure on: the configured one, or a single node started here."""

    def __init__(self) -> None:
        self.directory: Optional[str] = None

    def __enter__(self) -> Optional[str]:
        if shutil.which("sbatch") is None:
            return "SLURM is not installed (apt-get install slurm-wlm munge)"
        if os.environ.get("SLURM_CONF") and _reachable():
            return None
        if shutil.which("slurmctld") is None or os.geteuid() != 0:
            return "no SLURM is reachable, and one can be started only as root"
        self.directory = tempfile.mkdtemp(prefix="mpmsub-slurm-")
        done = subprocess.run(["bash", str(NODE), "start", self.directory], capture_output=True, text=True)
        if done.returncode != 0:
            return f"the single-node SLURM did not start: {done.stderr[-500:]}"
        os.environ["SLURM_CONF"] = os.path.join(self.directory, "slurm.conf")
        return None

    def __exit__(self, *exc: Any) -> None:
        if self.directory is not None:
            subprocess.run(["bash", str(NODE), "stop", self.directory], capture_output=True)
            os.environ.pop("SLURM_CONF", None)
            shutil.rmtree(self.directory, ignore_errors=True)


def _plain_slurm(count: int) -> float:
    """`count` plain `sbatch --wrap 'sleep 0.1'` (the resources mpmsub asks for the same job),
    then one squeue call every 0.25 s (mpmsub's shortest poll) until all have ended."""
    started = time.perf_counter()
    ids = []
    for _ in range(count):
        argv = ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=84M", "--output=/dev/null", "--wrap=sleep 0.1"]
        ids.append(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().split(";")[0])
    argv = ["squeue", "--noheader", "--states=all", f"--jobs={','.join(ids)}", "--format=%T"]
    while True:
        states = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
        if len(states) == count and all(state in _ENDED for state in states):
            break
        time.sleep(0.25)
    elapsed = time.perf_counter() - started
    assert states == ["COMPLETED"] * count, sorted(set(states))
    return elapsed


_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def _slurm_batch(count: int, workdir: str) -> Tuple[float, Counter[str]]:
    backend = mpmsub.SlurmBackend(workdir=workdir)
    started = time.perf_counter()
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = [executor.submit(mpmsub.Job(["sleep", "0.1"]).memory("20M")) for _ in range(count)]
        wait(futures)
    elapsed = time.perf_counter() - started
    failed = [future.result().error for future in futures if not future.result().success]
    assert not failed, f"{len(failed)} of {count} jobs failed: {failed[:3]}"
    return elapsed, backend.calls


def measure_slurm(runs: int = 5) -> List[Figure]:
    with _Slurm() as why_not, tempfile.TemporaryDirectory() as workdir:
        if why_not is not None:
            return [
                Figure("slurm: 100 short jobs", why_not, "<= 1.1x plain sbatch", False, []),
                Figure("slurm: squeue calls per second", why_not, "<= 4 per s", False, []),
            ]
        rows, ratios, rates = [], {}, []
        for count in COUNTS:
            times: Dict[str, List[float]] = {"plain": [], "mpmsub": []}
            for _ in range(runs):  # alternating: the node's pace drifts
                times["plain"].append(_plain_slurm(count))
                elapsed, calls = _slurm_batch(count, workdir)
                times["mpmsub"].append(elapsed)
                rates.append(calls["squeue"] / elapsed)
            plain, ours = median(times["plain"]), median(times["mpmsub"])
            ratios[count] = ours / plain
            rows.append(
                f"| {count} | {plain:.1f} s | {count} | {ours:.1f} s | {ours / plain:.2f}x | {calls['sbatch']} "
                f"| {calls['squeue']} | {calls['sacct']} | {calls['scancel']} | {rates[-1]:.2f} |"
            )
    detail = [
        f"jobs of `sleep 0.1` (1 node, 2 CPUs), median of {runs}; mpmsub's calls of its last run",
        "",
        "| jobs | plain sbatch + squeue every 0.25 s | its sbatch | mpmsub | ratio | mpmsub's sbatch "
        "| squeue | sacct | scancel | squeue per s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    worst = max(rates)
    return [
        Figure("slurm: 100 short jobs", f"{ratios[100]:.2f}x plain sbatch", "<= 1.1x", ratios[100] <= 1.1, detail),
        Figure("slurm: squeue calls per second", f"{worst:.2f} per s", "<= 4 per s", worst <= 4.0, []),
    ]


def measure(runs: int = 5, only: Optional[str] = None) -> List[Figure]:
    figures = [] if only == "slurm" else [measure_dask(runs)]
    return figures if only == "dask" else figures + measure_slurm(runs)


def main() -> None:
    parser = arguments(__doc__, runs=5)
    parser.add_argument("--only", choices=("dask", "slurm"), help="measure one backend")
    args = parser.parse_args()
    show("Backends", measure(args.runs, args.only), args.record)


if __name__ == "__main__":
    main()
