"""The README's code and the examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest
from conftest import ExampleRun

ROOT = Path(__file__).resolve().parent.parent.parent


def python_blocks(path: Path) -> list:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def run_python(block: str, where: str, namespace: dict, cwd: Path) -> None:
    """Run a block in `namespace`; a script (one with a `__main__` guard, as the examples of
    Python calls, whose workers import it) as a file of its own in a fresh interpreter."""
    if '__name__ == "__main__"' not in block:
        exec(compile(block, where, "exec"), namespace)
        return
    script = cwd / f"block_{len(list(cwd.glob('block_*.py')))}.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{where}:\n{block}\n{proc.stderr}"


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = python_blocks(ROOT / "README.md")
    assert blocks
    for block in blocks:
        run_python(block, "README.md", namespace, tmp_path)


ARGS = {"benchmark_demo.py": ["--quick"]}  # the full demonstration takes a minute
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def example_runs(report_example: ExampleRun) -> Iterator[Dict[str, subprocess.Popen[str]]]:
    """Every example started at once, each in a process of its own (they mostly sleep, and their
    budgets are their own): each test waits for its example instead of running it in turn. The
    report example runs for the session (conftest.py): its report is the browser test's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / name), *ARGS.get(name, [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in EXAMPLES
        if name != "report_example.py"
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs(example: str, example_runs: Dict[str, subprocess.Popen[str]], report_example: ExampleRun) -> None:
    if example == "report_example.py":
        status, out, err = report_example.wait()
        assert status == 0, err
        assert out
        return
    out, err = example_runs[example].communicate(timeout=120)
    assert example_runs[example].returncode == 0, err
    assert out


def run_shell(block: str, cwd: Path, first_on_path: Optional[Path] = None) -> None:
    """Run a shell block with bash -euo pipefail, this environment's scripts first on PATH."""
    dirs = [str(d) for d in (first_on_path, Path(sys.executable).parent) if d is not None]
    env = {**os.environ, "PATH": os.pathsep.join([*dirs, os.environ.get("PATH", "")])}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_command_line_example_runs(tmp_path: Path) -> None:
    """The shell session of the README's command line section, in a fresh directory, with the
    console script and python3 of this environment first on PATH."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The command line", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert blocks
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    for block in blocks:
        run_shell(block, tmp_path, first_on_path=bindir)
    assert "held 200 MB" in (tmp_path / "results.json").read_text()
    assert len((tmp_path / "run.log").read_text().splitlines()) == 4  # header and 3 jobs, run once


DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", [p.name for p in DOC_PAGES])
def test_docs_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page's own Python and shell blocks run (the README's, which pages include, run in
    the tests above)."""
    text = (ROOT / "docs" / page).read_text()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        run_python(block, page, namespace, tmp_path)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        if "pip install" in block:
            continue  # installation commands: the CI's own setup runs them
        run_shell(block, tmp_path)


def test_public_signatures_and_the_package_help_show_nothing_private() -> None:
    import inspect

    import mpmsub

    for name in mpmsub.__all__:
        obj = getattr(mpmsub, name)
        targets = [obj] if not inspect.isclass(obj) else [obj, *vars(obj).values()]
        for target in targets:
            if not callable(target) or (getattr(target, "__name__", "_").startswith("_") and target is not obj):
                continue
            try:
                parameters = inspect.signature(target).parameters
            except (TypeError, ValueError):
                continue
            assert not [p for p in parameters if p.startswith("_")], (name, target)
    assert len((mpmsub.__doc__ or "").splitlines()) > 5  # help(mpmsub) says what it is and where to start
    assert mpmsub.JobList.clear.__doc__
