"""GPU check: the GPU memory mpmsub reports for a job against what the job allocated.

Needs a machine with an NVIDIA GPU (one that `mpmsub._launch.gpus.detect()` finds, through NVML
or nvidia-smi), torch or cupy to allocate with, and nvidia-ml-py (`pip install mpmsub[gpu]`) for
mpmsub to measure with. Jobs of 256 MB, 1 GB and 4 GB each allocate that much device memory
(`torch.empty(n, dtype=torch.uint8, device="cuda")`, else `cupy.empty`, else the driver's
`cuMemAlloc` through ctypes, which needs nothing installed) and hold it 3 s, run at
once through `MemoryAwareExecutor` with `Job(...).gpu(1, memory="8G")`. For each it prints the
allocation, the result's `gpus` and `gpu_memory_used` and their ratio. Target: the figure
reported is at least the allocation and at most 1 GiB more (the CUDA context and the library's
kernels, which the process holds as well).
Exits 2 where there is no GPU (or no way to allocate on it).
Usage: python benchmarks/gpu_check.py [--record]
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, show

import mpmsub
from mpmsub._launch.gpus import GpuMeter, detect
from mpmsub._units import parse_memory

MB = 2**20
SIZES = ("256M", "1G", "4G")
RESERVED = "8G"  # each job's GPU memory reservation: above every size, with room for the context
CONTEXT_MB = 1024  # what a process's CUDA context may add to its allocation
HOLD = 3.0

ALLOCATE = {
    "torch": (
        "import time, torch\n"
        "x = torch.empty({size}, dtype=torch.uint8, device='cuda')\n"
        "torch.cuda.synchronize()\n"
        "time.sleep({hold})\n"
    ),
    "cupy": (
        "import time, cupy\n"
        "x = cupy.empty({size}, dtype=cupy.uint8)\n"
        "cupy.cuda.Device().synchronize()\n"
        "time.sleep({hold})\n"
    ),
    # The driver's own library, which every machine with the NVIDIA driver has: a context and one
    # allocation on the job's first visible device, through ctypes.
    "libcuda": (
        "import ctypes, time\n"
        "cuda = ctypes.CDLL('libcuda.so.1')\n"
        "assert cuda.cuInit(0) == 0\n"
        "device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()\n"
        "assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0\n"
        "assert cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device) == 0\n"
        "assert cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t({size})) == 0\n"
        "time.sleep({hold})\n"
    ),
}


def allocator() -> Optional[str]:
    """The library the jobs allocate with: torch, else cupy, else the driver's libcuda; None
    where there is none of them."""
    for name in ("torch", "cupy"):
        if importlib.util.find_spec(name) is not None:
            return name
    return "libcuda" if ctypes.util.find_library("cuda") is not None else None


def run(library: str) -> List[Tuple[int, mpmsub.JobResult]]:
    """Each size's allocation (bytes) and its job's result, the jobs run at once."""
    sizes = [parse_memory(size) for size in SIZES]
    jobs = [
        mpmsub.Job([sys.executable, "-c", ALLOCATE[library].format(size=size, hold=HOLD)])
        .gpu(1, memory=RESERVED)
        .memory("4G")  # the library's own host memory (torch alone takes a few hundred MB)
        .with_timeout(300)
        for size in sizes
    ]
    with mpmsub.MemoryAwareExecutor(cpus=len(jobs), gpus=None) as ex:
        futures = [ex.submit(job) for job in jobs]
        return [(size, future.result()) for size, future in zip(sizes, futures)]


def measure(library: str) -> List[Figure]:
    detail = [
        f"allocated with {library}; each job reserved {RESERVED} of GPU memory",
        "",
        "| allocation | gpus | gpu_memory_used | ratio |",
        "|---|---|---|---|",
    ]
    figures = []
    for size, result in run(library):
        requested = size / MB
        used = result.gpu_memory_used
        if not result.success:
            detail.append(f"| {requested:.0f} MB | {result.gpus} | failed: {result.error} | |")
            ok, value = False, "the job failed"
        elif used is None:
            detail.append(f"| {requested:.0f} MB | {result.gpus} | None (not measured) | |")
            ok, value = False, "not measured"
        else:
            ratio = used / requested
            detail.append(f"| {requested:.0f} MB | {result.gpus} | {used:.0f} MB | {ratio:.3f} |")
            ok, value = requested <= used <= requested + CONTEXT_MB, f"{ratio:.3f}x the allocation"
        ok = ok and len(result.gpus) == 1
        target = f"allocation to allocation + {CONTEXT_MB} MB, on 1 device"
        figures.append(Figure(f"gpu memory: {requested:.0f} MB", value, target, ok, []))
    return [figures[0]._replace(detail=detail), *figures[1:]]


def main() -> None:
    args = arguments(__doc__, runs=1).parse_args()
    devices = detect()
    if not devices:
        print("gpu_check: no GPU here (neither NVML nor nvidia-smi lists a device)", file=sys.stderr)
        sys.exit(2)
    library = allocator()
    if library is None:
        print("gpu_check: no torch, cupy or libcuda: the jobs have nothing to allocate with", file=sys.stderr)
        sys.exit(2)
    meter = GpuMeter.open()
    if meter is None:
        print("gpu_check: NVML is not available (pip install nvidia-ml-py): gpu_memory_used will be None")
    else:
        meter.close()
    for device in devices:
        memory = "unknown" if device.memory is None else f"{device.memory / MB:.0f} MB"
        print(f"device {device.id}: {device.uuid}, {memory}")
    figures = measure(library)
    show("GPU memory measurement", figures, args.record)
    if not all(figure.ok for figure in figures):
        sys.exit(1)


if __name__ == "__main__":
    main()
