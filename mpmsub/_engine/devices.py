"""The executor's GPU devices: given by `gpus=`, or detected when a job first asks for one (so
that an executor whose jobs never ask pays nothing for it), and the environment naming a job's."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from mpmsub._policy.ledger import GpuPool, Ledger


class GpuDevices:
    def __init__(self, option: Any, local: bool) -> None:
        from mpmsub._launch import gpus as _gpus

        self._lock = threading.Lock()
        self.devices: Optional[Tuple[_gpus.Device, ...]] = None  # None: not detected yet
        self.on_found: Optional[Callable[[List[Dict[str, Any]]], None]] = None  # told what detection found
        if not local:
            if option is not None:
                raise ValueError(
                    f"gpus={option!r} names this machine's devices, and jobs run elsewhere: a Dask worker declares "
                    "its GPUs (--resources GPU=N), a SLURM node its gres"
                )
            self.devices = ()
        elif option is not None:
            self.devices = _gpus.check_gpus(option)

    def described(self) -> List[Dict[str, Any]]:
        """The devices as the trace has them: id and memory (bytes, or None)."""
        return [{"id": device.id, "memory": device.memory} for device in self.devices or ()]

    def places(self) -> List[Tuple[int, Optional[int]]]:
        """The devices as the ledger counts them: id and memory."""
        return [(device.id, device.memory) for device in self.devices or ()]

    def ready(self, ledger: Ledger) -> None:
        """Detect the devices if nobody gave them, once, and hand them to `ledger` where it has
        none yet (before any job that asks for a GPU is queued on it: the loop never looks at an
        empty pool's devices). A cluster's are its runs' executors' too: each ledger takes them."""
        with self._lock:
            if self.devices is None:
                from mpmsub._launch import gpus as _gpus

                self.devices = _gpus.detect()
                if self.devices and self.on_found is not None:
                    self.on_found(self.described())
            if self.devices and ledger.here and not len(ledger.gpus):
                ledger.gpus = GpuPool(self.places())

    def environment(self, ids: Tuple[int, ...]) -> Dict[str, str]:
        """CUDA_VISIBLE_DEVICES and its kin, naming the devices `ids` (for a job that got them)."""
        from mpmsub._launch import gpus as _gpus

        by_id = {device.id: device for device in self.devices or ()}
        return _gpus.visible_env([by_id[i] for i in ids])
