"""Fixtures for the remote backends, shared by their own tests and the behaviour suite
(conftest.py makes them visible to every test module): a Dask LocalCluster of two worker
processes with declared resources, and a SLURM controller (the one configured here, or a
single node started from tests/support/slurm/node.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

MB = 2**20
DASK_WORKER_MEMORY = 300 * MB  # each Dask worker's declared memory: three 100M jobs at a time
DASK_WORKER_CPUS = 4

NODE = Path(__file__).parent / "slurm" / "node.sh"


def local_dask_cluster(cpus: int, memory: int, n_workers: int = 2) -> Iterator[Any]:
    """A LocalCluster of `n_workers` worker processes of `cpus` threads (scale() adds more alike),
    each declaring `cpus` CPUs and `memory` bytes; closed when the fixture using it ends."""
    distributed = pytest.importorskip(
        "distributed", reason="the Dask backend's tests need distributed: pip install 'mpmsub[dask]'"
    )
    cluster = distributed.LocalCluster(
        n_workers=n_workers,
        threads_per_worker=cpus,
        processes=True,
        resources={"cpus": cpus, "memory": memory},
        dashboard_address=":0",
        worker_dashboard_address=":0",
    )
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """Two worker processes of 4 threads, each declaring 4 CPUs and DASK_WORKER_MEMORY."""
    yield from local_dask_cluster(DASK_WORKER_CPUS, DASK_WORKER_MEMORY)


@pytest.fixture(scope="module")
def dask_client(dask_cluster: Any) -> Iterator[Any]:
    import distributed

    with distributed.Client(dask_cluster, set_as_default=False) as client:
        yield client


def _reachable() -> bool:
    try:
        done = subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


@pytest.fixture(scope="session")
def slurm_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Optional[str]]:
    """The SLURM_CONF of a controller to use: None for the one configured here, else the
    configuration of a single node started for the session (by the first module that asks, and
    stopped when the session ends). Skips where there is no SLURM to use or start."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed here (apt-get install slurm-wlm munge; .ci/run does)")
    if os.environ.get("SLURM_CONF") and _reachable():
        yield None
        return
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip("no SLURM controller is reachable, and one can be started only as root with slurm-wlm")
    directory = tmp_path_factory.mktemp("slurm")
    # Four CPUs (on two cores) let the tests' short jobs run four at a time.
    env = dict(os.environ, NODE_CPUS="4")
    done = subprocess.run(
        ["bash", str(NODE), "start", str(directory)], capture_output=True, text=True, timeout=120, env=env
    )
    if done.returncode != 0:
        subprocess.run(["bash", str(NODE), "stop", str(directory)], capture_output=True, timeout=120)
        pytest.fail(f"the test SLURM did not start: {done.stderr[-2000:]}")
    try:
        yield str(directory / "slurm.conf")
    finally:
        subprocess.run(["bash", str(NODE), "stop", str(directory)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def slurm(slurm_node: Optional[str]) -> Iterator[None]:
    """A SLURM controller, reached through SLURM_CONF while the module's tests run (the node
    started for the session lives on for the next module that asks)."""
    if slurm_node is None:
        yield
        return
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_node
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
