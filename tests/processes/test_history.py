"""m="auto": the key rule, input sizes, the estimator, the history store and its CLI, and
probe-then-fan-out with real processes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import mpmsub
from mpmsub import Job, MemoryAwareExecutor
from mpmsub._job import to_spec
from mpmsub._learn import history as history_module
from mpmsub._learn.estimate import FIT_RUNS, FLOOR, MARGIN, RETRY_GROWTH, WINDOW, Run, estimate, retry_memory
from mpmsub._learn.history import History, row
from mpmsub._learn.keys import input_size, job_key
from mpmsub._learn.runbook import RunBook

MB = 2**20
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")  # the tests' programs
TOOL = os.path.join(TESTS, "sized_tool.py")


def tool(path: Path, *options: str) -> List[str]:
    return [sys.executable, TOOL, str(path), *options]


def sized_file(path: Path, mb: float) -> Path:
    path.write_bytes(b"\0" * int(mb * MB))
    return path


def history_file(tmp_path: Path) -> str:
    return str(tmp_path / "history.db")


def history_rows(path: str, key: Optional[str] = None) -> List[Dict[str, Any]]:
    with History(path) as history:
        return list(history.rows(key))


# -- the key rule -----------------------------------------------------------------------------


def key(cmd: Any, **kwargs: Any) -> str:
    return job_key(to_spec(Job(cmd, **kwargs)))


def test_runs_of_one_tool_on_other_inputs_share_a_key(tmp_path: Path) -> None:
    assert key(["bwa", "mem", "-t", "8", "ref.fa", "s1.fq"]) == "bwa mem -t # *.fa *.fq"
    assert key(["/opt/bin/bwa", "mem", "-t", "4", "/data/ref.fa", "run2/s2.fq"]) == "bwa mem -t # *.fa *.fq"
    assert key(["samtools", "sort", "-@8", "-m", "2G", "-o", "out.bam", "in.bam"]) == (
        "samtools sort -@# -m # -o *.bam *.bam"
    )
    assert key(["gzip", "-9", "-c", "reads_1.fq.gz"]) == "gzip -# -c *.fq.gz"
    assert key(["STAR", "--runThreadN=16", "--genomeDir", "/idx/hg38/"]) == "STAR --runThreadN=# --genomeDir *"
    plain = tmp_path / "reads"  # an existing file without extension is a path too
    plain.write_text("x")
    assert key(["wc", "-l", "reads"], cwd=tmp_path) == "wc -l *"
    assert key(["sort", "words"]) == "sort words"  # a word that names nothing is kept (a subcommand)


def test_an_interpreters_script_is_part_of_the_program() -> None:
    assert key(["python3.11", "/home/me/align.py", "--threads=4", "x.txt"]) == "python align.py --threads=# *.txt"
    assert key(["python", "count.py", "x.txt"]) != key(["python", "align.py", "x.txt"])
    assert key(["java", "-Xmx4g", "-jar", "/opt/picard.jar", "MarkDuplicates", "I=a.bam"]) == (
        "java -Xmx#g -jar picard.jar MarkDuplicates *.bam"
    )
    assert key(["Rscript", "plot.R", "data.csv"]) == "Rscript plot.R *.csv"


def test_shell_scripts_pipelines_calls_and_given_keys() -> None:
    assert key(["sh", "-c", "gzip -9 -c /data/a.txt > a.txt.gz"]) == "sh -c gzip -# -c *.txt > *.txt.gz"
    assert key(["bash", "-c", "sort -k2 s1.tsv | uniq -c"]) == key(["bash", "-c", "sort -k3 s2.tsv | uniq -c"])
    assert job_key(to_spec(mpmsub.Pipeline([["cat", "a.txt"], ["sort", "-k2"]]))) == "cat *.txt | sort -k#"
    assert job_key(mpmsub.Call(os.path.getsize, "x").spec()) == f"call:{os.path.getsize.__module__}.getsize"
    assert key(["bwa", "mem", "ref.fa", "x.fq"], key="bwa-mem") == "bwa-mem"
    assert to_spec({"cmd": ["true"], "key": "k1", "m": "auto"}).key == "k1"


def test_input_size_sums_the_existing_files_the_arguments_name(tmp_path: Path) -> None:
    a, b = sized_file(tmp_path / "a.fq", 1), sized_file(tmp_path / "b.fq", 2)
    (tmp_path / "dir").mkdir()
    spec = to_spec(Job(["tool", "a.fq", f"--in={b}", "a.fq", "dir", "missing.fq", "-t", "4"], cwd=tmp_path))
    assert input_size(spec) == 3 * MB  # a.fq once, b.fq by its --in=, no directory, no missing file
    shell = to_spec(Job(["sh", "-c", f"cat {a} {b} | wc -c"]))
    assert input_size(shell) == 3 * MB
    assert input_size(mpmsub.Call(os.path.getsize, str(b)).spec()) == 2 * MB
    chunk = mpmsub.Call(os.path.getsize)._chunk_spec([(str(a),), (b,)], 0)  # a map() chunk: its largest item
    assert input_size(chunk) == 2 * MB
    assert input_size(mpmsub.Call(abs)._chunk_spec([(1,), (str(b),)], 0)) == 0  # the first item names no path


# -- the estimator ----------------------------------------------------------------------------

runs_strategy = st.lists(
    st.builds(Run, st.sampled_from([0, 10 * MB, 100 * MB, 1000 * MB]), st.integers(1 * MB, 4000 * MB)),
    min_size=1,
    max_size=80,
)


@given(runs_strategy, st.sampled_from([0, 10 * MB, 100 * MB, 1000 * MB, 5000 * MB]))
def test_an_estimate_is_never_below_the_largest_peak_seen_for_the_same_input_size(runs: List[Run], size: int) -> None:
    guess = estimate(runs, size)
    assert guess is not None
    same = [run.peak for run in runs if run.size == size]
    if same:
        assert guess.memory >= max(same) * (1 + MARGIN) + FLOOR - 1
    window = runs[-WINDOW:]
    if len({run.size for run in window}) == 1:
        assert guess.method in ("highest", "scaled") and guess.memory >= max(r.peak for r in window)
    assert guess.runs == len(window)
    # A miss goes further than the estimate, and never past the highest peak.
    assert guess.after_miss == 0 or guess.memory < guess.after_miss <= max(r.peak for r in window)


@given(st.lists(st.integers(1, 2000), min_size=2, max_size=60), st.integers(0, 3000))
@example([1, 1, 1, 1, 2, 2, 2], 3)  # (the closest neighbours all of one size: found by CI)
@example([1] * 10 + [2] * 15, 3)  # (the usual ones too)
def test_a_linear_tool_is_covered_and_from_30_runs_followed_exactly(sizes_mb: List[int], query_mb: int) -> None:
    """A tool whose peak is a line of its input: the estimate covers the line at this input (and
    so every run), and where FIT_RUNS (30) runs or more show the line, it is the line's value
    (plus 16M, and the margin of an input seen before)."""
    if len(set(sizes_mb)) < 2:
        sizes_mb = [*sizes_mb, sizes_mb[0] + 1]
    runs = [Run(s * MB, 50 * MB + 3 * s * MB, 1.0) for s in sizes_mb]  # peak = 50M + 3 x input
    guess = estimate(runs, query_mb * MB)
    assert guess is not None and guess.method in ("fit", "neighbours")
    truth = 50 * MB + 3 * query_mb * MB
    assert guess.memory >= truth + FLOOR - MB
    if len(runs) >= FIT_RUNS:  # (an input seen before: its peak plus the margin, at least)
        most = truth * (1 + MARGIN) if query_mb in sizes_mb else truth
        assert guess.method == "fit" and guess.memory <= most + FLOOR + MB


def test_estimate_methods() -> None:
    assert estimate([], 10) is None
    highest = estimate([Run(0, 100 * MB), Run(0, 80 * MB)], 0)
    assert highest is not None and highest.method == "highest" and highest.runs == 2
    assert highest.memory == pytest.approx(100 * MB * (1 + MARGIN) + FLOOR, abs=2)
    scaled = estimate([Run(10 * MB, 100 * MB)], 40 * MB)  # one size seen, this input 4x larger
    assert scaled is not None and scaled.method == "scaled"
    assert scaled.memory == pytest.approx(400 * MB * (1 + MARGIN) + FLOOR, abs=2)


def test_a_rare_high_peak_is_left_to_a_miss_that_goes_straight_to_it() -> None:
    """30 runs near 100M and one of 1G: covering the rare one every time would cost more than
    missing it once, so the estimate leaves it out, and a miss runs again with 1G at once (its
    key's highest peak), not in steps of 1.25; beyond that peak, steps of 1.25."""
    runs = [Run((10 + i) * MB, (100 + i % 7) * MB, 10.0) for i in range(30)]
    runs.insert(15, Run(25 * MB, 1000 * MB, 10.0))
    guess = estimate(runs, 20 * MB)
    assert guess is not None and guess.memory < 200 * MB and guess.after_miss == 1000 * MB
    assert retry_memory(guess.memory, guess.memory, guess.after_miss) == 1000 * MB
    assert retry_memory(1000 * MB, 1000 * MB, guess.after_miss) == 1000 * MB * RETRY_GROWTH
    assert retry_memory(guess.memory, guess.memory) < 200 * MB  # without it: one step
    covered = estimate(runs[:15], 20 * MB)  # every peak within the estimate: nothing to jump to
    assert covered is not None and covered.after_miss == 0
    # A GPU's memory, whose stop is no m="auto" miss, is estimated with the usual neighbours and
    # the most but one rise, as before: here they take the rare run in.
    gpu = estimate(runs, 20 * MB, by_cost=False)
    assert gpu is not None and gpu.memory >= 1000 * MB


def test_a_miss_of_a_tool_whose_memory_follows_its_input_goes_by_steps_not_to_its_largest_peak() -> None:
    """Peak = 50M + 3 x input, inputs of 10M to 1000M: a small input's miss is not sent to what
    the largest inputs took (a batch of small jobs would reserve the machine), but grows by 1.25."""
    runs = [Run(s * MB, (50 + 3 * s) * MB, 1.0) for s in range(10, 1001, 33)]
    for query in (10, 300):
        guess = estimate(runs, query * MB)
        assert guess is not None and guess.after_miss < guess.memory * RETRY_GROWTH, guess
        assert retry_memory(guess.memory, guess.memory, guess.after_miss) == math.ceil(guess.memory * RETRY_GROWTH)


def test_a_keys_runs_are_learnt_once_until_they_change() -> None:
    """The executor keeps what a key's runs say (a batch of many jobs of one key learns once),
    and learns again when one of its runs ends."""
    book = RunBook(None)
    assert book.model("k") is None
    spec = to_spec(Job(["true"]))

    def ended(peak_mb: float) -> Any:  # what the run book reads of a result (GPU memory: a tenth)
        return SimpleNamespace(failure=None, memory_used=peak_mb, gpu_memory_used=peak_mb / 10, runtime=1.0)

    for i in range(30):
        book.learn("k", spec, (i + 1) * MB, ended(100 + i), False)
    first, first_gpu = book.model("k"), book.model("k", gpu=True)
    assert first is not None and book.model("k") is first
    assert first_gpu is not None and book.model("k", gpu=True) is first_gpu
    runs = [Run((i + 1) * MB, int((100 + i) * MB), 1.0) for i in range(30)]
    assert first.at(10 * MB) == estimate(runs, 10 * MB)
    gpu_runs = [Run(run.size, int(run.peak / 10), 1.0) for run in runs]
    assert first_gpu.at(10 * MB) == estimate(gpu_runs, 10 * MB, by_cost=False)
    book.learn("k", spec, 5 * MB, ended(900), False)
    second, second_gpu = book.model("k"), book.model("k", gpu=True)
    assert second is not None and second is not first and second_gpu is not first_gpu
    assert second.at(5 * MB).memory >= 900 * MB * (1 + MARGIN)


def test_a_band_of_input_sizes_whose_peaks_are_higher_is_learned_where_it_is() -> None:
    """Peaks of about 1G, except three times as much for inputs in one band of sizes (as a tool
    switching strategy at some size does): inside the band the estimate covers the band's
    peaks; away from it, it is not raised by them."""
    runs = [Run(s * 10 * MB, (3000 if 30 <= s < 36 else 1000 + 7 * (s % 5)) * MB, 60.0) for s in range(1, 61)]
    inside = estimate(runs, 32 * 10 * MB)
    assert inside is not None and inside.memory >= 3000 * MB
    for s in (10, 25, 26, 27, 40, 41, 55):  # (the usual 12 neighbours of 25-27 and 40-41 reach into the band)
        away = estimate(runs, s * 10 * MB)
        assert away is not None and away.memory < 1300 * MB, (s, away)


# -- the store --------------------------------------------------------------------------------

WRITER = """
import sys
from mpmsub._learn.history import History, row
history = History(sys.argv[1], tolerant=False)
for batch in range(20):
    history.add([row("k" + sys.argv[2], ["tool", str(i)], i, i * 1024, 0.1, 0.1, 0, None, None)
                 for i in range(10)])
history.close()
"""


def test_concurrent_writers_share_one_history(tmp_path: Path) -> None:
    path = history_file(tmp_path)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(n)]) for n in range(6)]
    assert [w.wait(timeout=60) for w in writers] == [0] * 6
    with History(path, tolerant=False) as history:
        assert sorted(s.runs for s in history.summaries()) == [200] * 6
        assert len(history.runs("k3")) == min(200, WINDOW) and len(history.runs("k3", limit=50)) == 50
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_corrupt_history_warns_once_and_the_batch_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(b"this is not a database" * 100)
    caplog.set_level(logging.WARNING, logger="mpmsub")
    with MemoryAwareExecutor(cpus=2, memory="1G", history=str(path)) as ex:
        results = [ex.submit(Job(["true"]).memory("auto")).result(timeout=30) for _ in range(3)]
    assert all(r.success for r in results)
    warnings = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert path.read_bytes().startswith(b"this is not a database")  # left as it was


def test_a_locked_history_warns_once_and_the_batch_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = history_file(tmp_path)
    History(path).close()  # made, then locked by another writer for the whole batch
    monkeypatch.setattr(history_module, "_TIMEOUT", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    caplog.set_level(logging.WARNING, logger="mpmsub")
    try:
        with MemoryAwareExecutor(cpus=2, memory="1G", history=path) as ex:
            results = [ex.submit(["true"]).result(timeout=30) for _ in range(3)]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert all(r.success for r in results)
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1


def test_every_finished_job_adds_a_row(tmp_path: Path) -> None:
    path = history_file(tmp_path)
    data = sized_file(tmp_path / "in.dat", 2)
    with MemoryAwareExecutor(cpus=2, memory="1G", history=path) as ex:
        ok = ex.submit(tool(data, "--per-mb", "5", "--hold", "0")).result(timeout=30)
        bad = ex.submit(["sh", "-c", "exit 3"]).result(timeout=30)
        ex.submit(["no-such-program-xyz"]).result(timeout=30)  # never started: no row
    rows = history_rows(path)
    assert [r["failure"] for r in rows] == [None, "exit"] or [r["failure"] for r in rows] == ["exit", None]
    mine = next(r for r in rows if r["failure"] is None)
    assert mine["key"] == "python sized_tool.py *.dat --per-mb # --hold #"
    assert mine["argv"] == ok.cmd and mine["input_bytes"] == 2 * MB
    assert mine["peak_bytes"] == int(ok.memory_used * MB) and mine["version"] == mpmsub.__version__
    assert mine["host"] and mine["time"] > 0 and mine["runtime"] == pytest.approx(ok.runtime)
    assert next(r for r in rows if r["failure"] == "exit")["returncode"] == bad.returncode == 3


def test_history_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPMSUB_HISTORY", "off")
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        assert ex.history is None
        assert ex.submit(Job(["true"]).memory("auto")).result(timeout=30).success
    monkeypatch.setenv("MPMSUB_HISTORY", str(tmp_path / "h.db"))
    with MemoryAwareExecutor(cpus=1, memory="1G", history=False) as ex:
        assert ex.history is None
        assert ex.submit(["true"]).result(timeout=30).success
    assert not (tmp_path / "h.db").exists()
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:  # and the variable is read
        assert ex.submit(["true"]).result(timeout=30).success
    assert len(history_rows(str(tmp_path / "h.db"))) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"history": 12}, TypeError, "history must be True, False or the path"),
        ({"history": ""}, ValueError, "invalid history ''"),
        ({"history": "off"}, ValueError, "give history=False"),
        ({"auto_memory": "yes"}, TypeError, "auto_memory must be True or False; got 'yes'"),
        ({"probe_memory": "lots"}, ValueError, "invalid probe_memory 'lots'"),
        ({"probe_memory": "2G"}, ValueError, "invalid probe_memory '2G'"),
    ],
)
def test_bad_learning_options_are_refused_at_once(kwargs: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        MemoryAwareExecutor(cpus=1, memory="1G", **kwargs)
    with pytest.raises(error, match=message):
        mpmsub.cluster(p=1, m="1G", **kwargs)


def test_bad_auto_values_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="invalid m \\(memory\\) 'autox'"):
        Job(["true"]).memory("autox")
    with pytest.raises(ValueError, match="invalid key ''"):
        Job(["true"]).with_key("")
    with pytest.raises(TypeError, match="key must be a non-empty string"):
        mpmsub.job(["true"], key=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strict memory needs"):
        Job(["true"]).strict_memory().spec()


# -- probe, then fan out ----------------------------------------------------------------------


def test_a_tool_never_seen_is_probed_with_its_largest_input_then_fanned_out(tmp_path: Path) -> None:
    files = [sized_file(tmp_path / f"s{mb}.dat", mb) for mb in (1, 4, 2, 3)]
    with MemoryAwareExecutor(cpus=2, memory="1G", memory_reserve=0, history=history_file(tmp_path)) as ex:
        futures = [ex.submit(Job(tool(f, "--per-mb", "20", "--hold", "0.3")).memory("auto")) for f in files]
        other = ex.submit(Job(["sleep", "0.2"]))  # no m: runs beside the probe
        results = [f.result(timeout=60) for f in futures]
        beside = other.result(timeout=30)
    probe = results[1]  # the 4 MB input: the largest
    assert (probe.memory_estimate, probe.memory_estimate_runs) == ("probe", 0)
    assert probe.memory_requested == 1024  # what was free when it started
    assert beside.start_time < probe.end_time
    siblings = [r for r in results if r is not probe]
    assert all(r.success for r in results)
    assert all(r.start_time >= probe.end_time - 0.01 for r in siblings), "a sibling started before the probe ended"
    assert {r.memory_estimate for r in siblings} <= {"highest", "fit"}
    for r in siblings:  # estimates cover what each used, without the probe's whole budget
        assert r.memory_used <= r.memory_requested < 1024


def test_a_low_estimate_is_stopped_retried_with_more_and_learned(tmp_path: Path) -> None:
    path = history_file(tmp_path)
    data = sized_file(tmp_path / "in.dat", 1)
    with MemoryAwareExecutor(cpus=1, memory="1G", strict_memory=True, history=path) as ex:
        small = ex.submit(Job(tool(data, "--base", "10", "--per-mb", "0", "--hold", "0.3")).with_key("grows"))
        assert small.result(timeout=30).success
        # The same key now needs 200M: its estimate (from a ~20M run) is far too low.
        big = Job(tool(data, "--base", "200", "--per-mb", "0", "--hold", "0.3")).with_key("grows").memory("auto")
        first = ex.submit(big).result(timeout=60)
        after = ex.submit(Job(big.cmd).with_key("grows").memory("auto")).result(timeout=60)
    assert first.success and first.attempts >= 2, (first.attempts, first.error)
    assert first.memory_estimate == "highest" and first.memory_estimate_runs == 1
    assert first.memory_requested is not None and first.memory_requested >= first.memory_used
    assert after.success and after.attempts == 1
    assert after.memory_requested is not None and after.memory_requested > first.memory_used
    rows = history_rows(path, "grows")
    assert [r["failure"] for r in rows].count("memory") == first.attempts - 1


def test_a_stopped_estimate_runs_again_near_the_highest_peak_its_key_reached(tmp_path: Path) -> None:
    """A key whose runs took about 30M, once 300M: a job of it that needs 150M is estimated for
    the many, stopped, and runs again with about 300M at once (not 1.25 times more, five times)."""
    path = history_file(tmp_path)
    data = sized_file(tmp_path / "in.dat", 1)
    with History(path) as history:
        history.add(
            [
                row("rare", ["tool"], MB + i * 40_000, (300 if i == 11 else 30 + i % 3) * MB, 1.0, 1.0, 0, None, None)
                for i in range(30)
            ]
        )
    with MemoryAwareExecutor(cpus=1, memory="1G", strict_memory=True, history=path) as ex:
        big = Job(tool(data, "--base", "150", "--per-mb", "0", "--hold", "0.3")).with_key("rare").memory("auto")
        result = ex.submit(big).result(timeout=60)
    assert result.success and result.attempts == 2, (result.attempts, result.error)
    assert result.memory_estimate == "neighbours" and result.memory_estimate_runs == 30
    # (the runs nearest its input, following their trend, rising as far as the 300M one did; at most 300M)
    assert result.memory_requested is not None and 200 < result.memory_requested <= 300
    assert [r["failure"] for r in history_rows(path, "rare")].count("memory") == 1


def test_held_jobs_are_cancelled_with_the_queue(tmp_path: Path) -> None:
    ex = MemoryAwareExecutor(cpus=1, memory="1G", history=history_file(tmp_path))
    futures = [ex.submit(Job(["sleep", "0.5"]).with_key("napper").memory("auto")) for _ in range(4)]
    assert ex.status().queued + ex.status().running == 4
    deadline = time.monotonic() + 10
    while not futures[0].running() and time.monotonic() < deadline:  # the probe, once chosen
        time.sleep(0.01)
    ex.shutdown(wait=True, cancel_futures=True)
    assert futures[0].result().success  # the probe was running
    assert all(f.cancelled() for f in futures[1:])


def test_auto_everywhere(tmp_path: Path) -> None:
    path = history_file(tmp_path)
    call = mpmsub.Call(os.path.getsize, TOOL).memory("AUTO").with_key("getsize")
    jobs = [
        Job(["true"]).memory("auto"),
        {"cmd": ["true"], "m": "auto"},
        mpmsub.job(["true"], m="auto"),
        call,
    ]
    with MemoryAwareExecutor(cpus=2, memory="1G", history=path) as ex:
        futures = [ex.submit(j) for j in jobs]
        assert futures[3].result(timeout=60) == os.path.getsize(TOOL)
        results = [f.usage for f in futures]
        mapped = list(ex.map(os.path.getsize, [TOOL], memory="auto"))
    assert mapped == [os.path.getsize(TOOL)]
    assert all(r is not None and r.memory_estimate in ("probe", "highest") for r in results)
    with MemoryAwareExecutor(cpus=2, memory="1G", history=path, auto_memory=True) as ex:
        r = ex.submit(["true"]).result(timeout=30)
        fixed = ex.submit(Job(["true"]).memory("10M")).result(timeout=30)
    assert r.memory_estimate == "highest" and r.memory_estimate_runs >= 3
    assert fixed.memory_estimate is None and fixed.memory_requested == 10
    batch = mpmsub.cluster(p=2, m="1G", auto_memory=True, history=path, progress_bar=False, verbose=False)
    batch.jobs.append({"cmd": ["true"]})
    batch.run()
    assert batch.completed_jobs[0].memory_estimate == "highest"


def test_profile_writes_its_measurements_to_the_history(tmp_path: Path) -> None:
    path = history_file(tmp_path)
    data = sized_file(tmp_path / "in.dat", 1)
    batch = mpmsub.cluster(p=1, m="1G", history=path, progress_bar=False, verbose=False)
    batch.jobs.append({"cmd": tool(data, "--per-mb", "30", "--hold", "0"), "m": "auto"})
    [result] = batch.profile(verbose=False)
    [row] = history_rows(path)
    assert row["peak_bytes"] == int(result.memory_used * MB) and row["input_bytes"] == MB


# -- the command line -------------------------------------------------------------------------


def mpmsub_cli(*args: str, env_db: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPMSUB_HISTORY": env_db}
    return subprocess.run(
        [sys.executable, "-m", "mpmsub", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


def test_the_history_command(tmp_path: Path) -> None:
    db = history_file(tmp_path)
    data = sized_file(tmp_path / "in.dat", 1)
    jobs = tmp_path / "jobs.jsonl"
    line = {"cmd": tool(data, "--per-mb", "30", "--hold", "0"), "m": "auto"}
    jobs.write_text(json.dumps(line) + "\n" + json.dumps({**line, "id": "two"}) + "\n")
    ran = mpmsub_cli("run", str(jobs), "-q", env_db=db)
    assert ran.returncode == 0, ran.stderr
    text = tmp_path / "jobs.txt"
    text.write_text(f"{sys.executable} {TOOL} {data} --per-mb 30 --hold 0\n")
    ran = mpmsub_cli("run", str(text), "--job-mem", "auto", "-q", env_db=db)
    assert ran.returncode == 0, ran.stderr
    key = "python sized_tool.py *.dat --per-mb # --hold #"
    listed = mpmsub_cli("history", "list", env_db=db)
    assert listed.returncode == 0 and key in listed.stdout and "highest, 2 run(s)" in listed.stdout
    shown = mpmsub_cli("history", "show", key, env_db=db)
    assert shown.returncode == 0 and "runs: 2" in shown.stdout and "predicted: " in shown.stdout
    exported = mpmsub_cli("history", "export", env_db=db)
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(rows) == 3 and {r["key"] for r in rows} == {key, f"sh -c {key}"}
    forgot = mpmsub_cli("history", "forget", key, env_db=db)
    assert forgot.returncode == 0 and "forgot 2 run(s)" in forgot.stderr
    assert mpmsub_cli("history", "show", key, env_db=db).returncode == 1
    assert "forgot 1 run(s) of every key" in mpmsub_cli("history", "forget", "--all", env_db=db).stderr
    off = mpmsub_cli("history", "list", env_db="off")
    assert off.returncode == 2 and "the run history is off" in off.stderr
    bad = mpmsub_cli("run", "-", "--job-mem", "autox", env_db=db, stdin="true\n")
    assert bad.returncode == 2 and "invalid job memory 'autox'" in bad.stderr


def test_a_probe_never_starts_with_nothing_reserved(tmp_path: Path) -> None:
    with MemoryAwareExecutor(cpus=2, memory="1G", memory_reserve=0, history=history_file(tmp_path)) as ex:
        first = ex.submit(Job(["sleep", "0.3"]).with_key("one").memory("auto"))
        second = ex.submit(Job(["sleep", "0.1"]).with_key("two").memory("auto"))
        a, b = first.result(timeout=30), second.result(timeout=30)
    earlier, later = sorted((a, b), key=lambda r: r.start_time)
    assert earlier.memory_requested == 1024  # all that was free
    assert later.start_time >= earlier.end_time - 0.01  # waited for its CPU's share, 512M
    assert later.memory_requested is not None and later.memory_requested >= 512


def test_cancelled_held_jobs_are_let_go_and_shutdown_is_prompt(tmp_path: Path) -> None:
    ex = MemoryAwareExecutor(cpus=1, memory="1G", history=history_file(tmp_path))
    futures = [ex.submit(Job(["sleep", "0.3"]).with_key("many").memory("auto")) for _ in range(300)]
    deadline = time.monotonic() + 10
    while not any(f.running() for f in futures) and time.monotonic() < deadline:
        time.sleep(0.01)
    probe = next(f for f in futures if f.running())
    held = [f for f in futures if f is not probe]
    assert all(f.cancel() for f in held)
    started = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - started < 5
    assert probe.result().success and all(f.cancelled() for f in held)


def test_a_cancelled_probe_hands_over_and_terminate_cancels_the_held(tmp_path: Path) -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G", history=history_file(tmp_path)) as ex:
        blocker = ex.submit(["sleep", "0.5"])  # the probe waits for the CPU, queued
        first = ex.submit(Job(["sleep", "0.1"]).with_key("k").memory("auto"))
        second = ex.submit(Job(["sleep", "0.1"]).with_key("k").memory("auto"))
        time.sleep(0.2)  # the probe is chosen (first: the same input, submitted first)
        assert first.cancel()
        r = second.result(timeout=30)
        assert blocker.result().success
    assert r.success and r.memory_estimate == "probe"
    ex = MemoryAwareExecutor(cpus=1, memory="1G", history=history_file(tmp_path))
    futures = [ex.submit(Job(["sleep", "5"]).with_key("slow").memory("auto")) for _ in range(3)]
    deadline = time.monotonic() + 10
    while not futures[0].running() and time.monotonic() < deadline:  # the probe, once started
        time.sleep(0.01)
    started = time.monotonic()
    ex.terminate()
    assert time.monotonic() - started < 5
    assert futures[0].result().failure == "cancelled"
    assert all(f.cancelled() for f in futures[1:])


def test_profile_measures_unreserved_with_auto_memory(tmp_path: Path) -> None:
    batch = mpmsub.cluster(
        p=1, m="1G", auto_memory=True, history=history_file(tmp_path), progress_bar=False, verbose=False
    )
    batch.jobs.extend([["true"], ["true"]])
    results = batch.profile(verbose=False)
    assert [(r.memory_requested, r.memory_estimate) for r in results] == [(None, None), (None, None)]


def test_the_history_command_on_a_corrupt_database_and_a_bad_output(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    db.write_bytes(b"not a database" * 100)
    listed = mpmsub_cli("history", "list", env_db=str(db))
    assert listed.returncode == 1 and "cannot read the run history" in listed.stderr
    good = history_file(tmp_path)
    with MemoryAwareExecutor(cpus=1, memory="1G", history=good) as ex:
        ex.submit(["true"]).result(timeout=30)
    out = mpmsub_cli("history", "export", "-o", str(tmp_path / "no" / "such" / "dir.jsonl"), env_db=good)
    assert out.returncode == 1 and "cannot write" in out.stderr and "Traceback" not in out.stderr
    missing = mpmsub_cli("history", "--db", str(tmp_path / "typo.db"), "export", env_db=good)
    assert missing.returncode == 0 and "no run history at" in missing.stderr
    assert not (tmp_path / "typo.db").exists()


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_history_is_private_to_its_user(tmp_path: Path) -> None:
    """It holds every command line run (a token among the arguments): the directory mpmsub makes
    for it is 0700, the database and SQLite's -wal and -shm files 0600, whatever the umask. An
    existing database keeps its mode: it is the user's."""
    path = tmp_path / "state" / "mpmsub" / "history.db"
    previous = os.umask(0)
    try:
        history = History(str(path), tolerant=False)
        history.add([row("k", ["tool", "--token=secret"], 1, MB, 0.1, 0.1, 0, None, None)])
        assert len(history.runs("k")) == 1
        modes = {file.name: _mode(file) for file in path.parent.iterdir()}  # while it is open
        history.close()
    finally:
        os.umask(previous)
    assert modes == {"history.db": 0o600, "history.db-wal": 0o600, "history.db-shm": 0o600}
    assert _mode(path.parent) == 0o700
    os.chmod(path, 0o640)
    with History(str(path), tolerant=False) as history:
        history.add([row("k", ["tool"], 1, MB, 0.1, 0.1, 0, None, None)])
        assert len(history.runs("k")) == 2
    assert _mode(path) == 0o640


def test_a_long_shell_script_is_keyed_by_its_beginning_in_linear_time() -> None:
    # shlex takes time growing with the square of a token's length: a 1 MB line took 12 s, and
    # the command line could not be stopped while it keyed one.
    script = "gzip -k a.txt && echo " + "x" * 2_000_000
    key = job_key(to_spec(["sh", "-c", script]))
    assert key.startswith("sh -c gzip -k *.txt && echo") and key.endswith("…") and len(key) < 100


def test_a_name_that_is_not_utf8_gives_a_key_the_history_can_store(tmp_path: Path) -> None:
    spec = to_spec(["touch", str(tmp_path / "caf\udce9.txt")])
    key = job_key(spec)
    key.encode("utf-8")  # what SQLite takes
    with MemoryAwareExecutor(cpus=1, memory="1G", history=str(tmp_path / "h.db")) as ex:
        assert ex.submit(mpmsub.Job(spec.stages[0]).memory("auto")).result().success
    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        assert len(history.runs(key)) == 1


def test_a_history_written_before_gpu_peaks_is_read_and_then_takes_them(tmp_path: Path) -> None:
    """A runs table without the GPU peak column (as mpmsub wrote it before measuring GPUs): its
    rows read as before (no GPU peak), and the first row with one adds the column."""
    path = tmp_path / "old.db"
    old_schema = re.sub(
        r"NOT NULL,(\s*-- Unix time of its end)\n\s*gpu_peak_bytes[^\n]*", r"NOT NULL\1", history_module._SCHEMA
    )
    assert "gpu_peak_bytes" not in old_schema
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(old_schema)
        old_row = row("tool", ["tool"], 0, 5 * 2**20, 1.0, 1.0, 0, None, None)[:-1]
        conn.execute(
            f"INSERT INTO runs ({', '.join(history_module._COLUMNS[:-1])}) VALUES ({', '.join('?' * 12)})", old_row
        )
        conn.commit()
    with History(str(path), tolerant=False) as old:
        assert [r["peak_bytes"] for r in old.rows("tool")] == [5 * 2**20]
        assert old.gpu_runs("tool") == [] and old.runs("tool") == [Run(0, 5 * 2**20, 1.0)]
        old.add([row("tool", ["tool"], 0, 6 * 2**20, 1.0, 1.0, 0, None, None, 300 * 2**20)])
        assert [r["gpu_peak_bytes"] for r in old.rows("tool")] == [None, 300 * 2**20]
        assert old.gpu_runs("tool") == [Run(0, 300 * 2**20, 1.0)]
