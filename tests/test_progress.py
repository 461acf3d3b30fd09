from __future__ import annotations

import io

from mpmsub._progress import ProgressBar, format_duration


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
