"""Pipelines: commands connected like a shell `|`, measured and killed as one job.

Run it with:  python examples/pipeline_demo.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mpmsub


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mpmsub-pipes-"))
    words = workdir / "words.txt"
    words.write_text("\n".join(["gene", "read", "gene", "contig", "read", "gene"]) + "\n")

    p = mpmsub.cluster(p=2, m="1G", verbose=False, progress_bar=False)
    # 1. pipe_to on a Job
    p.jobs.append(mpmsub.Job(["cat", str(words)]).pipe_to(["sort"]).pipe_to(["uniq", "-c"]).with_id("count"))
    # 2. the pipeline() helper, with the last stage's output sent to a file
    p.jobs.append(
        mpmsub.pipeline(
            [["cat", str(words)], ["grep", "gene"], ["wc", "-l"]], m="50M", id="grep", stdout=str(workdir / "genes.txt")
        )
    )
    # 3. a Pipeline object inside a Job; a failing stage fails the job (as `set -o pipefail`)
    p.jobs.append(mpmsub.Job(cmd=mpmsub.Pipeline([["cat", str(workdir / "missing.txt")], ["sort"]])).with_id("broken"))
    p.run()

    for r in sorted(p.completed_jobs + p.failed_jobs, key=lambda r: r.job_id):
        print(f"{r.job_id:<6} success={r.success!s:<5} stage exit codes={r.stage_returncodes} error={r.error}")
        if r.stdout:
            print("       " + r.stdout.strip().replace("\n", "\n       "))
    print("genes.txt:", (workdir / "genes.txt").read_text().strip())


if __name__ == "__main__":
    main()
