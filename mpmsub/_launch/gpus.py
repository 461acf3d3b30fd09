"""The GPU devices of this machine, which of them a job sees, and how much device memory its
processes hold.

Detection asks NVML (the `pynvml` module of nvidia-ml-py) when it imports, else `nvidia-smi`
found on PATH; a machine with neither, or whose driver does not answer, has no GPUs: nothing
here raises for that. A device is named by its index, as `nvidia-smi` and NVML number them (PCI
bus order), and a job is shown its devices through the `*_VISIBLE_DEVICES` variables
(`visible_env`). The monitor reads each job's device memory with `GpuMeter`.
"""

from __future__ import annotations

import importlib
import logging
import operator
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, SupportsIndex, Tuple

logger = logging.getLogger("mpmsub")

MIB = 2**20
QUERY = ("--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits")
_COLUMNS = ("index", "uuid", "memory.total")
_UNITS = {"b": 1, "kib": 2**10, "mib": MIB, "gib": 2**30, "tib": 2**40}
_NOT_AVAILABLE = ("[n/a]", "n/a", "[not supported]", "not supported", "")
_NVIDIA_VARIABLES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
_ACCEPTED = "gpus must be None (detect), a number of devices or a list of device ids"


@dataclass(frozen=True)
class Device:
    """One GPU a job may be given."""

    id: int  # the index CUDA_VISIBLE_DEVICES names it by
    uuid: Optional[str] = None
    memory: Optional[int] = None  # total bytes on the device; None: unknown
    vendor: str = "nvidia"  # "nvidia" (detected) or "any" (ids given by the user: vendor unknown)


# --- parsing nvidia-smi's answer (pure) ---


def parse_query(text: str) -> Tuple[Device, ...]:
    """The devices in the CSV `nvidia-smi --query-gpu=index,uuid,memory.total` prints, with or
    without its header line and units. Raises ValueError naming the first line it cannot read."""
    lines = [line for line in text.splitlines() if line.strip()]
    columns = {name: at for at, name in enumerate(_COLUMNS)}
    header_unit: Optional[int] = None
    if lines and _is_header(lines[0]):
        columns, header_unit = _header(lines[0])
        lines = lines[1:]
    devices: List[Device] = []
    seen = set()
    for line in lines:
        try:
            device = _device(line, columns, header_unit)
        except ValueError as exc:
            raise ValueError(f"cannot read nvidia-smi's line {line!r}: {exc}") from None
        if device.id in seen:
            raise ValueError(f"cannot read nvidia-smi's line {line!r}: device {device.id} is listed twice")
        seen.add(device.id)
        devices.append(device)
    return tuple(devices)


def _fields(line: str) -> List[str]:
    return [field.strip() for field in line.split(",")]


def _is_header(line: str) -> bool:
    """A first line that names columns (`index`, ...) rather than giving a device's figures."""
    fields = [field.partition("[")[0].strip().lower() for field in _fields(line)]
    return not fields[0].isdigit() and any(field in _COLUMNS for field in fields)


def _header(line: str) -> Tuple[Dict[str, int], Optional[int]]:
    """Where each column is, by its name in the header, and the memory unit the header names
    (`memory.total [MiB]`), which values printed with `nounits` are in."""
    columns: Dict[str, int] = {}
    unit: Optional[int] = None
    for at, field in enumerate(_fields(line)):
        name, _, rest = field.partition("[")
        name = name.strip().lower()
        if name in _COLUMNS:
            columns[name] = at
        if name == "memory.total" and rest:
            unit = _UNITS.get(rest.rstrip("]").strip().lower())
            if unit is None:
                raise ValueError(f"cannot read nvidia-smi's header {line!r}: unknown memory unit {rest!r}")
    missing = [name for name in ("index", "memory.total") if name not in columns]
    if missing:
        raise ValueError(f"cannot read nvidia-smi's header {line!r}: no column {', '.join(missing)}")
    return columns, unit


def _device(line: str, columns: Dict[str, int], header_unit: Optional[int]) -> Device:
    fields = _fields(line)
    if len(fields) <= max(columns.values()):
        raise ValueError(f"{len(fields)} fields, expected {', '.join(_COLUMNS)}")
    index = fields[columns["index"]]
    if not index.isdigit():
        raise ValueError(f"the index {index!r} is no whole number")
    uuid = fields[columns["uuid"]] if "uuid" in columns else None
    if uuid is not None and uuid.lower() in _NOT_AVAILABLE:
        uuid = None
    return Device(int(index), uuid, _memory(fields[columns["memory.total"]], header_unit))


def _memory(text: str, header_unit: Optional[int]) -> Optional[int]:
    """Bytes of a `memory.total` field: `81559` (MiB, or the header's unit) or `81559 MiB`."""
    if text.lower() in _NOT_AVAILABLE:
        return None
    number, _, unit = text.partition(" ")
    scale = _UNITS.get(unit.strip().lower()) if unit else header_unit or MIB
    if scale is None or not number.isdigit():
        raise ValueError(f"the memory {text!r} is not a number of MiB")
    return int(number) * scale


# --- detection ---


def detect(timeout: float = 10.0) -> Tuple[Device, ...]:
    """This machine's GPUs: from NVML where `pynvml` imports and answers, else from nvidia-smi;
    `()` where neither finds any (no driver, no tool, an error: logged, never raised)."""
    found = _nvml_devices()
    return found if found is not None else _smi_devices(timeout)


def _nvml() -> Optional[Any]:
    """The `pynvml` module, or None where nvidia-ml-py is not installed."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def _nvml_devices() -> Optional[Tuple[Device, ...]]:
    """The devices NVML lists; None where NVML is missing or fails (nvidia-smi may still answer)."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # pynvml's NVMLError, or the library's absence under another name
        logger.debug("mpmsub: NVML does not start (%s); asking nvidia-smi", exc)
        return None
    try:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            total = nvml.nvmlDeviceGetMemoryInfo(handle).total
            devices.append(Device(index, uuid.decode() if isinstance(uuid, bytes) else str(uuid), int(total)))
        return tuple(devices)
    except Exception as exc:
        logger.debug("mpmsub: NVML cannot list the GPUs (%s); asking nvidia-smi", exc)
        return None
    finally:
        _shutdown(nvml)


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:
        logger.debug("mpmsub: nvmlShutdown failed: %s", exc)


def _smi_devices(timeout: float) -> Tuple[Device, ...]:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return ()
    try:
        done = subprocess.run([tool, *QUERY], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:  # TimeoutExpired among them
        logger.debug("mpmsub: no GPUs: %s failed: %s", tool, exc)
        return ()
    if done.returncode != 0:
        said = (done.stdout.strip() or done.stderr.strip()).splitlines()
        logger.debug("mpmsub: no GPUs: %s exited %d: %s", tool, done.returncode, said[0] if said else "")
        return ()
    try:
        return parse_query(done.stdout)
    except ValueError as exc:
        logger.warning("mpmsub: no GPUs: %s", exc)
        return ()


# --- the executor's `gpus=` and a job's environment ---


def check_gpus(gpus: object, detected: Callable[[], Tuple[Device, ...]] = detect) -> Tuple[Device, ...]:
    """The devices the executor's `gpus=` names: None, all that `detected()` finds; a number n,
    devices 0..n-1; a list, those ids. Ids detection lists get its details; others (where it
    finds none) are of vendor "any", their memory unknown."""
    if gpus is None:
        return detected()
    ids = _ids(gpus)
    if not ids:
        return ()
    found = {device.id: device for device in detected()}
    if not found:
        return tuple(Device(i, vendor="any") for i in ids)
    have = ", ".join(str(d) for d in sorted(found))
    if not isinstance(gpus, (list, tuple, range)) and len(ids) > len(found):
        raise ValueError(f"gpus={len(ids)} is more devices than this machine has: {len(found)} ({have})")
    for i in ids:
        if i not in found:
            raise ValueError(f"GPU device {i} does not exist: this machine has devices {have}")
    return tuple(found[i] for i in ids)


def _ids(gpus: object) -> List[int]:
    """The device ids `gpus` (a number or a list, not None) names, checked."""
    if isinstance(gpus, (list, tuple, range)):
        ids: List[int] = []
        for item in gpus:
            i = _whole(item)
            if i is None:
                raise TypeError(f"{_ACCEPTED}; got {gpus!r}: {item!r} is no device id (a whole number >= 0)")
            if i < 0:
                raise ValueError(f"{_ACCEPTED}; got {gpus!r}: {i} is no device id (a whole number >= 0)")
            if i in ids:
                raise ValueError(f"{_ACCEPTED}; got {gpus!r}: device {i} is listed twice")
            ids.append(i)
        return ids
    count = _whole(gpus)
    if count is None:
        raise TypeError(f"{_ACCEPTED}; got {gpus!r} ({type(gpus).__name__})")
    if count < 0:
        raise ValueError(f"{_ACCEPTED}; got {count}: a number of devices is >= 0")
    return list(range(count))


def _whole(value: object) -> Optional[int]:
    """`value` as a device number: an int or another integer type (numpy's); None for a bool, or
    a float even if whole (2.0), which would hide a mistake."""
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        return None
    return operator.index(value)


def visible_env(devices: Sequence[Device]) -> Dict[str, str]:
    """The environment that shows a job its devices, ids in the given order (the job numbers them
    0, 1, ... in that order). Empty for no devices: a job that asks for none is left alone."""
    if not devices:
        return {}
    ids = ",".join(str(device.id) for device in devices)
    env = dict.fromkeys(_NVIDIA_VARIABLES, ids)
    if any(device.vendor == "nvidia" for device in devices):
        # The ids are nvidia-smi's and NVML's (PCI bus order); CUDA's own default order puts the
        # fastest device first, which on a mixed machine names other devices by the same ids.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if any(device.vendor != "nvidia" for device in devices):
        # Perhaps AMD: HIP reads HIP_VISIBLE_DEVICES (and CUDA_VISIBLE_DEVICES). Not also
        # ROCR_VISIBLE_DEVICES: ROCr applies it first and HIP then numbers the devices it left
        # from 0, so the same ids in both would name other devices, or none.
        env["HIP_VISIBLE_DEVICES"] = ids
    return env


class GpuMeter:
    """Per-process GPU memory in use, read from NVML (None when NVML or no device is available)."""

    def __init__(self, nvml: Any, handles: Sequence[Any]) -> None:
        self._nvml: Optional[Any] = nvml
        self._error: Any = getattr(nvml, "NVMLError", Exception)
        # Both lists: a process with a graphics context (a display, Vulkan, OpenGL) holds memory
        # too. One with both contexts is in both, with the same figure: it counts once.
        self._reads: Tuple[Tuple[Any, Tuple[Callable[[Any], Any], ...]], ...] = tuple(
            (
                handle,
                (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses),
            )
            for handle in handles
        )

    @classmethod
    def open(cls) -> Optional[GpuMeter]:
        """A meter over every device NVML lists; None where pynvml is missing, NVML does not
        start or there is no device (logged at debug)."""
        nvml = _nvml()
        if nvml is None:
            logger.debug("mpmsub: no GPU memory figures: pynvml (nvidia-ml-py) is not installed")
            return None
        try:
            nvml.nvmlInit()
        except Exception as exc:
            logger.debug("mpmsub: no GPU memory figures: NVML does not start (%s)", exc)
            return None
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as exc:
            logger.debug("mpmsub: no GPU memory figures: NVML cannot list the GPUs (%s)", exc)
            handles = []
        if not handles:
            _shutdown(nvml)
            return None
        return cls(nvml, handles)

    def used_by(self, pids: Iterable[int]) -> int:
        """Bytes of device memory those processes hold now, over all devices."""
        return sum(self.by_device(pids))

    def by_device(self, pids: Iterable[int]) -> List[int]:
        """Bytes of memory those processes hold now on each device (the devices they hold memory
        on). A device NVML cannot read this time adds nothing (logged at debug)."""
        wanted = pids if isinstance(pids, (set, frozenset)) else set(pids)
        if not wanted:
            return []
        figures = []
        for handle, reads in self._reads:
            on_device: Dict[int, int] = {}
            for read in reads:
                try:
                    processes = read(handle)
                except self._error as exc:
                    logger.debug("mpmsub: cannot read GPU processes: %s", exc)
                    continue
                for process in processes:
                    if process.pid in wanted:
                        used = process.usedGpuMemory or 0  # None where the driver cannot tell
                        if used > on_device.get(process.pid, 0):
                            on_device[process.pid] = used
            if on_device:
                figures.append(sum(on_device.values()))
        return figures

    def close(self) -> None:
        """Shut NVML down (once; used_by reads nothing after)."""
        nvml, self._nvml, self._reads = self._nvml, None, ()
        if nvml is not None:
            _shutdown(nvml)
