from __future__ import annotations

import math
from pathlib import Path

import pytest
from support.helpers import alloc_cmd

import mpmsub
from mpmsub._job import MAX_GROWTH, to_spec
from mpmsub._units import MB


def test_builder_methods_of_the_seed() -> None:
    job = (
        mpmsub.Job(["my_program", "input.txt"])
        .cpu(2)
        .memory("4G")
        .with_timeout(300)
        .with_id("analysis_job")
        .working_dir("/tmp")
        .environment({"PYTHONPATH": "/custom/path"})
        .stdout_to("o.txt")
        .stderr_to("e.txt")
    )
    assert job.to_dict() == {
        "cmd": ["my_program", "input.txt"],
        "p": 2,
        "m": "4G",
        "id": "analysis_job",
        "cwd": "/tmp",
        "env": {"PYTHONPATH": "/custom/path"},
        "timeout": 300.0,
        "stdout": "o.txt",
        "stderr": "e.txt",
    }
    spec = job.spec()
    assert (spec.cpus, spec.memory, spec.timeout, spec.job_id) == (2, 4096 * MB, 300.0, "analysis_job")


def test_dict_round_trip_and_convenience_function() -> None:
    job = mpmsub.job(["echo", "convenience"], p=1, m="100M", timeout=300)
    assert to_spec(job.to_dict()) == job.spec()
    assert mpmsub.job(["x"], cpus=3, memory=200).spec().cpus == 3
    with pytest.raises(ValueError, match="CPU count once"):
        mpmsub.job(["x"], p=1, cpu=2)


def test_dict_aliases_of_the_original_library() -> None:
    assert to_spec({"cmd": ["x"], "cpu": 2, "memory": "1G"}) == to_spec({"cmd": ["x"], "p": 2, "m": "1G"})
    with pytest.raises(ValueError, match="'p' twice"):
        to_spec({"cmd": ["x"], "p": 1, "cpus": 2})


def test_pipelines_three_ways() -> None:
    a = mpmsub.Job(["cat", "f"]).pipe_to(["grep", "x"]).pipe_to(["sort"])
    b = mpmsub.Job(cmd=mpmsub.Pipeline([["cat", "f"], ["grep", "x"], ["sort"]]))
    c = mpmsub.pipeline([["cat", "f"], ["grep", "x"], ["sort"]])
    d = {"pipeline": [["cat", "f"], ["grep", "x"], ["sort"]]}
    assert a.spec() == b.spec() == c.spec() == to_spec(d) == to_spec({"cmd": [["cat", "f"], ["grep", "x"], ["sort"]]})
    assert a.spec().cmd == [["cat", "f"], ["grep", "x"], ["sort"]]
    assert str(mpmsub.Pipeline([["a", "1"], ["b"]])) == "a 1 | b"


def test_paths_are_accepted_as_arguments(tmp_path: Path) -> None:
    assert to_spec(["cat", tmp_path / "x"]).stages == (("cat", str(tmp_path / "x")),)


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        ({"cmd": []}, ValueError, "cmd is empty"),
        ({"p": 1}, ValueError, "has no 'cmd'"),
        ({"cmd": "echo hi"}, TypeError, "not the string 'echo hi'"),
        ({"cmd": ["echo", 1]}, TypeError, r"cmd\[1\] must be a string"),
        ({"cmd": [""]}, ValueError, "names no program"),
        ({"cmd": ["x"], "p": 0}, ValueError, "invalid p \\(cpus\\) 0"),
        ({"cmd": ["x"], "p": -2}, ValueError, "invalid p \\(cpus\\) -2"),
        ({"cmd": ["x"], "p": 1.5}, ValueError, "invalid p \\(cpus\\) 1.5"),
        ({"cmd": ["x"], "p": "many"}, ValueError, "invalid p \\(cpus\\) 'many'"),
        ({"cmd": ["x"], "m": "-1G"}, ValueError, "invalid m \\(memory\\) '-1G'"),
        ({"cmd": ["x"], "m": ""}, ValueError, "invalid m \\(memory\\) ''"),
        ({"cmd": ["x"], "m": "4Q"}, ValueError, "invalid m \\(memory\\) '4Q'"),
        ({"cmd": ["x"], "m": "lots"}, ValueError, "invalid m \\(memory\\) 'lots'"),
        ({"cmd": ["x"], "timeout": -1}, ValueError, "invalid timeout -1"),
        ({"cmd": ["x"], "timeout": "soon"}, ValueError, "invalid timeout 'soon'"),
        ({"cmd": ["x"], "mem": "1G"}, ValueError, "unknown job key 'mem' \\(did you mean 'memory'\\?\\)"),
        ({"cmd": ["x"], "env": {"A": 1}}, TypeError, "env\\['A'\\] must be a string"),
        ({"cmd": ["x"], "cwd": 3}, TypeError, "cwd must be"),
        ({"cmd": ["x"], "priority": "high"}, TypeError, "priority must be a whole number .*; got 'high'"),
        ({"cmd": ["x"], "priority": 1.5}, TypeError, "priority must be a whole number .*; got 1.5"),
        ({"cmd": ["x"], "priority": True}, TypeError, "priority must be a whole number .*; got True"),
        ("echo hi", TypeError, "not the string 'echo hi'"),
        (42, TypeError, "cannot run 42"),
        (["echo", None], TypeError, r"cmd\[1\] must be a string or a path; got None"),
        ([], ValueError, "cmd is empty"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_it(item: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        to_spec(item)


def test_job_objects_validate_at_creation() -> None:
    with pytest.raises(ValueError):
        mpmsub.Job([])
    with pytest.raises(ValueError):
        mpmsub.Job(["echo"]).cpu(-1)
    with pytest.raises(ValueError, match="needs a command"):
        mpmsub.Job()


def test_priority_three_ways_and_in_the_dict() -> None:
    assert to_spec(mpmsub.Job(["x"]).with_priority(3)).priority == 3
    assert to_spec({"cmd": ["x"], "priority": -2}).priority == -2
    assert to_spec(mpmsub.job(["x"], priority=1)).priority == 1
    assert to_spec(["x"]).priority == 0
    assert mpmsub.Job(["x"], priority=5).to_dict()["priority"] == 5
    assert "priority" not in mpmsub.Job(["x"]).to_dict()


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"cmd": ["x"], "p": 10**400}, "invalid p \\(cpus\\) 1000"),
        ({"cmd": ["x"], "p": "+-3"}, "invalid p \\(cpus\\) '\\+-3': expected a whole number of CPUs, from 1 to"),
        ({"cmd": ["x"], "m": 10**400}, "invalid m \\(memory\\) 1000.*at most 1048576T"),
        ({"cmd": ["x"], "m": 1e303}, "invalid m \\(memory\\) 1e\\+303"),
        ({"cmd": ["x"], "m": "9" * 400 + "G"}, "invalid m \\(memory\\) '999"),
        ({"cmd": ["x"], "timeout": 10**400}, "invalid timeout 1000.*at most"),
        ({"cmd": ["x"], "timeout": 1e300}, "invalid timeout 1e\\+300"),
        ({"cmd": ["x"], "retries": 1, "memory_growth": 10**400}, "invalid memory_growth 1000.*from 1 to 1000000"),
        ({"cmd": ["x"], "retries": 1, "memory_growth": 1e308}, "invalid memory_growth 1e\\+308"),
        ({"cmd": ["x"], "retries": 1, "memory_growth": math.inf}, "invalid memory_growth inf"),
        ({"cmd": ["x"], "retries": 1, "memory_growth": math.nan}, "invalid memory_growth nan"),
    ],
)
def test_numbers_out_of_range_are_a_value_error_naming_them(item: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_spec(item)


def test_huge_retries_and_priorities_are_kept_exactly() -> None:
    """No bound is needed: they are only counted down and compared, never made floats."""
    spec = to_spec({"cmd": ["x"], "retries": 10**400, "priority": -(10**400)})
    assert spec.retries == 10**400 and spec.priority == -(10**400)
    assert to_spec({"cmd": ["x"], "retries": 1, "memory_growth": MAX_GROWTH}).memory_growth == MAX_GROWTH


def test_the_largest_growth_retries_with_the_whole_budget() -> None:
    """A job stopped at its strict 20M is retried with 20M times the largest growth, cut to the
    budget (not an overflow on the executor's thread that leaves the future unresolved)."""
    job = mpmsub.Job(alloc_cmd(60, hold=0.5)).memory("20M").strict_memory().with_retries(1, MAX_GROWTH)
    with mpmsub.MemoryAwareExecutor(cpus=1, memory="500M", memory_reserve=0) as ex:
        result = ex.submit(job).result(timeout=60)
    assert result.success, (result.failure, result.error)
    assert result.attempts == 2 and result.memory_requested == 500
