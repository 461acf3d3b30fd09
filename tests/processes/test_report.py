"""The trace and the HTML report: what a run writes, what the report shows, and how it renders in
a browser (headless Chromium, where one is installed)."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from conftest import ROOT, ExampleRun
from hypothesis import given
from hypothesis import strategies as st
from support import callees
from support.browser import Chromium, find_chromium
from support.helpers import alloc_cmd, processes_with, unique_sleep, wait_for_end, wait_gone

import mpmsub
from mpmsub._cli import main as _cli
from mpmsub._report.html import RunView, TraceView, _lanes, load, reserved, steps
from mpmsub._report.trace import SAMPLES, Trace, line, read

MB = 2**20
SECTIONS = ["summary", "timeline", "memory", "cpus", "waste", "slowest", "failed", "advice"]
SCREENSHOT = ROOT / "docs" / "report.png"


# -- a real small run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Tuple[mpmsub.Cluster, Path]:
    """A run with successes, a failure with a message, a timeout, and a job stopped at its strict
    limit that runs again with more."""
    trace = tmp_path_factory.mktemp("small-run") / "run.jsonl"
    p = mpmsub.cluster(p=2, m="1G", verbose=False, progress_bar=False, trace=trace)
    p.jobs.append({"cmd": alloc_cmd(120, 0.6, steps=3, step_delay=0.05), "m": "400M", "id": "roomy"})
    p.jobs.append({"cmd": alloc_cmd(80, 0.4), "m": "100M", "id": "snug"})
    p.jobs.append({"cmd": [sys.executable, "-c", "import sys; sys.exit('no such reference: ref.fa')"], "id": "broken"})
    p.jobs.append({"cmd": alloc_cmd(10, 30), "m": "50M", "timeout": 0.5, "id": "stuck"})
    p.jobs.append(mpmsub.Job(alloc_cmd(200, 0.4)).memory("100M").strict_memory().with_retries(1, 3.0).with_id("liar"))
    p.run()
    return p, trace


@pytest.fixture(scope="module")
def small_report(small_run: Tuple[mpmsub.Cluster, Path]) -> Path:
    """The small run's report, with its figures."""
    p, trace = small_run
    out = trace.with_name("report.html")
    assert p.report(out) is True
    return out


def by_type(events: List[Dict[str, Any]], kind: str) -> List[Dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def test_the_trace_records_each_run_its_reservation_and_the_memory_over_time(
    small_run: Tuple[mpmsub.Cluster, Path],
) -> None:
    p, trace = small_run
    events = read(trace)
    head = events[0]
    assert head["type"] == "run" and head["version"] == 1 and head["mpmsub"] == mpmsub.__version__
    assert head["cpus"] == 2 and head["memory"] == 1024 * MB and head["backend"] == "local"
    assert events[-1]["type"] == "close"
    starts, ends = by_type(events, "start"), by_type(events, "end")
    assert sorted((e["job"], e["run"]) for e in starts) == sorted((e["job"], e["run"]) for e in ends)
    final = {e["job"]: e for e in ends if e["final"]}
    results = {r.job_id: r for r in p.completed_jobs + p.failed_jobs}
    assert set(final) == set(results) == {"roomy", "snug", "broken", "stuck", "liar"}
    for job, end in final.items():
        assert end["peak"] == int(results[job].memory_used * MB)
        assert end["status"] == (results[job].failure or "ok")
    assert final["stuck"]["status"] == "timeout" and final["broken"]["status"] == "exit"
    assert final["broken"]["stderr"] == "no such reference: ref.fa"
    liar = [e for e in ends if e["job"] == "liar"]
    assert [(e["run"], e["status"], e["final"]) for e in liar] == [(1, "memory", False), (2, "ok", True)]
    liar_starts = [e for e in starts if e["job"] == "liar"]
    assert [e["memory"] for e in liar_starts] == [100 * MB, 300 * MB]  # the retry reserves 3x
    samples = by_type(events, "sample")
    assert samples and max(s["max"] for s in samples) >= 200 * MB
    assert all(s["max"] >= s["used"] == sum(s["jobs"].values()) for s in samples)
    # a tenth of a second apart, but for the last tick before the machine fell idle (written then)
    assert sum(b["t"] - a["t"] < 0.09 for a, b in zip(samples, samples[1:])) <= 2


class StrictHTML(HTMLParser):
    """Every element closed in order (void elements aside), ids unique, and nothing fetched."""

    VOID: ClassVar[Set[str]] = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: List[str] = []
        self.ids: List[str] = []
        self.problems: List[str] = []
        self.doctype = False
        self.tags: Dict[str, int] = {}

    def handle_decl(self, decl: str) -> None:
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        self._attrs(tag, attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        self._attrs(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def _attrs(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag in ("script", "link", "iframe", "img"):
            self.problems.append(f"<{tag}> in a report that needs none")
        for name, value in attrs:
            if name == "id" and value:
                self.ids.append(value)
            if name in ("src", "href", "xlink:href") and value and not value.startswith(("#", "data:")):
                self.problems.append(f"{tag} {name}={value[:60]!r} points outside the file")


def check_html(text: str) -> StrictHTML:
    checker = StrictHTML()
    checker.feed(text)
    checker.close()
    assert checker.doctype
    assert not checker.problems, checker.problems[:5]
    assert not checker.stack, f"never closed: {checker.stack}"
    assert len(checker.ids) == len(set(checker.ids)), "duplicate ids"
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text), "the CSS fetches something"
    return checker


def section(text: str, name: str) -> str:
    match = re.search(rf'<section id="{name}">(.*?)</section>', text, re.S)
    assert match, f"no section {name}"
    return match.group(1)


def test_the_report_is_one_valid_html_file_with_every_section_and_figure(
    small_run: Tuple[mpmsub.Cluster, Path], small_report: Path
) -> None:
    p, _ = small_run
    text = small_report.read_text()
    checker = check_html(text)
    assert re.findall(r'<section id="(\w+)">', text) == SECTIONS
    for name in ("timeline", "memory", "cpus", "waste"):
        assert section(text, name).count("<svg") == 1, name
    assert checker.tags["svg"] == 4
    failed = section(text, "failed")
    for job, why in [("broken", "exited with status 1"), ("stuck", "timed out after 0.5 s")]:
        assert job in failed and why in failed
    assert "no such reference: ref.fa" in failed
    assert "liar" not in failed  # it failed once, then succeeded
    advice = section(text, "advice")
    roomy = next(r for r in p.completed_jobs if r.job_id == "roomy")
    row = re.search(r"<td>roomy</td>(.*?)</tr>", advice, re.S)
    assert row and f">{mpmsub.recommend_memory(roomy.memory_used)}<" in row.group(1)
    assert "asks for" in row.group(1)  # 400M for about 130M
    slowest = section(text, "slowest")
    assert slowest.index("roomy") < slowest.index("broken")  # the longest first
    summary = section(text, "summary")
    assert "5: 3 succeeded, 2 failed; 1 run(s) stopped and run again" in summary


def test_the_report_of_a_trace_file_is_the_report_of_the_run(
    small_run: Tuple[mpmsub.Cluster, Path], tmp_path: Path
) -> None:
    _, trace = small_run
    assert mpmsub.write_report(trace, tmp_path / "a.html", plots=False) is False
    assert _cli.main(["report", str(trace), "-o", str(tmp_path / "b.html"), "--no-plots"]) == 0
    assert (tmp_path / "a.html").read_text() == (tmp_path / "b.html").read_text()


# -- in a browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    executable = find_chromium()
    if executable is None:
        if os.environ.get("MPMSUB_REQUIRE_BROWSER"):
            pytest.fail("MPMSUB_REQUIRE_BROWSER is set but no Chromium is installed")
        pytest.skip("no Chromium here (Debian: apt-get install chromium): the browser tests are skipped")
    with Chromium(executable) as browser:
        yield browser


def test_the_report_renders_in_chromium_without_errors_or_network_requests(
    small_report: Path, chromium: Chromium
) -> None:
    out = small_report
    tab = chromium.open(out)
    page = tab.page()
    assert not page.errors, page.errors
    assert not page.console, page.console
    assert page.requests[0] == out.resolve().as_uri()
    assert all(url.startswith("data:") for url in page.requests[1:]), page.requests
    sizes = tab.evaluate("[...document.querySelectorAll('figure svg')].map(s => s.getBoundingClientRect().height)")
    assert len(sizes) == 4 and all(h > 100 for h in sizes), sizes
    assert tab.evaluate("document.title").startswith("mpmsub report: 5 jobs")


def png_size(path: Path) -> Tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_readme_screenshot_is_the_report_of_the_example_batch(
    report_example: ExampleRun, chromium: Chromium, tmp_path: Path
) -> None:
    """docs/report.png is made here, from the example batch's report in headless Chromium:
    MPMSUB_UPDATE_SCREENSHOT=1 writes it anew; otherwise the one committed must match its size."""
    status, _, err = report_example.wait()
    assert status == 0, err
    report = report_example.out / "report.html"
    check_html(report.read_text())
    tab = chromium.open(report, width=1200, height=900)
    page = tab.page()
    assert not page.errors and not page.console, (page.errors, page.console)
    shot = tmp_path / "report.png"
    tab.screenshot(shot, height=1500)
    assert png_size(shot) == (1200, 1500)
    if os.environ.get("MPMSUB_UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes(shot.read_bytes())
    assert png_size(SCREENSHOT) == (1200, 1500)


# -- the command line and its errors ---------------------------------------------------------------


def test_the_command_line_traces_a_run_and_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("sleep 0.2\nexit 3\n")
    trace = tmp_path / "run.jsonl"
    assert _cli.main(["run", str(jobs), "-q", "--job-mem", "50M", "--trace", str(trace)]) == _cli.FAILED
    ends = by_type(read(trace), "end")
    assert sorted(e["status"] for e in ends) == ["exit", "ok"]
    assert _cli.main(["report", str(trace), "--no-plots"]) == 0  # beside the trace, as run.html
    text = (tmp_path / "run.html").read_text()
    assert "exited with status 3" in section(text, "failed")
    assert f"wrote {tmp_path / 'run.html'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "{tmp}/missing.jsonl"], "no trace file '{tmp}/missing.jsonl'"),
        (["report", "{tmp}/garbage.jsonl"], "{tmp}/garbage.jsonl: line 1 is not JSON"),
        (["report", "{tmp}/other.jsonl"], "{tmp}/other.jsonl: not an mpmsub trace"),
        (["report", "{tmp}/trace.html"], "the report would overwrite its trace"),
        (["run", "{tmp}/jobs.txt", "--trace", "{tmp}/no/dir/t.jsonl"], "there is no directory '{tmp}/no/dir'"),
        (["run", "{tmp}/jobs.txt", "--trace", "{tmp}/jobs.txt"], "is the job file: writing the trace would overwrite"),
        (["run", "{tmp}/jobs.txt", "--joblog", "{tmp}/t", "--trace", "{tmp}/t"], "is the joblog"),
    ],
)
def test_bad_command_lines_say_what_is_wrong(
    argv: List[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "garbage.jsonl").write_text("garbage\n")
    (tmp_path / "other.jsonl").write_text('{"type": "end"}\n')
    (tmp_path / "trace.html").write_text("")
    (tmp_path / "jobs.txt").write_text("true\n")
    with pytest.raises(SystemExit) as exit:
        _cli.main([a.format(tmp=tmp_path) for a in argv])
    assert exit.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_bad_trace_values_are_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"trace must be a file path .* got 12"):
        mpmsub.MemoryAwareExecutor(trace=12)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got True"):
        mpmsub.cluster(trace=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid trace ''"):
        mpmsub.Cluster(trace="")
    with pytest.raises(ValueError, match=r"there is no directory .*no/such/dir"):
        mpmsub.MemoryAwareExecutor(trace=tmp_path / "no/such/dir/t.jsonl")
    with pytest.raises(ValueError, match="it is a directory"):
        mpmsub.cluster(trace=tmp_path)
    with pytest.raises(RuntimeError, match="call run"):
        mpmsub.cluster(progress_bar=False).report(tmp_path / "r.html")


def test_without_matplotlib_the_report_has_the_tables_and_says_how_to_get_figures(
    small_run: Tuple[mpmsub.Cluster, Path], tmp_path: Path
) -> None:
    _, trace = small_run
    out = tmp_path / "tables.html"
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
        "from mpmsub._cli.main import main; sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "report", str(trace), "-o", str(out)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'mpmsub[plot]'" in proc.stderr
    text = out.read_text()
    check_html(text)
    assert "<svg" not in text and 'id="no-figures"' in text
    assert re.findall(r'<section id="(\w+)">', text) == ["summary", "slowest", "failed", "advice"]
    p, _ = small_run
    saved = sys.modules.get("matplotlib")
    sys.modules["matplotlib"] = None  # type: ignore[assignment]
    try:
        with pytest.warns(UserWarning, match="mpmsub\\[plot\\]"):
            assert mpmsub.write_report(trace, tmp_path / "again.html") is False
        with pytest.warns(UserWarning, match="mpmsub\\[plot\\]") as warned:
            assert p.report(tmp_path / "cluster.html") is False
        assert warned[0].filename == __file__  # it points at the call, not into mpmsub
    finally:  # the same module back: its submodules, still loaded, belong to it
        if saved is None:
            del sys.modules["matplotlib"]
        else:
            sys.modules["matplotlib"] = saved


def test_jobs_cancelled_before_they_ran_are_in_the_trace_and_the_report(tmp_path: Path) -> None:
    trace = tmp_path / "cancel.jsonl"
    ex = mpmsub.MemoryAwareExecutor(cpus=2, memory="1000M", memory_reserve=0, trace=trace)
    a = ex.submit(mpmsub.Job(alloc_cmd(1, 30)).memory("500M").with_id("a"))
    # over its strict 300M at once: its retry asks for 600M, which waits beside A's 500M
    b = ex.submit(mpmsub.Job(alloc_cmd(400, 30)).memory("300M").strict_memory().with_retries(1, 2.0).with_id("b"))
    d = ex.submit(mpmsub.Job(["true"]).memory("600M").with_id("d"))  # waits for memory
    e = ex.submit(mpmsub.Job(["true"]).memory("600M").with_id("e"))
    assert e.cancel()
    wait_for_end(trace, "b")  # B was stopped; its retry is queued beside D
    deadline = time.monotonic() + 30
    while ex.status().queued < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert time.monotonic() < deadline
    ex.terminate()
    assert a.result().failure == b.result().failure == "cancelled" and d.cancelled() and e.cancelled()
    ends = {(e["job"], e["run"]): e for e in by_type(read(trace), "end")}
    assert ends[("b", 1)]["status"] == "memory" and not ends[("b", 1)]["final"]
    assert ends[("b", 2)]["status"] == "cancelled" and ends[("b", 2)]["ran"] is False
    assert "cancelled before it could run again" in ends[("b", 2)]["error"]
    for job in "de":
        assert ends[(job, 1)]["status"] == "cancelled" and ends[(job, 1)]["ran"] is False
    assert ends[("a", 1)]["status"] == "cancelled" and "ran" not in ends[("a", 1)]  # killed while running
    out = tmp_path / "cancel.html"
    mpmsub.write_report(trace, out, plots=False)
    text = out.read_text()
    assert "4: 0 succeeded, 4 failed (2 cancelled before they started)" in section(text, "summary")
    failed = section(text, "failed")
    assert all(f"<td>{job}</td>" in failed for job in "abde")


def test_a_job_killed_on_request_is_shown_as_killed_not_as_failed(tmp_path: Path) -> None:
    marker = unique_sleep()
    p = mpmsub.cluster(p=3, m="1G", verbose=False, progress_bar=False)
    p.jobs.append({"cmd": ["sh", "-c", f"sleep {marker} & sleep {marker}; wait"], "id": "long", "m": "50M"})
    p.jobs.append({"cmd": ["sh", "-c", "echo no input >&2; exit 3"], "id": "broken"})
    p.jobs.append({"cmd": ["echo", "fine"], "id": "fine"})

    def kill_long() -> bool:
        deadline = time.monotonic() + 30
        while len(processes_with(marker)) < 2 and time.monotonic() < deadline:  # its sleeps run
            time.sleep(0.02)
        return p.kill("long", "the input changed")

    with ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_long)
        p.run()
        assert killer.result(timeout=30)
    assert not wait_gone(marker)
    out = tmp_path / "killed.html"
    assert p.report(out, plots=False) is False
    text = out.read_text()
    check_html(text)
    assert re.findall(r'<section id="(\w+)">', text) == ["summary", "slowest", "failed", "killed", "advice"]
    assert '<p class="meta">3 jobs, 2 failed (1 killed), in' in text
    assert "3: 1 succeeded, 2 failed (1 killed)" in section(text, "summary")
    failed, killed = section(text, "failed"), section(text, "killed")
    assert "<td>broken</td>" in failed and "exited with status 3" in failed and "long" not in failed
    assert "The jobs killed on request are listed apart, below." in failed
    assert "1 job(s) killed on request" in killed and "<td>long</td>" in killed
    assert "killed: the input changed" in killed and "broken" not in killed
    row = re.search(r"<td>long</td>(.*?)</tr>", section(text, "slowest"), re.S)
    assert row and '<td class="killed">killed</td>' in row.group(1)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    drawn = tmp_path / "killed-plots.html"
    assert p.report(drawn, plots=True) is True
    text = drawn.read_text()
    check_html(text)
    timeline = section(text, "timeline")
    legend = re.findall(r"<text[^>]*>([^<]*)</text>", timeline)
    assert "killed on request" in legend and "failed" in legend  # each its own entry
    assert "Runs killed on request are hatched the other way, with a grey edge." in timeline


def test_a_job_killed_before_it_started_is_counted_as_killed(tmp_path: Path) -> None:
    lines = [
        {"type": "start", "t": 0.0, "job": "a", "run": 1, "cpus": 1, "memory": MB, "cmd": "x", "waited": 0},
        {"type": "end", "t": 1.0, "job": "a", "run": 1, "status": "ok", "final": True, "peak": MB, "runtime": 1.0},
        {
            "type": "end",
            "t": 0.5,
            "job": "b",
            "run": 1,
            "status": "killed",
            "final": True,
            "peak": 0,
            "runtime": 0.0,
            "error": "killed before it started: not needed",
            "ran": False,
        },
        {"type": "end", "t": 0.6, "job": "c", "run": 1, "status": "cancelled", "final": True, "ran": False},
    ]
    out = tmp_path / "queued.html"
    mpmsub.write_report(synthetic(tmp_path, lines), out, plots=False)
    text = out.read_text()
    check_html(text)
    assert "3: 1 succeeded, 2 failed (1 killed, 1 cancelled before they started)" in section(text, "summary")
    killed = section(text, "killed")
    row = re.search(r"<td>b</td>(.*?)</tr>", killed, re.S)
    assert row and '<td class="num">0</td><td class="num">-</td>' in row.group(1)  # no run, no runtime
    assert "killed before it started: not needed" in row.group(1)
    assert "<td>c</td>" in section(text, "failed") and "<td>b</td>" not in section(text, "failed")


def synthetic(tmp_path: Path, lines: List[Dict[str, Any]], header: Optional[Dict[str, Any]] = None) -> Path:
    trace = tmp_path / "synthetic.jsonl"
    head = {"type": "run", "version": 1, "cpus": 2, "memory": 1024 * MB, "host": "h", "start": 0, **(header or {})}
    trace.write_text("".join(json.dumps(line) + "\n" for line in [head, *lines]))
    return trace


def test_odd_job_ids_and_commands_do_not_break_the_report(tmp_path: Path) -> None:
    job = "$\\frac$ <b>&"
    cmd = "tool --in caf\udcff.fq"  # a byte that is not UTF-8, as os.fsdecode leaves it
    lines = [
        {"type": "start", "t": 0.0, "job": job, "run": 1, "cpus": 1, "memory": 10 * MB, "cmd": cmd, "waited": 0},
        {
            "type": "end",
            "t": 1.0,
            "job": job,
            "run": 1,
            "status": "exit",
            "final": True,
            "peak": 0,
            "runtime": 1.0,
            "error": "exited with status 1",
            "memory": 10 * MB,
        },
    ]
    out = tmp_path / "odd.html"
    assert mpmsub.write_report(synthetic(tmp_path, lines), out) is True
    text = out.read_text()
    check_html(text)
    assert "$\\frac$ &lt;b&gt;&amp;" in section(text, "failed") and "caf\\udcff.fq" in text


def test_a_trace_with_a_malformed_event_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = synthetic(tmp_path, [{"type": "start", "t": 0.1, "run": 1}])
    with pytest.raises(ValueError, match="event 2 of the trace is not a valid one"):
        mpmsub.write_report(trace, tmp_path / "x.html")
    with pytest.raises(SystemExit):
        _cli.main(["report", str(trace)])
    assert "event 2 of the trace is not a valid one" in capsys.readouterr().err


def test_remote_runs_are_drawn_from_their_end_back_over_their_runtime(tmp_path: Path) -> None:
    """A remote backend is handed jobs ahead of its size: a start there is a hand-over."""
    lines = [
        {"type": "start", "t": 0.0, "job": "j", "run": 1, "cpus": 1, "memory": MB, "cmd": "x", "waited": 0},
        {"type": "end", "t": 10.0, "job": "j", "run": 1, "status": "ok", "final": True, "peak": MB, "runtime": 2.0},
    ]
    view = load(read(synthetic(tmp_path, lines, {"backend": "mpmsub.DaskBackend('tcp://h:8786')"})))
    assert (view.runs[0].start, view.runs[0].end) == (8.0, 10.0)
    assert view.remote and not view.samples
    out = tmp_path / "remote.html"
    mpmsub.write_report(synthetic(tmp_path, lines, {"backend": "mpmsub.DaskBackend('tcp://h:8786')"}), out, plots=False)
    assert "not sampled (the jobs ran on a remote backend)" in section(out.read_text(), "summary")


# -- size, and what the report makes of odd traces -------------------------------------------------


def test_the_trace_of_10000_jobs_stays_small(tmp_path: Path) -> None:
    trace = tmp_path / "big.jsonl"
    with mpmsub.MemoryAwareExecutor(max_workers=2, trace=trace, history=False) as ex:
        futures = [ex.submit(callees.square, i) for i in range(10_000)]
        assert [f.result() for f in futures[-3:]] == [9997**2, 9998**2, 9999**2]
    events = read(trace)
    samples = by_type(events, "sample")
    assert len(events) == 2 + 2 * 10_000 + len(samples)
    longest = max(e.get("t", 0.0) for e in events)
    assert len(samples) <= longest / 0.1 + 1
    assert trace.stat().st_size < 10_000 * 2 * 250, f"{trace.stat().st_size} bytes"
    out = tmp_path / "big.html"
    mpmsub.write_report(trace, out)
    assert out.stat().st_size < 2_000_000  # 10,000 bars drawn as an image inside the SVG


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sample_lines_spread_out_over_a_long_run(tmp_path: Path) -> None:
    """A day of ticks every half second: at most SAMPLES lines at the monitor's pace, then ever
    further apart (logarithmic in the run's length)."""
    clock = Clock()
    trace = Trace(tmp_path / "day.jsonl", {"cpus": 1, "memory": MB}, clock=clock)
    while clock.now < 86_400:
        clock.now += 0.5
        trace.sample([("job", 100 * MB)])
    trace.close()
    times = [e["t"] for e in by_type(read(tmp_path / "day.jsonl"), "sample")]
    assert len(times) <= SAMPLES * 9, len(times)  # ~ SAMPLES * (1 + ln(86400 / (SAMPLES * 0.1)))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps[:100]) <= 0.5 and max(gaps) >= 86_000 / SAMPLES * 0.9  # the last: at close


def test_a_trace_cut_short_reports_its_runs_as_unfinished(tmp_path: Path) -> None:
    trace = tmp_path / "cut.jsonl"
    lines = [
        {"type": "run", "version": 1, "cpus": 2, "memory": 1024 * MB, "host": "h", "start": 0},
        {"type": "start", "t": 0.1, "job": "a", "run": 1, "cpus": 1, "memory": 100 * MB, "cmd": "x", "waited": 0},
        {"type": "sample", "t": 0.5, "used": 50 * MB, "max": 60 * MB, "jobs": {"a": 50 * MB}},
    ]
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"type": "end", "t": 0.')
    view = load(read(trace))
    (run,) = view.runs
    assert run.status == "unfinished" and run.end == 0.5 and run.failed
    out = tmp_path / "cut.html"
    mpmsub.write_report(trace, out, plots=False)
    assert "unfinished" in section(out.read_text(), "failed")


intervals = st.lists(
    st.tuples(st.floats(0, 100, allow_nan=False), st.floats(0.01, 50, allow_nan=False), st.integers(0, 4)),
    max_size=60,
)


def view_of(spans: List[Tuple[float, float, int]]) -> TraceView:
    runs = [
        RunView(f"j{i}", 1, start, start + length, 1, memory * 100 * MB or None, "", "ok", True, 0, length, None, 0.0)
        for i, (start, length, memory) in enumerate(spans)
    ]
    runs.sort(key=lambda r: (r.start, r.job, r.run))
    return TraceView({"cpus": 1, "memory": MB}, runs, [], max((r.end for r in runs), default=0.0))


@given(intervals)
def test_lanes_never_overlap_and_are_as_few_as_the_most_runs_at_once(spans: List[Tuple[float, float, int]]) -> None:
    view = view_of(spans)
    lanes = _lanes(view.runs)
    by_lane: Dict[int, List[RunView]] = {}
    for r in view.runs:
        by_lane.setdefault(lanes[f"{r.job}#{r.run}"], []).append(r)
    for runs in by_lane.values():
        assert all(a.end <= b.start for a, b in zip(runs, runs[1:]))
    _, ys = steps([(r.start, 1.0) for r in view.runs] + [(r.end, -1.0) for r in view.runs])
    assert len(by_lane) == max(ys)


@given(intervals)
def test_reserved_memory_is_the_sum_of_the_running_reservations(spans: List[Tuple[float, float, int]]) -> None:
    view = view_of(spans)
    xs, ys = reserved(view)
    assert ys[-1] == 0 and min(ys) >= 0
    for x, y in zip(xs, ys):
        # after every change at x: the runs under way from x on
        assert y == sum(r.memory or 0 for r in view.runs if r.start <= x < r.end)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)


@given(
    st.lists(st.tuples(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), values), max_size=14, unique_by=lambda f: f[0])
)
def test_a_trace_line_is_what_json_reads_back(fields: List[Tuple[str, Any]]) -> None:
    assert json.loads(line(*fields)) == dict(fields)


def test_a_new_trace_is_private_to_its_user(tmp_path: Path) -> None:
    """It holds every command line run: a new trace is 0600 whatever the umask; an existing one
    keeps its mode (it is the user's) and is written anew."""
    trace = tmp_path / "run.jsonl"
    previous = os.umask(0)
    try:
        with mpmsub.MemoryAwareExecutor(cpus=1, memory="1G", trace=trace, history=False) as ex:
            assert ex.submit(["echo", "--token=secret"]).result(timeout=30).success
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(trace).st_mode) == 0o600
    assert "--token=secret" in by_type(read(trace), "start")[0]["cmd"]
    os.chmod(trace, 0o644)
    with mpmsub.MemoryAwareExecutor(cpus=1, memory="1G", trace=trace, history=False) as ex:
        assert ex.submit(["true"]).result(timeout=30).success
    assert stat.S_IMODE(os.stat(trace).st_mode) == 0o644
    assert [event["cmd"] for event in by_type(read(trace), "start")] == ["true"]
