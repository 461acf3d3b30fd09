from __future__ import annotations

import io

import pytest

from mpmsub._report.progress import ProgressBar, format_duration


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    out = Tty()
    bar = ProgressBar(4, stream=out)
    for done in range(1, 5):
        bar.update(done, 0, 4 - done, 300 * 2**20)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n") and text.count("\n") == 1
    assert "4/4 (100.0%)" in text and "running 3 (300M reserved)" in text and "ETA" in text


def test_a_log_file_gets_occasional_plain_lines() -> None:
    out = io.StringIO()
    bar = ProgressBar(1000, stream=out)
    for done in range(1, 1001):
        bar.update(done, done // 500, 2, 0)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 10 <= len(lines) <= 12  # one per tenth of the batch, the last not repeated
    assert lines[-1].startswith("[") and "1000/1000 (100.0%)" in lines[-1] and "failed 2" in lines[-1]


def test_disabled_bar_writes_nothing() -> None:
    out = Tty()
    bar = ProgressBar(3, stream=out, enabled=False)
    bar.update(1, 0, 1, 0)
    bar.close()
    assert out.getvalue() == ""


def test_messages_go_above_the_bar() -> None:
    out = Tty()
    bar = ProgressBar(2, stream=out)
    bar.update(1, 0, 1, 0)
    bar.write_above("job_0001 done")
    assert "\r\x1b[Kjob_0001 done\n\r[" in out.getvalue()


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.25, 59.9, 61, 3725)] == ["0.2s", "59.9s", "1m01s", "1h02m"]


def test_the_bar_shows_the_memory_in_use_beside_the_reserved() -> None:
    out = io.StringIO()
    bar = ProgressBar(3, stream=out)
    bar.update(1, 0, 2, 800 * 2**20, 612 * 2**20)
    assert "running 2 (800M reserved, 612M in use)" in bar.line()
    bar.update(3, 0, 0, 0, 0)
    assert "running 0 (0B reserved)" in bar.line()  # nothing running: nothing in use to show


def test_status_measures_the_memory_the_running_jobs_use() -> None:
    import sys
    import time

    import mpmsub

    with mpmsub.MemoryAwareExecutor(cpus=2, memory="2G", history=False) as ex:
        code = "import time; x = bytearray(200 * 2**20); time.sleep(1.5)"
        future = ex.submit(mpmsub.Job([sys.executable, "-c", code]).memory("300M"))
        deadline = time.monotonic() + 10
        in_use = 0
        while time.monotonic() < deadline and in_use < 190 * 2**20:
            in_use = ex.status().memory_in_use or 0
            time.sleep(0.05)
        status = ex.status()
        assert future.result().success
    assert in_use >= 190 * 2**20 and status.reserved_memory == 300 * 2**20


def test_the_summary_gives_the_efficiency_and_the_jobs_that_asked_too_much() -> None:
    import sys

    import mpmsub

    batch = mpmsub.cluster(p=2, m="2G", progress_bar=False, verbose=False, history=False)
    batch.jobs.append(mpmsub.Job([sys.executable, "-c", "x = bytearray(30 * 2**20)"]).memory("500M").with_id("greedy"))
    code = "import time; x = bytearray(100 * 2**20); time.sleep(0.3)"
    batch.jobs.append(mpmsub.Job([sys.executable, "-c", code]).memory("120M").with_id("fair"))
    batch.run()
    text = mpmsub._report.text.summary_text(batch.stats, batch.completed_jobs)
    assert "efficiency: the 2 job(s) with m used" in text
    over = text.split("asked for far more memory than they used (1;", 1)[1]
    assert "greedy" in over.splitlines()[1] and "asked 500 MB" in over and "fair" not in over.split("\n\n")[0]


def test_the_bar_keeps_its_width_through_a_run_and_hides_memory_not_measured_yet() -> None:
    bar = ProgressBar(10, stream=io.StringIO())
    widths = set()
    for done, failed, in_use in [(0, 0, 0), (1, 0, 5 * 2**20), (9, 1, 7 * 2**20), (10, 3, 0)]:
        bar.update(done, failed, 2, 950 * 2**20, in_use)
        line = bar.line(80)
        widths.add(line.index("]"))
        assert ("in use" in line) == bool(in_use)  # 0 is a first tick not taken yet, not 0 bytes
    assert len(widths) == 1


def test_a_command_on_several_lines_keeps_the_summary_one_row_per_job(capsys: pytest.CaptureFixture[str]) -> None:
    import mpmsub

    batch = mpmsub.cluster(p=1, m="1G", verbose=False, progress_bar=False)
    batch.jobs.append(["sh", "-c", "true\nexit 3"])
    batch.run()
    batch.print_summary()
    out = capsys.readouterr().out
    assert "resources: 1 CPU," in out
    failed = [line for line in out.splitlines() if "exited with status 3" in line]
    assert len(failed) == 1 and failed[0].endswith("sh -c true\\nexit 3")  # the script's line break, escaped
    assert not any(line.startswith("exit 3") for line in out.splitlines())


def test_the_bar_counts_killed_jobs_apart_from_failed_ones() -> None:
    bar = ProgressBar(10, stream=io.StringIO())
    bar.update(4, 1, 2, 0, None, killed=2)
    assert bar.line().endswith("| failed 1 | killed 2")
    bar.update(5, 0, 2, 0, killed=1)
    line = bar.line()
    assert line.endswith("| killed 1") and "failed" not in line
    bar.update(6, 3, 2, 0)  # killed left out (positional callers): none killed
    assert bar.line().endswith("| failed 3")


def test_a_cluster_run_shows_its_killed_jobs_apart_on_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    import mpmsub

    batch = mpmsub.cluster(p=2, m="1G", verbose=False, progress_bar=True)
    batch.jobs.append({"cmd": ["false"], "id": "bad"})
    batch.jobs.append({"cmd": ["sleep", "60"], "id": "long"})

    def on_result(result: mpmsub.JobResult) -> None:
        if result.job_id == "bad":
            assert batch.kill("long", "not needed")

    batch.run(on_result=on_result)
    last = capsys.readouterr().err.splitlines()[-1]  # not a terminal: plain lines, the last at the end
    assert "2/2 (100.0%)" in last and last.endswith("| failed 1 | killed 1")


def test_the_bar_shows_the_gpus_and_named_resources_held_like_cpus() -> None:
    bar = ProgressBar(4, stream=io.StringIO())
    bar.update(1, 0, 2, 0, held=[("gpu", 2, 4), ("licence", 1, 2)])
    parts = bar.line().split(" | ")
    assert parts[-1] == "gpu 2/4, licence 1/2" and parts[-2].startswith("running 2 (")
    bar.update(2, 1, 0, 0, held=[("gpu", 0, 4)])
    assert bar.line().endswith(" | gpu 0/4 | failed 1")
    bar.update(3, 0, 1, 0)  # an executor with none of them: nothing more
    assert "gpu" not in bar.line() and bar.line().endswith("reserved)")
