"""GPUs and named resources under SLURM: what sbatch is asked for (`--gres=gpu:N`,
`--licenses=NAME:N`), what sinfo's gres and scontrol's licenses are read as, what is refused at
submit, and on the test node (tests/support/slurm/node.sh: no GPU, a license `licence` of two
seats) the refusals and the licence's count for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, List, Sequence, Tuple

import pytest

import mpmsub
from mpmsub._backends import slurm as _slurm
from mpmsub._job import to_spec

MB = 2**20


class _Site(mpmsub.SlurmBackend):
    """A site's answers to sinfo and scontrol, given; no SLURM needed."""

    def __init__(self, tmp_path: Path, sinfo: str, licenses: str, licenses_status: int = 0, **options: Any) -> None:
        super().__init__(workdir=str(tmp_path / "work"), **options)
        self.answers = {"sinfo": (sinfo, 0), "scontrol": (licenses, licenses_status)}

    def command(self, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        self.calls[argv[0]] += 1
        text, status = self.answers[argv[0]]
        return subprocess.CompletedProcess(list(argv), status, text if status == 0 else "", "" if status == 0 else text)


SINFO = "n1|8|64000|gpu:a100:2(S:0-1)\nn2|16|128000|(null)\nn1|8|64000|gpu:a100:2(S:0-1)\n"
LICENSES = (
    "LicenseName=licence Total=2 Used=0 Free=2 Reserved=0 Remote=no\n"
    "LicenseName=db Total=10 Used=3 Free=7 Reserved=0 Remote=no\n"
)


def options(spec: Any, backend: mpmsub.SlurmBackend) -> Tuple[str, ...]:
    return _slurm.sbatch_options(spec, backend, kill_grace=5.0)


def test_gpus_are_a_gres_and_named_resources_are_licenses(tmp_path: Path) -> None:
    backend = mpmsub.SlurmBackend(partition="gpu", workdir=str(tmp_path), extra_args=["--gres=gpu:a100:2"])
    job = mpmsub.Job(["true"]).cpu(2).memory("1G").gpu(2).resources(licence=1, db=3)
    assert options(to_spec(job), backend) == (
        "--cpus-per-task=2",
        "--mem=1088M",
        "--gres=gpu:2",
        "--licenses=db:3,licence:1",
        "--partition=gpu",
        "--gres=gpu:a100:2",  # the site's own, last: it wins
    )
    plain = options(to_spec(mpmsub.Job(["true"])), mpmsub.SlurmBackend(workdir=str(tmp_path)))
    assert plain == ("--cpus-per-task=1",)
    # Jobs alike but for their GPUs or licenses are not one array (the options are its shape).
    one, other = (to_spec(mpmsub.Job(["true"]).resources(licence=n)) for n in (1, 2))
    assert options(one, backend) != options(other, backend)


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [
        ("(null)", 0),
        ("gpu:4", 4),
        ("gpu:a100:2(S:0-1)", 2),
        ("gpu:a100:2(S:0,1),gpu:v100:1(S:1)", 3),
        ("gpu:tesla:2,mps:200,shard:8", 2),
        ("mps:100", 0),
    ],
)
def test_the_gpus_of_sinfos_gres_column(gres: str, gpus: int) -> None:
    assert _slurm.gres_gpus(gres) == gpus


def test_nodes_and_licenses_are_read_once(tmp_path: Path) -> None:
    site = _Site(tmp_path, SINFO, LICENSES)
    assert [(node.name, dict(node.resources)) for node in site.nodes()] == [("n1", {"GPU": 2}), ("n2", {})]
    assert site.licenses() == {"licence": 2, "db": 10}
    assert site.licenses() == {"licence": 2, "db": 10}
    assert site.calls == {"sinfo": 1, "scontrol": 1}
    assert _Site(tmp_path, SINFO, "").licenses() == {}  # none configured
    assert _Site(tmp_path, SINFO, "scontrol: error: no answer", licenses_status=1).licenses() is None


def refusal(site: mpmsub.SlurmBackend, job: mpmsub.Job) -> Any:
    return site.why_never_fits(to_spec(job))


def test_what_no_node_or_license_can_give_is_refused_naming_both(tmp_path: Path) -> None:
    site = _Site(tmp_path, SINFO, LICENSES)
    assert refusal(site, mpmsub.Job(["true"]).gpu(2).resources(licence=2, db=10)) is None
    assert (
        refusal(site, mpmsub.Job(["true"]).gpu(3))
        == "it asks for 3 GPUs but no SLURM node has more than 2 (gres gpu:2)"
    )
    # Each part fits a node; together, none: n1 has the GPUs, n2 the CPUs.
    combined = refusal(site, mpmsub.Job(["true"]).gpu(1).cpu(12))
    assert combined.startswith("it needs 12 CPUs and 1 GPU on one SLURM node; the largest SLURM node: n1 offers 8")
    assert "n2 offers 16 CPUs, 125G and gres gpu:0" in combined
    assert refusal(site, mpmsub.Job(["true"]).resources(licence=3)) == (
        "it asks for 3 of resource 'licence' (sbatch --licenses=licence:3) but SLURM's license 'licence' has 2 in all"
    )
    assert refusal(site, mpmsub.Job(["true"]).resources(matlab=1)) == (
        "it asks for 1 of resource 'matlab' (sbatch --licenses=matlab:1) but SLURM has no license 'matlab' "
        "(scontrol show licenses lists db:10, licence:2)"
    )
    assert "SLURM gives a job whole GPUs (--gres=gpu:N): ask gpu(n) without memory" in refusal(
        site, mpmsub.Job(["true"]).gpu(1, memory="20G")
    )
    no_gpus = _Site(tmp_path, "n2|16|128000|(null)\n", "")
    assert refusal(no_gpus, mpmsub.Job(["true"]).gpu(1)) == "it asks for 1 GPU but no SLURM node has any"
    # Where scontrol cannot tell, sbatch decides.
    unknown = _Site(tmp_path, SINFO, "scontrol: error", licenses_status=1)
    assert refusal(unknown, mpmsub.Job(["true"]).resources(matlab=1)) is None


def test_an_executor_refuses_such_a_job_at_submit(tmp_path: Path) -> None:
    site = _Site(tmp_path, SINFO, LICENSES)
    refused = r"can never run on mpmsub.SlurmBackend.*license 'licence' has 2 in all"
    executor = mpmsub.MemoryAwareExecutor(backend=site, resources={"licence": 5}, history=False)
    with executor, pytest.raises(ValueError, match=refused):
        executor.submit(mpmsub.Job(["true"]).resources(licence=3))
    assert site.calls["sbatch"] == 0


# -- on the test node --------------------------------------------------------------------------------


@pytest.fixture
def backend(slurm: None, tmp_path: Path) -> mpmsub.SlurmBackend:
    return mpmsub.SlurmBackend(workdir=str(tmp_path / "work"), max_poll=1.0)


def test_the_test_node_refuses_gpus_and_unknown_licenses_at_submit(backend: mpmsub.SlurmBackend) -> None:
    with mpmsub.MemoryAwareExecutor(backend=backend, resources={"licence": 5, "matlab": 1}) as executor:
        with pytest.raises(ValueError, match=r"it asks for 1 GPU but no SLURM node has any"):
            executor.submit(mpmsub.Job(["true"]).gpu(1))
        with pytest.raises(ValueError, match=r"SLURM has no license 'matlab'"):
            executor.submit(mpmsub.Job(["true"]).resources(matlab=1))
    assert backend.calls["sbatch"] == 0


SPAN = "import time; print(time.time()); time.sleep(0.6); print(time.time())"


def test_jobs_holding_a_license_never_run_more_at_once_than_its_seats(backend: mpmsub.SlurmBackend) -> None:
    """Three one-CPU jobs holding one seat each of a 2-seat license on a node of four CPUs: SLURM
    runs at most two at once (the executor's own cap, 3, is no bound here)."""
    seats = (backend.licenses() or {}).get("licence")
    if seats != 2:
        pytest.skip(f"this SLURM has no license 'licence' of 2 seats (Licenses=licence:2): {backend.licenses()}")
    jobs = [mpmsub.Job([sys.executable, "-c", SPAN]).resources(licence=1) for _ in range(3)]
    with mpmsub.MemoryAwareExecutor(backend=backend, resources={"licence": 3}) as executor:
        with pytest.raises(ValueError, match=r"license 'licence' has 2 in all"):
            executor.submit(mpmsub.Job(["true"]).resources(licence=3))
        results = [future.result(timeout=120) for future in [executor.submit(job) for job in jobs]]
    periods: List[Tuple[float, float]] = []
    for result in results:
        assert result.success, result.error
        assert result.resources == {"licence": 1}
        start, end = (float(word) for word in str(result.stdout).split())
        periods.append((start, end))
    most = max(sum(1 for s, e in periods if s <= start < e) for start, _ in periods)
    assert most <= 2, periods


@pytest.mark.parametrize(
    ("value", "ids"),
    [(None, None), ("0,1", [0, 1]), ("3", [3]), ("", []), ("NoDevFiles", None), ("GPU-8a2c1e0f,GPU-11", None)],
)
def test_the_devices_a_runner_or_worker_was_granted(value: Any, ids: Any) -> None:
    """CUDA_VISIBLE_DEVICES as SLURM sets it for --gres (or a Dask worker was started with):
    ids; unset, or devices named otherwise: None (every device found there)."""
    from mpmsub._backends.node import granted_gpus

    assert granted_gpus({} if value is None else {"CUDA_VISIBLE_DEVICES": value}) == ids
