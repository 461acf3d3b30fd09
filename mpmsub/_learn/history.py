"""The run history: one SQLite database (WAL mode, shared safely by several mpmsub processes)
with a row per finished run of a job or call, which `m="auto"` predicts from.

Where: `history=` on the executor or cluster (a path, or False), else `$MPMSUB_HISTORY` (a
path, or "off"), else the user's state directory (`~/.local/state/mpmsub/history.db` on Linux,
`$XDG_STATE_HOME` honoured; `~/Library/Application Support/mpmsub/history.db` on macOS).

A history that cannot be used (a corrupt file, a database locked for longer than the timeout,
a directory that cannot be written) never fails a batch: mpmsub logs one warning and runs
without it.

It holds every command line run: mpmsub creates its directory with mode 0700 and the database
with mode 0600 (SQLite gives its -wal and -shm files the database's mode). An existing database
or directory keeps its mode.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

from mpmsub import _threads
from mpmsub._errors import MpmsubError
from mpmsub._files import DIRECTORY_MODE, open_private
from mpmsub._learn.estimate import LEARNED_FROM, WINDOW, Run
from mpmsub._version import __version__

# sqlite3 and json are imported where they are used: an executor makes its History at once, and
# most never read it (no m="auto") or write it only as their first job ends.
if TYPE_CHECKING:
    import sqlite3

logger = logging.getLogger("mpmsub")

OFF = ("off", "no", "false", "0", "none")
_TIMEOUT = 10.0  # seconds a writer waits for another process's transaction before giving up
_GATHER = 0.25  # seconds a writer gathers rows before it writes them in one transaction
_SCHEMA_VERSION = 1
_COLUMNS = (
    "key",
    "argv",
    "input_bytes",
    "peak_bytes",
    "runtime",
    "cpu_time",
    "returncode",
    "failure",
    "memory_requested",
    "host",
    "version",
    "time",
    "gpu_peak_bytes",
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    argv TEXT NOT NULL,           -- JSON: the argv list, or a pipeline's list of them
    input_bytes INTEGER NOT NULL, -- total size of the existing files its arguments name
    peak_bytes INTEGER NOT NULL,  -- peak memory of its whole process tree
    runtime REAL NOT NULL,        -- seconds
    cpu_time REAL NOT NULL,       -- seconds, user + system
    returncode INTEGER,
    failure TEXT,                 -- NULL: success; else JobResult.failure ("requeued": stopped for the machine)
    memory_requested INTEGER,     -- bytes reserved, NULL for none
    host TEXT NOT NULL,
    version TEXT NOT NULL,        -- mpmsub's
    time REAL NOT NULL,           -- Unix time of its end
    gpu_peak_bytes INTEGER        -- GPU memory peak of its process tree (NVML); NULL: not measured
);
CREATE INDEX IF NOT EXISTS runs_by_key ON runs (key, id);
PRAGMA user_version = {_SCHEMA_VERSION};
"""

Row = Tuple[Any, ...]  # in the order of _COLUMNS
T = TypeVar("T")
_host: Optional[str] = None  # this machine's name, asked once


def default_path() -> str:
    """The history's place in the user's state directory."""
    if sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Application Support")
    else:
        base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "mpmsub", "history.db")


def resolve(history: object) -> Optional[str]:
    """The history's path for `history=` (True or None: $MPMSUB_HISTORY, else the default; False:
    none; a path); None when it is off."""
    if history is False:
        return None
    if history is None or history is True:
        env = os.environ.get("MPMSUB_HISTORY")
        if env is None or not env.strip():
            return default_path()
        if env.strip().lower() in OFF:
            return None
        return os.path.expanduser(env)
    if isinstance(history, os.PathLike):
        history = os.fspath(history)
    if not isinstance(history, str):
        raise TypeError(f"history must be True, False or the path of a database file; got {history!r}")
    if not history.strip() or "\0" in history:
        raise ValueError(f"invalid history {history!r}: expected the path of a database file, or False")
    if history.strip().lower() in OFF:
        raise ValueError(f"invalid history {history!r}: to run without a history, give history=False")
    return os.path.expanduser(history)


def _wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode. Processes opening a new history at the same moment may find
    the switch refused at once ("database is locked": SQLite does not wait where waiting could
    deadlock); each tries again for up to _TIMEOUT."""
    import sqlite3

    deadline = time.monotonic() + _TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _gpu_column(conn: sqlite3.Connection, add: bool) -> bool:
    """Whether the runs table has the GPU peak column (a history written before mpmsub measured
    GPUs has not); with `add`, it has it after (an added column: older mpmsubs still read and
    write the table, leaving it NULL)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    if "gpu_peak_bytes" in columns:
        return True
    if add:
        conn.execute("ALTER TABLE runs ADD COLUMN gpu_peak_bytes INTEGER")
    return add


class HistoryError(MpmsubError):
    """The history database cannot be used (for the `mpmsub history` command)."""


@dataclass(frozen=True)
class KeySummary:
    key: str
    runs: int
    last: float  # Unix time
    recent: Tuple[Run, ...]  # its most recent learned-from runs, oldest first


class History:
    """One database file. Every method may be called from any thread (one connection, used
    under a lock). In an executor (`tolerant`), the first error logs a warning and turns the
    history off: reads then find nothing and writes are dropped."""

    def __init__(self, path: str, tolerant: bool = True) -> None:
        self.path = path
        self.tolerant = tolerant
        self.broken = False
        self._conn: Optional[sqlite3.Connection] = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"History({self.path!r})"

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            import sqlite3

            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # created 0600 before SQLite would make it 0644
                os.close(open_private(self.path, os.O_EXCL))
            conn = sqlite3.connect(self.path, timeout=_TIMEOUT, isolation_level=None, check_same_thread=False)
            try:
                _wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:  # a new database (reads of an existing one write nothing)
                    conn.executescript(_SCHEMA)
                elif version != _SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(f"its schema is version {version}; this mpmsub knows {_SCHEMA_VERSION}")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _failed(self, exc: BaseException, doing: str) -> None:
        if not self.tolerant:
            raise HistoryError(f"cannot {doing} the run history {self.path!r}: {exc}") from exc
        if not self.broken:
            self.broken = True
            logger.warning(
                "mpmsub: the run history %s cannot be used (%s: %s); running without it "
                "(m='auto' jobs are probed as if never seen)",
                self.path,
                type(exc).__name__,
                exc,
            )
        if self._conn is not None:
            import sqlite3

            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _use(self, doing: str, work: Callable[[sqlite3.Connection], T], default: T) -> T:
        """`work` on the connection, under the lock; `default` once the history is off, or when
        it fails (which turns it off, or raises HistoryError outside an executor)."""
        import sqlite3

        with self._lock:
            if self.broken:
                return default
            try:
                return work(self._connection())
            except (sqlite3.Error, OSError, ValueError) as exc:  # ValueError: text SQLite cannot take
                self._failed(exc, doing)
                return default

    def runs(self, key: str, limit: int = WINDOW) -> List[Run]:
        """The last `limit` runs of `key` that an estimate learns from, oldest first."""
        return self._learned(key, "peak_bytes", limit)

    def gpu_runs(self, key: str, limit: int = WINDOW) -> List[Run]:
        """As `runs`, with the GPU memory peak of those where it was measured."""
        return self._learned(key, "gpu_peak_bytes", limit)

    def _learned(self, key: str, peak: str, limit: int) -> List[Run]:
        marks = ",".join("?" * (len(LEARNED_FROM) - 1))
        sql = (
            f"SELECT input_bytes, {peak}, runtime FROM runs WHERE key = ? AND {peak} IS NOT NULL AND "
            f"(failure IS NULL OR failure IN ({marks})) ORDER BY id DESC LIMIT ?"
        )
        params = (key, *[f for f in LEARNED_FROM if f is not None], limit)

        def read(conn: sqlite3.Connection) -> List[Any]:
            if peak == "gpu_peak_bytes" and not _gpu_column(conn, False):
                return []  # a history written before GPUs were measured
            return conn.execute(sql, params).fetchall()

        rows: List[Any] = self._use("read", read, [])
        return [Run(int(size), int(figure), float(runtime)) for size, figure, runtime in reversed(rows)]

    def add(self, rows: Sequence[Row]) -> None:
        """Add runs (rows in the order of _COLUMNS; one without the last, the GPU peak, has none),
        in one transaction."""
        sql = f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        rows = [(*r, None) if len(r) == len(_COLUMNS) - 1 else r for r in rows]

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                _gpu_column(conn, True)
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        self._use("write", insert, None)

    def summaries(self) -> List[KeySummary]:
        """Every key, with its run count, last run and recent learned-from runs (most runs first)."""
        sql = "SELECT key, COUNT(*), MAX(time) FROM runs GROUP BY key ORDER BY COUNT(*) DESC, key"
        keys: List[Any] = self._use("read", lambda conn: conn.execute(sql).fetchall(), [])
        return [KeySummary(key, int(count), float(last), tuple(self.runs(key))) for key, count, last in keys]

    def rows(self, key: Optional[str] = None) -> Iterator[Dict[str, Any]]:
        """The rows of `key` (of every key when None), oldest first, as dicts (argv decoded)."""
        params: Tuple[Any, ...] = () if key is None else (key,)

        def read(conn: sqlite3.Connection) -> List[Any]:
            columns = _COLUMNS if _gpu_column(conn, False) else _COLUMNS[:-1]
            sql = f"SELECT {', '.join(columns)} FROM runs" + ("" if key is None else " WHERE key = ?")
            return conn.execute(sql + " ORDER BY id", params).fetchall()

        fetched: List[Any] = self._use("read", read, [])
        import json

        for values in fetched:
            row = dict(zip(_COLUMNS, values))
            row.setdefault("gpu_peak_bytes", None)
            row["argv"] = json.loads(row["argv"])
            yield row

    def forget(self, key: Optional[str]) -> int:
        """Delete the runs of `key` (every run when None); the number deleted."""
        if key is None:
            return self._use("change", lambda conn: int(conn.execute("DELETE FROM runs").rowcount), 0)
        return self._use("change", lambda conn: int(conn.execute("DELETE FROM runs WHERE key = ?", (key,)).rowcount), 0)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                import sqlite3

                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None


_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()
_shared: Dict[str, History] = {}
_shared_lock = threading.Lock()


def shared(path: str) -> History:
    """The process's History of `path`, opened once and kept (executors come and go; opening a
    database, and the checkpoint of its last close, cost more than a batch of short jobs). One
    that proved unusable stays off for the rest of the process: it warned once."""
    key = os.path.abspath(path)
    with _shared_lock:
        history = _shared.get(key)
        if history is None:
            history = _shared[key] = History(path)
        return history


def close_recorders() -> None:
    """Write what every recorder still holds (at interpreter exit, where their daemon threads
    would otherwise die with rows unwritten)."""
    for recorder in list(_recorders):
        recorder.close(wait=True)
    with _shared_lock:
        histories = list(_shared.values())
    for history in histories:
        history.close()


class Recorder:
    """Writes an executor's rows from a thread of its own, gathered for a moment and written in
    one transaction, so that neither the executor's loop nor a job waits on the disk (and a
    batch of short jobs costs one transaction every quarter second, not one per job)."""

    def __init__(self, history: History) -> None:
        self.history = history
        self._rows: Deque[Row] = collections.deque()
        self._pending = False  # a write is due: rows came since the last one
        self._closing = False
        self._wake = threading.Event()
        self._now = threading.Event()  # cuts the gathering short (at close)
        self._write = threading.Lock()  # one writer at a time: this thread's, or a flush
        self._thread: Optional[threading.Thread] = None
        self._direct = False  # no thread could start (interpreter shutdown): rows written at once
        _recorders.add(self)

    def put(self, row: Row) -> None:
        """Queue a row (the executor's loop thread)."""
        self._rows.append(row)
        if self._thread is None and not self._direct:
            self._thread = _threads.start(self._run, "mpmsub-history")
            self._direct = self._thread is None
        if self._direct:
            self.flush()  # on the loop: slower, but the program is ending and waits for nothing else
            return
        if not self._pending:
            self._pending = True
            self._wake.set()

    def flush(self) -> None:
        """Write the queued rows now, from this thread (after a write under way, if any)."""
        with self._write:
            rows = []
            while True:
                try:
                    rows.append(self._rows.popleft())
                except IndexError:
                    break
            if rows:
                self.history.add(rows)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._now.wait(_GATHER)
            self._pending = False
            self.flush()
            if self._closing and not self._rows:
                return

    def close(self, wait: bool = True) -> None:
        """Write what is queued, then stop; with `wait`, return once written."""
        self._closing = True
        if self._thread is None:
            return
        self._now.set()
        self._wake.set()
        if wait:
            self.join()

    def join(self, timeout: float = 60.0) -> None:
        """Wait for the rows to be written (the history's own timeouts bound each write)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def row(
    key: str,
    argv: Any,
    input_bytes: int,
    peak: int,
    runtime: float,
    cpu_time: float,
    returncode: Optional[int],
    failure: Optional[str],
    memory_requested: Optional[int],
    gpu_peak: Optional[int] = None,
) -> Row:
    """A finished run as a row of the history (with this host, mpmsub's version and the time)."""
    import json

    global _host
    if _host is None:
        import socket

        _host = socket.gethostname()
    return (
        key,
        json.dumps(argv),
        int(input_bytes),
        int(peak),
        float(runtime),
        float(cpu_time),
        returncode,
        failure,
        memory_requested,
        _host,
        __version__,
        time.time(),
        gpu_peak,
    )
