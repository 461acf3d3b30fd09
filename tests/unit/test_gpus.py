"""GPU detection against a fake `nvidia-smi` run for real from PATH, the executor's `gpus=`,
the environment a job gets for its devices, and GpuMeter's sums (over a stand-in for NVML)."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fake_nvidia_smi import (
    A100_MIB,
    HEADER,
    failing_gpus_on_path,
    fake_gpus_on_path,
    fake_uuid,
    install_fake_nvidia_smi,
)

from mpmsub._launch.gpus import Device, GpuMeter, check_gpus, detect, parse_query, visible_env

MIB = 2**20
FOUR = tuple(Device(i, fake_uuid(i), A100_MIB * MIB) for i in range(4))


@pytest.fixture(autouse=True)
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection here asks nvidia-smi only, even where nvidia-ml-py is installed."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


# --- detection through a real nvidia-smi process ---


def test_detect_lists_the_devices_nvidia_smi_reports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    found = detect()
    assert [d.id for d in found] == [0, 1, 2, 3]
    assert [d.uuid for d in found] == [f"GPU-00000000-0000-0000-0000-00000000000{i}" for i in range(4)]
    assert {d.memory for d in found} == {81559 * MIB}
    assert {d.vendor for d in found} == {"nvidia"}


def test_detect_with_chosen_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path, [(0, "GPU-a", 16384), (1, "GPU-b", 24576)])
    assert detect() == (Device(0, "GPU-a", 16 * 2**30), Device(1, "GPU-b", 24 * 2**30))


@pytest.mark.parametrize("fmt", ["csv", "csv,noheader", "csv,nounits", "csv,noheader,nounits"])
def test_the_fake_answers_each_format_and_each_parses(tmp_path: Path, fmt: str) -> None:
    import subprocess

    tool = install_fake_nvidia_smi(tmp_path)
    out = subprocess.run(
        [str(tool), "--query-gpu=index,uuid,memory.total", f"--format={fmt}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert (lines[0] == HEADER) == ("noheader" not in fmt)
    assert lines[-1].endswith(" MiB") == ("nounits" not in fmt)
    assert parse_query(out) == FOUR


def test_the_fake_answers_other_arguments_plainly(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run([str(install_fake_nvidia_smi(tmp_path)), "-L"], capture_output=True, text=True)
    assert done.returncode == 0 and "fake nvidia-smi" in done.stdout


def test_a_failing_nvidia_smi_means_no_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing_gpus_on_path(monkeypatch, tmp_path)
    with caplog.at_level(logging.DEBUG, logger="mpmsub"):
        assert detect() == ()
    assert "exited 9" in caplog.text and "couldn't communicate with the NVIDIA driver" in caplog.text


def test_no_nvidia_smi_on_path_means_no_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect() == ()


def test_a_hanging_nvidia_smi_means_no_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\nexec sleep 30\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/bin:/usr/bin")
    assert detect(timeout=0.3) == ()


def test_unreadable_output_means_no_gpus_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho '0, GPU-a, 1024'\necho 'No devices were found'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mpmsub"):
        assert detect() == ()
    assert "'No devices were found'" in caplog.text


def test_detect_asks_nvml_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)  # would say four devices
    nvml = FakeNvml([[]], uuids=[b"GPU-nvml"], totals=[8 * 2**30])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert detect() == (Device(0, "GPU-nvml", 8 * 2**30),)
    assert nvml.calls == ["init", "shutdown"]


def test_detect_falls_back_to_nvidia_smi_when_nvml_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], init_fails=True))
    assert detect() == FOUR


# --- parsing (pure) ---


def test_parse_query_reads_the_header_form_and_the_bare_form() -> None:
    with_header = "index, uuid, memory.total [MiB]\n0, GPU-x, 81559 MiB\n1, GPU-y, 40960 MiB\n"
    bare = "0, GPU-x, 81559\n1, GPU-y, 40960\n"
    expected = (Device(0, "GPU-x", 81559 * MIB), Device(1, "GPU-y", 40960 * MIB))
    assert parse_query(with_header) == parse_query(bare) == expected
    assert parse_query("") == ()


def test_parse_query_finds_columns_by_the_header() -> None:
    text = "memory.total [GiB], name, index\n80, H100, 3\n"
    assert parse_query(text) == (Device(3, None, 80 * 2**30),)


def test_parse_query_takes_not_available_as_unknown() -> None:
    assert parse_query("0, [N/A], [N/A]\n") == (Device(0, None, None),)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("0, GPU-x, 81559\nNo devices were found\n", "No devices were found"),
        ("0, GPU-x, lots\n", "0, GPU-x, lots"),
        ("0, GPU-x\n", "0, GPU-x"),
        ("x, GPU-x, 10\n", "x, GPU-x, 10"),
        ("0, GPU-x, 10 parsecs\n", "0, GPU-x, 10 parsecs"),
        ("0, GPU-x, 10\n0, GPU-y, 10\n", "0, GPU-y, 10"),
        ("index, uuid\n0, GPU-x\n", "index, uuid"),
    ],
)
def test_parse_query_names_the_first_bad_line(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=repr(named)):
        parse_query(text)


devices_strategy = st.lists(
    st.tuples(
        st.integers(0, 64),
        st.from_regex(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}", fullmatch=True),
        st.integers(0, 2**22),
    ),
    max_size=8,
    unique_by=lambda device: device[0],
)


@given(devices_strategy, st.booleans(), st.booleans())
def test_parse_query_round_trips_the_csv_formats(
    devices: List[Tuple[int, str, int]], header: bool, units: bool
) -> None:
    lines = [HEADER] if header else []
    lines += [f"{i}, {uuid}, {mib}{' MiB' if units else ''}" for i, uuid, mib in devices]
    assert parse_query("\n".join(lines) + "\n") == tuple(Device(i, uuid, mib * MIB) for i, uuid, mib in devices)


# --- check_gpus ---


def none_found() -> Tuple[Device, ...]:
    return ()


def four_found() -> Tuple[Device, ...]:
    return FOUR


def must_not_detect() -> Tuple[Device, ...]:
    raise AssertionError("detection asked for nothing")


def test_check_gpus_none_detects() -> None:
    assert check_gpus(None, four_found) == FOUR
    assert check_gpus(None, none_found) == ()


def test_check_gpus_none_detects_for_real(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpus_on_path(monkeypatch, tmp_path)
    assert check_gpus(None) == FOUR


def test_check_gpus_number_takes_the_first_devices() -> None:
    assert check_gpus(2, four_found) == FOUR[:2]
    assert check_gpus(2, none_found) == (Device(0, vendor="any"), Device(1, vendor="any"))
    assert check_gpus(0, must_not_detect) == ()
    assert check_gpus([], must_not_detect) == ()


def test_check_gpus_list_takes_those_devices_in_order() -> None:
    assert check_gpus([3, 1], four_found) == (FOUR[3], FOUR[1])
    assert check_gpus((5,), none_found) == (Device(5, None, None, "any"),)
    assert check_gpus(range(1, 3), four_found) == FOUR[1:3]


def test_check_gpus_refuses_a_device_detection_does_not_list() -> None:
    with pytest.raises(ValueError, match=r"GPU device 7 does not exist: this machine has devices 0, 1, 2, 3"):
        check_gpus([0, 7], four_found)
    with pytest.raises(ValueError, match=r"gpus=5 is more devices than this machine has: 4 \(0, 1, 2, 3\)"):
        check_gpus(5, four_found)


@pytest.mark.parametrize(
    ("value", "error", "named"),
    [
        (True, TypeError, "True"),
        (False, TypeError, "False"),
        (-1, ValueError, "-1"),
        (1.5, TypeError, "1.5"),
        (2.0, TypeError, "2.0"),
        ("0,1", TypeError, "'0,1'"),
        ({0, 1}, TypeError, "{0, 1}"),
        ([0, 0], ValueError, "device 0 is listed twice"),
        ([0, -2], ValueError, "-2 is no device id"),
        ([0, 1.5], TypeError, "1.5 is no device id"),
        ([True], TypeError, "True is no device id"),
        (["0"], TypeError, "'0' is no device id"),
    ],
)
def test_check_gpus_refuses_bad_values_naming_them(value: object, error: type, named: str) -> None:
    with pytest.raises(error) as info:
        check_gpus(value, must_not_detect)
    message = str(info.value)
    assert named in message
    assert message.startswith("gpus must be None (detect), a number of devices or a list of device ids; got")


# --- a job's environment ---


def test_visible_env_of_nvidia_devices() -> None:
    assert visible_env([FOUR[2], FOUR[0]]) == {
        "CUDA_VISIBLE_DEVICES": "2,0",
        "NVIDIA_VISIBLE_DEVICES": "2,0",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def test_visible_env_of_devices_given_by_id_also_shows_hip() -> None:
    env = visible_env([Device(1, vendor="any"), Device(3, vendor="any")])
    assert env == {"CUDA_VISIBLE_DEVICES": "1,3", "NVIDIA_VISIBLE_DEVICES": "1,3", "HIP_VISIBLE_DEVICES": "1,3"}


def test_visible_env_of_no_devices_is_empty() -> None:
    assert visible_env([]) == {}


# --- GpuMeter ---


class FakeNvmlError(Exception):
    pass


class FakeProcess:
    def __init__(self, pid: int, used: Optional[int]) -> None:
        self.pid = pid
        self.usedGpuMemory = used


class FakeMemory:
    def __init__(self, total: int) -> None:
        self.total = total


class FakeNvml(types.ModuleType):
    """A stand-in for pynvml (the driver): per device, its compute and graphics processes as
    (pid, bytes) pairs; a device given as None fails to read."""

    NVMLError = FakeNvmlError

    def __init__(
        self,
        compute: Sequence[Optional[Sequence[Tuple[int, Optional[int]]]]],
        graphics: Optional[Sequence[Optional[Sequence[Tuple[int, Optional[int]]]]]] = None,
        *,
        init_fails: bool = False,
        uuids: Sequence[Any] = (),
        totals: Sequence[int] = (),
    ) -> None:
        super().__init__("pynvml")
        self.compute = compute
        self.graphics = graphics if graphics is not None else [[] for _ in compute]
        self.init_fails = init_fails
        self.uuids = uuids
        self.totals = totals
        self.calls: List[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_fails:
            raise FakeNvmlError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.compute)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> Any:
        return self.uuids[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> FakeMemory:
        return FakeMemory(self.totals[handle])

    def _processes(self, table: Sequence[Optional[Sequence[Tuple[int, Optional[int]]]]], handle: int) -> List[Any]:
        rows = table[handle]
        if rows is None:
            raise FakeNvmlError("GPU is lost")
        return [FakeProcess(pid, used) for pid, used in rows]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> List[Any]:
        return self._processes(self.compute, handle)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> List[Any]:
        return self._processes(self.graphics, handle)


def test_gpu_meter_is_none_without_nvml() -> None:
    assert GpuMeter.open() is None  # `no_nvml`: pynvml does not import


def test_gpu_meter_is_none_when_nvml_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([[]], init_fails=True))
    assert GpuMeter.open() is None


def test_gpu_meter_is_none_without_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert GpuMeter.open() is None
    assert nvml.calls == ["init", "shutdown"]


def open_meter(monkeypatch: pytest.MonkeyPatch, nvml: FakeNvml) -> GpuMeter:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    meter = GpuMeter.open()
    assert meter is not None
    return meter


def test_used_by_sums_the_pids_over_devices_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(
        compute=[[(10, 100), (11, 50), (99, 7000)], [(10, 30)]],
        graphics=[[(12, 5)], [(99, 1)]],
    )
    meter = open_meter(monkeypatch, nvml)
    assert meter.used_by([10, 11, 12]) == 185
    assert meter.by_device([10, 11, 12]) == [155, 30]  # what a share on each device is held to
    assert meter.by_device([11]) == [50] and meter.by_device([5]) == []
    assert meter.used_by({10}) == 130
    assert meter.used_by(iter([11])) == 50
    assert meter.used_by([]) == 0
    assert meter.used_by([5]) == 0
    meter.close()
    meter.close()
    assert nvml.calls == ["init", "shutdown"]
    assert meter.used_by([10]) == 0


def test_used_by_counts_a_process_in_both_lists_once(monkeypatch: pytest.MonkeyPatch) -> None:
    meter = open_meter(monkeypatch, FakeNvml(compute=[[(10, 100)]], graphics=[[(10, 100)]]))
    assert meter.used_by([10]) == 100
    meter.close()


def test_used_by_takes_unknown_use_as_zero_and_skips_a_failing_device(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    meter = open_meter(monkeypatch, FakeNvml(compute=[[(10, None), (11, 40)], None, [(10, 2)]]))
    with caplog.at_level(logging.DEBUG, logger="mpmsub"):
        assert meter.used_by([10, 11]) == 42
    assert "GPU is lost" in caplog.text
    meter.close()
