"""GPUs and named resources where users look: `status()` and `running()` while jobs hold them,
the progress line, the summary, `run --json`, `mpmsub ps`, and the HTML report of a trace.
Real processes, each waiting for a file the test creates, so that what runs is known."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, TypeVar

import pytest
from support.fake_nvidia_smi import failing_gpus_on_path, fake_gpus_on_path

import mpmsub
from mpmsub._cli import control
from mpmsub._report import text as _text
from mpmsub._report.html import load, summary_rows, write_report
from mpmsub._result import JobResult
from mpmsub._units import MB

SCRIPT = Path(sys.executable).with_name("mpmsub")
GIB = 1024 * MB
T = TypeVar("T")


@pytest.fixture(autouse=True)
def four_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In this process, the machine's GPUs are four fake ones of 81559 MiB (a real GPU machine's
    would refuse `gpus=4`); the `mpmsub` commands started see the real ones, and ask for one."""
    fake_gpus_on_path(monkeypatch, tmp_path)


def waiting(go: Path) -> List[str]:
    """A command that runs until `go` exists."""
    return ["sh", "-c", f'while [ ! -e "{go}" ]; do sleep 0.02; done']


def eventually(look: Callable[[], T], ok: Callable[[T], bool], timeout: float = 20) -> T:
    deadline = time.monotonic() + timeout
    while True:
        seen = look()
        if ok(seen):
            return seen
        assert time.monotonic() < deadline, f"never came to pass: {seen!r}"
        time.sleep(0.02)


def test_status_and_running_show_the_gpus_and_named_resources_held(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with mpmsub.MemoryAwareExecutor(cpus=4, memory="1G", gpus=4, resources={"licence": 2, "scratch": 3}) as ex:
        idle = ex.status()
        assert idle.reserved_resources == {"licence": 0, "scratch": 0} and idle.gpus_in_use == ()
        two = ex.submit(mpmsub.Job(waiting(go)).gpu(2).resources(licence=1).with_id("two"))
        one = ex.submit(mpmsub.Job(waiting(go)).gpu(1).resources(licence=1, scratch=2).with_id("one"))
        plain = ex.submit(mpmsub.Job(waiting(go)).with_id("plain"))
        status = eventually(ex.status, lambda s: s.running == 3)
        assert status.reserved_resources == {"licence": 2, "scratch": 2}
        assert status.gpus_in_use == (0, 1, 2)
        jobs = {job.job_id: job for job in eventually(ex.running, lambda jobs: len(jobs) == 3)}
        assert jobs["plain"].gpus == () and jobs["plain"].resources == {}
        assert jobs["one"].resources == {"licence": 1, "scratch": 2} and len(jobs["one"].gpus) == 1
        assert jobs["two"].resources == {"licence": 1} and len(jobs["two"].gpus) == 2
        assert sorted(jobs["one"].gpus + jobs["two"].gpus) == [0, 1, 2]
        go.touch()
        results = [future.result(timeout=20) for future in (two, one, plain)]
        assert [r.gpus for r in results] == [jobs["two"].gpus, jobs["one"].gpus, ()]
        done = ex.status()
        assert done.reserved_resources == {"licence": 0, "scratch": 0} and done.gpus_in_use == ()


def test_a_device_shared_by_two_jobs_is_in_use_once(tmp_path: Path) -> None:
    go = tmp_path / "go"  # the four fake devices are detected, with their memory, at the first GPU job
    with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        assert ex.status().reserved_resources == {} and ex.status().gpus_in_use == ()
        futures = [ex.submit(mpmsub.Job(waiting(go)).gpu(1, memory="30G")) for _ in range(2)]
        status = eventually(ex.status, lambda s: s.running == 2)
        assert status.gpus_in_use == (0,)
        assert [job.gpus for job in ex.running()] == [(0,), (0,)]
        go.touch()
        assert [f.result(timeout=20).gpu_memory_requested for f in futures] == [30 * 1024, 30 * 1024]


def test_the_progress_line_counts_gpus_and_named_resources_like_cpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    go = tmp_path / "go"
    cluster = mpmsub.cluster(p=2, m="1G", gpus=4, resources={"licence": 2}, verbose=False)
    cluster.jobs.append(mpmsub.Job(waiting(go)).gpu(2).resources(licence=1))
    cluster.jobs.append(mpmsub.Job(["sh", "-c", f'sleep 1.2; touch "{go}"']))
    cluster.run()
    lines = capsys.readouterr().err.splitlines()
    assert any("| gpu 2/4, licence 1/2" in line for line in lines), lines  # while the GPU job ran
    assert "| gpu 0/4, licence 0/2" in lines[-1]


def test_the_progress_line_of_a_cluster_without_gpus_or_pools_says_nothing_of_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failing_gpus_on_path(monkeypatch, tmp_path / "none")  # a machine without GPUs
    plain = mpmsub.cluster(p=1, m="1G", verbose=False)
    plain.jobs.append(["true"])
    plain.run()
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("[") and "1/1" in line and "gpu" not in line and " | running 0 (0B reserved)" in line


def result(job_id: str, **fields: Any) -> JobResult:
    return JobResult(job_id, ["tool", job_id], 0, "", "", 1.5, 40.0, 1.0, 0.0, 1.5, **fields)


def test_the_summary_names_the_gpus_and_pools_and_a_gpu_column_only_when_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = mpmsub.cluster(p=2, m="1G", gpus=[1, 3], resources={"licence": 2}, progress_bar=False, verbose=False)
    cluster.jobs.append(mpmsub.Job(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]).gpu(1).resources(licence=2))
    cluster.run()
    cluster.print_summary()
    out = capsys.readouterr().out
    assert "  resources: 2 CPUs, 1G memory, 2 GPUs, licence 2\n" in out
    assert "  GPUs:      1 job(s) held GPUs (devices 1)" in out
    assert "GPU MB" not in out  # measured with NVML alone: none here
    stats = cluster.stats["cluster"]
    assert (stats["gpus"], stats["resources"]) == (2, {"licence": 2})

    results = [
        result("gpu_job", gpus=(0, 1), gpu_memory_requested=20480.0, gpu_memory_used=812.4),
        result("cpu_job"),
    ]
    stats = _text.job_stats(results, cpus=8, memory=32 * GIB, wall_time=2.0, gpus=4, resources={"licence": 2})
    text = _text.summary_text(stats, results)
    assert "  resources: 8 CPUs, 32G memory, 4 GPUs, licence 2\n" in text
    assert "largest GPU memory peak 812.4 MB (gpu_job)" in text
    table = text[text.index("\njob ") + 1 :].splitlines()
    assert table[0].split()[:7] == ["job", "status", "runtime", "peak", "MB", "asked", "MB"]
    assert "GPU MB" in table[0]
    rows = {row.split()[0]: row.split() for row in table[1:]}
    assert rows["gpu_job"][5] == "812.4" and rows["cpu_job"][5] == "-"
    bare = _text.summary_text(_text.job_stats(results[1:], cpus=1, memory=GIB, wall_time=1.0), results[1:])
    assert "  resources: 1 CPU, 1G memory\n" in bare and "GPU" not in bare


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_run_json_gives_each_jobs_gpus_and_resources(tmp_path: Path) -> None:
    (tmp_path / "jobs.txt").write_text("echo $CUDA_VISIBLE_DEVICES\n")
    out = cli(
        "run", "jobs.txt", "--gpus", "1", "--resources", "licence=1", "--job-gpus", "1", "--job-res", "licence=1",
        "--json", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    (row,) = answer["results"]
    assert (row["gpus"], row["resources"]) == ([0], {"licence": 1}) and "gpu_memory_used" in row
    assert (answer["stats"]["cluster"]["gpus"], answer["stats"]["cluster"]["resources"]) == (1, {"licence": 1})


def test_ps_shows_what_a_job_holds_beside_cpus_and_memory(tmp_path: Path) -> None:
    go = tmp_path / "go"
    (tmp_path / "jobs.jsonl").write_text(
        json.dumps({"cmd": waiting(go), "gpus": 1, "resources": {"licence": 1}, "id": "held"})
        + "\n"
        + json.dumps({"cmd": waiting(go), "id": "bare"})
        + "\n"
    )
    run = subprocess.Popen(
        [str(SCRIPT), "run", "jobs.jsonl", "--gpus", "1", "--resources", "licence=1", "-p", "2", "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ps = ["ps", "--run", str(run.pid)]

        def both_listed() -> str:
            out = cli(*ps, cwd=tmp_path).stdout
            return out if "held" in out and "bare" in out else ""

        table = eventually(both_listed, bool).splitlines()
        head = table[2].split()
        assert head[head.index("TIME") + 1] == "HOLDS"
        rows = {line.split()[0]: line for line in table[3:]}
        assert "GPU 0 licence=1" in rows["held"] and "GPU" not in rows["bare"]
        answer = json.loads(cli(*ps, "--json", cwd=tmp_path).stdout)
        jobs = {job["job_id"]: job for job in answer["jobs"]}
        assert (jobs["held"]["gpus"], jobs["held"]["resources"]) == ([0], {"licence": 1})
        assert (jobs["bare"]["gpus"], jobs["bare"]["resources"]) == ([], {})
    finally:
        go.touch()
        run.communicate(timeout=30)
    assert run.returncode == 0


@pytest.mark.parametrize(
    ("job", "shown"),
    [
        ({"gpus": [0, 2], "resources": {"licence": 1, "io": 2}}, "GPUs 0,2 io=2 licence=1"),
        ({"gpus": [], "resources": {}}, ""),
        ({}, ""),  # an older run's answer
    ],
)
def test_held_text(job: Dict[str, Any], shown: str) -> None:
    assert control.held_text(job) == shown


def trace(with_gpus: bool) -> List[Dict[str, Any]]:
    """A small trace written by hand: two GPU runs sharing device 1, one plain run."""
    header: Dict[str, Any] = {
        "type": "run", "version": 1, "mpmsub": "0", "start": 0, "host": "h", "cpus": 4, "memory": 8 * GIB,
        "max_workers": None, "schedule": "fifo", "backend": "local",
    }  # fmt: skip
    extra: Sequence[Dict[str, Any]] = ({}, {}, {})
    end_extra: Sequence[Dict[str, Any]] = ({}, {}, {})
    if with_gpus:
        header["resources"] = {"licence": 2}
        header["gpus"] = [{"id": i, "memory": 80 * GIB} for i in range(4)]
        extra = (
            {"gpus": [0, 1], "resources": {"licence": 1}},
            {"gpus": [1], "gpu_memory": 20 * GIB, "resources": {"licence": 1}},
            {},
        )
        end_extra = ({"gpus": [0, 1], "gpu_peak": 3 * GIB}, {"gpus": [1]}, {})
    events = [header]
    for i, (job, (start, end)) in enumerate(zip(("a", "b", "c"), ((0.0, 2.0), (0.5, 1.5), (0.2, 1.0)))):
        events.append({"type": "start", "t": start, "job": job, "run": 1, "cpus": 1, "memory": None,
                       "cmd": f"tool {job}", "waited": 0.0, **extra[i]})  # fmt: skip
        events.append({"type": "end", "t": end, "job": job, "run": 1, "status": "ok", "final": True, "peak": MB,
                       "runtime": end - start, "cpu": 0.1, "rc": 0, "memory": None, **end_extra[i]})  # fmt: skip
    return events


def test_the_report_shows_the_gpus_and_named_resources_of_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(trace(True), path, plots=False)
    page = path.read_text()
    rows = dict(summary_rows(load(trace(True))))
    assert rows["resources"] == "4 CPUs, 8G memory, 4 GPUs (80G each), licence 2; schedule fifo"
    assert rows["most held at once"] == "2 GPUs of 4, licence 2 of 2"  # device 1 shared, counted once
    section = page[page.index('<section id="gpus">') :]
    section = section[: section.index("</section>")]
    assert "<td>0, 1</td>" in section and "<td>1</td>" in section
    assert '<td class="num">whole</td>' in section and '<td class="num">20,480.0</td>' in section
    assert '<td class="num">3,072.0</td>' in section and '<td class="num">-</td>' in section
    assert "tool c" not in section  # no GPU: not listed


def test_a_report_of_a_trace_without_them_has_none_of_it(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(trace(False), path, plots=False)
    page = path.read_text()
    rows = dict(summary_rows(load(trace(False))))
    assert rows["resources"] == "4 CPUs, 8G memory; schedule fifo" and "most held at once" not in rows
    assert 'id="gpus"' not in page and "GPU" not in page


def test_a_real_runs_trace_reports_its_gpus(tmp_path: Path) -> None:
    cluster = mpmsub.cluster(p=2, m="1G", gpus=2, resources={"licence": 1}, trace=tmp_path / "t.jsonl")
    cluster.progress_bar = cluster.verbose = False
    cluster.jobs.append(mpmsub.Job(["true"]).gpu(1).resources(licence=1).with_id("on_gpu"))
    cluster.jobs.append(mpmsub.Job(["true"]).with_id("plain"))
    cluster.run()
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert events[0]["resources"] == {"licence": 1} and [g["id"] for g in events[0]["gpus"]] == [0, 1]
    cluster.report(tmp_path / "r.html", plots=False)
    page = (tmp_path / "r.html").read_text()
    assert re.search(r"2 GPUs \(79\.\dG each\), licence 1", page) and "on_gpu" in page[page.index('id="gpus"') :]
    assert os.stat(tmp_path / "r.html").st_size > 0
