"""`mpmsub ps` and `mpmsub kill`: a running `mpmsub run` answers them on a Unix socket.

Other users on the machine are not trusted. The socket lives in a directory private to this
user (0700, theirs, created exclusively; refused otherwise), so no one else can connect to it,
nor put a socket of their own where the commands look; on Linux the run also checks each peer's
uid (SO_PEERCRED). A request and its answer are one JSON object on a line each, a request at
most 64 KiB: nothing is ever unpickled. The directory is $XDG_RUNTIME_DIR/mpmsub (a per-boot
directory of the user's on this machine), else a per-machine directory under the run history's
state directory (a home directory may be shared by several machines, whose pids collide).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import selectors
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from mpmsub import _threads
from mpmsub._cluster import Cluster
from mpmsub._files import UnsafeFileError, private_directory
from mpmsub._learn.history import default_path

PROTOCOL = 1
MAX_REQUEST = 64 * 1024  # bytes of a request's line; a longer one is refused unread
_MAX_ANSWER = 64 * 2**20  # what a client reads at most (a ps of every job of a huge run fits)
TIMEOUT = 10.0  # seconds a client waits for the run's answer
_SERVE_TIMEOUT = 2.0  # seconds the run waits for a connection's request, which must come at once
_NAME = re.compile(r"run-(\d{1,10})\.sock", re.ASCII)
# A Unix socket's path, its NUL included, fits in sun_path: 108 bytes on Linux, 104 on macOS.
_PATH_MAX = 108 if sys.platform.startswith("linux") else 104


def runtime_directory() -> Optional[str]:
    """$XDG_RUNTIME_DIR/mpmsub where XDG_RUNTIME_DIR names a directory of this user's."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isabs(base):
        return None
    try:
        status = os.stat(base)
    except OSError:
        return None
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
        return None
    return os.path.join(base, "mpmsub")


def state_directory() -> str:
    """This machine's directory of runs beside the run history (its state directory, which a
    home shared by several machines shares too: hence the machine's name)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()).strip(".") or "localhost"
    return os.path.join(os.path.dirname(default_path()), "runs", host)


def directories() -> List[str]:
    """Where runs may have their sockets, the one a new run uses first: a run started with
    another environment (no XDG_RUNTIME_DIR: cron, sudo -u, a batch job) is found too."""
    found = runtime_directory()
    return [found, state_directory()] if found else [state_directory()]


def socket_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"run-{pid}.sock")


# -- the run's side --------------------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """What a run's socket answers from: its cluster, its jobs' numbers (Seq) by id, what the
    run is (pid, host, start, job file, directory) and its jobs' counts so far."""

    cluster: Cluster
    seqs: Dict[str, int]
    info: Dict[str, Any]
    counts: Callable[[], Dict[str, int]]


def answer(state: RunState, request: object) -> Dict[str, Any]:
    """The answer to one request: {"op": "info"}, {"op": "ps"}, or {"op": "kill", "jobs": [ID,
    ...], "reason": TEXT or null}. A job is named by its id, or by its number (Seq) when no job
    has that id."""
    if not isinstance(request, dict) or request.get("op") not in ("info", "ps", "kill"):
        return {"ok": False, "error": 'expected {"op": "info" | "ps" | "kill", ...}'}
    reply: Dict[str, Any] = {"ok": True, "protocol": PROTOCOL, "run": state.info}
    if request["op"] == "info":
        return reply
    running = state.cluster.running()
    if request["op"] == "ps":
        counts = dict(state.counts())
        ended = sum(counts.values())
        counts["running"] = len(running)
        counts["queued"] = max(0, len(state.seqs) - ended - len(running))
        counts["total"] = len(state.seqs)
        reply["counts"] = counts
        reply["jobs"] = [{**dataclasses.asdict(job), "seq": state.seqs.get(job.job_id)} for job in running]
        return reply
    jobs, reason = request.get("jobs"), request.get("reason")
    if not isinstance(jobs, list) or not all(isinstance(job, str) for job in jobs):
        return {"ok": False, "error": "kill: expected a list of job ids"}
    if reason is not None and not isinstance(reason, str):
        return {"ok": False, "error": "kill: expected a reason that is a string, or null"}
    started = {job.job_id for job in running}
    by_seq = {str(seq): job_id for job_id, seq in state.seqs.items()}
    reply["results"] = [_kill(state, job, reason or None, by_seq, started) for job in jobs]
    return reply


def held_text(job: Dict[str, Any]) -> str:
    """What a running job of a `ps` answer holds beside CPUs and memory: 'GPU 0,1 licence=1'
    ('' for nothing: an older run's answer has no such keys)."""
    parts = []
    gpus = job.get("gpus") or []
    if gpus:
        parts.append(f"GPU{'s' if len(gpus) != 1 else ''} {','.join(map(str, gpus))}")
    parts += [f"{name}={count}" for name, count in sorted(dict(job.get("resources") or {}).items())]
    return " ".join(parts)


def _kill(
    state: RunState, job: str, reason: Optional[str], by_seq: Dict[str, str], started: Set[str]
) -> Dict[str, Any]:
    job_id = job if job in state.seqs else by_seq.get(job.strip(), job)
    if job_id not in state.seqs:
        return {"job": job, "error": f"no job {job!r} in this run (mpmsub ps lists the running ones)"}
    try:
        killed = state.cluster.kill(job_id, reason)
    except (ValueError, TypeError) as exc:
        return {"job": job, "id": job_id, "error": str(exc)}
    result = {"job": job, "id": job_id, "killed": killed, "started": job_id in started}
    if not killed:  # ended, or being stopped already (killed, its timeout, a memory stop)
        result["stopping"] = any(j.job_id == job_id for j in state.cluster.running())
    return result


class Server:
    """A run's control socket, answering one request per connection on a daemon thread until
    `close()`. Made by `serve`."""

    def __init__(self, listener: socket.socket, path: str, state: RunState) -> None:
        self.path = path
        self._listener = listener
        self._state = state
        self._inode = os.stat(path, follow_symlinks=False).st_ino
        self._wake_read, self._wake_write = os.pipe()
        self._closing = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> bool:
        self._thread = _threads.start(self._serve, "mpmsub-control")
        if self._thread is None:  # the interpreter is shutting down
            self._listener.close()
            self.close()
        return self._thread is not None

    def close(self) -> None:
        """Stop answering and remove the socket (this run's alone: compared by inode)."""
        if self._closing:
            return
        self._closing = True
        try:
            if os.stat(self.path, follow_symlinks=False).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        if self._thread is not None:
            os.write(self._wake_write, b"x")
            # A request being answered ends within _SERVE_TIMEOUT or so; the thread is a daemon,
            # so a run never waits much longer for it.
            self._thread.join(_SERVE_TIMEOUT + 1)
            if self._thread.is_alive():
                return  # the wake-up pipe stays open for it (a descriptor reused could be read)
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _serve(self) -> None:
        # A selector, not select(): a run with many jobs may hold descriptors past FD_SETSIZE.
        selector = selectors.DefaultSelector()
        try:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._closing:
                if any(key.fd == self._wake_read for key, _ in selector.select()):
                    break
                try:
                    conn, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                with conn:
                    self._handle(conn)
        finally:
            selector.close()
            self._listener.close()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(_SERVE_TIMEOUT)
        try:
            uid = _peer_uid(conn)
            if uid is not None and uid != os.geteuid():
                return  # another user's process (the directory should have kept it out)
            line = _read_line(conn)
            try:
                request = json.loads(line) if line is not None else None
            except ValueError:
                request = None
            if line is None:
                reply: Dict[str, Any] = {"ok": False, "error": f"a request is one line of at most {MAX_REQUEST} bytes"}
            elif request is None:
                reply = {"ok": False, "error": "a request is a JSON object"}
            else:
                try:
                    reply = answer(self._state, request)
                except Exception as exc:  # the run goes on; the client is told
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:  # the client went away, or sent nothing in time: nothing to answer
            pass


def _peer_uid(conn: socket.socket) -> Optional[int]:
    """The connected process's uid, where the system says it (Linux); None elsewhere."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    credentials = struct.Struct("3i")  # struct ucred: pid, uid, gid
    _, uid, _ = credentials.unpack(conn.getsockopt(socket.SOL_SOCKET, option, credentials.size))
    return int(uid)


def _read_line(conn: socket.socket) -> Optional[bytes]:
    """The request's line (up to its newline, or the end of what was sent); None when longer
    than MAX_REQUEST."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            return None
    return data.split(b"\n", 1)[0]


def serve(state: RunState) -> Tuple[Optional[Server], Optional[str]]:
    """The run's control socket, answering; or None and why there is none (never raises: a run
    goes on without it). Its answers name the run: `state.info` gets its pid, host and start."""
    state.info.update(pid=os.getpid(), host=socket.gethostname(), started=time.time())
    directory = directories()[0]
    path = socket_path(directory, os.getpid())
    if len(os.fsencode(path)) >= _PATH_MAX:
        return None, f"its path {path!r} is longer than a Unix socket's ({_PATH_MAX - 1} bytes)"
    try:
        private_directory(directory, create=True)
        with contextlib.suppress(FileNotFoundError):  # left by a run of this pid killed outright
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(16)
            listener.setblocking(False)
            server = Server(listener, path, state)
        except BaseException:
            listener.close()
            raise
    except (OSError, UnsafeFileError) as exc:
        return None, str(exc)
    if not server.start():
        return None, "the interpreter is shutting down"
    return server, None


# -- the commands' side ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunInfo:
    """A run found: its socket, and what it said it is (None where it did not answer in time:
    stopped with Ctrl-Z, say)."""

    path: str
    pid: int
    started: Optional[float] = None
    jobfile: str = "?"
    cwd: str = "?"

    def describe(self) -> str:
        if self.started is None:
            return f"pid {self.pid}: not answering"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid}, started {when}: {self.jobfile} (in {self.cwd})"


def request(path: str, message: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
    """The run's answer to `message`. Raises OSError where none came (ConnectionRefusedError:
    nothing listens there; TimeoutError: it did not answer in time), ValueError for one that is
    not an answer."""
    timeout = TIMEOUT if timeout is None else timeout
    chunks, size = [], 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
            conn.sendall(json.dumps(message).encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
            while size <= _MAX_ANSWER:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except socket.timeout:  # Python 3.9's is not yet TimeoutError
            raise TimeoutError(f"the run at {path} did not answer within {timeout:g} s (is it stopped?)") from None
    reply = json.loads(b"".join(chunks)) if chunks else None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ValueError(f"the run at {path} did not answer")
    if reply["ok"] and (reply.get("protocol") != PROTOCOL or not isinstance(reply.get("run"), dict)):
        version = reply["run"].get("version", "?") if isinstance(reply.get("run"), dict) else "?"
        raise ValueError(f"the run is mpmsub {version}, whose answers this mpmsub cannot read: use that version")
    return reply


def find_runs(pid: Optional[int] = None) -> List[RunInfo]:
    """This user's runs on this machine that answer (the one of `pid` alone, when given).
    A socket whose run is gone (nothing listens, its pid is dead) is removed."""
    runs = []
    for directory in directories():
        try:
            if not private_directory(directory, create=False):
                continue
            names = sorted(os.listdir(directory))
        except UnsafeFileError as exc:
            raise UnsafeFileError(f"{exc}: mpmsub does not use it for runs' sockets") from None
        for name in names:
            match = _NAME.fullmatch(name)
            if match is None or (pid is not None and int(match.group(1)) != pid):
                continue
            found = _ask(os.path.join(directory, name), int(match.group(1)))
            if found is not None:
                runs.append(found)
    return runs


def _ask(path: str, pid: int) -> Optional[RunInfo]:
    try:
        status = os.stat(path, follow_symlinks=False)
        if not stat.S_ISSOCK(status.st_mode) or status.st_uid != os.geteuid():
            return None
        reply = request(path, {"op": "info"})
    except TimeoutError:  # a run that is there, stopped or very busy: named, to be told
        return RunInfo(path, pid)
    except (ConnectionRefusedError, FileNotFoundError):
        if not _alive(pid):  # killed outright: its socket was left
            with contextlib.suppress(OSError):
                os.unlink(path)
        return None
    except (OSError, ValueError):  # starting, ending, or not an mpmsub run: not one to pick
        return None
    run = reply["run"] if reply["ok"] else None
    started = run.get("started") if isinstance(run, dict) else None
    if not isinstance(run, dict) or not isinstance(started, (int, float)):
        return None
    return RunInfo(path, pid, float(started), str(run.get("jobfile", "?")), str(run.get("cwd", "?")))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: the pid is taken, not by a run of ours
        return True
    return True


def pick_run(pid: Optional[int]) -> RunInfo:
    """The run to ask: the one of `pid`, or this user's only run. Raises LookupError saying
    there is none, or listing them where there are several; UnsafeFileError for a directory of
    sockets that is not private, OSError for one that cannot be read, TimeoutError for a run
    that does not answer."""
    runs = find_runs(pid)
    if pid is not None and not runs:
        raise LookupError(f"no mpmsub run of yours with pid {pid} is going on this machine")
    if not runs:
        where = " or ".join(directories())
        raise LookupError(f"no mpmsub run of yours is going on this machine (none has a socket in {where})")
    if len(runs) > 1:
        listed = "".join(f"\n  {run.describe()}" for run in sorted(runs, key=lambda r: r.started or 0))
        raise LookupError(f"{len(runs)} mpmsub runs of yours are going; pick one with --run PID:{listed}")
    if runs[0].started is None:
        raise TimeoutError(f"the run of pid {runs[0].pid} did not answer within {TIMEOUT:g} s (is it stopped?)")
    return runs[0]
