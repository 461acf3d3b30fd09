"""Start-up: what a short script or a command line pays for mpmsub before its work is done, each
run a fresh process (so the interpreter's start and the imports count), the ways run in turn
with baselines measured in the same run (medians of --runs). The targets of issue 22:

1. `python -X importtime -c "import mpmsub"`, and `-c "from mpmsub import Cluster,
   MemoryAwareExecutor"` (`import mpmsub` imports nothing until a name is used: the second is
   what a program pays for the executor and the cluster): the cumulative times of what each
   imports beyond the interpreter's start. Target: at most 70 ms, for the second. Printed
   beside: the same for `import concurrent.futures, subprocess, psutil`.
2. cold map: a fresh script times `with Executor(max_workers=2) as ex: sum(ex.map(square,
   range(20000), chunksize=200))`, from before the executor is created to the end of the `with`
   (its shutdown included). Targets: mpmsub at most 2x ProcessPoolExecutor with "fork", and
   faster than ProcessPoolExecutor with "forkserver" and with "spawn".
3. executor created and 2 workers ready: a fresh script times `MemoryAwareExecutor(max_workers=2)`
   until `list(ex.map(square, range(100), chunksize=10))` has returned. Target: at most 40 ms.
   Printed beside: ProcessPoolExecutor with "fork".
4. 1000 `true` jobs on 2 slots as a whole `python -c` process (the executor of
   dispatch_overhead.py) / `xargs -P2`. Target: at most 1.4.
5. `mpmsub run` of a 1000-line job file of `true` on 2 slots / `xargs -P2`. Target: at most 1.8.

The scripts of 2 and 3 import their executor at the top, as a user's script does (`from mpmsub
import MemoryAwareExecutor`, `from concurrent.futures import ProcessPoolExecutor`: the workers
that import the main module pay for it), and run in a private temporary directory with
the module that defines `square`, so that workers started any way can import it. Every command
runs there, so that a checkout in the current directory does not stand in for the installed
mpmsub.
Usage: python benchmarks/startup.py [--runs 7] [--record]
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, interleaved_medians, show, xargs_true

MPMSUB = Path(sys.executable).with_name("mpmsub")
SLOTS, JOBS = 2, 1000
ITEMS, CHUNK = 20000, 200
KINDS = ("fork", "forkserver", "spawn")  # ProcessPoolExecutor's start methods, against mpmsub
LIMIT = 120  # seconds: a run that takes longer has hung
IMPORTS = {
    "mpmsub": "import mpmsub",
    "engine": "from mpmsub import Cluster, MemoryAwareExecutor",
    "floor": "import concurrent.futures, subprocess, psutil",
}

CALLS = '''"""The function the workers run."""


def square(x):
    return x * x
'''


def script(imports: str, make: str) -> str:
    """A script as its user writes it, with the executor's module imported at the top: workers
    that import the main module (spawn's, forkserver's, mpmsub's) pay for that as they would."""
    return f'''"""A fresh process: time one executor's start (argv: map|ready, and the start method)."""

import sys
import time

{imports}
from startup_calls import square


def make(kind):
    return {make}


def main(what, kind):
    if what == "map":
        started = time.perf_counter()
        with make(kind) as ex:
            total = sum(ex.map(square, range({ITEMS}), chunksize={CHUNK}))
        taken = time.perf_counter() - started
        assert total == sum(x * x for x in range({ITEMS})), total
    else:
        started = time.perf_counter()
        ex = make(kind)
        list(ex.map(square, range(100), chunksize=10))
        taken = time.perf_counter() - started
        ex.shutdown()
    print(taken)


if __name__ == "__main__":
    main(*sys.argv[1:])
'''


SCRIPTS = {
    "mpmsub": script("from mpmsub import MemoryAwareExecutor", f"MemoryAwareExecutor(max_workers={SLOTS})"),
    "ppe": script(
        "import multiprocessing\nfrom concurrent.futures import ProcessPoolExecutor",
        f"ProcessPoolExecutor(max_workers={SLOTS}, mp_context=multiprocessing.get_context(kind))",
    ),
}


WHOLE = f"""
import mpmsub

with mpmsub.MemoryAwareExecutor(cpus={SLOTS}, memory="1G") as ex:
    futures = [ex.submit(["true"]) for _ in range({JOBS})]
    for f in futures:
        if not f.result().success:
            raise RuntimeError(f.result().error)
"""


def _importtime(where: str, statement: str) -> Dict[str, int]:
    """The microseconds `python -X importtime -c statement` reports for each top-level import."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        cwd=where,
        capture_output=True,
        text=True,
        check=True,
        timeout=LIMIT,
    )
    found: Dict[str, int] = {}
    for line in run.stderr.splitlines():
        fields = line.split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name = fields[2][1:]  # nested imports are indented further
        if not name.startswith(" "):
            found[name] = found.get(name, 0) + int(fields[1])
    return found


@functools.cache
def _startup_modules(where: str) -> frozenset[str]:
    """What the interpreter imports before any statement runs (site, encodings, ...)."""
    return frozenset(_importtime(where, "pass"))


def import_time(where: str, statement: str) -> float:
    """Seconds `python -X importtime -c statement` reports for what the statement imports (the
    cumulative times of the top-level lines; what the interpreter's own start imports is left
    out). `from mpmsub import X` counts the engine modules that the name imports after mpmsub."""
    found = _importtime(where, statement)
    total = sum(us for name, us in found.items() if name not in _startup_modules(where))
    if total == 0:
        raise RuntimeError(f"no import time for {statement!r}")
    return total / 1e6


def in_script(where: str, what: str, kind: str) -> float:
    """The seconds a fresh run of the script of `kind` (mpmsub or a start method) reports."""
    name = "mpmsub" if kind == "mpmsub" else "ppe"
    command = [sys.executable, f"startup_{name}.py", what, kind]
    run = subprocess.run(command, cwd=where, capture_output=True, text=True, timeout=LIMIT)
    if run.returncode != 0:
        raise RuntimeError(f"startup_{name}.py {what} {kind} exited with {run.returncode}:\n{run.stderr}")
    return float(run.stdout.split()[-1])


def wall(where: str, command: List[str]) -> float:
    """The wall time of a whole command."""
    started = time.perf_counter()
    subprocess.run(command, cwd=where, check=True, stdout=subprocess.DEVNULL, timeout=LIMIT)
    return time.perf_counter() - started


def xargs() -> float:
    started = time.perf_counter()
    xargs_true(JOBS, SLOTS)
    return time.perf_counter() - started


def ways(where: str) -> Dict[str, Callable[[], float]]:
    """Every way, by name: each returns its figure in seconds."""
    jobfile = os.path.join(where, "jobs.txt")
    Path(jobfile).write_text("true\n" * JOBS)
    found: Dict[str, Callable[[], float]] = {
        f"import {name}": functools.partial(import_time, where, statement) for name, statement in IMPORTS.items()
    }
    for what in ("map", "ready"):
        for kind in ("mpmsub", *(KINDS if what == "map" else KINDS[:1])):
            found[f"{what} {kind}"] = functools.partial(in_script, where, what, kind)
    found["xargs"] = xargs
    found["python -c"] = functools.partial(wall, where, [sys.executable, "-c", WHOLE])
    found["mpmsub run"] = functools.partial(
        wall, where, [str(MPMSUB), "run", jobfile, "-p", str(SLOTS), "-m", "1G", "-q"]
    )
    return found


def measure(runs: int = 7) -> List[Figure]:
    where = tempfile.mkdtemp(prefix="mpmsub-startup-")
    try:
        Path(where, "startup_calls.py").write_text(CALLS)
        for name, text in SCRIPTS.items():
            Path(where, f"startup_{name}.py").write_text(text)
        m = interleaved_medians(runs, ways(where))
    finally:
        shutil.rmtree(where)
    ms = {name: value * 1e3 for name, value in m.items()}

    def row(what: str, ours: str, baseline: str, theirs: str, digits: int = 0) -> str:
        return (
            f"| {what} | {ms[ours]:.{digits}f} ms | {baseline} | {ms[theirs]:.{digits}f} ms "
            f"| {m[ours] / m[theirs]:.2f} |"
        )

    map_what = f"cold map, {ITEMS} items, chunksize {CHUNK}, {SLOTS} workers"
    detail = [
        f"| start-up, each run a fresh process | mpmsub (median of {runs}) | baseline | baseline (median) | ratio |",
        "|---|---|---|---|---|",
        row("`import mpmsub` (-X importtime, cumulative)", "import mpmsub", f"`{IMPORTS['floor']}`", "import floor", 1),
        row(f"`{IMPORTS['engine']}`", "import engine", f"`{IMPORTS['floor']}`", "import floor", 1),
        *[row(map_what, "map mpmsub", f'ProcessPoolExecutor, "{kind}"', f"map {kind}") for kind in KINDS],
        row(f"executor created, {SLOTS} workers ready", "ready mpmsub", 'ProcessPoolExecutor, "fork"', "ready fork"),
        row(f"{JOBS} `true` jobs, {SLOTS} slots, whole `python -c`", "python -c", f"xargs -P{SLOTS}", "xargs"),
        row(f"`mpmsub run` of a {JOBS}-line job file, -p {SLOTS}", "mpmsub run", f"xargs -P{SLOTS}", "xargs"),
    ]
    ratio = {kind: m["map mpmsub"] / m[f"map {kind}"] for kind in KINDS}
    whole, cli = m["python -c"] / m["xargs"], m["mpmsub run"] / m["xargs"]
    return [
        Figure(
            "start-up: import mpmsub, and the executor's modules",
            f"{ms['import mpmsub']:.1f} ms, {ms['import engine']:.0f} ms (floor {ms['import floor']:.0f} ms)",
            "<= 70 ms",
            ms["import engine"] <= 70,
            detail,
        ),
        Figure(
            "start-up: cold map, 2 workers",
            f'{ratio["fork"]:.2f}x ProcessPoolExecutor "fork"',
            "<= 2",
            ratio["fork"] <= 2,
            [],
        ),
        *[
            Figure(f'start-up: cold map, against "{kind}"', f"{ratio[kind]:.2f}x", "< 1", ratio[kind] < 1, [])
            for kind in KINDS[1:]
        ],
        Figure(
            "start-up: executor and 2 workers ready",
            f"{ms['ready mpmsub']:.0f} ms (fork {ms['ready fork']:.0f} ms)",
            "<= 40 ms",
            ms["ready mpmsub"] <= 40,
            [],
        ),
        Figure(f"start-up: {JOBS} `true` jobs, whole process", f"{whole:.2f}x xargs -P2", "<= 1.4", whole <= 1.4, []),
        Figure(f"start-up: `mpmsub run`, {JOBS}-line job file", f"{cli:.2f}x xargs -P2", "<= 1.8", cli <= 1.8, []),
    ]


def main() -> None:
    args = arguments(__doc__, runs=7).parse_args()
    show("Start-up", measure(args.runs), args.record)


if __name__ == "__main__":
    main()
