"""GPU devices and named resources with real processes: which devices each job sees (a fake
`nvidia-smi` lists four), no device double-booked, devices shared by GPU memory, a GPU head's
reservation, named pools, the refusals, and GPU memory measured per process tree (through a
stand-in for NVML: the job's processes say what they hold, as CUDA's allocations would)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from support.fake_nvidia_smi import A100_MIB, fake_gpus_on_path, fake_uuid
from support.fake_pynvml import ALLOCATE, install_fake_nvml

import mpmsub
from mpmsub._job import to_spec
from mpmsub._learn.history import History, row
from mpmsub._report.trace import read as read_trace

MB = 2**20
GiB = 2**30


def _booking(directory: Path, most: int, hold: float = 0.3) -> List[str]:
    """A job that marks each of its devices taken while it runs (a file per job in a directory
    per device) and fails if it finds more than `most` jobs on one; it prints its devices."""
    script = f"""
for d in $(echo "$CUDA_VISIBLE_DEVICES" | tr , ' '); do mkdir -p {directory}/$d; touch {directory}/$d/$$; done
over=""
for d in $(echo "$CUDA_VISIBLE_DEVICES" | tr , ' '); do
    [ "$(ls {directory}/$d | wc -l)" -le {most} ] || over="$over $d"
done
sleep {hold}
for d in $(echo "$CUDA_VISIBLE_DEVICES" | tr , ' '); do rm {directory}/$d/$$; done
[ -z "$over" ] || {{ echo "double-booked:$over"; exit 1; }}
echo "$CUDA_VISIBLE_DEVICES"
"""
    return ["sh", "-c", script]


def test_each_job_sees_only_its_own_devices_and_none_is_double_booked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    booked = tmp_path / "booked"
    with mpmsub.MemoryAwareExecutor(cpus=6, memory="2G") as executor:
        futures = [executor.submit(mpmsub.Job(_booking(booked, 1)).gpu(1 + i % 2)) for i in range(12)]
        results = [f.result(timeout=60) for f in futures]
    for i, result in enumerate(results):
        assert result.success, (result.stdout, result.error)
        seen = tuple(int(d) for d in result.stdout.strip().split(","))
        assert seen == result.gpus and len(seen) == 1 + i % 2 and set(seen) <= {0, 1, 2, 3}


def test_a_job_gets_the_environment_of_its_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    printed = "echo $CUDA_VISIBLE_DEVICES/$NVIDIA_VISIBLE_DEVICES/$CUDA_DEVICE_ORDER/${HIP_VISIBLE_DEVICES-unset}"
    with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G") as executor:
        detected = executor.submit(mpmsub.Job(["sh", "-c", printed]).gpu(2)).result(timeout=30)
        plain = executor.submit(["sh", "-c", printed]).result(timeout=30)
    assert detected.stdout == "0,1/0,1/PCI_BUS_ID/unset\n" and detected.gpus == (0, 1)
    assert plain.stdout == "///unset\n" and plain.gpus == ()  # a job that asks for none is left alone
    with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", gpus=[2, 3]) as executor:  # ids given
        given = executor.submit(mpmsub.Job(["sh", "-c", printed]).gpu(1)).result(timeout=30)
    assert given.stdout == "2/2/PCI_BUS_ID/unset\n" and given.gpus == (2,)


def test_jobs_share_a_device_while_their_gpu_memory_fits_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Two devices of 40G: three 12G jobs fit on each, never four; a whole-device job shares with none.
    fake_gpus_on_path(monkeypatch, tmp_path, [(0, fake_uuid(0), 40960), (1, fake_uuid(1), 40960)])
    shares, wholes = tmp_path / "shares", tmp_path / "wholes"
    with mpmsub.MemoryAwareExecutor(cpus=8, memory="2G", schedule="greedy") as executor:
        small = [executor.submit(mpmsub.Job(_booking(shares, 3, 0.5)).gpu(1, memory="12G")) for _ in range(9)]
        whole = [executor.submit(mpmsub.Job(_booking(wholes, 1, 0.2)).gpu(1)) for _ in range(2)]
        results = [f.result(timeout=60) for f in small + whole]
    assert all(r.success for r in results), [(r.stdout, r.error) for r in results if not r.success]
    starts = sorted(results[:9], key=lambda r: r.start_time)
    assert len({r.gpus for r in starts[:6]}) == 2  # six at once, three on each device
    assert all(r.gpu_memory_requested == 12 * 1024 for r in results[:9])
    # No whole-device job ran beside a share of its device.
    for w in results[9:]:
        for s in results[:9]:
            if s.gpus == w.gpus:
                assert s.end_time <= w.start_time + 0.05 or w.end_time <= s.start_time + 0.05


def test_a_gpu_head_job_keeps_its_reservation_from_later_gpu_jobs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two devices, one held by a long job: a job needing both waits, and a later one-device job
    does not take the free device before it (it would delay the head); a job without GPUs does."""
    fake_gpus_on_path(monkeypatch, tmp_path, [(0, fake_uuid(0), A100_MIB), (1, fake_uuid(1), A100_MIB)])
    go = tmp_path / "go"
    with mpmsub.MemoryAwareExecutor(cpus=4, memory="2G", schedule="fifo") as executor:
        long = executor.submit(mpmsub.Job(["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done"]).gpu(1))
        while executor.status().running < 1:
            time.sleep(0.02)
        head = executor.submit(mpmsub.Job(["true"]).gpu(2).with_id("head"))
        later = executor.submit(mpmsub.Job(["true"]).gpu(1).with_id("later"))
        cpu_only = executor.submit(mpmsub.Job(["true"]).with_id("cpu-only"))
        assert cpu_only.result(timeout=30).success  # backfilled beside the head
        time.sleep(0.3)
        assert not head.done() and not later.done()
        go.touch()
        results = [f.result(timeout=30) for f in (long, head, later)]
    assert all(r.success for r in results)
    assert results[1].gpus == (0, 1) and results[2].start_time >= results[1].start_time


def test_named_resources_are_counted_like_cpus(tmp_path: Path) -> None:
    seats = tmp_path / "seats"
    with mpmsub.MemoryAwareExecutor(cpus=6, memory="2G", resources={"licence": 2}) as executor:
        job = (
            f"mkdir -p {seats}; touch {seats}/$$; n=$(ls {seats} | wc -l); sleep 0.3; rm {seats}/$$; "
            '[ "$n" -le 2 ] || { echo "$n seats"; exit 1; }'
        )
        futures = [executor.submit(mpmsub.Job(["sh", "-c", job]).resources(licence=1)) for _ in range(6)]
        results = [f.result(timeout=60) for f in futures]
    assert all(r.success for r in results), [r.stdout for r in results]
    assert all(r.resources == {"licence": 1} for r in results)
    # Six jobs of 0.3 s on two seats: at least three rounds, whatever the six CPUs allow.
    wall = max(r.end_time for r in results) - min(r.start_time for r in results)
    assert wall >= 0.85


def test_refusals_name_what_is_asked_and_what_there_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", resources={"licence": 2}) as executor:
        refusals = {
            "5 GPUs but the executor has 4 GPUs": mpmsub.Job(["true"]).gpu(5),
            "90G on a GPU but the executor's largest GPU has 79.6G": mpmsub.Job(["true"]).gpu(1, memory="90G"),
            "resource 'seat' but the executor has none (its resources: licence 2)": mpmsub.Job(["true"]).resources(
                seat=1
            ),
            "3 of resource 'licence' but the executor has 2": mpmsub.Job(["true"]).resources(licence=3),
        }
        for message, job in refusals.items():
            with pytest.raises(ValueError, match="can never run on this executor") as caught:
                executor.submit(job)
            assert message in str(caught.value)
        with pytest.raises(ValueError, match="give GPUs to a command"):
            executor.submit(mpmsub.Call(print).gpu(1))
    bad_inputs = [
        (lambda: mpmsub.Job(["true"]).gpu(-1), "invalid gpus (number of GPUs) -1"),
        (lambda: mpmsub.Job(["true"]).gpu(1.5), "invalid gpus (number of GPUs) 1.5"),  # type: ignore[arg-type]
        (lambda: mpmsub.Job(["true"]).resources(licence=0), "invalid count of resource 'licence' 0"),
        (lambda: mpmsub.Job(["true"]).gpu(0, memory="1G"), "is given for 0 GPUs"),
        (lambda: mpmsub.MemoryAwareExecutor(gpus=[7]), "GPU device 7 does not exist"),
        (lambda: mpmsub.MemoryAwareExecutor(resources={"cpus": 2}), "invalid resource name 'cpus'"),
        (lambda: mpmsub.MemoryAwareExecutor(resources={"licence": -2}), "invalid count of resource 'licence' -2"),
    ]
    for make, message in bad_inputs:
        with pytest.raises((ValueError, TypeError)) as caught:
            make()
        assert message in str(caught.value)


def test_a_machine_without_gpus_refuses_a_gpu_job_at_submit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi to be found
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with mpmsub.MemoryAwareExecutor(cpus=1, memory="1G") as executor:
        with pytest.raises(ValueError, match="it asks for 1 GPU but the executor has 0 GPUs"):
            executor.submit(mpmsub.Job(["true"]).gpu(1))
        assert executor.submit(["/bin/true"]).result(timeout=30).success


def test_gpu_memory_is_measured_per_process_tree_and_strict_stops_a_job_over_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    held = tmp_path / "gpu-memory"
    install_fake_nvml(monkeypatch, held, devices=4, memory=A100_MIB * MB)
    trace = tmp_path / "trace.jsonl"

    def allocating(mb: int, seconds: float) -> List[str]:  # the allocation is the shell's child's
        return ["sh", "-c", f"\"{sys.executable}\" -c '{ALLOCATE}' {held} {mb} {seconds}; true"]

    with mpmsub.MemoryAwareExecutor(cpus=3, memory="2G", trace=trace) as executor:
        measured = executor.submit(mpmsub.Job(allocating(500, 1.0)).gpu(1, memory="1G"))
        beside = executor.submit(mpmsub.Job(allocating(200, 1.0)).gpu(1, memory="1G"))
        strict = executor.submit(mpmsub.Job(allocating(3000, 3.0)).gpu(1, memory="1G", strict=True))
        results = [f.result(timeout=60) for f in (measured, beside, strict)]
    assert results[0].success and results[1].success
    # Its own processes' figure (the job beside it on the same device is not counted), the peak
    # of the five steps: 400M or 500M, as the last sample before the release fell.
    assert 400 <= (results[0].gpu_memory_used or 0) <= 500
    assert 160 <= (results[1].gpu_memory_used or 0) <= 200
    assert results[2].failure == "memory" and "exceeded its GPU memory" in (results[2].error or "")
    assert "over the 1024M it reserved (gpu strict)" in (results[2].error or "")
    ends = {e["job"]: e for e in read_trace(trace) if e["type"] == "end"}
    starts = {e["job"]: e for e in read_trace(trace) if e["type"] == "start"}
    first = results[0].job_id
    assert ends[first]["gpus"] == list(results[0].gpus) and ends[first]["gpu_peak"] > 400 * MB
    assert starts[first]["gpu_memory"] == GiB and starts[first]["gpus"] == list(results[0].gpus)


def test_the_command_line_gives_gpus_and_resources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"cmd": "echo one $CUDA_VISIBLE_DEVICES", "gpus": 2})
        + "\n"
        + json.dumps({"cmd": "echo two $CUDA_VISIBLE_DEVICES", "resources": {"licence": 1}})
        + "\n"
        + json.dumps({"cmd": "echo three $CUDA_VISIBLE_DEVICES"})
        + "\n"
    )
    run = [sys.executable, "-m", "mpmsub", "run", "-q", "-k", "--resources", "licence=1"]
    done = subprocess.run(
        [*run, "--job-gpus", "1", str(jobs)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    lines = [line.split(" ") for line in done.stdout.splitlines()]
    assert [(word, len(ids.split(","))) for word, ids in lines] == [("one", 2), ("two", 1), ("three", 1)]
    template = [
        *run,
        "--job-res",
        "licence=1",
        "--job-gpus",
        "1",
        "--job-gpu-mem",
        "30G",
        "echo {} $CUDA_VISIBLE_DEVICES",
    ]
    done = subprocess.run([*template, ":::", "a", "b"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.splitlines() == ["a 0", "b 0"], done.stderr  # shares of one
    for bad, message in [
        (["--job-gpus=-1"], "invalid job gpus '-1'"),
        (["--job-res", "licence"], "expected NAME=COUNT"),
        (["--gpus", "0,9"], "GPU device 9 does not exist"),
        (["--job-res", "seat=1"], "resource 'seat' but the executor has none"),
    ]:
        done = subprocess.run(
            [*run, *bad, "true", ":::", "x"], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert done.returncode == 2 and message in done.stderr, (bad, done.stderr)


def test_gpu_memory_auto_learns_from_the_measured_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """gpu(1, memory="auto"): a whole device while its key has no measured run; then the
    estimate of the measured GPU peaks (the run history's rule: peak plus 10% and 16M)."""
    fake_gpus_on_path(monkeypatch, tmp_path)
    held = tmp_path / "gpu-memory"
    install_fake_nvml(monkeypatch, held, devices=4, memory=A100_MIB * MB)
    command = ["sh", "-c", f"\"{sys.executable}\" -c '{ALLOCATE}' {held} 500 1.0"]
    results = []
    for _ in range(2):
        with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", history=tmp_path / "history.db") as executor:
            job = mpmsub.Job(command).gpu(1, memory="auto").with_key("basecaller")
            results.append(executor.submit(job).result(timeout=60))
    first, second = results
    assert first.success and first.gpu_memory_requested is None  # never measured: a whole device
    assert 400 <= (first.gpu_memory_used or 0) <= 500
    assert second.gpu_memory_requested == pytest.approx(first.gpu_memory_used * 1.1 + 16, abs=1)
    with History(str(tmp_path / "history.db")) as history:  # (closed: an open one warns on 3.13)
        rows = list(history.rows("basecaller"))
    assert [row["gpu_peak_bytes"] // MB for row in rows] == [int(r.gpu_memory_used or 0) for r in results]


def test_gpu_memory_auto_keeps_room_for_a_rare_peak(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A GPU memory estimate keeps the usual neighbours and rise: a job stopped for its GPU
    memory is no m="auto" miss sent straight to its key's highest peak, so a key whose runs took
    about 100M of GPU memory, once 1000M among the smallest inputs, reserves the 1000M."""
    fake_gpus_on_path(monkeypatch, tmp_path)
    held = tmp_path / "gpu-memory"
    install_fake_nvml(monkeypatch, held, devices=4, memory=A100_MIB * MB)
    with History(str(tmp_path / "history.db")) as history:
        gpu_peaks = [(1000 if i == 4 else 100 + i % 3) * MB for i in range(30)]
        rows = [row("rare", ["t"], (i + 1) * MB, 50 * MB, 1.0, 1.0, 0, None, None, p) for i, p in enumerate(gpu_peaks)]
        history.add(rows)
    command = ["sh", "-c", f"\"{sys.executable}\" -c '{ALLOCATE}' {held} 50 0.1"]
    with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", history=tmp_path / "history.db") as executor:
        result = executor.submit(mpmsub.Job(command).gpu(1, memory="auto").with_key("rare")).result(timeout=60)
    assert result.success and (result.gpu_memory_requested or 0) >= 1000, result.gpu_memory_requested


BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"


def _real_gpu() -> str:
    """Why the real-GPU test cannot run here ('' where it can)."""
    import ctypes.util

    from mpmsub._launch.gpus import detect

    if importlib.util.find_spec("pynvml") is None:
        return "nvidia-ml-py (pynvml) is not installed: pip install 'mpmsub[gpu]'"
    if not detect():
        return "no NVIDIA GPU here (neither NVML nor nvidia-smi lists a device)"
    if ctypes.util.find_library("cuda") is None:
        return "no libcuda to allocate with"
    return ""


@pytest.mark.skipif(bool(_real_gpu()), reason=_real_gpu() or "a GPU is here")
def test_on_a_real_gpu_nvml_measures_what_a_job_allocated() -> None:
    """A job that allocates 512M with the driver's own library (cuMemAlloc): NVML's figure for
    its tree is at least that, and at most 1G more (its CUDA context)."""
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)  # the benchmark's own allocation, by the driver's library
    allocate = gpu_check.ALLOCATE["libcuda"].format(size=512 * 2**20, hold=2)
    with mpmsub.MemoryAwareExecutor(cpus=1) as executor:
        result = executor.submit(mpmsub.Job([sys.executable, "-c", allocate]).gpu(1, memory="4G")).result(timeout=120)
    assert result.success, result.stderr
    assert result.gpus and 512 <= (result.gpu_memory_used or 0) <= 512 + 1024


def test_gpu_memory_is_held_to_each_device_and_a_strict_stop_grows_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gpu(2, memory=...) reserves that much on each of two devices: the figure measured and held
    to it is the busiest device's, not the sum. A job over its share is stopped and retried with
    its GPU memory grown (memory_growth), its m untouched. NVML is let go with the executor."""
    fake_gpus_on_path(monkeypatch, tmp_path)
    held = tmp_path / "gpu-memory"
    nvml = install_fake_nvml(monkeypatch, held, devices=4, memory=A100_MIB * MB)
    trace = tmp_path / "trace.jsonl"

    def allocating(mb: int, seconds: float) -> List[str]:
        return ["sh", "-c", f"\"{sys.executable}\" -c '{ALLOCATE}' {held} {mb} {seconds}; true"]

    with mpmsub.MemoryAwareExecutor(cpus=2, memory="2G", trace=trace) as executor:
        pair = executor.submit(mpmsub.Job(allocating(600, 1.0)).gpu(2, memory="1G", strict=True))
        grown = executor.submit(mpmsub.Job(allocating(1500, 1.5)).gpu(1, memory="1G", strict=True).with_retries(1))
        pair_result, grown_result = pair.result(timeout=60), grown.result(timeout=60)
    assert pair_result.success and len(pair_result.gpus) == 2, pair_result.error
    assert 480 <= (pair_result.gpu_memory_used or 0) <= 600  # on each device, as reserved
    assert grown_result.success and grown_result.attempts == 2, grown_result.error
    assert grown_result.gpu_memory_requested == 2048 and grown_result.memory_requested is None
    assert nvml.calls["init"] == nvml.calls["shutdown"] > 0
    # Found after the trace's header was written (a job first asked): a line of their own.
    (found,) = [e for e in read_trace(trace) if e["type"] == "gpus"]
    assert [d["id"] for d in found["gpus"]] == [0, 1, 2, 3]
    from mpmsub._report.html import load

    assert len(load(read_trace(trace)).header["gpus"]) == 4


def test_a_cluster_finds_its_devices_when_a_job_first_asks_in_any_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run without GPU jobs asks nvidia-smi nothing; a later job asking for one is placed."""
    smi = fake_gpus_on_path(monkeypatch, tmp_path)
    asked = tmp_path / "asked"
    smi.write_text(smi.read_text().replace("#!/bin/sh\n", f"#!/bin/sh\necho >> {asked}\n", 1))
    p = mpmsub.cluster(p=2, m="1G", verbose=False, progress_bar=False)
    p.jobs.append(["true"])
    p.run()
    assert not asked.exists()
    p.jobs.append(mpmsub.Job(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]).gpu(2))
    p.run()
    assert p.completed_jobs[-1].stdout == "0,1\n" and asked.read_text().count("\n") == 1


def test_gpu_options_that_ask_for_nothing_give_nothing() -> None:
    assert mpmsub.Job(["true"], gpu_strict=False).spec().gpus == 0
    assert to_spec({"cmd": ["true"], "gpu_strict": False}).gpus == 0
    with pytest.raises(ValueError, match="invalid gpu memory 0: a share of a device is above 0"):
        mpmsub.Job(["true"]).gpu(1, memory=0)
    with pytest.raises(TypeError, match="resources must be a mapping of names to counts; got 'licence=2'"):
        mpmsub.MemoryAwareExecutor(resources="licence=2")  # type: ignore[arg-type]


def test_a_gpu_share_on_the_command_line_asks_for_one_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    run = [sys.executable, "-m", "mpmsub", "run", "-q"]
    done = subprocess.run(
        [*run, "--job-gpu-mem", "10G", "echo $CUDA_VISIBLE_DEVICES", ":::", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == "0 x\n", done.stderr  # (the value is appended)
    done = subprocess.run(
        [*run, "--job-gpus", "0", "--job-gpu-mem", "10G", "true", ":::", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        done.returncode == 2 and "--job-gpu-mem 10G is a share of each job's GPUs, and --job-gpus is 0" in done.stderr
    )
