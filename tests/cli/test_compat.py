"""The original mpmsub's API where it differs from ours: `mpmsub.utils` and its units (MB), the
top-level helpers, `cluster(describe=)`, queued jobs as dicts, its stats keys, duplicate ids,
`Job` defaults; and the original's own example scripts and test file, run unchanged."""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mpmsub
from mpmsub import utils
from mpmsub._job import to_spec
from mpmsub.utils import format_duration, format_memory, parse_cpu_string, parse_memory_string, validate_job

ROOT = Path(__file__).resolve().parent.parent.parent


def quiet(**kwargs: Any) -> mpmsub.Cluster:
    return mpmsub.cluster(verbose=False, progress_bar=False, **kwargs)


# -- mpmsub.utils and the top level ---------------------------------------------------------------


def test_the_originals_names_are_importable_from_utils_and_the_top_level() -> None:
    from mpmsub.utils import format_duration, parse_cpu_string, parse_memory_string, validate_job  # noqa: F401

    for name in ("parse_memory_string", "parse_cpu_string", "format_memory"):
        assert name in mpmsub.__all__
        assert getattr(mpmsub, name) is getattr(utils, name)


def test_top_level_format_memory_takes_mb_as_the_originals_did() -> None:
    # The original's profiling example prints the cluster's memory with it: 2 GB is 2.0G, not 2K.
    assert mpmsub.format_memory(quiet(p=1, m="2G").max_memory_mb) == "2.0G"


@pytest.mark.parametrize(
    ("given", "mb"),
    [("16G", 16384), ("2048M", 2048), ("1024", 1024), (2048, 2048), ("1.5G", 1536), ("1gb", 1024), ("512K", 0)],
)
def test_parse_memory_string_gives_whole_mb(given: object, mb: int) -> None:
    assert parse_memory_string(given) == mb  # type: ignore[arg-type]
    assert isinstance(parse_memory_string(given), int)  # type: ignore[arg-type]


def test_none_means_detect_for_both_parsers() -> None:
    assert parse_memory_string(None) is None and parse_cpu_string(None) is None


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        ("invalid", ValueError, "invalid memory 'invalid'"),
        ("4Q", ValueError, "invalid memory '4Q'"),
        (-1, ValueError, "invalid memory -1"),
        (True, TypeError, "got True"),
        ([1], TypeError, r"got \[1\]"),
    ],
)
def test_parse_memory_string_names_bad_input(given: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        parse_memory_string(given)  # type: ignore[arg-type]


def test_parse_cpu_string() -> None:
    assert parse_cpu_string("4") == 4 and parse_cpu_string(6) == 6
    with pytest.raises(ValueError, match="invalid cpus 'invalid'"):
        parse_cpu_string("invalid")
    with pytest.raises(ValueError, match="invalid cpus 0"):
        parse_cpu_string(0)
    with pytest.raises(TypeError, match=r"got 4\.5j"):
        parse_cpu_string(4.5j)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mb", "text"),
    [(512, "512M"), (0.4, "0M"), (1023.9, "1023M"), (1024, "1.0G"), (1536, "1.5G"), (2 * 1024 * 1024, "2048.0G")],
)
def test_format_memory_in_mb(mb: float, text: str) -> None:
    assert format_memory(mb) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0.0s"), (30, "30.0s"), (59.94, "59.9s"), (65, "1m 5s"), (3600, "1h 0m 0s"), (7384.9, "2h 3m 4s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("function", [format_memory, format_duration])
@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        ("1G", TypeError, "got '1G'"),
        (None, TypeError, "got None"),
        (True, TypeError, "got True"),
        (-1, ValueError, "invalid .* -1"),
        (math.nan, ValueError, "invalid .* nan"),
        (math.inf, ValueError, "invalid .* inf"),
        (10**400, ValueError, "invalid .* 1000"),
    ],
)
def test_formatters_name_bad_input(function: Any, given: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        function(given)


@given(st.floats(min_value=0, max_value=1e9))
def test_what_format_memory_writes_is_accepted_back_as_m(mb: float) -> None:
    # The original's profiling advice builds `m` from format_memory: it must parse, and mean
    # about as much (the one decimal of G is at most 51.2 MB, 5% of 1 GB, off).
    back = parse_memory_string(format_memory(mb))
    assert back is not None and abs(back - mb) <= 1 + 0.05 * mb


def test_validate_job_normalises_as_the_original() -> None:
    assert validate_job({"cmd": ["echo", "hello"], "p": 1, "m": "100M"}) == {
        "cmd": ["echo", "hello"],
        "p": 1,
        "m": 100,
        "id": None,
        "cwd": None,
        "env": None,
        "timeout": None,
        "stdout": None,
        "stderr": None,
    }
    bare = validate_job({"cmd": ["echo"]})
    assert (bare["p"], bare["m"]) == (1, None)
    assert validate_job({"cmd": ["x"], "m": "1.5K"})["m"] == 1.5 / 1024  # not a whole MB: not rounded to 0
    piped = validate_job({"cmd": mpmsub.Pipeline([["echo", "a"], ["sort"]]), "timeout": 5, "priority": 2})
    assert piped["cmd"] == mpmsub.Pipeline([["echo", "a"], ["sort"]])
    assert (piped["timeout"], piped["priority"]) == (5.0, 2)
    assert validate_job(piped) == piped  # its output is a valid job dict


@pytest.mark.parametrize(
    ("job", "error", "message"),
    [
        ({"p": 1, "m": "100M"}, ValueError, "has no 'cmd'"),
        ({"cmd": [], "p": 1}, ValueError, "cmd is empty"),
        ({"cmd": ["x"], "m": "lots"}, ValueError, "invalid m \\(memory\\) 'lots'"),
        ({"cmd": ["x"], "p": 0}, ValueError, "invalid p \\(cpus\\) 0"),
        (["echo", "hi"], TypeError, "a job must be a dict"),
    ],
)
def test_validate_job_names_bad_input(job: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        validate_job(job)


def test_get_system_resources() -> None:
    found = utils.get_system_resources()
    assert set(found) == {"cpus", "memory_mb"}
    assert found["cpus"] >= 1 and found["memory_mb"] > 0


# -- Job ---------------------------------------------------------------------------------------------


def test_job_p_and_m_are_none_until_set_and_mean_one_cpu_and_no_reservation() -> None:
    job = mpmsub.Job(["echo", "test"])
    assert job.p is None and job.m is None
    spec = job.spec()
    assert (spec.cpus, spec.memory) == (1, None)
    assert job.to_dict() == {
        "cmd": ["echo", "test"],
        "p": None,
        "m": None,
        "id": None,
        "cwd": None,
        "env": None,
        "timeout": None,
        "stdout": None,
        "stderr": None,
    }
    assert to_spec(job.to_dict()) == spec


def test_builder_methods_take_the_originals_keyword_names(tmp_path: Path) -> None:
    job = (
        mpmsub.Job(["echo", "x"])
        .cpu(cores=2)
        .memory(mem="1G")
        .working_dir(path=str(tmp_path))
        .environment(env_vars={"A": "b"})
        .with_timeout(seconds=30)
        .with_id(job_id="named")
        .stdout_to(file_path="o.txt")
        .stderr_to(file_path="e.txt")
        .pipe_to(next_cmd=["sort"])
    )
    data = job.to_dict()
    assert (data["p"], data["m"], data["id"], data["timeout"]) == (2, "1G", "named", 30.0)
    assert data["pipeline"] == [["echo", "x"], ["sort"]]


def test_result_cpu_used_is_cpu_seconds_and_cpus_the_reservation() -> None:
    p = quiet(p=2, m="1G")
    p.jobs.append(mpmsub.Job(["sleep", "0.1"]).cpu(2))
    p.run()
    (result,) = p.completed_jobs
    assert result.cpus == 2  # what the original called cpu_used
    assert 0 <= result.cpu_used < 0.1  # sleeping takes (almost) no CPU time


# -- cluster ---------------------------------------------------------------------------------------


def test_describe_prints_the_resources(capsys: pytest.CaptureFixture[str]) -> None:
    p = quiet(p=1, m="1G", describe=True)
    assert isinstance(p, mpmsub.Cluster)
    out = capsys.readouterr().out
    assert "mpmsub resources" in out and "1G for jobs" in out
    quiet(p=1, m="1G")
    assert capsys.readouterr().out == ""


def test_queued_jobs_read_as_the_originals_dicts() -> None:
    p = quiet(p=2, m="1G")
    p.jobs.append({"cmd": ["echo", "a"]})
    p.jobs.append(mpmsub.Job(["echo", "b"]).cpu(2).memory("150M").with_id("b"))
    p.jobs.append(mpmsub.pipeline([["echo", "c"], ["sort"]], m="1.5K"))
    views = list(p.jobs)
    assert all(isinstance(job, dict) for job in views)
    assert [(job["id"], job["p"], job["m"]) for job in views] == [
        ("job_0001", 1, None),
        ("b", 2, 150),
        ("job_0002", 1, 1.5 / 1024),
    ]
    assert views[0]["cmd"] == ["echo", "a"] and views[2]["cmd"] == mpmsub.Pipeline([["echo", "c"], ["sort"]])
    assert p.jobs[1] == views[1] and p.jobs[-1] == views[2] and p.jobs[0:2] == views[:2]
    assert p.job_queue.pending_jobs == views
    stats = p.run()
    assert stats["jobs"]["completed"] == 3
    assert list(p.jobs) == [] and p.job_queue.pending_jobs == []
    assert p.job_queue.completed_jobs == p.completed_jobs and p.job_queue.failed_jobs == []


def test_a_queued_jobs_dict_is_read_only_but_copies_freely() -> None:
    p = quiet(p=1, m="1G")
    p.jobs.append({"cmd": ["echo"], "id": "mine"})
    job = p.jobs[0]
    with pytest.raises(TypeError, match="queued job 'mine' is read-only"):
        job["m"] = 100
    with pytest.raises(TypeError, match="read-only"):
        job.update(p=2)
    with pytest.raises(TypeError, match="read-only"):
        del job["p"]
    assert p.jobs[0]["m"] is None
    mutable = dict(job)
    mutable["m"] = 100
    assert copy.copy(job) == copy.deepcopy(job) == pickle.loads(pickle.dumps(job)) == job


def test_stats_keep_todays_keys_and_add_the_originals() -> None:
    p = quiet(p=2, m="1G")
    p.jobs.extend([["echo", "a"], ["sleep", "0.1"]])
    before = p.stats
    assert before["jobs"]["pending"] == 2 and before["cluster"]["runtime_formatted"] == "0.0s"
    stats = p.run()
    assert {"cluster", "jobs", "time", "memory", "cpu", "resources"} <= set(stats)
    cluster = stats["cluster"]
    assert (cluster["cpus"], cluster["max_cpus"], cluster["max_memory"]) == (2, 2, "1.0G")
    assert cluster["max_memory_mb"] == cluster["memory_mb"] == 1024
    assert cluster["runtime"] == stats["time"]["wall"] >= 0.1
    assert re.fullmatch(r"\d+\.\ds", cluster["runtime_formatted"])
    assert stats["jobs"]["total"] == stats["jobs"]["completed"] == 2
    assert (stats["jobs"]["pending"], stats["jobs"]["running"]) == (0, 0)
    assert stats["resources"] == {"cpu_slots_used": 0, "memory_used": "0M", "active_jobs": 0}


def test_stats_during_a_run_count_the_running_jobs_and_what_they_reserve() -> None:
    p = quiet(p=2, m="1G", schedule="fifo")
    p.jobs.append({"cmd": ["sleep", "0.5"], "m": "100M", "id": "slow"})
    p.jobs.append({"cmd": ["echo", "quick"], "id": "quick"})
    seen: Dict[str, Dict[str, Any]] = {}

    def on_result(result: mpmsub.JobResult) -> None:
        seen[result.job_id] = p.stats

    p.run(on_result=on_result)
    during = seen["quick"]  # ends while "slow" still runs
    assert (during["jobs"]["running"], during["jobs"]["pending"]) == (1, 0)
    assert during["resources"] == {"cpu_slots_used": 1, "memory_used": "100M", "active_jobs": 1}
    assert 0 < during["cluster"]["runtime"] < p.stats["cluster"]["runtime"]


def test_duplicate_ids_are_renamed_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    p = quiet(p=2, m="1G")
    with caplog.at_level(logging.WARNING, logger="mpmsub"):
        first = p.jobs.append({"cmd": ["echo", "1"], "id": "dup"})
        rest = p.jobs.extend([{"cmd": ["echo", "2"], "id": "dup"}, mpmsub.Job(["echo", "3"]).with_id("dup")])
        clash = p.jobs.append({"cmd": ["echo", "4"], "id": "dup_2"})
    assert [first, *rest, clash] == ["dup", "dup_2", "dup_3", "dup_2_2"]
    assert "job id 'dup' is taken in this cluster; this job runs as 'dup_2'" in caplog.text
    p.run()
    outputs = {r.job_id: (r.stdout or "").strip() for r in p.completed_jobs}
    assert outputs == {"dup": "1", "dup_2": "2", "dup_3": "3", "dup_2_2": "4"}


def test_the_command_lines_cluster_still_refuses_duplicate_ids() -> None:
    p = quiet(p=1, m="1G")
    p._refuse_duplicate_ids = True
    p.jobs.append({"cmd": ["echo"], "id": "dup"})
    with pytest.raises(ValueError, match="duplicate job id 'dup': ids must be unique within a cluster"):
        p.jobs.append({"cmd": ["echo"], "id": "dup"})
    assert len(p.jobs) == 1


def test_the_executor_still_refuses_duplicate_ids() -> None:
    with mpmsub.MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        assert ex.submit(mpmsub.Job(["echo"]).with_id("dup")).result().success
        with pytest.raises(ValueError, match="duplicate job id 'dup'"):
            ex.submit(mpmsub.Job(["echo"]).with_id("dup"))


# -- the original's scripts, unchanged ----------------------------------------------------------------

# Where the original package is: a git repository (bare or not) of it, or a plain directory of
# its files (CI unpacks its source distribution from PyPI, which has its test file but not its
# examples).
ORIGINAL = Path(os.environ.get("MPMSUB_ORIGINAL_REPO", "/work/.mirror/nextgenusfs+mpmsub/repo"))


def _plain() -> bool:
    return (ORIGINAL / "mpmsub").is_dir()


def _have_original() -> bool:
    return ORIGINAL.is_dir() and (_plain() or shutil.which("git") is not None)


# What the original's examples run besides Python.
PROGRAMS = ("python3", "echo", "sleep", "ls", "cat", "grep", "sort", "wc", "tr", "sed", "date", "env", "pwd")
# A line of output each script prints when it works as it did with the original.
EXPECTED = {
    "basic_example.py": "Created cluster with 4 CPUs and 2.0G memory",
    "profiling_example.py": "Created cluster with 4 CPUs and 2.0G memory",
    "memory_example.py": "Created cluster with 4 CPUs and 1.0G memory",
    "api_demo.py": "Total runtime: ",
    "job_object_demo.py": "Job 2: ['echo', 'Hello from dict job 2'] (p=1, m=150)",
    "pipeline_demo.py": "mpmsub resources",
    "test_defaults.py": "All 4 jobs completed successfully!",
}


def _git_show(path: str) -> str:
    if _plain():
        return (ORIGINAL / path).read_text()
    return subprocess.run(
        ["git", "-C", str(ORIGINAL), "show", f"HEAD:{path}"], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def _original_examples() -> List[str]:
    if not _have_original():
        return []
    if _plain():
        return sorted(f"examples/{p.name}" for p in (ORIGINAL / "examples").glob("*.py"))
    listed = subprocess.run(
        ["git", "-C", str(ORIGINAL), "ls-tree", "--name-only", "HEAD", "examples/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [name for name in listed.stdout.split() if name.endswith(".py")]


def _run_original(tmp_path: Path, argv: List[str], timeout: float) -> subprocess.CompletedProcess[str]:
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        pytest.skip(f"the original's scripts run {', '.join(missing)}, not installed here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", _original_examples() or ["(no examples of the original)"])
def test_an_original_example_runs_unchanged(script: str, tmp_path: Path) -> None:
    if not script.startswith("examples/"):
        pytest.skip(f"no examples of the original mpmsub at {ORIGINAL} (set MPMSUB_ORIGINAL_REPO to a checkout)")
    if script.endswith("benchmark_demo.py") and psutil.virtual_memory().available < 5 * 1024**3:
        pytest.skip("benchmark_demo.py holds 3 GB at once (three 1 GB jobs side by side); under 5 GB is available")
    path = tmp_path / script
    path.parent.mkdir()
    path.write_text(_git_show(script))
    done = _run_original(tmp_path, [sys.executable, str(path)], timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output, output  # benchmark_demo.py prints its exceptions and exits 0
    assert EXPECTED.get(path.name, "") in done.stdout, done.stdout


@pytest.mark.timeout(300)
def test_the_originals_test_file_passes_unchanged(tmp_path: Path) -> None:
    if not _have_original():
        pytest.skip(f"no checkout of the original mpmsub at {ORIGINAL} (set MPMSUB_ORIGINAL_REPO)")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_basic.py").write_text(_git_show("tests/test_basic.py"))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # none of our settings: the original had none
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_basic.py"]
    done = _run_original(tmp_path, argv, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b\d+ passed\b", done.stdout) and "failed" not in done.stdout, done.stdout
