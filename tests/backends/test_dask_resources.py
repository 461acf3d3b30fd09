"""GPUs and named resources on Dask: a cluster of two worker processes, one declaring two GPUs (a
fake nvidia-smi on its PATH lists four devices, its CUDA_VISIBLE_DEVICES grants it 1 and 3) and
one seat of a licence, the other neither."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from support.fake_nvidia_smi import install_fake_nvidia_smi

import mpmsub
from mpmsub._backends.dask import task_resources
from mpmsub._job import to_spec

distributed = pytest.importorskip(
    "distributed", reason="the Dask backend's tests need distributed: pip install 'mpmsub[dask]'"
)

MB = 2**20
GPU_WORKER = {"cpus": 4, "memory": 300 * MB, "GPU": 2, "licence": 1}
PLAIN_WORKER = {"cpus": 4, "memory": 600 * MB}
SPAN = "import time; print(time.time()); time.sleep(0.4); print(time.time())"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    fake = install_fake_nvidia_smi(tmp_path_factory.mktemp("gpu") / "bin")  # devices 0-3
    gpu_env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "1,3"}

    def worker(resources: Dict[str, int], env: Dict[str, str]) -> Dict[str, Any]:
        options = {"nthreads": 4, "resources": resources, "env": env, "dashboard_address": ":0"}
        return {"cls": distributed.Nanny, "options": options}

    spec = distributed.SpecCluster(
        scheduler={"cls": distributed.Scheduler, "options": {"dashboard_address": ":0"}},
        workers={"gpu": worker(GPU_WORKER, gpu_env), "plain": worker(PLAIN_WORKER, {})},
    )
    try:
        yield spec
    finally:
        spec.close()


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(2)
        # Detection asks NVML first: where nvidia-ml-py is installed it would see the real devices.
        client.run(exec, "import sys; sys.modules['pynvml'] = None", {})
        yield client


@pytest.fixture
def backend(client: Any) -> mpmsub.DaskBackend:
    return mpmsub.DaskBackend(client)


def address(client: Any, name: str) -> str:
    workers = mpmsub.DaskBackend(client)._scheduler_info()["workers"]  # every worker, in any release
    return str(next(where for where, worker in workers.items() if worker["name"] == name))


def spans(results: List[mpmsub.JobResult]) -> List[Tuple[float, float]]:
    for result in results:
        assert result.success, result.error
    return [(float(str(r.stdout).split()[0]), float(str(r.stdout).split()[1])) for r in results]


def most_at_once(periods: List[Tuple[float, float]]) -> int:
    return max(sum(1 for s, e in periods if s <= start < e) for start, _ in periods)


def test_a_task_asks_dask_for_its_whole_resource_set() -> None:
    spec = to_spec(mpmsub.Job(["true"]).memory("100M").cpu(2).gpu(1).resources(licence=1, db=2))
    assert task_resources(spec) == {"cpus": 2, "memory": 100 * MB, "GPU": 1, "db": 2, "licence": 1}
    assert task_resources(to_spec(["true"])) == {"cpus": 1, "memory": 0}


def test_workers_declare_gpus_and_named_resources(backend: mpmsub.DaskBackend, client: Any) -> None:
    nodes = {node.name: node for node in backend.nodes(fresh=True)}
    assert dict(nodes[address(client, "gpu")].resources) == {"GPU": 2, "licence": 1}
    assert dict(nodes[address(client, "plain")].resources) == {}


def test_a_named_resource_runs_only_where_declared_one_seat_at_a_time(backend: mpmsub.DaskBackend, client: Any) -> None:
    """Three jobs holding the worker's one licence seat, in one round with plain jobs of the same
    size: Dask runs them on that worker only, one after another (the executor's own cap, 3, is
    no bound here)."""
    licensed = [mpmsub.Job([sys.executable, "-c", SPAN]).resources(licence=1) for _ in range(3)]
    plain = [mpmsub.Job([sys.executable, "-c", SPAN]) for _ in range(3)]
    with mpmsub.MemoryAwareExecutor(backend=backend, resources={"licence": 3}) as executor:
        futures = [executor.submit(job) for job in licensed + plain]
        results = [future.result(timeout=60) for future in futures]
    assert {result.host for result in results[:3]} == {address(client, "gpu")}
    assert most_at_once(spans(results[:3])) == 1
    assert [result.resources for result in results] == [{"licence": 1}] * 3 + [{}] * 3
    spans(results[3:])  # the plain ones ran too, wherever Dask put them


def test_an_executor_not_given_a_resource_leaves_it_to_the_workers(backend: mpmsub.DaskBackend) -> None:
    """Without resources=, the executor does not count the licence: Dask does, by the workers'."""
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        futures = [executor.submit(mpmsub.Job([sys.executable, "-c", SPAN]).resources(licence=1)) for _ in range(2)]
        results = [future.result(timeout=60) for future in futures]
    assert most_at_once(spans(results)) == 1 and all(r.resources == {"licence": 1} for r in results)


def test_what_no_worker_declares_is_refused_at_submit_naming_both(backend: mpmsub.DaskBackend) -> None:
    with mpmsub.MemoryAwareExecutor(cpus=8, memory="1G", backend=backend, resources={"licence": 4}) as ex:
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"it asks for 3 GPUs but no Dask worker declares more than 2 \(GPU=2\)"):
            ex.submit(mpmsub.Job(["true"]).gpu(3))
        with pytest.raises(ValueError, match=r"2 of resource 'licence' but no Dask worker declares more than 1"):
            ex.submit(mpmsub.Job(["true"]).resources(licence=2))
        with pytest.raises(ValueError, match=r"1 of resource 'db' but no Dask worker declares it"):
            ex.submit(mpmsub.Job(["true"]).resources(db=1))
        with pytest.raises(ValueError, match=r"on Dask a job gets whole GPUs .*: ask gpu\(n\) without memory"):
            ex.submit(mpmsub.Job(["true"]).gpu(1, memory="20G"))
        # Each fits some worker; together, none: the GPU worker has too little memory.
        with pytest.raises(ValueError, match=r"needs 1 CPU, 400M and 1 GPU on one Dask worker; .* 300M and GPU=2"):
            ex.submit(mpmsub.Job(["true"]).memory("400M").gpu(1))
        assert time.monotonic() - started < 5


def test_a_gpu_job_gets_devices_of_its_worker_named_in_its_environment(
    backend: mpmsub.DaskBackend, client: Any
) -> None:
    """The worker's executor picks among the worker's devices (1 and 3 of the four its nvidia-smi
    lists): two one-GPU jobs at once get one each; a two-GPU job gets both."""
    show = (
        "import os, time; start = time.time(); time.sleep(0.5);"
        " print(os.environ['CUDA_VISIBLE_DEVICES'], start, time.time())"
    )
    with mpmsub.MemoryAwareExecutor(backend=backend) as executor:
        ones = [executor.submit(mpmsub.Job([sys.executable, "-c", show]).gpu(1)) for _ in range(2)]
        results = [future.result(timeout=60) for future in ones]
        both = executor.submit(mpmsub.Job([sys.executable, "-c", show]).gpu(2)).result(timeout=60)
    for result in [*results, both]:
        assert result.success, result.error
        assert result.host == address(client, "gpu")
        assert result.gpus == tuple(int(device) for device in str(result.stdout).split()[0].split(","))
    (_, start0, end0), (_, start1, end1) = (str(result.stdout).split() for result in results)
    if float(start0) < float(end1) and float(start1) < float(end0):  # at once (Dask's GPU=2 lets them)
        assert sorted(result.gpus for result in results) == [(1,), (3,)]
    assert {result.gpus for result in results} <= {(1,), (3,)}
    assert both.gpus == (1, 3)
