"""The runs an executor learns memory from (m="auto"): each key's past runs, read from the run
history once per key, and every run this executor ends, which also goes to the history's writer
thread (`_learn.history.Recorder`).

Submitters read a key's past runs from disk (`load`, on their own thread: disk reads do not
belong on the loop); the loop estimates from them (`model`: what they say, kept until the key's
runs change, so that a batch of many jobs of one key learns once) and adds each run that ends
(`learn`). A lock guards the runs of each key between them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Set

from mpmsub._result import ERROR, PICKLE, START
from mpmsub._units import MB

if TYPE_CHECKING:
    from mpmsub._learn.estimate import Model, Run
    from mpmsub._learn.history import Recorder
    from mpmsub._result import JobResult
    from mpmsub._spec import JobSpec


class RunBook:
    def __init__(self, recorder: Optional[Recorder]) -> None:
        self.recorder = recorder  # None: no history (m="auto" learns from this executor's runs)
        self._runs: Dict[str, List[Run]] = {}
        self._gpu_runs: Dict[str, List[Run]] = {}  # the same, GPU memory peaks (where NVML measured them)
        self._loaded: Set[str] = set()  # keys whose runs were read from the history
        self._models: Dict[str, Optional[Model]] = {}  # what each key's runs say, while they do not change
        self._gpu_models: Dict[str, Optional[Model]] = {}  # the same of their GPU memory
        self._changes: Dict[str, int] = {}  # how often each key's runs changed
        self._lock = threading.Lock()

    def load(self, key: str) -> None:
        """Read the past runs of `key` from the history, once per executor (this executor's own
        runs written first, so that each is counted once). Any thread but the loop's."""
        with self._lock:
            if key in self._loaded or self.recorder is None:
                return
            self._loaded.add(key)
            known = len(self._runs.get(key, ()))
            known_gpu = len(self._gpu_runs.get(key, ()))
        self.recorder.flush()  # the rows of those `known` runs, and of any before them
        runs = self.recorder.history.runs(key)
        gpu_runs = self.recorder.history.gpu_runs(key)
        with self._lock:
            self._runs[key] = runs + self._runs.get(key, [])[known:]
            self._gpu_runs[key] = gpu_runs + self._gpu_runs.get(key, [])[known_gpu:]
            self._changed(key)

    def model(self, key: str, gpu: bool = False) -> Optional[Model]:
        """What the runs of `key` known now say (`_learn.estimate.learn`); None without any.
        `gpu`: what their GPU memory peaks say, with the default neighbours and rise (a GPU stop
        does not run again as an m="auto" miss does)."""
        from mpmsub._learn.estimate import learn

        models = self._gpu_models if gpu else self._models
        with self._lock:
            if key in models:
                return models[key]
            runs = list((self._gpu_runs if gpu else self._runs).get(key, ()))
            changes = self._changes.get(key, 0)
        model = learn(runs, by_cost=not gpu)
        with self._lock:
            if self._changes.get(key, 0) == changes:  # (else runs came in meanwhile: learnt again next time)
                models[key] = model
        return model

    def _changed(self, key: str) -> None:
        """The runs of `key` changed (the lock held): what they say is to be learnt again."""
        self._changes[key] = self._changes.get(key, 0) + 1
        self._models.pop(key, None)
        self._gpu_models.pop(key, None)

    def learn(self, key: Optional[str], spec: JobSpec, input_size: int, result: JobResult, requeued: bool) -> None:
        """Record a run that ended in the history, and in what this executor estimates from."""
        if key is None or result.failure in (START, PICKLE, ERROR):
            return  # never ran, or mpmsub failed: nothing of the tool was measured
        from mpmsub._learn import estimate, history

        failure = "requeued" if requeued else result.failure
        peak = int(result.memory_used * MB)
        gpu_peak = None if result.gpu_memory_used is None else int(result.gpu_memory_used * MB)
        if self.recorder is not None:  # before the run is counted below (see load)
            row = history.row(
                key,
                spec.cmd,
                input_size,
                peak,
                result.runtime,
                result.cpu_used,
                result.returncode,
                failure,
                spec.memory,
                gpu_peak,
            )
            self.recorder.put(row)
        if failure in estimate.LEARNED_FROM:
            with self._lock:
                for runs, figure in ((self._runs, peak), (self._gpu_runs, gpu_peak)):
                    if figure is None:
                        continue
                    kept = runs.setdefault(key, [])
                    kept.append(estimate.Run(input_size, figure, result.runtime))
                    if len(kept) > 4 * estimate.WINDOW:  # an estimate looks at the last WINDOW
                        del kept[: -2 * estimate.WINDOW]
                self._changed(key)

    def close(self) -> None:
        """No more runs: the writer thread finishes writing (joined by `join`)."""
        if self.recorder is not None:
            self.recorder.close(wait=False)

    def join(self) -> None:
        """Every run recorded is in the history."""
        if self.recorder is not None:
            self.recorder.join()
