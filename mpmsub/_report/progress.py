"""A progress bar on stderr, standard library only.

On a terminal it redraws one line in place; elsewhere (a log file, CI) it writes a plain line now
and then (every tenth of the batch, or every 30 s) instead of carriage-return noise.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence, TextIO, Tuple

from mpmsub._units import format_memory

_PLAIN_EVERY = 30.0  # seconds between plain lines when nothing else calls for one


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


Held = Tuple[str, int, int]  # a resource beside CPUs and memory: its name, how much is held, of how much


class ProgressBar:
    """done/total, percent, elapsed, ETA, what is running (count, memory reserved and in use;
    GPUs and named resources held, where the executor has them), and how many failed and were
    killed, apart."""

    def __init__(self, total: int, *, label: str = "", stream: Optional[TextIO] = None, enabled: bool = True) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and total > 0
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.done = 0
        self.failed = 0
        self.killed = 0
        self.running = 0
        self.reserved = 0
        self.in_use: Optional[int] = None
        self.held: Tuple[Held, ...] = ()
        self._last_plain = -1.0
        self._last_decile = -1
        self._drawn = False
        self._plain_done = -1

    def update(
        self,
        done: int,
        failed: int,
        running: int,
        reserved_memory: int,
        memory_in_use: Optional[int] = None,
        killed: int = 0,
        held: Sequence[Held] = (),
    ) -> None:
        """The counts, the memory the running jobs reserve and (where known) the memory they use.
        `failed` counts the failures other than `killed`: jobs killed on request (kill()) are the
        user's own doing, shown apart. `held`: the GPUs and named resources the running jobs
        hold, each (name, held, capacity), shown as 'gpu 2/4'."""
        self.done, self.failed, self.running, self.reserved = done, failed, running, reserved_memory
        self.in_use, self.killed, self.held = memory_in_use, killed, tuple(held)
        if not self.enabled:
            return
        if self.interactive:
            self._draw()
            return
        now = time.monotonic()
        decile = 10 * done // self.total
        if decile != self._last_decile or now - self._last_plain >= _PLAIN_EVERY:
            self._last_decile, self._last_plain = decile, now
            self._write_plain()

    def line(self, width: int = 80) -> str:
        elapsed = time.monotonic() - self.started
        fraction = self.done / self.total if self.total else 1.0
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        parts = [
            f"{self.done}/{self.total} ({100 * fraction:.1f}%)",
            f"elapsed {format_duration(elapsed)}",
            f"ETA {format_duration(eta) if eta is not None else '?'}",
            f"running {self.running} ({self._memory()})",
        ]
        if self.held:
            parts.append(", ".join(f"{name} {used}/{total}" for name, used, total in self.held))
        if self.failed:
            parts.append(f"failed {self.failed}")
        if self.killed:
            parts.append(f"killed {self.killed}")
        text = " | ".join(parts)
        if self.label:
            text = f"{self.label} {text}"
        # By the width alone, so that it stays the same all through a run; narrow below 120
        # columns, where the figures need the room.
        bar_width = 10 if width < 120 else min(30, width // 4)
        filled = int(bar_width * fraction)
        return f"[{'█' * filled}{'░' * (bar_width - filled)}] {text}"

    def _memory(self) -> str:
        text = f"{format_memory(self.reserved)} reserved"
        if self.in_use and self.running:  # 0 is not measured yet (a job's first tick)
            text += f", {format_memory(self.in_use)} in use"
        return text

    def _draw(self) -> None:
        import shutil  # here: its archive modules are worth no import of mpmsub's

        width = shutil.get_terminal_size((100, 20)).columns
        text = self.line(width)[: width - 1]
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def write_above(self, message: str, stream: Optional[TextIO] = None, end: str = "\n") -> None:
        """Print a message (to `stream`, the bar's own by default) without breaking the bar: used
        by verbose logging, and by the command line for its jobs' output."""
        out = self.stream if stream is None else stream
        if self.enabled and self.interactive and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            out.write(message + end)
            out.flush()
            if not (message + end).endswith("\n"):
                self.stream.write("\n")  # the bar is redrawn on a line of its own
            self._draw()
        else:
            out.write(message + end)
        out.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        if self.interactive:
            self._draw()
            self.stream.write("\n")
        elif self._plain_done != self.done:
            self._write_plain()
        self.stream.flush()

    def _write_plain(self) -> None:
        self._plain_done = self.done
        self.stream.write(self.line() + "\n")
        self.stream.flush()
