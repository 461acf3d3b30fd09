"""The executor's GPU devices: given by `gpus=`, or detected when a job first asks for one (so
that an executor whose jobs never ask pays nothing for it), and the environment naming a job's."""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple

from mpmsub._policy.ledger import GpuPool, Ledger


class GpuDevices:
    def __init__(self, option: Any, local: bool) -> None:
        from mpmsub._launch import gpus as _gpus

        self._lock = threading.Lock()
        self.devices: Optional[Tuple[_gpus.Device, ...]] = None  # None: not detected yet
        if isinstance(option, GpuDevices):  # a cluster's, for each run's executor: found once
            option.ready_devices()
            self.devices = option.devices
            return
        if not local:
            if option is not None:
                raise ValueError(
                    f"gpus={option!r} names this machine's devices, and jobs run elsewhere: a Dask worker declares "
                    "its GPUs (--resources GPU=N), a SLURM node its gres"
                )
            self.devices = ()
        elif option is not None:
            self.devices = _gpus.check_gpus(option)

    def places(self) -> List[Tuple[int, Optional[int]]]:
        """The devices as the ledger counts them: id and memory."""
        return [(device.id, device.memory) for device in self.devices or ()]

    def ready(self, ledger: Ledger) -> None:
        """Detect the devices if nobody gave them, once, and hand them to `ledger` (before any
        job that asks for a GPU is queued: the loop never looks at an empty pool's devices)."""
        if self.devices is not None:
            return
        with self._lock:
            if self.devices is None:
                devices = self._detect()
                ledger.gpus = GpuPool([(device.id, device.memory) for device in devices])
                self.devices = devices

    def ready_devices(self) -> None:
        """Detect them now if nobody gave them (for another ledger that takes them at its start)."""
        with self._lock:
            if self.devices is None:
                self.devices = self._detect()

    @staticmethod
    def _detect() -> Tuple[Any, ...]:
        from mpmsub._launch import gpus as _gpus

        return _gpus.detect()

    def environment(self, ids: Tuple[int, ...]) -> Dict[str, str]:
        """CUDA_VISIBLE_DEVICES and its kin, naming the devices `ids` (for a job that got them)."""
        from mpmsub._launch import gpus as _gpus

        by_id = {device.id: device for device in self.devices or ()}
        return _gpus.visible_env([by_id[i] for i in ids])
