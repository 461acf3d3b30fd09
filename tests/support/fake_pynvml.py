"""A stand-in for the driver's NVML (the `pynvml` module), for machines without GPUs: it lists
the devices it is made with, and reports as a process's GPU memory what that process wrote in a
file `DIRECTORY/DEVICE/PID` (bytes), as a CUDA program's allocation would show in NVML. Jobs
"allocate" with `ALLOCATE`, a small program run under the job's shell, so that the figure belongs
to a process of the job's tree that is not its first.

    def test_x(monkeypatch, tmp_path):
        nvml = install_fake_nvml(monkeypatch, tmp_path / "gpu-memory", devices=2, memory=40 * GiB)
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from pathlib import Path
from typing import Any, List

import pytest

# Run as `python -c ALLOCATE DIRECTORY MB SECONDS`: holds MB on each device of its
# CUDA_VISIBLE_DEVICES for SECONDS (in steps of a fifth of it), then lets go.
ALLOCATE = """
import os, sys, time
directory, mb, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
devices = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
paths = [os.path.join(directory, device, str(os.getpid())) for device in devices]
for step in range(1, 6):
    for path in paths:
        with open(path, "w") as f:
            f.write(str(mb * step // 5 * 1024 * 1024))
    time.sleep(seconds / 5)
for path in paths:
    os.remove(path)
"""


class NVMLError(Exception):
    pass


class _Process:
    def __init__(self, pid: int, used: int) -> None:
        self.pid = pid
        self.usedGpuMemory = used


class _Memory:
    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self.used = 0


def make(directory: Path, devices: int, memory: int) -> types.ModuleType:
    """A module with the functions of pynvml that mpmsub calls."""
    module = types.ModuleType("pynvml")
    for device in range(devices):
        (directory / str(device)).mkdir(parents=True, exist_ok=True)

    def processes(handle: int) -> List[_Process]:
        found = []
        for entry in os.scandir(directory / str(handle)):
            with contextlib.suppress(OSError, ValueError):  # written or removed just now
                found.append(_Process(int(entry.name), int(Path(entry.path).read_text() or 0)))
        return found

    module.calls = {"init": 0, "shutdown": 0}  # type: ignore[attr-defined]

    def count(name: str) -> None:
        module.calls[name] += 1  # type: ignore[attr-defined]

    functions: dict = {
        "NVMLError": NVMLError,
        "nvmlInit": lambda: count("init"),
        "nvmlShutdown": lambda: count("shutdown"),
        "nvmlDeviceGetCount": lambda: devices,
        "nvmlDeviceGetHandleByIndex": lambda index: index,
        "nvmlDeviceGetUUID": lambda handle: f"GPU-fake-{handle}",
        "nvmlDeviceGetMemoryInfo": lambda handle: _Memory(memory),
        "nvmlDeviceGetComputeRunningProcesses": processes,
        "nvmlDeviceGetGraphicsRunningProcesses": lambda handle: [],
    }
    for name, value in functions.items():
        setattr(module, name, value)
    return module


def install_fake_nvml(monkeypatch: pytest.MonkeyPatch, directory: Path, devices: int, memory: int) -> Any:
    """Make `import pynvml` give the stand-in for the rest of the test; it."""
    module = make(directory, devices, memory)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module
