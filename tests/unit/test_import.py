"""`import mpmsub` stays light: what only some programs use (the report, the history, Dask,
SLURM, the command line, the trace) and its heavy imports are imported when first used, while
every public name still resolves where it always did."""

from __future__ import annotations

import ast
import os
import pickle
import re
import subprocess
import sys
import textwrap
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Dict, List

import pytest

import mpmsub

ROOT = Path(__file__).resolve().parent.parent.parent

# What `import mpmsub` must not import (each is imported where it is used).
NOT_AT_IMPORT = [
    "psutil",  # a worker importing a main module that imports the executor does without it
    "sqlite3",
    "json",
    "asyncio",
    "ssl",
    "multiprocessing",
    "concurrent.futures.process",
    "concurrent.futures.thread",
    "urllib.parse",
    "tempfile",
    "difflib",
    "hashlib",
    "mpmsub._cli.main",
    "mpmsub._backends.dask",
    "mpmsub._learn.history",
    "mpmsub._report.html",
    "mpmsub._learn.keys",
    "mpmsub._learn.estimate",
    "mpmsub._backends.remote",
    "mpmsub._report.text",
    "mpmsub._backends.slurm",
    "mpmsub._report.trace",
    "mpmsub._launch.worker_main",
    "mpmsub._launch.pool",
]
if sys.version_info >= (3, 11):  # before, typing lacks some of what mpmsub's annotations use
    NOT_AT_IMPORT.append("typing_extensions")
LAZY = ["DaskBackend", "SlurmBackend", "WorkerDiedError", "recommend_memory", "write_report"]


def imported_by(code: str, watched: List[str]) -> Dict[str, Any]:
    """Run `code` in a fresh interpreter: "imported", the modules of `watched` it imported (not
    those the interpreter's start-up had imported already), and "output", the lines it printed."""
    script = (
        "import sys\n_before = set(sys.modules)\n"
        + textwrap.dedent(code)
        + f"\nprint(repr(sorted(m for m in {watched!r} if m in sys.modules and m not in _before)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPMSUB_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    return {"imported": ast.literal_eval(lines[-1]), "output": lines[:-1]}


def test_import_mpmsub_imports_nothing_until_a_name_is_used() -> None:
    run = imported_by(
        "import mpmsub\nprint(sorted(m for m in sys.modules if m.startswith('mpmsub')))", ["typing", "psutil"]
    )
    assert run["output"] == ["['mpmsub']"]  # a worker importing a main module that imports mpmsub pays nothing
    assert run["imported"] == []


def test_the_executor_and_the_cluster_leave_the_heavy_modules_alone() -> None:
    run = imported_by(
        "import mpmsub\nfrom mpmsub import Call, Cluster, Job, MemoryAwareExecutor, cluster", NOT_AT_IMPORT
    )
    assert run["imported"] == []


def test_the_lazy_names_resolve_on_first_use() -> None:
    run = imported_by(
        """
        import mpmsub
        print("mpmsub._backends.dask" in sys.modules, "mpmsub._backends.slurm" in sys.modules)
        backend = mpmsub.DaskBackend
        from mpmsub import SlurmBackend, write_report, recommend_memory
        print(backend.__module__, SlurmBackend.__module__, write_report.__module__, recommend_memory(1000.0))
        """,
        ["mpmsub._backends.dask", "mpmsub._backends.slurm", "mpmsub._report.html", "mpmsub._report.text", "sqlite3"],
    )
    assert run["output"] == ["False False", "mpmsub._backends.dask mpmsub._backends.slurm mpmsub._report.html 1.2G"]
    assert run["imported"] == [
        "mpmsub._backends.dask",
        "mpmsub._backends.slurm",
        "mpmsub._report.html",
        "mpmsub._report.text",
    ]


def test_public_names_are_all_there() -> None:
    listed = dir(mpmsub)
    assert set(LAZY) <= set(mpmsub.__all__)
    for name in mpmsub.__all__:
        assert name in listed
        assert getattr(mpmsub, name) is not None
    from mpmsub import DaskBackend, SlurmBackend, WorkerDiedError, recommend_memory, write_report
    from mpmsub._backends.dask import DaskBackend as dask_backend
    from mpmsub._backends.slurm import SlurmBackend as slurm_backend
    from mpmsub._report.html import write_report as html_write_report
    from mpmsub._report.text import recommend_memory as report_recommend_memory

    assert DaskBackend is dask_backend and SlurmBackend is slurm_backend
    assert write_report is html_write_report and recommend_memory is report_recommend_memory
    assert WorkerDiedError is mpmsub.WorkerDiedError is mpmsub._errors.WorkerDiedError
    namespace: Dict[str, Any] = {}
    exec("from mpmsub import *", namespace)
    assert set(mpmsub.__all__) <= set(namespace)


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="module 'mpmsub' has no attribute 'NoSuchThing'"):
        _ = mpmsub.NoSuchThing  # type: ignore[attr-defined]
    with pytest.raises(ImportError, match="NoSuchThing"):
        from mpmsub import NoSuchThing  # type: ignore[attr-defined]  # noqa: F401
    with pytest.raises(AttributeError, match=re.escape("module 'mpmsub._errors' has no attribute 'NoSuchThing'")):
        _ = mpmsub._errors.NoSuchThing  # type: ignore[attr-defined]


def test_worker_died_error_is_still_a_broken_process_pool() -> None:
    error = mpmsub.WorkerDiedError("call 'x' failed: its worker process was killed by signal SIGKILL")
    assert isinstance(error, BrokenProcessPool) and isinstance(error, mpmsub.CallError)
    assert mpmsub.WorkerDiedError.__module__ == "mpmsub._errors"
    assert mpmsub.WorkerDiedError.__qualname__ == "WorkerDiedError"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is mpmsub.WorkerDiedError and str(copy) == str(error)


def test_running_commands_without_a_history_never_imports_sqlite3() -> None:
    run = imported_by(
        """
        import mpmsub
        with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", history=False) as ex:
            print(ex.submit(["echo", "job"]).result().stdout.strip())
        c = mpmsub.cluster(p=2, m="1G", history=False, verbose=False, progress_bar=False)
        c.jobs.append({"cmd": ["echo", "cluster"], "p": 1, "m": 10})
        c.run()
        print(len(c.completed_jobs), len(c.failed_jobs))
        """,
        # Nor the zygote of Python calls: only commands ran.
        [
            "sqlite3",
            "mpmsub._learn.history",
            "asyncio",
            "ssl",
            "mpmsub._backends.dask",
            "mpmsub._backends.slurm",
            "mpmsub._launch.zygote",
        ],
    )
    assert run["output"] == ["job", "1 0"]
    assert run["imported"] == []


def test_a_history_imports_sqlite3_when_it_is_written(tmp_path: Path) -> None:
    database = tmp_path / "history.db"
    run = imported_by(
        f"""
        import mpmsub
        ex = mpmsub.MemoryAwareExecutor(cpus=1, memory="1G", history={str(database)!r})
        print("sqlite3" in sys.modules)
        with ex:
            ex.submit(["true"]).result()
        print(len(list(ex.history.rows())))
        """,
        ["sqlite3"],
    )
    assert run["output"] == ["False", "1"]
    assert run["imported"] == ["sqlite3"]


def test_a_call_whose_worker_dies_at_interpreter_exit_still_fails_with_worker_died(tmp_path: Path) -> None:
    # The executor is never shut down: the exit hook waits for the call, whose error class is
    # made only then, when concurrent.futures.process can no longer be imported. (The first call
    # prepares the worker while the main module is still whole.)
    script = tmp_path / "late.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys, time
        import mpmsub

        def die():
            time.sleep(0.5)
            os._exit(3)

        def report(future):
            error = future.exception()
            print(type(error).__name__, isinstance(error, mpmsub.CallError), "status 3" in str(error))
            sys.stdout.flush()

        if __name__ == "__main__":
            ex = mpmsub.MemoryAwareExecutor(max_workers=1, history=False)
            ex.submit(abs, -1).result()
            ex.submit(die).add_done_callback(report)
        """)
    )
    env = {k: v for k, v in os.environ.items() if k != "MPMSUB_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["WorkerDiedError", "True", "True"], done.stderr
