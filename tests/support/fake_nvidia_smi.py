"""A stand-in `nvidia-smi` for machines without GPUs: a shell script put first on PATH that
answers the device query mpmsub asks (`--query-gpu=index,uuid,memory.total`), so that GPU
detection runs for real (a subprocess found on PATH) against devices the test chooses.

    def test_x(monkeypatch, tmp_path):
        fake_gpus_on_path(monkeypatch, tmp_path)  # four devices of 81559 MiB
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path
from typing import Sequence, Tuple

import pytest

# index, uuid, memory.total in MiB
FakeDevice = Tuple[int, str, int]

A100_MIB = 81559
DRIVER_FAILURE = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)


def fake_uuid(index: int) -> str:
    return f"GPU-00000000-0000-0000-0000-{index:012d}"


FOUR_DEVICES: Tuple[FakeDevice, ...] = tuple((i, fake_uuid(i), A100_MIB) for i in range(4))

HEADER = "index, uuid, memory.total [MiB]"

_SCRIPT = """\
#!/bin/sh
# A fake nvidia-smi (tests/support/fake_nvidia_smi.py).
query=""
format=""
for arg in "$@"; do
    case "$arg" in
        --query-gpu=index,uuid,memory.total) query=yes ;;
        --format=*) format="${{arg#--format=}}" ;;
    esac
done
if [ -z "$query" ]; then
    echo "fake nvidia-smi: only --query-gpu=index,uuid,memory.total is answered"
    exit 0
fi
case "$format" in
    *noheader*) ;;
    *) echo {header} ;;
esac
case "$format" in
    *nounits*)
{plain}
        ;;
    *)
{units}
        ;;
esac
exit 0
"""

_FAILING = """\
#!/bin/sh
# A fake nvidia-smi whose driver does not answer (tests/support/fake_nvidia_smi.py).
echo {message}
exit {code}
"""


def _echo_lines(lines: Sequence[str]) -> str:
    return "\n".join(f"        echo {shlex.quote(line)}" for line in lines) or "        :"


def _write_executable(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nvidia-smi"
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def install_fake_nvidia_smi(directory: Path, devices: Sequence[FakeDevice] = FOUR_DEVICES) -> Path:
    """Write an executable `nvidia-smi` into `directory` that lists `devices` as the real one
    does (header unless `noheader`, "MiB" after each memory figure unless `nounits`); its path."""
    rows = [f"{index}, {uuid}, {mib}" for index, uuid, mib in devices]
    text = _SCRIPT.format(
        header=shlex.quote(HEADER),
        plain=_echo_lines(rows),
        units=_echo_lines([f"{row} MiB" for row in rows]),
    )
    return _write_executable(directory, text)


def install_failing_nvidia_smi(directory: Path, code: int = 9, message: str = DRIVER_FAILURE) -> Path:
    """Write an `nvidia-smi` that prints `message` and exits `code`, as the real one does on a
    machine whose driver is missing or not loaded; its path."""
    return _write_executable(directory, _FAILING.format(message=shlex.quote(message), code=int(code)))


def _first_on_path(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    monkeypatch.setenv("PATH", os.pathsep.join([str(directory), os.environ.get("PATH", "")]))
    # Detection asks NVML before nvidia-smi: where nvidia-ml-py is installed (a GPU machine) it
    # would see the real devices. None in sys.modules makes `import pynvml` fail.
    monkeypatch.setitem(sys.modules, "pynvml", None)


def fake_gpus_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, devices: Sequence[FakeDevice] = FOUR_DEVICES
) -> Path:
    """Install the fake `nvidia-smi` under `tmp_path` and put it first on PATH (NVML hidden, so
    detection asks it) for the rest of the test; its path."""
    path = install_fake_nvidia_smi(tmp_path / "fake-gpu-bin", devices)
    _first_on_path(monkeypatch, path.parent)
    return path


def failing_gpus_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: int = 9) -> Path:
    """As `fake_gpus_on_path`, with an `nvidia-smi` whose driver does not answer."""
    path = install_failing_nvidia_smi(tmp_path / "fake-gpu-bin", code)
    _first_on_path(monkeypatch, path.parent)
    return path
