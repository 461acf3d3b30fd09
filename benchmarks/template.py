"""GNU parallel's command line: `mpmsub run -j2 true ::: 1..N` against `parallel -j2 true ::: 1..N`
and `xargs -P2` in the same run.

Prints the ratio of medians (mpmsub / GNU parallel). Target: at most 0.7. Needs GNU parallel.
Usage: python benchmarks/template.py [--jobs 1000] [--runs 5] [--record]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, interleaved, per_job_table, show, xargs_true

MPMSUB = Path(sys.executable).with_name("mpmsub")


def command_line(program: List[str], jobs: int, slots: int) -> None:
    values = [str(i) for i in range(1, jobs + 1)]
    subprocess.run([*program, f"-j{slots}", "true", ":::", *values], check=True, stdout=subprocess.DEVNULL)


def measure(jobs: int = 1000, runs: int = 5) -> Figure:
    slots = 2
    if shutil.which("parallel") is None:
        raise SystemExit("GNU parallel is not installed (apt-get install parallel)")
    mpmsub = [str(MPMSUB), "run", "-q"]
    parallel = ["parallel", "--will-cite"]
    times = interleaved(
        runs,
        {
            f"xargs -P{slots}": lambda: xargs_true(jobs, slots),
            f"parallel -j{slots}": lambda: command_line(parallel, jobs, slots),
            f"mpmsub run -j{slots}": lambda: command_line(mpmsub, jobs, slots),
        },
    )
    ratio = times[f"mpmsub run -j{slots}"] / times[f"parallel -j{slots}"]
    detail = per_job_table(f"{jobs} `true` jobs, -j{slots}", runs, jobs, list(times.items()))
    return Figure("template command line", f"{ratio:.2f}x GNU parallel", "<= 0.7", ratio <= 0.7, detail)


def main() -> None:
    parser = arguments(__doc__, runs=5)
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    show("GNU parallel's command line", [measure(args.jobs, args.runs)], args.record)


if __name__ == "__main__":
    main()
