"""A run's report: trace a small batch, then write its HTML report.

The batch stands in for a day of sequencing work (each job a Python program that takes memory
in steps and holds it): aligners, sorters that ask for far more memory than they use, one
assembler, a job that fails, one that overruns its timeout, and one that uses more than it
declared and runs again with more. It runs on 4 CPUs and 1 GiB, in about 5 seconds.

Run it with:  python examples/report_example.py [--out DIR]
(the trace and report.html go to DIR, by default a new temporary directory). Figures need
matplotlib: pip install 'mpmsub[plot]'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mpmsub

TOOL = """\
import sys, time
mb, seconds = int(sys.argv[1]), float(sys.argv[2])
held = []
for _ in range(4):  # its memory grows over the first half of its run
    held.append(bytearray(mb // 4 * 2**20))
    time.sleep(seconds / 8)
time.sleep(seconds / 2)
"""


def tool(out: Path, name: str, mb: int, seconds: float) -> list[str]:
    """The command of a stand-in tool `name` (a script in `out`) that takes `mb` for `seconds`."""
    script = out / f"{name}.py"
    script.write_text(TOOL)
    return [sys.executable, str(script), str(mb), str(seconds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the trace and the report go (default: a new temporary dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mpmsub-report-"))
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "run.jsonl"

    p = mpmsub.cluster(p=4, m="1G", verbose=False, progress_bar=False, trace=trace)
    for i, (mb, seconds) in enumerate([(200, 0.7), (240, 1.0), (160, 0.6), (260, 0.9), (180, 0.7), (220, 0.6)], 1):
        p.jobs.append({"cmd": tool(out, "align", mb, seconds), "p": 1, "m": "300M", "id": f"align-{i}"})
    for i in range(1, 4):  # ask for 400M, use 60M
        p.jobs.append({"cmd": tool(out, "sort_reads", 60, 0.5), "p": 1, "m": "400M", "id": f"sort-{i}"})
    p.jobs.append({"cmd": tool(out, "assemble", 520, 1.3), "p": 2, "m": "600M", "id": "assemble"})
    p.jobs.append({"cmd": tool(out, "index", 90, 0.6), "p": 2, "m": "150M", "id": "index"})
    p.jobs.append(
        {
            "cmd": [sys.executable, "-c", "import sys; sys.exit('ref.fa: no such file')"],
            "m": "50M",
            "id": "call-variants",
        }
    )
    p.jobs.append({"cmd": tool(out, "download", 40, 30.0), "m": "100M", "timeout": 1.0, "id": "stuck-download"})
    # declares 100M but takes 240M: stopped at its limit, then run again with 3x the memory
    p.jobs.append(
        mpmsub.Job(tool(out, "dedup", 240, 0.6)).memory("100M").strict_memory().with_retries(1, 3.0).with_id("dedup")
    )
    p.run()
    p.print_summary()

    report = out / "report.html"
    figures = p.report(report)
    print(f"\ntrace:  {trace}\nreport: {report}" + ("" if figures else "  (tables only: pip install 'mpmsub[plot]')"))


if __name__ == "__main__":
    main()
