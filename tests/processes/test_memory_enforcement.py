"""Memory enforcement, retries, the live memory gate and OOM recognition, with real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import psutil
import pytest
from support.helpers import job_groups, wait_for_end
from support.shortage_scenarios import ON_TERM_ALLOCATE, grower

import mpmsub
from mpmsub import JobResult, MemoryAwareExecutor
from mpmsub._report.trace import read as read_trace
from mpmsub._system import available_memory, memory_groups
from mpmsub._units import format_memory

MB = 2**20


TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the support package is
CGROUP_V1 = "/sys/fs/cgroup/memory"
CGROUP_V2 = "/sys/fs/cgroup"


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Optional[str]]:
    """A fresh memory cgroup (v1, or v2 where its memory controller is enabled) limited to
    `limit` bytes; yields its cgroup.procs file, or None where this process may not make one."""
    name = f"mpmsub-test-{uuid.uuid4().hex[:8]}"
    if os.path.exists(f"{CGROUP_V1}/memory.limit_in_bytes") and os.access(CGROUP_V1, os.W_OK):
        group, limit_file = f"{CGROUP_V1}/{name}", "memory.limit_in_bytes"
    elif "memory" in _text(f"{CGROUP_V2}/cgroup.subtree_control").split() and os.access(CGROUP_V2, os.W_OK):
        group, limit_file = f"{CGROUP_V2}/{name}", "memory.max"
    else:
        yield None
        return
    os.mkdir(group)
    try:
        with open(f"{group}/{limit_file}", "w") as f:
            f.write(str(limit))
        yield f"{group}/cgroup.procs"
    finally:
        deadline = time.monotonic() + 5
        while True:  # the last processes may take a moment to leave
            try:
                os.rmdir(group)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


SCENARIO_LIMIT = 2 * 1024 * MB
SCENARIO_MARGIN = 1024 * MB


# The scenarios of shortage_scenarios.py, with the files each is given (made in its own directory).
SCENARIOS: Dict[str, Tuple[str, ...]] = {
    "live_gate": (),
    "newest_requeued": ("trace.jsonl",),
    "requeued_waits_for_margin": ("trace.jsonl",),
    "requeued_too_often": (),
    "grace_not_requeued": ("runs",),
    "larger_than_free": (),
    "one_by_one": (),
}
EXACT = {"requeued_waits_for_margin"}  # scenarios played only in a group of their own


class Shortages:
    """Plays the scenarios of shortage_scenarios.py, each in a child process, in a 2G memory cgroup
    of its own where one can be made (there the available memory moves only with our processes),
    else on the machine's figure.

    The executor reads the smallest of the machine's and each enclosing group's available memory.
    A scenario's own group decides only while the others have room to spare: on a machine or in a
    container with less, their figure (moved by the page cache and everything else) would decide,
    and the scenario would not play as written. Where the machine has room for every group at
    once, all the scenarios are started together (they mostly sleep): each test waits for its own.
    Otherwise each is played when its test asks for it, alone."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._groups = contextlib.ExitStack()
        self._playing: Dict[str, subprocess.Popen[str]] = {}

    def start_all(self) -> None:
        outer = available_memory(memory_groups())
        with memory_cgroup(MB) as probe:
            if probe is None or outer < len(SCENARIOS) * SCENARIO_LIMIT + SCENARIO_MARGIN:
                return
        for name in SCENARIOS:
            self._playing[name] = self._start(name, self._groups.enter_context(memory_cgroup(SCENARIO_LIMIT)))

    def _start(self, name: str, procs: Optional[str]) -> subprocess.Popen[str]:
        (self.directory / name).mkdir()
        args = [str(self.directory / name / arg) for arg in SCENARIOS[name]]
        enter = f"open({procs!r}, 'w').write(str(os.getpid()))\n" if procs else ""
        code = (
            f"import json, os, sys\n{enter}sys.path.insert(0, {TESTS!r})\n"
            f"from support import shortage_scenarios\nprint(json.dumps(shortage_scenarios.{name}(*sys.argv[1:])))\n"
        )
        return subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def play(self, name: str) -> Tuple[List[Any], Path]:
        """The scenario's results (JobResults, and any other dict it returns), and its directory."""
        proc = self._playing.pop(name, None)
        if proc is not None:
            out, err = _finish(proc)
        else:
            outer = available_memory(memory_groups())
            if outer < SCENARIO_LIMIT + SCENARIO_MARGIN:
                pytest.skip(
                    f"needs {format_memory(SCENARIO_LIMIT + SCENARIO_MARGIN)} available to play a memory "
                    f"shortage in a group of its own; there is {format_memory(outer)}"
                )
            with memory_cgroup(SCENARIO_LIMIT) as procs:
                if procs is None and name in EXACT:
                    pytest.skip("needs root and a writable memory cgroup: the machine's figure moves too much")
                proc = self._start(name, procs)
                out, err = _finish(proc)
        assert proc.returncode == 0, err
        results = [JobResult(**d) if "job_id" in d else d for d in json.loads(out.splitlines()[-1])]
        return results, self.directory / name

    def close(self) -> None:
        try:
            for proc in self._playing.values():  # scenarios whose tests did not run: they end soon
                _finish(proc)
        finally:
            self._groups.close()


def _finish(proc: subprocess.Popen[str]) -> Tuple[str, str]:
    """A scenario's output once it has ended; one that hangs is killed (the executor in it then
    kills its jobs)."""
    try:
        return proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return out, err + "\n(the scenario was killed after 180 s)"


@pytest.fixture(scope="module")
def shortages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shortages]:
    played = Shortages(tmp_path_factory.mktemp("shortages"))
    try:
        played.start_all()
        yield played
    finally:
        played.close()


def runs(trace: Path) -> str:
    """The runs a trace records, a line each: for the message of a failed assertion."""
    ends = [e for e in read_trace(trace) if e["type"] == "end"]
    lines = (f"{e['job']} run {e['run']}: {e['status']} at {e['t']} s, peak {e['peak'] / MB:.0f}M" for e in ends)
    return "\n".join(lines)


class TreeSampler:
    """A sampler in the test: the summed RSS of processes whose command line holds a marker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    if self.marker in (proc.info["cmdline"] or []):
                        total += proc.info["memory_info"].rss
                except (psutil.Error, TypeError):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_liar_is_stopped_and_an_honest_job_beside_it_succeeds() -> None:
    marker = uuid.uuid4().hex
    with TreeSampler(marker) as sampler, MemoryAwareExecutor(cpus=2, memory="1G", memory_reserve=0) as ex:
        honest = ex.submit(mpmsub.Job(grower(250, step_mb=250, hold=3.0, marker=marker)).memory("300M"))
        time.sleep(0.3)
        # 100M every 0.2 s: a monitor delayed 0.7 s on a busy machine still stops it in bounds
        liar = ex.submit(mpmsub.Job(grower(1500, step_delay=0.2, marker=marker)).memory("200M"))
        liar_result, honest_result = liar.result(timeout=60), honest.result(timeout=60)
    assert honest_result.success, honest_result.error
    assert liar_result.failure == "memory" and not liar_result.success
    assert liar_result.error is not None
    assert liar_result.error.startswith("exceeded memory: used ") and "having declared 200M" in liar_result.error
    assert "of the 1024M budget" in liar_result.error
    assert 600 <= liar_result.memory_used <= 1300
    # the total stays near the budget: at most a few hundred MB over it, never the liar's 1.5G
    assert sampler.peak <= 1024 * MB + 350 * MB, f"sampled total peaked at {sampler.peak / MB:.0f} MB"


def test_strict_mode_per_job_and_per_executor() -> None:
    with MemoryAwareExecutor(cpus=2, memory="4G") as ex:
        strict = ex.submit(mpmsub.Job(grower(400, hold=0.5)).memory("150M").strict_memory())
        lenient = ex.submit(mpmsub.Job(grower(250, hold=0.3)).memory("150M"))  # over, but there is room
        r = strict.result(timeout=60)
        assert r.failure == "memory"
        assert r.error is not None and r.error.startswith("exceeded its memory limit: used ")
        assert r.error.endswith("of the 150M it declared (strict memory)")
        assert lenient.result(timeout=60).success
    with MemoryAwareExecutor(cpus=2, memory="4G", strict_memory=True) as ex:
        over = ex.submit({"cmd": grower(300, hold=0.5), "m": "120M"})
        within = ex.submit({"cmd": grower(50, step_mb=50, hold=0.3), "m": "200M"})
        opted_out = ex.submit({"cmd": grower(250, hold=0.3), "m": "120M", "strict": False})
        no_m = ex.submit({"cmd": grower(250, hold=0.3)})  # nothing to hold it to: the budget only
        assert over.result(timeout=60).failure == "memory"
        assert within.result(timeout=60).success and opted_out.result(timeout=60).success
        assert no_m.result(timeout=60).success


def test_a_strict_job_over_its_m_while_the_driver_was_stopped_fails_at_its_end(tmp_path: Path) -> None:
    # No sample can see the job: the driver is SIGSTOPped for its whole life. Its final peak
    # (the kernel's ru_maxrss, or its cgroup's) decides.
    release = tmp_path / "go"
    code = (
        f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.01)\nx = bytearray(300 * 2**20)\n"
    )
    driver = textwrap.dedent(f"""
        import sys, mpmsub
        with mpmsub.MemoryAwareExecutor(cpus=1, memory="2G") as ex:
            job = mpmsub.Job([sys.executable, "-c", {code!r}]).memory("50M").strict_memory()
            r = ex.submit(job).result()
        print(r.failure, "|", r.error, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mpmsub.__file__).parent.parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True, env=env)
    try:
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while not (jobs := [c for c in me.children() if c.name().startswith("python")]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        job = jobs[0]
        proc.send_signal(signal.SIGSTOP)
        release.touch()
        while job.status() != psutil.STATUS_ZOMBIE:  # it allocated and exited while no one looked
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
    failure, error = out.strip().split(" | ")
    assert failure == "memory"
    assert error.startswith("exceeded its memory limit: used ")
    assert error.endswith("of the 50M it declared (strict memory; measured at its end)")


def test_a_memory_failure_is_retried_with_more_memory() -> None:
    with MemoryAwareExecutor(cpus=1, memory="2G") as ex:
        job = mpmsub.Job(grower(260, step_mb=130, hold=0.6)).memory("100M").strict_memory().with_retries(3)
        r = ex.submit(job).result(timeout=60)
    assert r.success, r.error
    assert r.attempts == 3  # 100M and 200M were too little, 400M held it
    assert r.memory_requested == 400


def test_memory_growth_is_capped_at_the_budget() -> None:
    with MemoryAwareExecutor(cpus=1, memory="300M") as ex:
        job = mpmsub.Job(grower(500, hold=0.5)).memory("200M").strict_memory().with_retries(2, memory_growth=4)
        r = ex.submit(job).result(timeout=60)
    assert r.failure == "memory" and r.attempts == 3
    assert r.memory_requested == 300


def test_other_failures_are_retried_as_they_were(tmp_path: Path) -> None:
    flag = tmp_path / "ran-once"
    script = f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else open({str(flag)!r}, 'w').close() or 3)"
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        ok = ex.submit(mpmsub.job([sys.executable, "-c", script], m="50M", retries=2)).result(timeout=30)
        never = ex.submit({"cmd": ["sh", "-c", "exit 5"], "retries": 2}).result(timeout=30)
        missing = ex.submit({"cmd": ["no-such-program-xyz"], "retries": 3}).result(timeout=30)
    assert ok.success and ok.attempts == 2 and ok.memory_requested == 50
    assert never.returncode == 5 and never.attempts == 3
    assert missing.failure == "start" and missing.attempts == 1  # retrying cannot find it either


@pytest.mark.parametrize("pause", ["", "sleep 0.5 && cat /proc/self/cgroup && "], ids=["at-once", "after-placement"])
def test_a_kernel_oom_kill_is_reported_as_a_memory_failure(pause: str) -> None:
    # The job puts itself in a 100M group. Taking its memory after the executor has looked for
    # its processes to measure them in a group of its own, it must still be under the 100M.
    with memory_cgroup(100 * MB) as procs:
        if procs is None:
            pytest.skip("needs root and a writable memory cgroup to provoke a kernel OOM kill")
        if pause and job_groups() is None:
            pytest.skip("the executor makes no per-job memory cgroups here: no placement to stay out of")
        alloc = f"{sys.executable} -c 'x = bytearray(400 * 2**20)'"
        with MemoryAwareExecutor(cpus=1, memory="2G") as ex:
            r = ex.submit(["sh", "-c", f"echo $$ > {procs} && {pause}exec {alloc}"]).result(timeout=60)
            time.sleep(0.5)  # idle: the executor's count of OOM kills must not go stale
            own = ex.submit(["sh", "-c", "kill -9 $$"]).result(timeout=60)
        if pause:  # after the placement, it was still in the group it chose
            assert os.path.basename(os.path.dirname(procs)) in (r.stdout or ""), r.stdout
        assert r.failure == "memory", (r.returncode, r.error)
        assert r.error is not None and r.error.startswith("killed by the kernel's out-of-memory killer (SIGKILL)")
        assert (own.failure, own.error) == ("signal", "killed by signal SIGKILL")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"cpus": 0}, ValueError, "invalid cpus 0"),
        ({"cpus": 1.5}, ValueError, "invalid cpus 1.5"),
        ({"cpus": "x"}, ValueError, "invalid cpus 'x'"),
        ({"memory": "-1G"}, ValueError, "invalid memory '-1G'"),
        ({"memory": "many"}, ValueError, "invalid memory 'many'"),
        ({"memory": 0}, ValueError, "positive memory budget"),
        ({"max_workers": 0}, ValueError, "invalid max_workers 0"),
        ({"kill_grace": -1}, ValueError, "invalid kill_grace -1"),
        ({"strict_memory": "yes"}, TypeError, "strict_memory must be True or False; got 'yes'"),
        ({"memory_reserve": "lots"}, ValueError, "invalid memory_reserve 'lots'"),
    ],
)
def test_bad_executor_arguments_are_refused_naming_the_value(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        MemoryAwareExecutor(**kwargs)


@pytest.mark.parametrize(
    ("job", "error", "message"),
    [
        ({"cmd": ["x"], "retries": -1}, ValueError, "invalid retries -1"),
        ({"cmd": ["x"], "retries": 1.5}, TypeError, "retries must be a whole number"),
        ({"cmd": ["x"], "retries": 1, "memory_growth": 0.5}, ValueError, "invalid memory_growth 0.5"),
        ({"cmd": ["x"], "strict": "yes"}, TypeError, "strict must be True or False"),
        ({"cmd": ["x"], "strict": True}, ValueError, "strict memory needs the job's memory"),
    ],
)
def test_bad_retry_and_strict_options(job: dict, error: type, message: str) -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex, pytest.raises(error, match=message):
        ex.submit(job)


def test_an_output_flood_does_not_deadlock(tmp_path: Path) -> None:
    flood = "import sys; chunk = 'x' * 2**20\nfor _ in range({n}): sys.stdout.write(chunk)"
    with MemoryAwareExecutor(cpus=2, memory="2G") as ex:
        to_file = ex.submit(mpmsub.Job([sys.executable, "-c", flood.format(n=300)]).stdout_to(tmp_path / "out"))
        # 16M (256 pipe buffers): more held here would raise this process's peak, above which a
        # job's ru_maxrss is not trusted, and leave later tests' peaks to sampling alone
        captured = ex.submit([sys.executable, "-c", flood.format(n=16)])
        rf, rc = to_file.result(timeout=120), captured.result(timeout=120)
    assert rf.success and (tmp_path / "out").stat().st_size == 300 * MB
    assert rc.success and len(rc.stdout or "") == 16 * MB


# -- regressions found by review: a stop acts only on the run and the state it was decided for ----


def test_a_memory_stop_during_a_timeouts_grace_kills_at_once(tmp_path: Path) -> None:
    with MemoryAwareExecutor(cpus=1, memory="4G", kill_grace=5, memory_reserve=0) as ex:
        job = mpmsub.Job([sys.executable, "-c", ON_TERM_ALLOCATE.format(mb=800), str(tmp_path / "runs")])
        r = ex.submit(job.memory("100M").strict_memory().with_timeout(0.3)).result(timeout=30)
    assert r.failure == "timeout"  # the first reason stands
    assert r.runtime < 3, "the strict stop waited for the timeout's 5 s grace"


@pytest.mark.parametrize("how", ["shutdown", "terminate"])
def test_cancelling_a_queued_retry_resolves_its_future(how: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    ex = MemoryAwareExecutor(cpus=2, memory="1000M", memory_reserve=0, trace=trace)
    a = ex.submit(mpmsub.Job([sys.executable, "-c", "import time; time.sleep(3)"]).memory("500M"))
    # killed at 400M over its strict 300M; the retry asks 600M, which waits beside A's 500M
    job = mpmsub.Job(grower(400, step_mb=400, hold=5)).memory("300M").strict_memory().with_retries(1)
    b = ex.submit(job.with_id("b"))
    wait_for_end(trace, "b")
    deadline = time.monotonic() + 20
    while ex.status().queued != 1 and time.monotonic() < deadline:  # B's retry waits
        time.sleep(0.01)
    if how == "shutdown":
        ex.shutdown(wait=True, cancel_futures=True)
    else:
        ex.terminate()
    r = b.result(timeout=5)
    assert r.failure == "cancelled" and r.attempts == 1
    assert (
        r.error is not None
        and "exceeded its memory limit" in r.error
        and "cancelled before it could run again" in r.error
    )
    assert a.done()


# The memory shortage scenarios last: they play at once, with nothing else beside them.
def test_the_live_gate_holds_jobs_the_machine_cannot_take(shortages: Shortages) -> None:
    (ra, rb), _ = shortages.play("live_gate")
    assert ra.success and rb.success
    assert rb.start_time >= ra.end_time - 0.05, "the gate let two 300M jobs share 400M of free memory"


def test_the_newest_job_is_stopped_and_requeued_when_the_machine_runs_short(shortages: Shortages) -> None:
    (ra, rb), files = shortages.play("newest_requeued")
    trace = files / "trace.jsonl"
    assert ra.success and ra.requeued == 0, runs(trace)
    assert rb.success and rb.requeued == 1 and rb.attempts == 1, runs(trace)
    assert rb.start_time >= ra.end_time - 0.05, runs(trace)  # its final run waited for A to free the memory


def test_a_requeued_job_waits_for_more_than_the_peak_it_was_stopped_at(shortages: Shortages) -> None:
    # It may have been stopped while still growing: room for its peak alone is not enough.
    (ra, rb, seen), files = shortages.play("requeued_waits_for_margin")
    trace = files / "trace.jsonl"
    assert ra.success and rb.success and rb.requeued == 1, runs(trace)
    assert rb.start_time >= seen["ample"], f"B started again in room for 1.1x its peak\n{runs(trace)}"


def test_a_job_requeued_too_often_fails_with_a_memory_error(shortages: Shortages) -> None:
    (r,), _ = shortages.play("requeued_too_often")
    assert r.failure == "memory" and r.requeued == 3
    assert r.error is not None and "under the" in r.error and "giving up" in r.error


def test_a_job_in_its_timeout_grace_is_not_requeued_when_the_machine_runs_short(shortages: Shortages) -> None:
    (r,), files = shortages.play("grace_not_requeued")
    runs = files / "runs"
    assert (r.failure, r.requeued, r.attempts) == ("timeout", 0, 1)
    assert runs.read_text() == "run\nterm\n"  # it took the memory in its grace, and ran once


def test_a_job_larger_than_the_free_memory_starts_when_nothing_else_runs(shortages: Shortages) -> None:
    (r,), _ = shortages.play("larger_than_free")
    assert r.success and r.requeued == 0


def test_requeued_jobs_come_back_one_by_one_when_together_they_do_not_fit(shortages: Shortages) -> None:
    (rb, rs), _ = shortages.play("one_by_one")
    assert rb.failure == "memory" and rb.requeued == 3  # needs more than the machine spares
    assert rs.success and rs.requeued >= 1, rs.error  # fine once it runs on its own
