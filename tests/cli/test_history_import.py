"""`mpmsub history import`: Nextflow traces and Snakemake benchmarks read into the run history,
driven through the command in a subprocess, and the parsers of Nextflow's figures."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmsub import Job, MemoryAwareExecutor
from mpmsub._learn import imports
from mpmsub._learn.estimate import WINDOW
from mpmsub._learn.history import _COLUMNS, History
from mpmsub._units import MB

ROOT = Path(__file__).resolve().parent.parent.parent
TRACES = Path("/work/shared/data/nf-core-traces")
GB = 1024 * MB
WHEN = 1_600_000_000.0  # the sample files' modification time


def mpmsub(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "mpmsub", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def write(path: Path, lines: List[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    os.utime(path, (WHEN, WHEN))
    return path


def tsv(*cells: str) -> str:
    return "\t".join(cells)


def nextflow_tsv(path: Path) -> Path:
    """A trace.txt as Nextflow writes it by default (human sizes and durations; no process
    column), with memory and complete added, and rows of every kind."""
    header = tsv(
        "task_id", "hash", "name", "status", "exit", "realtime", "%cpu", "peak_rss", "rchar", "memory", "complete"
    )
    return write(
        path,
        [
            header,
            tsv(
                "1",
                "a1/000001",
                "FASTQC (s1)",
                "COMPLETED",
                "0",
                "3m 4s",
                "150.0%",
                "1.2 GB",
                "512 MB",
                "4 GB",
                "2024-01-02 03:04:05.500",
            ),
            tsv("2", "a1/000002", "FASTQC (s2)", "COMPLETED", "0", "250ms", "-", "3.4 KB", "1 GB", "-", "-"),
            tsv(
                "3",
                "a1/000003",
                "STAR_ALIGN (s1)",
                "FAILED",
                "137",
                "1h 2m 3s",
                "99.5%",
                "31.9 GB",
                "2 GB",
                "32 GB",
                "-",
            ),
            tsv("4", "a1/000004", "STAR_ALIGN (s2)", "FAILED", "1", "4.5s", "100.0%", "1 GB", "3 GB", "32 GB", "-"),
            tsv("5", "a1/000001", "FASTQC (s1)", "CACHED", "0", "3m 4s", "150.0%", "1.2 GB", "512 MB", "4 GB", "-"),
            tsv("6", "a1/000006", "FASTQC (s4)", "ABORTED", "-", "-", "-", "-", "-", "4 GB", "-"),
            tsv("7", "a1/000007", "FASTQC (s5)", "COMPLETED", "0", "2s", "10.0%", "1.2 XB", "1 MB", "4 GB", "-"),
            tsv("8", "a1/000008", "FASTQC (s6)", "COMPLETED", "0", "2s", "10.0%", "-", "1 MB", "4 GB", "-"),
        ],
    )


SNAKEMAKE_HEADER = tsv(
    "s", "h:m:s", "max_rss", "max_vms", "max_uss", "max_pss", "io_in", "io_out", "mean_load", "cpu_time"
)


def extended(rule: str, sample: str, rss: float, sizes: List[float]) -> str:
    """A line of Snakemake's --benchmark-extended JSON Lines (the fields of its BenchmarkRecord,
    sort_keys=True as Snakemake writes them)."""
    record = {
        "cpu_time": 0.5,
        "h:m:s": "0:00:02",
        "input_size_mb": {f"data/{sample}.{n}.fastq": size for n, size in enumerate(sizes)},
        "io_in": 0.1,
        "io_out": 0.0,
        "jobid": 3,
        "max_pss": 10.0,
        "max_rss": rss,
        "max_uss": 9.0,
        "max_vms": 300.0,
        "mean_load": 0.25,
        "params": {},
        "resources": {"_cores": 1, "_nodes": 1, "mem_mb": 2000, "mem_mib": 1908, "disk_mb": 1000, "tmpdir": "/tmp"},
        "rule_name": rule,
        "s": 2.0,
        "threads": 1,
        "wildcards": {"sample": sample},
    }
    return json.dumps(record, sort_keys=True)


def test_a_nextflow_trace_with_human_figures_becomes_runs_of_its_processes(tmp_path: Path) -> None:
    nextflow_tsv(tmp_path / "trace.txt")
    out = mpmsub("history", "--db", "h.db", "import", "trace.txt", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "trace.txt (Nextflow trace): 4 run(s) of 2 key(s) imported, 2 cached or aborted, 2 malformed"
    assert [line.split() for line in lines[1:]] == [["2", "FASTQC"], ["2", "STAR_ALIGN"]]
    # Malformed rows: one warning, naming the first and why.
    assert out.stderr.count("mpmsub:") == 1
    assert "trace.txt: skipped 2 malformed row(s); the first, line 8: peak_rss: '1.2 XB' is not a size" in out.stderr

    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        first, second = history.rows("FASTQC")
        assert first["argv"] == ["nextflow", "FASTQC (s1)", "a1/000001"]
        assert (first["peak_bytes"], first["input_bytes"], first["memory_requested"]) == (
            round(1.2 * GB),
            512 * MB,
            4 * GB,
        )
        assert (first["runtime"], first["cpu_time"]) == (184.0, pytest.approx(276.0))
        assert (first["returncode"], first["failure"], first["host"]) == (0, None, "imported")
        assert first["time"] == time.mktime(time.strptime("2024-01-02 03:04:05", "%Y-%m-%d %H:%M:%S")) + 0.5
        assert (second["peak_bytes"], second["runtime"], second["cpu_time"]) == (round(3.4 * 1024), 0.25, 0.0)
        assert (second["memory_requested"], second["time"]) == (None, WHEN)  # none: the file's time
        killed, failed = history.rows("STAR_ALIGN")
        assert (killed["failure"], killed["returncode"], killed["runtime"]) == ("memory", 137, 3723.0)
        assert (failed["failure"], failed["returncode"], failed["runtime"]) == ("exit", 1, 4.5)
        assert len(history.runs("STAR_ALIGN")) == 2  # both learned from: a peak says what was needed
        assert [len(list(history.rows(key))) for key in ("FASTQC", "STAR_ALIGN")] == [2, 2]

    shown = mpmsub("history", "--db", "h.db", "show", "STAR_ALIGN", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "runs: 2" in shown.stdout and "memory (137)" in shown.stdout and "exit (1)" in shown.stdout
    assert "last command: nextflow STAR_ALIGN (s2) a1/000004" in shown.stdout
    listed = mpmsub("history", "--db", "h.db", "list", cwd=tmp_path)
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [["FASTQC", "2"], ["STAR_ALIGN", "2"]]


def test_a_nextflow_csv_with_raw_numbers_and_another_input_size_column(tmp_path: Path) -> None:
    write(
        tmp_path / "trace.csv",
        [
            "task_id,hash,process,name,status,exit,realtime,%cpu,peak_rss,rchar,read_bytes,memory,hostname,complete,x",
            '1,b2/000001,NF:X:SORT,"NF:X:SORT (a, b)",COMPLETED,0,1500,200.0,104857600,2097152,1048576,'
            '1073741824,node1,1700000000123,"1;2,3"',
            "2,b2/000002,NF:X:SORT,NF:X:SORT (c),COMPLETED,0,3000,100.0,209715200,4194304,2097152,-,"
            "node2,1700000001000,-",
        ],
    )
    out = mpmsub(
        "history",
        "--db",
        "h.db",
        "import",
        "--key-prefix",
        "nf:",
        "--input-size",
        "read_bytes",
        "trace.csv",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "trace.csv (Nextflow trace): 2 run(s) of 1 key(s) imported"
    assert out.stderr == ""
    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        rows = list(history.rows("nf:NF:X:SORT"))
        assert [r["input_bytes"] for r in rows] == [1048576, 2097152]  # read_bytes, not rchar
        assert [r["peak_bytes"] for r in rows] == [100 * MB, 200 * MB]
        assert [(r["runtime"], r["cpu_time"]) for r in rows] == [(1.5, 3.0), (3.0, 3.0)]
        assert [(r["host"], r["time"], r["memory_requested"]) for r in rows] == [
            ("node1", 1700000000.123, GB),
            ("node2", 1700000001.0, None),
        ]
        assert rows[0]["argv"] == ["nextflow", "NF:X:SORT (a, b)", "b2/000001"]
        assert [(r.size, r.peak) for r in history.runs("nf:NF:X:SORT")] == [(1048576, 100 * MB), (2097152, 200 * MB)]
    missing = mpmsub("history", "--db", "h.db", "import", "--input-size", "bytes_in", "trace.csv", cwd=tmp_path)
    assert missing.returncode == 1
    assert "trace.csv: no column 'bytes_in' for the input size; it has task_id, hash," in missing.stderr


def test_snakemake_benchmarks_key_by_file_name_or_key_and_read_sizes_in_mb(tmp_path: Path) -> None:
    write(
        tmp_path / "benchmarks" / "samtools_sort.tsv",
        [
            SNAKEMAKE_HEADER,
            tsv("1.2345", "0:00:01", "120.50", "300.1", "100.0", "110.0", "5.00", "1.00", "0.80", "0.99"),
        ],
    )
    for sample, rss in (("A", "200.00"), ("B", "400.00")):
        rows = [tsv("3.0", "0:00:03", rss, "900", "NA", "NA", "10.00", "2.00", "0.90", "2.70")]
        if sample == "B":  # repeat("...", 2) writes a row per repeat; one Snakemake could not measure
            rows.append(tsv("3.1", "0:00:03", "NA", "NA", "NA", "NA", "NA", "NA", "NA", "NA"))
        write(tmp_path / "benchmarks" / "bwa_map" / f"{sample}.tsv", [SNAKEMAKE_HEADER, *rows])
    out = mpmsub("history", "--db", "h.db", "import", "benchmarks/samtools_sort.tsv", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "benchmarks/samtools_sort.tsv (Snakemake benchmark): 1 run(s) of 1 key(s) imported",
        "       1  samtools_sort",
    ]
    out = mpmsub(
        "history", "--db", "h.db", "import", "--key", "bwa_map", "--input-size", "io_in",
        "benchmarks/bwa_map/A.tsv", "benchmarks/bwa_map/B.tsv", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "benchmarks/bwa_map/B.tsv (Snakemake benchmark): 1 run(s) of 1 key(s) imported, 1 malformed" in out.stdout
    assert "B.tsv: skipped 1 malformed row(s); the first, line 3: no max_rss" in out.stderr
    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        (sort,) = history.rows("samtools_sort")
        assert (sort["peak_bytes"], sort["input_bytes"], sort["runtime"], sort["cpu_time"]) == (
            round(120.5 * MB),
            0,
            1.2345,
            0.99,
        )
        assert (sort["returncode"], sort["failure"], sort["host"], sort["time"]) == (0, None, "imported", WHEN)
        assert sort["argv"][:2] == ["snakemake", "samtools_sort"]
        assert [(r.size, r.peak) for r in history.runs("bwa_map")] == [(10 * MB, 200 * MB), (10 * MB, 400 * MB)]


def test_snakemake_extended_json_lines_name_their_rule_input_and_request(tmp_path: Path) -> None:
    write(
        tmp_path / "benchmarks" / "map.jsonl",
        [extended("bwa_map", "A", 64.0, [0.5, 1.5]), "{not json", extended("bwa_map", "B", 128.0, [3.0, 1.0])],
    )
    plain = {"s": 1.0, "h:m:s": "0:00:01", "max_rss": 10.0, "cpu_time": "NA"}  # without --benchmark-extended
    write(tmp_path / "benchmarks" / "plain.jsonl", [json.dumps(plain)])
    out = mpmsub(
        "history", "--db", "h.db", "import", "--key-prefix", "smk:", "benchmarks/map.jsonl", "benchmarks/plain.jsonl",
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "benchmarks/map.jsonl (Snakemake benchmark): 2 run(s) of 1 key(s) imported, 1 malformed",
        "       2  smk:bwa_map",
        "benchmarks/plain.jsonl (Snakemake benchmark): 1 run(s) of 1 key(s) imported",
        "       1  smk:plain",
    ]
    assert "map.jsonl: skipped 1 malformed row(s); the first, line 2: not JSON" in out.stderr
    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        a, b = history.rows("smk:bwa_map")
        assert (a["input_bytes"], a["peak_bytes"], a["memory_requested"]) == (2 * MB, 64 * MB, 1908 * MB)
        assert (b["input_bytes"], b["runtime"], b["cpu_time"]) == (4 * MB, 2.0, 0.5)
        assert a["argv"][:2] == ["snakemake", "bwa_map"]
        (run,) = history.rows("smk:plain")  # no rule in it: the file's name; no input size: 0
        assert (run["input_bytes"], run["peak_bytes"], run["memory_requested"], run["cpu_time"]) == (
            0,
            10 * MB,
            None,
            0.0,
        )


def test_files_of_another_format_are_refused_and_nothing_is_imported(tmp_path: Path) -> None:
    nextflow_tsv(tmp_path / "trace.txt")
    write(tmp_path / "x.txt", ["name,size", "a,1"])
    refused = mpmsub("history", "--db", "h.db", "import", "trace.txt", "x.txt", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr == (
        "mpmsub: x.txt: not a Nextflow trace (no process/peak_rss columns) nor a Snakemake benchmark "
        "(no s/max_rss columns)\n"
    )
    assert refused.stdout == ""
    write(tmp_path / "other.jsonl", ['{"cmd": ["true"], "m": "1G"}'])
    (tmp_path / "binary.db").write_bytes(b"SQLite format 3\x00\xff\xfe")
    (tmp_path / "empty.tsv").write_text("\n")
    for name, why in (
        ("other.jsonl", "nor a Snakemake benchmark (no s/max_rss columns)\n"),
        ("binary.db", "(no s/max_rss columns): it is not UTF-8 text\n"),
        ("empty.tsv", "empty.tsv: empty: expected a Nextflow trace or a Snakemake benchmark\n"),
        ("missing.txt", "cannot read 'missing.txt': No such file or directory\n"),
    ):
        out = mpmsub("history", "--db", "h.db", "import", name, cwd=tmp_path)
        assert out.returncode == 1 and out.stderr.endswith(why), out.stderr
    empty = mpmsub("history", "--db", "h.db", "import", "--key", " ", "trace.txt", cwd=tmp_path)
    assert empty.returncode == 2 and "invalid key ' ': expected a non-empty string" in empty.stderr
    if (tmp_path / "h.db").exists():
        with History(str(tmp_path / "h.db")) as history:
            assert not list(history.rows())


def test_importing_again_adds_only_runs_not_yet_imported(tmp_path: Path) -> None:
    nextflow_tsv(tmp_path / "trace.txt")
    bench = write(tmp_path / "benchmarks" / "sort.tsv", [SNAKEMAKE_HEADER, tsv("1.0", "0:00:01", "50.0", *["1"] * 7)])
    assert mpmsub("history", "--db", "h.db", "import", "trace.txt", "benchmarks/sort.tsv", cwd=tmp_path).returncode == 0
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "trace.txt").write_bytes((tmp_path / "trace.txt").read_bytes())  # identities: task hashes
    again = mpmsub(
        "history", "--db", "h.db", "import", "copy/trace.txt", "benchmarks/../benchmarks/sort.tsv", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "copy/trace.txt (Nextflow trace): 0 run(s) of 0 key(s) imported, 4 already imported, 2 cached or aborted, "
        "2 malformed",
        "benchmarks/../benchmarks/sort.tsv (Snakemake benchmark): 0 run(s) of 0 key(s) imported, 1 already imported",
    ]
    write(bench, [SNAKEMAKE_HEADER, tsv("2.0", "0:00:02", "70.0", *["1"] * 7)])  # the rule ran again
    rerun = mpmsub("history", "--db", "h.db", "import", "benchmarks/sort.tsv", cwd=tmp_path)
    assert rerun.stdout.splitlines()[0] == "benchmarks/sort.tsv (Snakemake benchmark): 1 run(s) of 1 key(s) imported"
    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        assert [r["peak_bytes"] for r in history.rows("sort")] == [50 * MB, 70 * MB]
        assert len(list(history.rows())) == 6
    # Another key is another run: the same file under a prefix is imported beside it.
    prefixed = mpmsub("history", "--db", "h.db", "import", "--key-prefix", "nf:", "trace.txt", cwd=tmp_path)
    assert prefixed.stdout.splitlines()[0].startswith("trace.txt (Nextflow trace): 4 run(s) of 2 key(s) imported")


def nf_core_completed(path: Path) -> int:
    with path.open(newline="") as file:
        return sum(row["status"] == "COMPLETED" and row["peak_rss"] != "-" for row in csv.DictReader(file))


@pytest.mark.skipif(not TRACES.is_dir(), reason="the nf-core traces are not on this machine")
def test_the_nf_core_traces_are_imported_whole_and_teach_an_auto_job(tmp_path: Path) -> None:
    names = ["trace_chipseq.csv", "trace_eager.csv", "trace_rnaseq.csv"]
    out = mpmsub(
        "history", "--db", "h.db", "import", "--key-prefix", "nf:", *(str(TRACES / n) for n in names), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    counts = {n: nf_core_completed(TRACES / n) for n in names}
    assert counts == {"trace_chipseq.csv": 2938, "trace_eager.csv": 1576, "trace_rnaseq.csv": 1308}
    summaries = [line for line in out.stdout.splitlines() if not line.startswith(" ")]
    assert summaries == [
        f"{TRACES / 'trace_chipseq.csv'} (Nextflow trace): 2938 run(s) of 48 key(s) imported",
        f"{TRACES / 'trace_eager.csv'} (Nextflow trace): 1576 run(s) of 19 key(s) imported",
        f"{TRACES / 'trace_rnaseq.csv'} (Nextflow trace): 1308 run(s) of 54 key(s) imported",
    ]
    db = str(tmp_path / "h.db")
    with History(db, tolerant=False) as history:
        assert len(list(history.rows())) == sum(counts.values())
        fastqc = list(history.rows("nf:fastqc"))
        assert len(fastqc) == 137 and fastqc[0]["argv"] == ["nextflow", "fastqc (DA188_L1)", "4d/5d2be1"]
        assert (fastqc[0]["peak_bytes"], fastqc[0]["input_bytes"], fastqc[0]["runtime"]) == (
            274485248,
            145215827,
            12.291,
        )
        assert fastqc[0]["memory_requested"] == 4 * GB and fastqc[0]["time"] == 1719302586.0
    again = mpmsub(
        "history", "--db", "h.db", "import", "--key-prefix", "nf:", str(TRACES / "trace_eager.csv"), cwd=tmp_path
    )
    assert again.stdout.endswith("0 run(s) of 0 key(s) imported, 1576 already imported\n")

    # A job named by an imported key is estimated from those runs, not probed.
    job = Job([sys.executable, "-c", "pass"]).memory("auto").with_key("nf:fastqc")
    with MemoryAwareExecutor(cpus=1, memory="2G", history=db) as ex:
        result = ex.submit(job).result()
    assert result.returncode == 0
    assert result.memory_estimate not in (None, "probe") and result.memory_estimate_runs == min(137, WINDOW)
    assert 200 < result.memory_requested < 2048  # MB: fastqc's peaks (~300M), the margin added


# -- the parsers, against Python copies of Nextflow's own formatters --------------------------


def nf_size(size: int) -> str:
    """Nextflow's MemoryUnit.toString(): units of 1024, one decimal at most ('1.2 GB')."""
    if size <= 0:
        return "0"
    group = int(math.log10(size) / math.log10(1024))
    return f"{size / 1024**group:.1f}".rstrip("0").rstrip(".") + " " + ("B", "KB", "MB", "GB", "TB", "PB", "EB")[group]


def nf_duration(ms: int) -> str:
    """Nextflow's Duration.toString(): '250ms', '4.5s' under a minute, else '1d 2h 3m 4s'."""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{round(ms / 100) / 10:g}s"
    secs = round(ms / 1000)
    parts = [(secs // 86400, "d"), (secs // 3600 % 24, "h"), (secs // 60 % 60, "m"), (secs % 60, "s")]
    return " ".join(f"{n}{unit}" for n, unit in parts if n)


@given(st.integers(min_value=0, max_value=2**59))
def test_sizes_round_trip_through_nextflow_s_formats(size: int) -> None:
    assert imports.parse_size(str(size)) == size  # raw: bytes, exactly
    shown = nf_size(size)
    group = int(math.log10(size) / math.log10(1024)) if size else 0
    assert abs(imports.parse_size(shown) - size) <= 0.05 * 1024**group + 1, shown


@given(st.integers(min_value=0, max_value=10**12))
def test_durations_round_trip_through_nextflow_s_formats(ms: int) -> None:
    assert imports.parse_duration(str(ms)) == ms / 1000  # raw: milliseconds
    shown = nf_duration(ms)
    most = 0 if ms < 1000 else 0.05 if ms < 60_000 else 0.5
    assert abs(imports.parse_duration(shown) - ms / 1000) <= most + 1e-6, shown


CELLS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["-", "NA", "1.2 GB", "3m 4s", "137", "FAILED", "CACHED", "{'a': 1}", "1e400", "9" * 30]),
)
HEADERS = [
    "name\tstatus\texit\trealtime\t%cpu\tpeak_rss\trchar\tmemory\tcomplete\thash",
    "s\th:m:s\tmax_rss\tcpu_time\tinput_size_mb\tresources\trule_name",
    "process,peak_rss,rchar",
]


@given(st.sampled_from(HEADERS), st.lists(st.lists(CELLS, max_size=10), max_size=5), st.sampled_from(["\t", ","]))
def test_any_file_is_read_or_refused_with_a_value_error_and_its_runs_fit_the_history(
    header: str, rows: List[List[str]], sep: str
) -> None:
    text = "".join(line + "\n" for line in [header, *(sep.join(row) for row in rows)])
    try:
        found = imports.read(text.encode("utf-8", "surrogatepass"), "f", "/f", WHEN)
    except ValueError:
        return
    assert found.malformed + found.passed_over + len(found.runs) <= text.count("\n") + text.count("\r") - 1
    for run in found.runs:
        assert 0 <= run.peak_bytes <= 2**60 and 0 <= run.input_bytes <= 2**60 and 0 <= run.time < 2.6e11


def test_the_figures_nextflow_writes_and_what_is_refused() -> None:
    assert [imports.parse_size(s) for s in ("0", "512 B", "3.4 KB", "512 MB", "1.2 GB", "2G", "1 TB")] == [
        0, 512, round(3.4 * 1024), 512 * MB, round(1.2 * GB), 2 * GB, 1024 * GB,
    ]  # fmt: skip
    assert [imports.parse_duration(s) for s in ("250ms", "4.5s", "3m 4s", "1h 2m 3s", "1d 2h", "01:02:03")] == [
        0.25, 4.5, 184.0, 3723.0, 93600.0, 3723.0,
    ]  # fmt: skip
    for bad in ("", "-1", "1.2 XB", "GB", "1e3", "2 EB 1"):
        with pytest.raises(ValueError, match="is not a size"):
            imports.parse_size(bad)
    with pytest.raises(ValueError, match="too large"):
        imports.parse_size("2048 EB")
    for bad in ("", "4.5 parsecs", "3m 4", "-5s"):
        with pytest.raises(ValueError, match="not a duration"):
            imports.parse_duration(bad)
    assert imports.parse_time("1700000000123") == 1700000000.123
    with pytest.raises(ValueError, match="not a time"):
        imports.parse_time("yesterday")


def test_an_imported_run_is_a_row_in_the_history_s_column_order() -> None:
    fields = [f for f in imports.ImportedRun.__dataclass_fields__]
    assert [*fields[:10], "version", "time", "gpu_peak_bytes"] == list(_COLUMNS)
