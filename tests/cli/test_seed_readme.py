"""Every code block of the original library's README, run with real commands in place of its
placeholders (`my_program`, `script.py`, ...). Each test keeps the block's calls as written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mpmsub

PY = sys.executable


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "script.py").write_text("import os; print('script', os.environ.get('PYTHONPATH'))\n")
    (tmp_path / "input.txt").write_text("data\n")
    return tmp_path


def test_quick_start(capsys: pytest.CaptureFixture) -> None:
    # Create a cluster with 6 CPUs and 16GB memory limit
    p = mpmsub.cluster(p=6, m="16G")

    # Add jobs with different resource requirements (dictionary style)
    p.jobs.append({"cmd": ["echo", "example", "subprocess", "cmd"], "p": 1, "m": "1G"})

    # Or use the Job object interface
    p.jobs.append(mpmsub.Job([PY, "-c", "x = bytearray(50 * 2**20)"]).cpu(2).memory("2G"))

    # Run all jobs with optimal scheduling
    p.run()

    # Analyze results
    for job in p.completed_jobs:
        print(f"Job: {job.cmd}")
        print(f"Runtime: {job.runtime:.2f}s")
        print(f"Memory used: {job.memory_used:.1f}MB")

    out = capsys.readouterr().out
    assert out.count("Job: ") == 2 and "Memory used:" in out
    assert len(p.completed_jobs) == 2


def test_creating_a_cluster() -> None:
    # Auto-detect system resources
    p = mpmsub.cluster()
    assert p.max_cpus >= 1

    # Specify resources explicitly
    p = mpmsub.cluster(p=4, m="8G")

    # Control verbosity and progress bar
    p = mpmsub.cluster(p=4, m="8G", verbose=True, progress_bar=True)
    p = mpmsub.cluster(p=4, m="8G", progress_bar=False)  # Disable progress bar

    # Memory can be specified in various formats
    p = mpmsub.cluster(p=4, m="8192M")  # MB
    assert p.max_memory_mb == 8192
    p = mpmsub.cluster(p=4, m="8G")  # GB
    assert p.max_memory_mb == 8192
    p = mpmsub.cluster(p=4, m=8192)  # MB as integer
    assert p.max_memory_mb == 8192


def test_dictionary_interface(in_tmp: Path) -> None:
    p = mpmsub.cluster(p=4, m="8G", progress_bar=False, verbose=False)
    # Simple job
    p.jobs.append({"cmd": ["echo", "hello"]})

    # Job with resource requirements
    p.jobs.append(
        {
            "cmd": ["cat", "input.txt"],
            "p": 2,  # 2 CPU cores
            "m": "4G",  # 4GB memory
            "timeout": 300,  # 5 minute timeout
        }
    )

    # Job with custom environment
    p.jobs.append(
        {
            "cmd": ["python", "script.py"] if _has("python") else [PY, "script.py"],
            "p": 1,
            "m": "1G",
            "cwd": str(in_tmp),
            "env": {"PYTHONPATH": "/custom/path"},
        }
    )
    p.run()
    assert len(p.completed_jobs) == 3, [r.error for r in p.failed_jobs]
    outputs = {r.job_id: r.stdout for r in p.completed_jobs}
    assert outputs["job_0003"] == "script /custom/path\n"


def _has(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def test_job_object_interface(in_tmp: Path) -> None:
    p = mpmsub.cluster(p=4, m="8G", progress_bar=False, verbose=False)

    # Simple job creation
    job = mpmsub.Job(["echo", "hello"])
    p.jobs.append(job)

    # Builder pattern (fluent interface)
    job = mpmsub.Job(["cat", "input.txt"]).cpu(2).memory("4G").with_timeout(300).with_id("analysis_job")
    p.jobs.append(job)

    # Step-by-step building
    job = mpmsub.Job([PY, "script.py"])
    job.cpu(1)
    job.memory("1G")
    job.working_dir(str(in_tmp))
    job.environment({"PYTHONPATH": "/custom/path"})
    p.jobs.append(job)

    # Convenience function for quick job creation
    job1 = mpmsub.job(["echo", "convenience"], p=1, m="100M")
    job2 = mpmsub.job([PY, "script.py"], p=2, timeout=300)

    # Mix all approaches
    jobs = [
        {"cmd": ["echo", "dict job"], "p": 1, "m": "100M"},
        mpmsub.Job(["echo", "object job"]).cpu(1).memory("150M"),
        mpmsub.job(["echo", "convenience job"], p=1),
    ]
    p.jobs.extend(jobs)
    p.jobs.extend([job1, job2])
    p.run()
    assert len(p.completed_jobs) == 8 and not p.failed_jobs
    assert {r.job_id for r in p.completed_jobs} >= {"analysis_job"}


def test_running_jobs() -> None:
    p = mpmsub.cluster(p=4, m="8G", progress_bar=False, verbose=False)
    p.jobs.extend([["echo", str(i)] for i in range(4)])
    # Run with default settings
    results = p.run()
    assert results["jobs"]["completed"] == 4

    p.jobs.extend([["echo", str(i)] for i in range(4)])
    # Limit concurrent jobs
    results = p.run(max_workers=2)
    assert results["jobs"]["total"] == 8


def test_analyzing_results(capsys: pytest.CaptureFixture) -> None:
    p = mpmsub.cluster(p=2, m="1G", progress_bar=False, verbose=False)
    p.jobs.extend([["echo", "fine"], ["sh", "-c", "exit 7"]])
    p.run()

    # Print summary
    p.print_summary()

    # Access completed jobs
    for job in p.completed_jobs:
        print(f"Job {job.job_id}: {job.success}")
        print(f"Runtime: {job.runtime:.2f}s")
        print(f"Memory: {job.memory_used:.1f}MB")
        print(f"Output: {job.stdout}")

    # Access failed jobs
    for job in p.failed_jobs:
        print(f"Failed job {job.job_id}: {job.error}")

    # Get statistics
    stats = p.stats
    out = capsys.readouterr().out
    assert "Job job_0001: True" in out and "Output: fine" in out
    assert "Failed job job_0002: exited with status 7" in out
    assert stats["jobs"]["failed"] == 1


def test_job_profiling(capsys: pytest.CaptureFixture) -> None:
    # Create cluster and add jobs without memory specifications
    p = mpmsub.cluster(p=4, m="8G")
    p.jobs.append({"cmd": [PY, "-c", "x = bytearray(120 * 2**20)", "arg1", "arg2"]})
    p.jobs.append({"cmd": [PY, "-c", "x = bytearray(60 * 2**20)", "arg1"]})

    # Profile jobs to measure actual memory usage
    # This runs jobs sequentially to get accurate measurements
    profile_results = p.profile()
    out = capsys.readouterr().out
    assert "Ready to paste" in out and len(profile_results) == 2
    recommended = [mpmsub.recommend_memory(r.memory_used) for r in profile_results]

    # Use the recommendations for efficient scheduling:
    p2 = mpmsub.cluster(p=4, m="8G")
    p2.jobs.append({"cmd": [PY, "-c", "x = bytearray(120 * 2**20)", "arg1", "arg2"], "p": 1, "m": recommended[0]})
    p2.jobs.append({"cmd": [PY, "-c", "x = bytearray(60 * 2**20)", "arg1"], "p": 1, "m": recommended[1]})
    p2.run()  # Now runs with optimized memory scheduling
    stats = p2.stats
    print(f"Total jobs: {stats['jobs']['total']}")
    print(f"Completed: {stats['jobs']['completed']}")
    print(f"Failed: {stats['jobs']['failed']}")
    out = capsys.readouterr().out
    assert "Total jobs: 2\nCompleted: 2\nFailed: 0" in out


def test_progress_bar(capsys: pytest.CaptureFixture) -> None:
    # Progress bar enabled by default
    p = mpmsub.cluster(p=4, m="8G")
    p.jobs.extend(
        [
            {"cmd": ["sleep", "0.1"], "p": 1, "m": "100M"},
            {"cmd": ["sleep", "0.2"], "p": 1, "m": "100M"},
            {"cmd": ["sleep", "0.1"], "p": 1, "m": "100M"},
        ]
    )
    p.run()
    assert "3/3 (100.0%)" in capsys.readouterr().err

    # Disable progress bar if needed
    p_quiet = mpmsub.cluster(p=4, m="8G", progress_bar=False)
    p_quiet.jobs.append({"cmd": ["echo", "hello"], "p": 1})
    p_quiet.run()  # No progress bar shown
    assert "%)" not in capsys.readouterr().err

    # Progress bar also works with profiling
    p.jobs.append({"cmd": ["sleep", "0.1"]})
    p.profile()  # Shows progress during sequential profiling
    assert "profiling 1/1 (100.0%)" in capsys.readouterr().err
