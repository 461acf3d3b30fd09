"""The package's layering, read from its source with `ast` (nothing is imported): every module
has a layer, imports only from its own layer and those below, and the imports executed at import
time form no circle. Imports under `if TYPE_CHECKING:` are exempt: they never run."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "mpmsub"

# Lowest first: a module may import its own layer and those below, never above.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    (
        "spec",
        (
            "_units",
            "_errors",
            "_result",
            "_ledger",
            "_job",
            "_call",
            "_template",
            "_files",
            "_threads",
            "_system",
            "_future",
        ),
    ),
    ("policy (pure)", ("_enforce", "_scheduler", "_policy", "_learn")),
    (
        "launch",
        (
            "_launcher",
            "_loop",
            "_proctree",
            "_cgroups",
            "_guard",
            "_monitor",
            "_local",
            "_workers",
            "_worker",
            "_zygote",
            "_delivery",
            "_outcome",
        ),
    ),
    # What the engine uses and is not part of it: the backends' client side, and the run records
    # the engine writes (history, trace) with the report maths the trace shortens names with.
    ("backends and run records", ("_backends", "_remote", "_dask", "_slurm", "_history", "_trace", "_report")),
    ("engine", ("_core", "_runbook", "_executor", "_node")),
    ("reports", ("_htmlreport", "_progress")),
    ("faces", ("_cluster", "_cli", "_jobfile", "_joblog", "_halt", "utils", "__init__", "__main__")),
]
LAYER: Dict[str, int] = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}
BACKENDS = LAYER["_backends"]
ENGINE = LAYER["_core"]

# Imports that break the rules today, each with why; a fixed one must leave the list.
KNOWN: Dict[Tuple[str, str], str] = {
    ("_history", "__init__"): "reads __version__, defined in __init__ itself (which imports nothing at runtime)",
    ("_trace", "__init__"): "reads __version__ (deferred), defined in __init__ itself",
}

# The only modules below the engine that may import `_executor` or `_core`.
ENGINE_USERS = {"_node", "_cluster", "_cli", "__init__", "utils"}

# Pure policy: importing one starts nothing, and it neither starts threads nor processes.
PURE = ("_policy", "_scheduler", "_enforce", "_ledger", "_learn")
NOT_PURE = (
    "threading",
    "_thread",
    "subprocess",
    "multiprocessing",
    "concurrent.futures",
    "socket",
    "selectors",
    "asyncio",
    "pty",
    "time",  # a pure policy is handed the clock; only _learn may read it
)
TIME_ALLOWED = {"_learn"}
OS_PROCESS_CALLS = ("fork", "forkpty", "system", "popen", "spawn", "posix_spawn", "exec")

MODULE, DEFERRED, TYPING = "module-level", "deferred", "typing-only"


class Import(NamedTuple):
    importer: str
    imported: str  # a module of the package (its file's stem), or a dotted name outside it
    line: int
    kind: str  # MODULE, DEFERRED or TYPING

    def where(self) -> str:
        return f"mpmsub/{self.importer}.py:{self.line}: {self.importer} -> {self.imported} ({self.kind})"


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def lazy_table(tree: ast.Module) -> Tuple[Dict[str, str], int]:
    """`__init__`'s `_LAZY`: public name -> the module (stem) that defines it, and its line."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            assert isinstance(node.value, ast.Dict), "_LAZY is no dict literal"
            table: Dict[str, str] = {}
            for key, value in zip(node.value.keys, node.value.values):
                if key is not None:
                    table[ast.literal_eval(key)] = ast.literal_eval(value)
                else:  # **dict.fromkeys([...], "mpmsub._x")
                    assert isinstance(value, ast.Call) and ast.unparse(value.func) == "dict.fromkeys", ast.unparse(
                        value
                    )
                    table.update(dict.fromkeys(ast.literal_eval(value.args[0]), ast.literal_eval(value.args[1])))
            assert all(path.startswith("mpmsub.") for path in table.values()), table
            return {name: path[len("mpmsub.") :] for name, path in table.items()}, node.lineno
    raise AssertionError("mpmsub/__init__.py has no _LAZY table")


def imports_of(name: str, tree: ast.Module, modules: FrozenSet[str], lazy: Dict[str, str]) -> List[Import]:
    found: List[Import] = []

    def package_name(dotted: str) -> Optional[str]:
        if dotted == "mpmsub":
            return "__init__"
        if dotted.startswith("mpmsub."):
            return dotted.split(".")[1]
        return None

    def add(imported: str, node: ast.stmt, kind: str) -> None:
        found.append(Import(name, imported, node.lineno, kind))

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(package_name(alias.name) or alias.name, node, kind)
        elif isinstance(node, ast.ImportFrom):
            source = "mpmsub" + (f".{node.module}" if node.module else "") if node.level else node.module or ""
            if source == "mpmsub":
                for alias in node.names:
                    if alias.name in modules:
                        add(alias.name, node, kind)
                    else:  # a public name: from the module `_LAZY` names, or `__init__`'s own
                        add(lazy.get(alias.name, "__init__"), node, kind)
            elif package_name(source) is not None:
                add(package_name(source) or "", node, kind)
            else:
                add(source, node, kind)
                for alias in node.names:  # `from os import fork`
                    add(f"{source}.{alias.name}", node, kind)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.iter_child_nodes(node):
                visit(child, kind if kind == TYPING else DEFERRED)
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.body:
                visit(child, TYPING)
            for child in node.orelse:
                visit(child, kind)
        elif (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.UnaryOp)
            and isinstance(node.test.op, ast.Not)
            and is_type_checking(node.test.operand)
        ):
            for child in node.body:
                visit(child, kind)
            for child in node.orelse:
                visit(child, TYPING)
        else:  # class bodies, try, with, if, for: executed when the enclosing code is
            for child in ast.iter_child_nodes(node):
                visit(child, kind)

    visit(tree, MODULE)
    return found


class Package(NamedTuple):
    modules: FrozenSet[str]
    imports: Tuple[Import, ...]  # of the package's own modules only
    external: Tuple[Import, ...]  # of everything else (the standard library, third parties)
    trees: Dict[str, ast.Module]


@functools.cache
def package() -> Package:
    trees = {path.stem: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in PACKAGE.glob("*.py")}
    modules = frozenset(trees)
    lazy, line = lazy_table(trees["__init__"])
    missing = {name: module for name, module in lazy.items() if module not in modules}
    assert not missing, f"_LAZY names modules that do not exist: {missing}"
    every = [imp for name in sorted(trees) for imp in imports_of(name, trees[name], modules, lazy)]
    # `__init__.__getattr__` imports each `_LAZY` module on first use.
    every += [Import("__init__", module, line, DEFERRED) for module in sorted(set(lazy.values()))]
    own = tuple(imp for imp in every if imp.imported in modules and imp.imported != imp.importer)
    return Package(modules, own, tuple(imp for imp in every if imp.imported not in modules), trees)


def test_every_module_has_a_layer() -> None:
    modules = package().modules
    unplaced = sorted(modules - set(LAYER))
    assert not unplaced, f"modules in no layer (place each in LAYERS): {unplaced}"
    gone = sorted(set(LAYER) - modules)
    assert not gone, f"LAYERS names modules that are gone: {gone}"
    twice = sorted(m for m in LAYER if sum(m in ms for _, ms in LAYERS) > 1)
    assert not twice, f"modules in more than one layer: {twice}"


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's: the graph's strongly connected components."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    components: List[List[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: List[str] = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def cycle_through(start: str, graph: Dict[str, Set[str]], within: Set[str]) -> List[str]:
    """A shortest path start -> ... -> start inside one component."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*paths[node], start]
            if nxt in within and nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")


def test_no_import_circle_at_module_level() -> None:
    at_import = [imp for imp in package().imports if imp.kind == MODULE]
    graph: Dict[str, Set[str]] = {}
    first: Dict[Tuple[str, str], Import] = {}
    for imp in at_import:
        graph.setdefault(imp.importer, set()).add(imp.imported)
        first.setdefault((imp.importer, imp.imported), imp)
    circles = []
    for component in strongly_connected(graph):
        if len(component) > 1:
            path = cycle_through(component[0], graph, set(component))
            steps = "\n    ".join(first[pair].where() for pair in zip(path, path[1:]))
            circles.append(f"{' -> '.join(path)} (all in the circle: {', '.join(component)})\n    {steps}")
    assert not circles, "module-level import circles:\n" + "\n".join(circles)


def allowed(imp: Import) -> bool:
    importer, imported = LAYER[imp.importer], LAYER[imp.imported]
    if imported <= importer:
        return True
    # A backend's worker-side code runs the engine there: `_node`, and only when called.
    return importer == BACKENDS and imp.imported == "_node" and imp.kind == DEFERRED


def test_layers() -> None:
    broken: List[str] = []
    used: Set[Tuple[str, str]] = set()
    for imp in package().imports:
        if imp.kind == TYPING or allowed(imp):
            continue
        pair = (imp.importer, imp.imported)
        if pair in KNOWN:
            used.add(pair)
            continue
        importer, imported = LAYERS[LAYER[imp.importer]][0], LAYERS[LAYER[imp.imported]][0]
        broken.append(f"{imp.where()}: {importer} imports {imported}, above it")
    assert not broken, "imports from a higher layer:\n" + "\n".join(broken)
    stale = sorted(set(KNOWN) - used)
    assert not stale, f"KNOWN lists imports that are fixed or gone (remove them): {stale}"


def test_worker_imports_nothing_of_the_package_at_import() -> None:
    # The worker process's own script: its start-up cost is every worker's.
    found = [imp.where() for imp in package().imports if imp.importer == "_worker" and imp.kind == MODULE]
    assert not found, found


def test_only_the_engine_and_faces_import_the_engine() -> None:
    found = [
        imp.where()
        for imp in package().imports
        if imp.imported in ("_executor", "_core")
        and imp.kind != TYPING
        and imp.importer not in ENGINE_USERS
        and LAYER[imp.importer] < ENGINE
    ]
    assert not found, found


def starts_something(imp: Import) -> bool:
    if imp.imported.startswith("os."):  # `from os import fork`
        return imp.imported[len("os.") :].startswith(OS_PROCESS_CALLS)
    return any(
        (imp.imported == name or imp.imported.startswith(f"{name}."))
        and not (name == "time" and imp.importer in TIME_ALLOWED)
        for name in NOT_PURE
    )


def test_pure_policy_starts_no_threads_or_processes() -> None:
    found = [
        imp.where()
        for imp in package().external
        if imp.importer in PURE and imp.kind != TYPING and starts_something(imp)
    ]
    for name in PURE:
        for node in ast.walk(package().trees[name]):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and node.attr.startswith(OS_PROCESS_CALLS)
            ):
                found.append(f"mpmsub/{name}.py:{node.lineno}: os.{node.attr}")
    assert not found, "pure policy modules that start threads or processes:\n" + "\n".join(found)
