"""The HTML report of a run's trace: one self-contained file (inline CSS and SVG, no script, no
fetch), with figures drawn by matplotlib where it is installed (the `plot` extra) and the tables
alone where it is not.

`load` turns trace events into runs and samples; the figures and tables read only those.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import html
import io
import os
import re
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from mpmsub._files import open_private
from mpmsub._report.text import asks_too_much, recommend_memory
from mpmsub._report.trace import PathLike, read
from mpmsub._units import MB, format_memory, shorten

INSTALL_HINT = "pip install 'mpmsub[plot]'"
ROWS_PER_JOB = 40  # up to this many jobs, the timeline has a row per job; beyond, packed lanes
RASTER_ABOVE = 2000  # bars drawn as an image inside the SVG beyond this many runs (file size)
TOP = 10  # rows in the slowest-jobs table
LISTED = 100  # rows at most in the failed-jobs, killed-jobs and advice tables
WASTE_BARS = 25  # jobs in the requested-versus-used figure
_CMD_CELL = 90  # characters of a command in a table

OK = "ok"
KILLED = "killed"  # a job killed on request (kill()): the user's decision, shown apart from failures


@dataclasses.dataclass
class RunView:
    """One run of a job, as the trace tells it."""

    job: str
    run: int
    start: float  # seconds since the trace began
    end: float
    cpus: int
    memory: Optional[int]  # bytes reserved
    cmd: str
    status: str  # "ok", a failure kind, "requeued", or "unfinished" (no end in the trace)
    final: bool
    peak: int  # bytes
    runtime: float
    error: Optional[str]
    waited: float
    stderr: Optional[str] = None
    ran: bool = True  # False: cancelled before it began (no bar, no reservation)
    gpus: Tuple[int, ...] = ()  # its GPU devices by id
    gpu_count: int = 0  # how many GPUs it held (a remote backend's are counted, not named)
    gpu_memory: Optional[int] = None  # bytes reserved on each of its GPUs; None: whole devices
    gpu_peak: Optional[int] = None  # bytes: its processes' peak GPU memory (measured by NVML only)
    resources: Dict[str, int] = dataclasses.field(default_factory=dict)  # named resources it held

    @property
    def failed(self) -> bool:
        return self.status != OK

    @property
    def killed(self) -> bool:
        return self.status == KILLED


@dataclasses.dataclass
class TraceView:
    header: Dict[str, Any]
    runs: List[RunView]  # by start time
    samples: List[Tuple[float, int]]  # (t, the most in use since the last sample)
    duration: float

    @functools.cached_property
    def ran(self) -> List[RunView]:
        """The runs that began (a job cancelled while queued has an end but no run)."""
        return [r for r in self.runs if r.ran]

    @property
    def remote(self) -> bool:
        return _remote(self.header)

    @functools.cached_property
    def finals(self) -> List[RunView]:
        """Each job's last run: what it came to."""
        last: Dict[str, RunView] = {}
        for run in self.runs:
            if run.job not in last or run.run >= last[run.job].run:
                last[run.job] = run
        return list(last.values())


def _remote(header: Dict[str, Any]) -> bool:
    """Whether a trace's jobs ran on a remote backend (measured there, handed over ahead)."""
    return str(header.get("backend", "local")) != "local"


def load(events: Sequence[Dict[str, Any]]) -> TraceView:
    """Runs and samples of a trace's events (a run with no end ends with the trace, 'unfinished').

    On a remote backend a run's start is when it was handed over (the backend queues jobs ahead
    of its size): there, a run is drawn from its end back over its runtime."""
    if not events or not isinstance(events[0], dict) or events[0].get("type") != "run":
        raise ValueError("not an mpmsub trace: it does not begin with a 'run' event")
    remote = _remote(events[0])
    header = events[0]
    starts: Dict[Tuple[str, int], Dict[str, Any]] = {}
    runs: List[RunView] = []
    samples: List[Tuple[float, int]] = []
    last_t = 0.0
    for number, event in enumerate(events[1:], 2):
        try:
            kind = event["type"]
            last_t = max(last_t, float(event.get("t", 0.0)))
            if kind == "start":
                starts[(str(event["job"]), int(event["run"]))] = event
            elif kind == "end":
                start = starts.pop((str(event["job"]), int(event["run"])), None)
                end = float(event["t"])
                runtime = float(event.get("runtime", 0.0))
                begun = float(start["t"]) if start and not remote else end - runtime
                runs.append(_run(str(event["job"]), int(event["run"]), begun, end, start, event))
            elif kind == "sample":
                samples.append((float(event["t"]), int(event.get("max", event.get("used", 0)))))
            elif kind == "gpus" and not header.get("gpus"):  # found after the header was written
                header = {**header, "gpus": list(event["gpus"])}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"event {number} of the trace is not a valid one ({exc!r}): {str(event)[:100]}") from None
    for (job, number), start in starts.items():
        runs.append(_run(job, number, float(start["t"]), last_t, start, None))
    runs.sort(key=lambda r: (r.start, r.job, r.run))
    return TraceView(header, runs, samples, last_t)


def _run(
    job: str, number: int, start: float, end: float, began: Optional[Dict[str, Any]], ended: Optional[Dict[str, Any]]
) -> RunView:
    began = began or {}
    done = ended or {}
    memory = done.get("memory", began.get("memory"))
    # A start names its devices, or counts them where a remote backend picks them; an end names them.
    named = done.get("gpus", began.get("gpus"))
    devices = tuple(int(device) for device in named) if isinstance(named, list) else ()
    gpu_memory, gpu_peak = began.get("gpu_memory"), done.get("gpu_peak")
    return RunView(
        job=job,
        run=number,
        start=start,
        end=end,
        cpus=int(began.get("cpus", 1)),
        memory=None if memory is None else int(memory),
        cmd=str(began.get("cmd", "")),
        status=str(done.get("status", "unfinished")),
        final=bool(done.get("final", True)),
        peak=int(done.get("peak", 0)),
        runtime=float(done.get("runtime", end - start)),
        error=done.get("error") if ended else "the trace ends while it runs (the run was stopped?)",
        waited=float(began.get("waited", 0.0)),
        stderr=done.get("stderr"),
        ran=bool(done.get("ran", True)),
        gpus=devices,
        gpu_count=len(devices) if devices else int(named or 0),
        gpu_memory=None if gpu_memory is None else int(gpu_memory),
        gpu_peak=None if gpu_peak is None else int(gpu_peak),
        resources={str(name): int(count) for name, count in dict(began.get("resources") or {}).items()},
    )


# -- the file --------------------------------------------------------------------------------------


def write_report(
    trace: Union[PathLike, Sequence[Dict[str, Any]]], output: PathLike, *, plots: Optional[bool] = None
) -> bool:
    """Write the HTML report of `trace` (a trace file's path, or its events) to `output`.

    Figures need matplotlib (`pip install 'mpmsub[plot]'`); without it (or with `plots=False`)
    the report holds the tables alone, and (unless `plots=False`) a warning says how to install
    it. Returns whether the figures were drawn."""
    return report_to(trace, output, plots, stacklevel=3)


def report_to(
    trace: Union[PathLike, Sequence[Dict[str, Any]]], output: PathLike, plots: Optional[bool], stacklevel: int
) -> bool:
    """write_report(), its missing-matplotlib warning pointed `stacklevel` frames up (at the
    user's call, through mpmsub's own)."""
    events = read(trace) if isinstance(trace, (str, os.PathLike)) else list(trace)
    view = load(events)
    figures: Optional[Dict[str, str]] = None
    if plots is not False:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            warnings.warn(
                f"mpmsub: the report has tables but no figures: matplotlib is not installed ({INSTALL_HINT})",
                stacklevel=stacklevel,
            )
        else:
            figures = _figures(view)
    page = render(view, figures)
    # A command may hold bytes that are not UTF-8 (decoded as surrogates): written as escapes.
    # A new report is 0600, as a trace: it holds the commands.
    with open(open_private(os.fspath(output), os.O_TRUNC), "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(page)
    return figures is not None


# -- figures (matplotlib) --------------------------------------------------------------------------


def _figures(view: TraceView) -> Dict[str, str]:
    """Each figure as inline SVG, by section id."""
    import matplotlib

    out = {"timeline": _timeline(view), "memory": _memory(view), "cpus": _cpus(view)}
    waste = _waste(view)
    if waste is not None:
        out["waste"] = waste
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        return {name: _svg(figure, name) for name, figure in out.items()}


_REFERENCE = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


def _svg(figure: Any, name: str) -> str:
    """A figure as an SVG element for the page: its ids (matplotlib numbers them the same in every
    figure: figure_1, patch_1, ...) and the references to them prefixed with `name`, so that
    the page's ids are unique."""
    buf = io.StringIO()
    figure.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # no XML declaration or doctype inside HTML
    ids = set(re.findall(r'\bid="([^"]+)"', text))
    return _REFERENCE.sub(lambda m: m.group(1) + (f"{name}-{m.group(2)}" if m.group(2) in ids else m.group(2)), text)


def _new_figure(height: float) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, height), layout="constrained")
    return figure


def _unit(most: float) -> Tuple[float, str]:
    """A divisor and a name for bytes on an axis whose largest value is `most`."""
    return (1024 * MB, "GiB") if most >= 2 * 1024 * MB else (MB, "MiB")


def _timeline(view: TraceView) -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import Normalize

    runs = view.ran
    jobs = list(dict.fromkeys(r.job for r in runs))
    per_job = len(jobs) <= ROWS_PER_JOB
    rows = {job: i for i, job in enumerate(jobs)} if per_job else _lanes(runs)
    count = len(jobs) if per_job else (max(rows.values(), default=-1) + 1)
    figure = _new_figure(min(9.0, 1.4 + 0.22 * max(count, 3)))
    ax = figure.add_subplot()
    divisor, unit = _unit(max((r.peak for r in runs), default=0))
    norm = Normalize(0, max(max((r.peak for r in runs), default=0) / divisor, 1e-9))
    cmap = matplotlib_colormap("viridis")
    groups: Dict[str, Tuple[List[Any], List[Any]]] = {kind: ([], []) for kind in _BARS}
    ends_x, ends_y = [], []
    for r in runs:
        y = rows[r.job] if per_job else rows[f"{r.job}#{r.run}"]
        right = max(r.end, r.start + 1e-3)  # a run too short to see keeps a sliver
        kind = "ok" if not r.failed else "again" if not r.final else "killed" if r.killed else "failed"
        boxes, colors = groups[kind]
        boxes.append([(r.start, y - 0.4), (r.start, y + 0.4), (right, y + 0.4), (right, y - 0.4)])
        colors.append(cmap(norm(r.peak / divisor)))
        if kind == "failed":
            ends_x.append(r.end)
            ends_y.append(y)
    raster = len(runs) > RASTER_ABOVE
    for kind, (boxes, colors) in groups.items():
        edge, width, hatch, label = _BARS[kind]
        if boxes:
            ax.add_collection(
                PolyCollection(
                    boxes,
                    facecolors=colors,
                    edgecolors=edge,
                    linewidths=width,
                    hatch=hatch,
                    rasterized=raster,
                    label=label,
                )
            )
    if ends_x:
        ax.scatter(ends_x, ends_y, marker="x", color="#d62728", s=30, zorder=3, rasterized=raster)
    ax.set_xlim(0, max(view.duration, max((r.end for r in runs), default=0.0), 1e-3) * 1.01)
    ax.set_ylim(count - 0.5, -0.5)
    if per_job:
        ax.set_yticks(range(count), [_label(job) for job in jobs], fontsize=8 if count > 15 else 9)
    else:
        ax.set_ylabel(f"{len(jobs)} jobs, packed into rows")
        ax.set_yticks([])
    ax.set_xlabel("seconds since the start")
    if ends_x or groups["again"][0] or groups["killed"][0]:
        _legend(ax)
    figure.colorbar(ScalarMappable(norm, cmap), ax=ax, label=f"peak memory ({unit})", pad=0.01)
    return figure


def _label(text: str) -> str:
    """A job id as a tick label: a `$` is a dollar sign, not the start of mathematics."""
    return text.replace("$", r"\$")


def _legend(ax: Any) -> None:
    """The legend in a row above the plot, where it hides nothing."""
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, fontsize=8, frameon=False, borderaxespad=0.2)


def matplotlib_colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


# How the timeline draws each kind of run: edge colour, edge width, hatch and legend label.
_BARS: Dict[str, Tuple[str, float, Optional[str], str]] = {
    "ok": ("none", 0.0, None, "_nolegend_"),
    "again": ("#ff7f0e", 1.2, "..", "stopped, then run again"),
    "failed": ("#d62728", 1.5, "///", "failed"),
    "killed": ("#555555", 1.5, "\\\\\\", "killed on request"),
}


def _lanes(runs: Sequence[RunView]) -> Dict[str, int]:
    """Rows for runs (by "job#run") such that runs in one row never overlap: the first row free
    at each run's start, in order of start."""
    free_at: List[float] = []
    rows: Dict[str, int] = {}
    for r in runs:  # by start
        lane = next((i for i, end in enumerate(free_at) if end <= r.start), len(free_at))
        if lane == len(free_at):
            free_at.append(0.0)
        free_at[lane] = r.end
        rows[f"{r.job}#{r.run}"] = lane
    return rows


def steps(changes: Iterable[Tuple[float, float]]) -> Tuple[List[float], List[float]]:
    """A step function (x, y, drawn 'post') of (time, change) pairs: the running total."""
    xs: List[float] = [0.0]
    ys: List[float] = [0.0]
    total = 0.0
    for t, delta in sorted(changes):
        total += delta
        if xs[-1] == t:
            ys[-1] = total
        else:
            xs.append(t)
            ys.append(total)
    return xs, ys


def _held(view: TraceView, amount: Callable[[RunView], float]) -> Tuple[List[float], List[float]]:
    """The sum of `amount` over the runs under way, over time (a step function)."""
    changes = []
    for r in view.ran:
        held = amount(r)
        if held:
            changes += [(r.start, held), (r.end, -held)]
    return steps(changes)


def reserved(view: TraceView) -> Tuple[List[float], List[float]]:
    """Memory reserved over time (bytes), from the runs' starts and ends."""
    return _held(view, lambda r: float(r.memory or 0))


def cpus_in_use(view: TraceView) -> Tuple[List[float], List[float]]:
    return _held(view, lambda r: float(r.cpus))


def gpus_in_use(view: TraceView) -> int:
    """The most GPU devices held at once (a device shared by several runs counted once; a remote
    backend's, named by no id, by their number)."""
    changes = []
    for r in view.ran:
        if r.gpu_count:
            held = r.gpus or tuple(range(-r.gpu_count, 0))  # unnamed: never shared, each its own
            changes += [(r.start, 1, held), (r.end, -1, held)]
    holders: Dict[int, int] = {}
    most = 0
    for _, delta, held in sorted(changes, key=lambda change: change[:2]):  # ends first at a tie
        for device in held:
            holders[device] = holders.get(device, 0) + delta
        most = max(most, sum(1 for count in holders.values() if count > 0))
    return most


def in_use(view: TraceView) -> List[Tuple[float, int]]:
    """The sampled memory in use, with a 0 wherever no job was running (the monitor samples
    nothing then)."""
    idle = [(t, 0) for t, running in zip(*cpus_in_use(view)) if running == 0 and t > 0]
    return sorted(view.samples + idle)


def _memory(view: TraceView) -> Any:
    budget = int(view.header.get("memory", 0))
    rx, ry = reserved(view)
    most = max([budget, *ry, *(used for _, used in view.samples)])
    divisor, unit = _unit(most)
    figure = _new_figure(3.4)
    ax = figure.add_subplot()
    ax.step(rx, [y / divisor for y in ry], where="post", color="#1f77b4", label="reserved")
    ax.fill_between(rx, [y / divisor for y in ry], step="post", color="#1f77b4", alpha=0.12)
    if view.samples:
        points = in_use(view)
        ax.plot(
            [t for t, _ in points],
            [used / divisor for _, used in points],
            color="#2ca02c",
            linewidth=1.4,
            label="in use (sampled)",
        )
    if budget:
        ax.axhline(budget / divisor, color="#d62728", linestyle="--", linewidth=1.2, label="budget")
    ax.set_xlim(0, max(view.duration, 1e-3))
    ax.set_ylim(0, most / divisor * 1.08 if most else 1)
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel(unit)
    _legend(ax)
    return figure


def _cpus(view: TraceView) -> Any:
    cx, cy = cpus_in_use(view)
    total = int(view.header.get("cpus", 0))
    figure = _new_figure(2.6)
    ax = figure.add_subplot()
    ax.step(cx, cy, where="post", color="#9467bd", label="CPUs reserved by running jobs")
    ax.fill_between(cx, cy, step="post", color="#9467bd", alpha=0.15)
    if total:
        ax.axhline(total, color="#d62728", linestyle="--", linewidth=1.2, label=f"CPUs of the run ({total})")
    ax.set_xlim(0, max(view.duration, 1e-3))
    ax.set_ylim(0, max([total, *cy, 1]) * 1.15)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("CPUs")
    _legend(ax)
    return figure


def _waste(view: TraceView) -> Optional[Any]:
    asked = sorted(
        (r for r in view.finals if r.memory and r.ran and r.status in (OK, "memory")),
        key=lambda r: abs((r.memory or 0) - r.peak),
        reverse=True,
    )[:WASTE_BARS]
    if not asked:
        return None
    divisor, unit = _unit(max(max(r.memory or 0, r.peak) for r in asked))
    figure = _new_figure(1.2 + 0.26 * len(asked))
    ax = figure.add_subplot()
    ys = range(len(asked))
    ax.barh(ys, [(r.memory or 0) / divisor for r in asked], color="#c7c7c7", label="reserved (m)")
    over = ["#d62728" if r.peak > (r.memory or 0) else "#2ca02c" for r in asked]
    ax.barh(ys, [r.peak / divisor for r in asked], height=0.5, color=over, label="used (peak)")
    ax.set_yticks(list(ys), [_label(r.job) for r in asked], fontsize=8 if len(asked) > 15 else 9)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    _legend(ax)
    return figure


# -- the page --------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
       margin: 0; background: #fafafa; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 6px; border-bottom: 1px solid #e3e3e3; padding-bottom: 4px; }
p.meta, p.note { color: #555; margin: 4px 0 10px; }
figure { margin: 8px 0; }
figure svg { width: 100%; height: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #ececec; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.cmd { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; word-break: break-all; }
table.summary { width: auto; }
table.summary th { background: none; font-weight: 500; color: #555; }
.bad { color: #b3261e; font-weight: 600; }
.killed { color: #555; font-weight: 600; }
.hint { background: #fff4e5; border: 1px solid #f0c36d; padding: 8px 12px; border-radius: 4px; }
pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; background: #f6f6f6;
      margin: 4px 0 0; padding: 4px 6px; white-space: pre-wrap; word-break: break-all; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; background: #f3f3f3; padding: 0 3px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _mb(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / MB:,.1f}"


def _table(head: Sequence[str], rows: Iterable[Sequence[Tuple[str, str]]], numeric: Sequence[int] = ()) -> str:
    """A table; each cell a (class, already escaped html) pair."""
    cols = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls}">{cell}</td>' if cls else f"<td>{cell}</td>" for cls, cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{cols}</tr></thead><tbody>{body}</tbody></table>"


def _command(r: RunView) -> Tuple[str, str]:
    """A command cell: its program without its directory, shortened; the whole line as a tooltip."""
    program, _, rest = r.cmd.partition(" ")
    short = shorten(os.path.basename(program) + (" " + rest if rest else ""), _CMD_CELL)
    return ("cmd", f'<span title="{_e(r.cmd)}">{_e(short)}</span>')


def _status(r: RunView) -> Tuple[str, str]:
    return ("", "ok") if not r.failed else ("killed" if r.killed else "bad", _e(r.status))


def summary_rows(view: TraceView) -> List[Tuple[str, str]]:
    """(label, value) pairs of the run as a whole."""
    head = view.header
    finals = view.finals
    failed = [r for r in finals if r.failed]
    killed = sum(r.killed for r in finals)
    _, ry = reserved(view)
    _, cy = cpus_in_use(view)
    used = max((u for _, u in view.samples), default=None)
    with_m = [r for r in finals if r.memory and r.status == OK]
    began = {r.job for r in view.ran}
    never = sum(r.job not in began and not r.killed for r in finals)  # one killed is counted as killed
    apart = []  # the failed jobs counted apart
    if killed:
        apart.append(f"{killed} killed")
    if never:
        apart.append(f"{never} cancelled before they started")
    again = sum(not r.final for r in view.runs)
    rows = [
        ("started", datetime.datetime.fromtimestamp(head.get("start", 0)).strftime("%Y-%m-%d %H:%M:%S")),
        ("on", f"{head.get('host', '?')} ({head.get('backend', 'local')}), mpmsub {head.get('mpmsub', '?')}"),
        (
            "resources",
            f"{head.get('cpus')} CPUs, {format_memory(int(head.get('memory', 0)))} memory"
            + _beside(head)
            + (f", at most {head['max_workers']} jobs at once" if head.get("max_workers") else "")
            + f"; schedule {head.get('schedule', '?')}",
        ),
        ("duration", f"{view.duration:,.2f} s"),
        (
            "jobs",
            f"{len(finals)}: {len(finals) - len(failed)} succeeded, {len(failed)} failed"
            + (f" ({', '.join(apart)})" if apart else "")
            + (f"; {again} run(s) stopped and run again" if again else ""),
        ),
        ("most reserved at once", f"{format_memory(int(max(ry)))}, {int(max(cy))} CPUs"),
        (
            "most in use at once",
            format_memory(int(used))
            if used is not None
            else "not sampled (the jobs ran on a remote backend)"
            if view.remote
            else "not sampled",
        ),
    ]
    rows += _held_rows(view)
    if with_m:
        peak = sum(r.peak for r in with_m)
        asked = sum(r.memory or 0 for r in with_m)
        rows.append(
            (
                "memory efficiency",
                f"{100 * peak / asked:.0f}% (the {len(with_m)} succeeded job(s) with m used "
                f"{format_memory(peak)} of the {format_memory(asked)} they reserved, peak over m)",
            )
        )
    return rows


def _beside(head: Dict[str, Any]) -> str:
    """The run's GPUs and named resources, for its resources row: ', 4 GPUs (80G each), licence 2'."""
    text = ""
    gpus = head.get("gpus") or []
    if gpus:
        sizes = {device.get("memory") for device in gpus}
        size = sizes.pop() if len(sizes) == 1 else None
        text += f", {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}"
        text += f" ({format_memory(int(size))} each)" if size else ""
    return text + "".join(f", {name} {count}" for name, count in sorted(dict(head.get("resources") or {}).items()))


def _holding(name: str) -> Callable[[RunView], float]:
    """How much of the named resource `name` a run holds."""
    return lambda r: float(r.resources.get(name, 0))


def _held_rows(view: TraceView) -> List[Tuple[str, str]]:
    """The most GPUs and named resources held at once, against the run's: a row only where
    some run held some."""
    head = view.header
    parts = []
    gpus = gpus_in_use(view)
    if gpus:
        total = len(head.get("gpus") or [])
        parts.append(f"{gpus} GPU{'s' if gpus != 1 else ''}" + (f" of {total}" if total else ""))
    pools = dict(head.get("resources") or {})
    for name in sorted({name for r in view.ran for name in r.resources}):
        _, held = _held(view, _holding(name))
        parts.append(f"{name} {int(max(held))}" + (f" of {pools[name]}" if name in pools else ""))
    return [("most held at once", ", ".join(parts))] if parts else []


def render(view: TraceView, figures: Optional[Dict[str, str]]) -> str:
    """The report page; `figures` (SVG by section id) None where matplotlib is missing."""
    finals = view.finals
    failed = [r for r in finals if r.failed]
    killed = [r for r in failed if r.killed]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mpmsub report: {len(finals)} jobs on {_e(view.header.get('host', '?'))}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>mpmsub report</h1>",
        f'<p class="meta">{len(finals)} jobs, {len(failed)} failed'
        + (f" ({len(killed)} killed)" if killed else "")
        + f", in {view.duration:,.1f} s</p>",
        '<section id="summary"><h2>Summary</h2><table class="summary"><tbody>',
        *(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary_rows(view)),
        "</tbody></table></section>",
    ]
    if figures is None:
        parts.append(
            '<p class="hint" id="no-figures">The figures need matplotlib, which is not installed where '
            f"this report was written: <code>{_e(INSTALL_HINT)}</code>, then write the report again. "
            "The tables follow.</p>"
        )
    else:
        parts += _figure_sections(view, figures)
    parts += _slowest(finals)
    parts += _gpu_table(view)
    parts += _failed([r for r in failed if not r.killed], view, bool(killed))
    parts += _killed(killed, view)
    parts += _advice(finals)
    parts.append(
        '<footer><p class="note">Written by mpmsub from a trace; every figure and table above is in '
        "this one file.</p></footer></main></body></html>"
    )
    return "\n".join(parts) + "\n"


def _figure_sections(view: TraceView, figures: Dict[str, str]) -> List[str]:
    killed = any(r.killed for r in view.ran)
    sampled = (
        "The green line is the memory the running jobs' process trees used, as sampled (the most "
        "at any sample in each interval)."
        if view.samples
        else "The jobs ran on a remote backend, which measures them there: only reservations are shown."
        if view.remote
        else "No memory was sampled (no job ran long enough to be)."
    )
    texts = [
        (
            "timeline",
            "Jobs over time",
            "One bar per run of a job, from its start to its end, coloured by the peak memory of its "
            "process tree. Failed runs are hatched with a red edge and a cross at their end; runs "
            "stopped and then run again (a retry, or a stop because the machine ran short) have an "
            "orange edge."
            + (" Runs killed on request are hatched the other way, with a grey edge." if killed else "")
            + (" Beyond 40 jobs, runs are packed into rows that never overlap." if len(view.finals) > 40 else ""),
        ),
        (
            "memory",
            "Memory over time",
            "The blue area is the memory the running jobs reserved (their m); the dashed red line is "
            "the run's budget. " + sampled,
        ),
        (
            "cpus",
            "CPUs in use over time",
            "The CPUs reserved by the jobs running at each moment, against the run's CPUs.",
        ),
        (
            "waste",
            "Requested versus used memory",
            f"For the jobs with m that succeeded or were stopped for memory, the {WASTE_BARS} furthest from "
            "their reservation: grey is what each reserved, green what it used at its peak (red: more than "
            "it reserved).",
        ),
    ]
    out = []
    for key, title, text in texts:
        if key in figures:
            out.append(
                f'<section id="{key}"><h2>{_e(title)}</h2><p class="note">{_e(text)}</p>'
                f"<figure>{figures[key]}</figure></section>"
            )
        elif key == "waste":
            out.append(
                f'<section id="{key}"><h2>{_e(title)}</h2><p class="note">No job reserved memory (m), so '
                "there is nothing to compare.</p></section>"
            )
    return out


def _slowest(finals: List[RunView]) -> List[str]:
    ran = sorted((r for r in finals if r.ran), key=lambda r: r.runtime, reverse=True)[:TOP]
    rows = [
        [
            ("", _e(r.job)),
            _status(r),
            ("num", f"{r.runtime:,.2f}"),
            ("num", f"{r.waited:,.2f}"),
            ("num", _mb(r.peak)),
            ("num", _mb(r.memory)),
            _command(r),
        ]
        for r in ran
    ]
    return [
        f'<section id="slowest"><h2>Slowest jobs</h2><p class="note">The {len(ran)} longest runs (their last run '
        "each); waited is the time from submission to start.</p>",
        _table(["job", "status", "runtime s", "waited s", "peak MiB", "reserved MiB", "command"], rows, (2, 3, 4, 5)),
        "</section>",
    ]


def _gpu_table(view: TraceView) -> List[str]:
    """The runs that held GPUs: their devices, the GPU memory each reserved and its peak (a
    section only where some run held GPUs)."""
    runs = [r for r in view.ran if r.gpu_count]
    if not runs:
        return []
    rows = [
        [
            ("", _e(r.job) + (f" (run {r.run})" if r.run > 1 else "")),
            _status(r),
            ("", _e(", ".join(map(str, r.gpus)) if r.gpus else f"{r.gpu_count} (chosen by the backend)")),
            ("num", "whole" if r.gpu_memory is None else _mb(r.gpu_memory)),
            ("num", _mb(r.gpu_peak)),
            ("num", f"{r.runtime:,.2f}"),
            _command(r),
        ]
        for r in runs[:LISTED]
    ]
    more = f" The first {LISTED} of {len(runs)} are listed." if len(runs) > LISTED else ""
    return [
        '<section id="gpus"><h2>GPU jobs</h2><p class="note">Each run that held GPUs: its devices (as its '
        "<code>CUDA_VISIBLE_DEVICES</code> named them), the GPU memory it reserved on each (whole: the devices "
        "were its alone) and its processes' peak GPU memory, measured where NVML is available "
        f"(-: not measured).{more}</p>",
        _table(
            ["job", "status", "devices", "reserved MiB each", "GPU peak MiB", "runtime s", "command"], rows, (3, 4, 5)
        ),
        "</section>",
    ]


def _attempts(view: TraceView) -> Dict[str, int]:
    """How many runs each job had (a job that never began has none)."""
    attempts: Dict[str, int] = {}
    for r in view.ran:
        attempts[r.job] = attempts.get(r.job, 0) + 1
    return attempts


def _failed(failed: List[RunView], view: TraceView, killed: bool = False) -> List[str]:
    """The failed jobs, those killed on request aside (`killed`: there were some)."""
    if not failed:
        none = "every job that was not killed succeeded" if killed else "every job succeeded"
        return [f'<section id="failed"><h2>Failed jobs</h2><p class="note">None: {none}.</p></section>']
    attempts = _attempts(view)
    rows = [
        [
            ("", _e(r.job)),
            ("bad", _e(r.status)),
            ("num", str(attempts.get(r.job, 0))),
            ("", _e(r.error or "") + (f"<pre>{_e(r.stderr)}</pre>" if r.stderr else "")),
            _command(r),
        ]
        for r in failed[:LISTED]
    ]
    more = f" The first {LISTED} are listed." if len(failed) > LISTED else ""
    return [
        f'<section id="failed"><h2>Failed jobs</h2><p class="note">{len(failed)} job(s) failed; '
        f"runs counts every run of the job.{more}"
        + (" The jobs killed on request are listed apart, below." if killed else "")
        + "</p>",
        _table(["job", "status", "runs", "error", "command"], rows, (2,)),
        "</section>",
    ]


def _killed(killed: List[RunView], view: TraceView) -> List[str]:
    """The jobs killed on request, with the reason given: a section only where there are some
    (they are the user's decision, not failures to look into)."""
    if not killed:
        return []
    attempts = _attempts(view)
    rows = [
        [
            ("", _e(r.job)),
            ("num", str(attempts.get(r.job, 0))),
            ("num", f"{r.runtime:,.2f}" if r.ran else "-"),
            ("", _e(r.error or "")),
            _command(r),
        ]
        for r in killed[:LISTED]
    ]
    more = f" The first {LISTED} are listed." if len(killed) > LISTED else ""
    return [
        f'<section id="killed"><h2>Killed jobs</h2><p class="note">{len(killed)} job(s) killed on request '
        "(<code>Cluster.kill</code>, <code>executor.kill</code>, <code>future.kill</code>), their whole "
        f"process tree, or before they started; the error holds the reason given to the kill.{more}</p>",
        _table(["job", "runs", "runtime s", "error", "command"], rows, (1, 2)),
        "</section>",
    ]


def _advice(finals: List[RunView]) -> List[str]:
    """profile()'s advice: for each succeeded job, an m from its peak (plus 20%), beside what it
    reserved; the jobs that asked for the most they did not use come first."""
    ok = [r for r in finals if r.status == OK]
    ok.sort(key=lambda r: ((r.memory or 0) - r.peak, r.peak), reverse=True)
    rows = []
    for r in ok[:LISTED]:
        if r.memory is None:
            verdict = "no m: reserve the recommendation"
        elif r.peak < MB:
            verdict = "used almost nothing"
        elif asks_too_much(r.memory / MB, r.peak / MB):
            verdict = f"asks for {r.memory / max(r.peak, 1):.0f}x what it used"
        elif r.memory < r.peak:
            verdict = "used more than it reserved"
        else:
            verdict = "about right"
        rows.append(
            [
                ("", _e(r.job)),
                ("num", _mb(r.memory)),
                ("num", _mb(r.peak)),
                ("num", _e(recommend_memory(r.peak / MB))),
                ("", _e(verdict)),
                _command(r),
            ]
        )
    more = f" The first {LISTED} of {len(ok)} are listed." if len(ok) > LISTED else ""
    return [
        '<section id="advice"><h2>Memory advice</h2><p class="note">As <code>profile()</code> advises: for '
        "each job that succeeded, an m of its measured peak plus 20%, rounded up, beside what it reserved; "
        f"the jobs that left the most of their reservation unused come first.{more}</p>",
        _table(["job", "reserved MiB", "peak MiB", "recommended m", "verdict", "command"], rows, (1, 2, 3)),
        "</section>",
    ]
