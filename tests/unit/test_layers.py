"""The package's layering, read from its source with `ast` (nothing is imported): every module
has a layer, imports only from its own layer and those below, and the imports executed at import
time form no circle. Imports under `if TYPE_CHECKING:` are exempt: they never run.

A module is named by its path under `mpmsub/`, dotted and without `.py`: `_engine.core`,
`__init__` (the package's own), `_backends.__init__` (a subpackage's)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple, Union

PACKAGE = Path(__file__).resolve().parent.parent.parent / "mpmsub"

# Lowest first: a module may import its own layer and those below, never above. `pkg.*` places
# the modules of `pkg` that no layer names themselves.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    (
        "spec",
        (
            "_units",
            "_errors",
            "_protocol",
            "_result",
            "_spec",
            "_version",
            "_job",
            "_call",
            "_files",
            "_threads",
            "_system",
            # A subpackage's __init__ runs on every import of its modules: it stays as light as the
            # lowest layer (a docstring), so reaching `_launch.loop` never brings in the engine.
            "_backends.__init__",
            "_cli.__init__",
            "_engine.__init__",
            "_launch.__init__",
            "_learn.__init__",
            "_policy.__init__",
            "_report.__init__",
        ),
    ),
    ("policy (pure)", ("_policy.*", "_learn.keys", "_learn.estimate", "_learn.imports")),
    ("launch", ("_launch.*",)),
    # The run records the engine writes (history, runbook, trace) and the reports read from them.
    ("run records", ("_learn.history", "_learn.runbook", "_report.*")),
    ("backends", ("_backends.*",)),
    ("engine", ("_engine.*",)),
    # The worker side of a remote backend: it runs an engine there.
    ("node", ("_backends.node",)),
    ("faces", ("_cluster", "_cli.*", "utils", "__init__", "__main__")),
]
ENTRY: Dict[str, int] = {entry: index for index, (_, entries) in enumerate(LAYERS) for entry in entries}

# Upward imports by design, each with why; one no longer made must leave the list.
KNOWN: Dict[Tuple[str, str], str] = {}

# The engine's entry points, and the only modules below the engine that may import them.
ENGINE_ENTRIES = ("_engine.executor", "_engine.core")
ENGINE_USERS = {"_backends.node"}

# Pure policy: importing one starts nothing, and it neither starts threads nor processes.
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
    "time",  # a pure policy is handed the clock
)
OS_PROCESS_CALLS = ("fork", "forkpty", "system", "popen", "spawn", "posix_spawn", "exec")

MODULE, DEFERRED, TYPING = "module-level", "deferred", "typing-only"


def is_pure(module: str) -> bool:
    return module.startswith("_policy.") or module in ("_learn.estimate", "_learn.imports")


def path_of(module: str) -> str:
    return f"mpmsub/{module.replace('.', '/')}.py"


def placed_by(module: str) -> Optional[str]:
    """The `LAYERS` entry that places a module: its own name, else its package's `pkg.*`."""
    if module in ENTRY:
        return module
    package, dot, _ = module.rpartition(".")
    return f"{package}.*" if dot and f"{package}.*" in ENTRY else None


def layer(module: str) -> int:
    entry = placed_by(module)
    assert entry is not None, f"{path_of(module)} is in no layer (place it in LAYERS)"
    return ENTRY[entry]


def parents(module: str) -> List[str]:
    """The `__init__`s an import of `module` runs before it: `_a.b` -> `__init__`, `_a.__init__`."""
    dotted = "" if module == "__init__" else module.removesuffix(".__init__")
    parts = dotted.split(".") if dotted else []
    return [".".join([*parts[:depth], "__init__"]) for depth in range(len(parts))]


class Import(NamedTuple):
    importer: str
    imported: str  # a module of the package (see the docstring), or a dotted name outside it
    line: int
    kind: str  # MODULE, DEFERRED or TYPING
    through: str = ""  # for a package's __init__ run by importing one of its modules: that module

    def where(self) -> str:
        how = f"{self.kind}, run by importing {self.through}" if self.through else self.kind
        return f"{path_of(self.importer)}:{self.line}: {self.importer} -> {self.imported} ({how})"


class Imports(NamedTuple):
    own: List[Import]  # of the package's modules, as written (or that do not exist)
    implied: List[Import]  # of the packages' __init__s the imports above run first
    external: List[Import]  # of everything else (the standard library, third parties)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def resolve(dotted: str, modules: FrozenSet[str]) -> Optional[str]:
    """`mpmsub._engine.core` -> `_engine.core`, `mpmsub._backends` -> `_backends.__init__`;
    None for a name outside the package, or one that is no module of it."""
    if dotted == "mpmsub":
        return "__init__"
    if not dotted.startswith("mpmsub."):
        return None
    name = dotted[len("mpmsub.") :]
    return name if name in modules else f"{name}.__init__" if f"{name}.__init__" in modules else None


def lazy_table(tree: ast.Module) -> Tuple[Dict[str, str], int]:
    """`__init__`'s `_LAZY`: public name -> the dotted module that defines it, and its line."""
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
            return table, node.lineno
    raise AssertionError("mpmsub/__init__.py has no _LAZY table")


def imports_of(name: str, tree: ast.Module, modules: FrozenSet[str], lazy: Dict[str, str]) -> Imports:
    found = Imports([], [], [])
    # Where relative imports start: the module's package (for a package's __init__, that package).
    here = ["mpmsub", *name.split(".")][:-1]

    def add(imported: str, node: Union[ast.stmt, ast.expr], kind: str) -> None:
        found.own.append(Import(name, imported, node.lineno, kind))
        found.implied.extend(
            Import(name, init, node.lineno, kind, imported) for init in parents(imported) if init in modules
        )

    def add_dotted(dotted: str, node: Union[ast.stmt, ast.expr], kind: str) -> None:
        if dotted == "mpmsub" or dotted.startswith("mpmsub."):
            add(resolve(dotted, modules) or dotted[len("mpmsub.") :], node, kind)
        else:
            found.external.append(Import(name, dotted, node.lineno, kind))

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add_dotted(alias.name, node, kind)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module or "") if part)
            source_module = resolve(source, modules)
            if source_module is None:
                add_dotted(source, node, kind)
                if source != "mpmsub" and not source.startswith("mpmsub."):
                    for alias in node.names:  # `from os import fork`
                        add_dotted(f"{source}.{alias.name}", node, kind)
                return
            for alias in node.names:
                submodule = resolve(f"{source}.{alias.name}", modules)
                if submodule is not None:  # `from mpmsub._backends import remote`
                    add(submodule, node, kind)
                elif source_module == "__init__":  # a public name: from the module `_LAZY` names
                    add(resolve(lazy.get(alias.name, "mpmsub"), modules) or "__init__", node, kind)
                else:
                    add(source_module, node, kind)
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add_dotted(node.args[0].value, node, kind)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            body = node.body if isinstance(node.body, list) else [node.body]
            for child in ast.iter_child_nodes(node):  # decorators and defaults run where it is defined
                visit(child, DEFERRED if kind != TYPING and any(child is stmt for stmt in body) else kind)
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
    imports: Tuple[Import, ...]  # of the package's own modules, as written (and `_LAZY`'s)
    implied: Tuple[Import, ...]  # of the packages' __init__s, run before the modules imported
    external: Tuple[Import, ...]  # of everything else (the standard library, third parties)
    trees: Dict[str, ast.Module]


@functools.cache
def package() -> Package:
    trees = {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts): ast.parse(
            path.read_text(encoding="utf-8"), str(path)
        )
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    modules = frozenset(trees)
    lazy, line = lazy_table(trees["__init__"])
    missing = {name: dotted for name, dotted in lazy.items() if resolve(dotted, modules) is None}
    assert not missing, f"_LAZY names modules that do not exist: {missing}"
    found = [imports_of(name, trees[name], modules, lazy) for name in sorted(trees)]
    own = [imp for imports in found for imp in imports.own]
    # `__init__.__getattr__` imports each `_LAZY` module on first use.
    own += [
        Import("__init__", module, line, DEFERRED)
        for module in sorted({resolve(dotted, modules) or dotted for dotted in lazy.values()})
    ]
    gone = [imp.where() for imp in own if imp.imported not in modules]
    assert not gone, "imports of modules that do not exist:\n" + "\n".join(gone)
    implied = [imp for imports in found for imp in imports.implied]
    return Package(  # once each: `from x import a, b` is one import of x
        modules,
        tuple(dict.fromkeys(imp for imp in own if imp.imported != imp.importer)),
        tuple(dict.fromkeys(imp for imp in implied if imp.imported != imp.importer)),
        tuple(imp for imports in found for imp in imports.external),
        trees,
    )


def test_every_module_has_a_layer() -> None:
    modules = package().modules
    unplaced = sorted(path_of(m) for m in modules if placed_by(m) is None)
    assert not unplaced, f"modules in no layer (place each in LAYERS): {unplaced}"
    gone = sorted(set(ENTRY) - {placed_by(m) for m in modules})
    assert not gone, f"LAYERS names modules or packages that are gone (or placed otherwise): {gone}"
    twice = sorted(e for e in ENTRY if sum(e in entries for _, entries in LAYERS) > 1)
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
    # Importing `mpmsub._backends.remote` runs `mpmsub/__init__.py` and `_backends/__init__.py`
    # first: those edges count too.
    at_import = [imp for imp in (*package().imports, *package().implied) if imp.kind == MODULE]
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
    importer, imported = layer(imp.importer), layer(imp.imported)
    if imported <= importer:
        return True
    # A backend's client sends the node side (which runs an engine there) by reference: it reaches
    # `_backends.node` only when called, never at import.
    return importer == layer("_backends.base") and imp.imported == "_backends.node" and imp.kind == DEFERRED


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
        importer, imported = LAYERS[layer(imp.importer)][0], LAYERS[layer(imp.imported)][0]
        broken.append(f"{imp.where()}: {importer} imports {imported}, above it")
    assert not broken, "imports from a higher layer:\n" + "\n".join(broken)
    stale = sorted(set(KNOWN) - used)
    assert not stale, f"KNOWN lists imports that are fixed or gone (remove them): {stale}"


def test_worker_imports_nothing_of_the_package_at_import() -> None:
    # The worker process's own script: its start-up cost is every worker's.
    assert "_launch.worker_main" in package().modules
    found = [
        imp.where()
        for imp in package().imports
        if imp.importer == "_launch.worker_main" and imp.kind == MODULE and imp.imported != "_protocol"
    ]
    assert not found, found  # but the protocol it speaks, standard library only


def test_only_the_engine_and_faces_import_the_engine() -> None:
    engine = layer("_engine.core")
    found = [
        imp.where()
        for imp in package().imports
        if imp.imported in ENGINE_ENTRIES
        and imp.kind != TYPING
        and imp.importer not in ENGINE_USERS
        and layer(imp.importer) < engine
    ]
    assert not found, found


def starts_something(imp: Import) -> bool:
    if imp.imported.startswith("os."):  # `from os import fork`
        return imp.imported[len("os.") :].startswith(OS_PROCESS_CALLS)
    return any(imp.imported == name or imp.imported.startswith(f"{name}.") for name in NOT_PURE)


def test_pure_policy_starts_no_threads_or_processes() -> None:
    pure = sorted(m for m in package().modules if is_pure(m))
    assert "_learn.estimate" in pure and "_policy.scheduler" in pure, pure
    found = [
        imp.where()
        for imp in package().external
        if is_pure(imp.importer) and imp.kind != TYPING and starts_something(imp)
    ]
    for name in pure:
        for node in ast.walk(package().trees[name]):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and node.attr.startswith(OS_PROCESS_CALLS)
            ):
                found.append(f"{path_of(name)}:{node.lineno}: os.{node.attr}")
    assert not found, "pure policy modules that start threads or processes:\n" + "\n".join(found)
