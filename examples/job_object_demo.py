"""Every way to describe a job: dicts, Job objects with builder methods, job(), and a mix.

Run it with:  python examples/job_object_demo.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mpmsub


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mpmsub-demo-"))
    p = mpmsub.cluster(p=2, m="1G", verbose=False, progress_bar=False)

    # A dictionary, the original interface
    p.jobs.append({"cmd": ["echo", "dict job"], "p": 1, "m": "50M", "id": "from-dict"})

    # A Job built step by step: each builder validates at once and returns the job
    job = (
        mpmsub.Job([sys.executable, "-c", "import os; print(os.getcwd(), os.environ['GREETING'])"])
        .cpu(1)
        .memory("100M")
        .with_timeout(30)
        .with_id("builder")
        .working_dir(workdir)
        .environment({"GREETING": "hello"})
    )
    print("as a dict:", job.to_dict())
    p.jobs.append(job)

    # The convenience function, and output sent to a file instead of captured
    p.jobs.append(mpmsub.job(["echo", "to a file"], p=1, m="50M", id="to-file", stdout=str(workdir / "out.txt")))

    # Bad input is refused at once, with the value named
    for bad in (
        {"cmd": ["echo"], "p": 0},
        {"cmd": ["echo"], "m": "lots"},
        {"cmd": ["echo"], "mem": "1G"},
        {"cmd": ["echo"], "p": 8},
    ):
        try:
            p.jobs.append(bad)
        except ValueError as exc:
            print("refused:", exc)

    p.run()
    for r in sorted(p.completed_jobs, key=lambda r: r.job_id):
        print(f"{r.job_id:<10} -> {r.stdout!r}")
    print("to-file wrote:", (workdir / "out.txt").read_text().strip())


if __name__ == "__main__":
    main()
