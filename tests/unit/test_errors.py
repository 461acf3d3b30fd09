"""One tree of errors: every exception class mpmsub defines is an MpmsubError and keeps the base
it had before, and the tree drawn in _errors' docstring is the real one. The kinds of failure
are a Literal type whose values are _result's constants."""

from __future__ import annotations

import concurrent.futures
import importlib
import pickle
import pkgutil
import re
import typing
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import pytest

import mpmsub
from mpmsub import _errors, _result
from mpmsub._errors import MpmsubError

# worker_main is the standard-library script that worker processes run; __main__ runs the command line.
NOT_COLLECTED = {"mpmsub.__main__", "mpmsub._launch.worker_main"}
OPTIONAL = {"dask", "distributed", "matplotlib"}  # packages some modules may need when imported
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(mpmsub.__path__, "mpmsub.")
    if not info.ispkg and info.name not in NOT_COLLECTED
)


def load(name: str) -> Optional[ModuleType]:
    """The module, or None where it needs an optional package that is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in OPTIONAL:
            return None
        raise


def exception_classes(module: ModuleType) -> Dict[str, type]:
    """The exception classes `module` defines, by the name it binds them to."""
    if module is _errors:
        _errors.WorkerDiedError  # noqa: B018  (made on first use)
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == module.__name__
    }


def all_exception_classes() -> Tuple[Dict[str, type], bool]:
    """Every module's exception classes, and whether every module could be imported."""
    found: Dict[str, type] = {}
    complete = True
    for name in MODULES:
        module = load(name)
        if module is None:
            complete = False
        else:
            found.update(exception_classes(module))
    return found, complete


def drawn_tree() -> Dict[str, List[str]]:
    """The tree in _errors' docstring: each class's name -> [its parent's name, the rest of its line]."""
    lines = (_errors.__doc__ or "").splitlines()
    start = lines.index("    MpmsubError")
    tree: Dict[str, List[str]] = {}
    parents: List[str] = []
    for line in lines[start:]:
        if not line.strip():
            break
        depth = (len(line) - len(line.lstrip())) // 4 - 1
        name, _, rest = line.strip().partition(" ")
        del parents[depth:]
        tree[name] = [parents[-1] if parents else "", rest.strip()]
        parents.append(name)
    return tree


@pytest.mark.parametrize("name", MODULES)
def test_every_exception_class_is_an_mpmsub_error(name: str) -> None:
    module = load(name)
    if module is None:
        pytest.skip(f"{name} needs an optional package")
    for cls in exception_classes(module).values():
        if issubclass(cls, Exception):
            assert issubclass(cls, MpmsubError), cls
        else:  # the command line's signals, as KeyboardInterrupt is one
            assert not issubclass(cls, MpmsubError), cls


def test_each_keeps_its_second_base() -> None:
    from mpmsub._backends.slurm import SlurmError
    from mpmsub._cli.jobfile import JobFileError
    from mpmsub._cli.template import TemplateError
    from mpmsub._launch.zygote import ZygoteError
    from mpmsub._learn.history import HistoryError
    from mpmsub._policy.ledger import LedgerError

    assert issubclass(SlurmError, RuntimeError) and issubclass(LedgerError, RuntimeError)
    assert issubclass(JobFileError, ValueError) and issubclass(TemplateError, ValueError)
    assert issubclass(mpmsub.WorkerDiedError, concurrent.futures.process.BrokenProcessPool)
    assert issubclass(mpmsub.CallPicklingError, pickle.PicklingError)
    for cls in (SlurmError, LedgerError, JobFileError, TemplateError, HistoryError, ZygoteError):
        assert issubclass(cls, MpmsubError)
    with pytest.raises(ValueError, match="bad line"):  # an `except ValueError` still catches it
        raise JobFileError("bad line")


def test_the_docstring_draws_every_class_under_its_base() -> None:
    classes, complete = all_exception_classes()
    doc = _errors.__doc__ or ""
    for name in classes:
        assert re.search(rf"(?<![\w.]){re.escape(name)}\b", doc), f"{name} is not named in _errors' docstring"
    tree = drawn_tree()
    in_tree = {name: cls for name, cls in classes.items() if issubclass(cls, MpmsubError)}
    assert set(in_tree) <= set(tree)
    if complete:  # and nothing drawn that is not there
        assert set(tree) == set(in_tree)
    for name, cls in in_tree.items():
        parent, rest = tree[name]
        assert parent == ("" if cls is MpmsubError else cls.__bases__[0].__name__), name
        short = cls.__module__.partition(".")[2]  # its path in the package: _backends.slurm
        assert (f"in {short}" in rest) == (short != "_errors"), (name, rest)
        for base in cls.__bases__[1:]:
            assert base.__name__ in rest, (name, base)


def test_the_failure_kinds_are_the_constants() -> None:
    constants = {
        value
        for name, value in vars(_result).items()
        if name.isupper() and not name.startswith("_") and isinstance(value, str)
    }
    assert set(typing.get_args(_result.FailureKind)) == constants
    assert len(typing.get_args(_result.FailureKind)) == 10
    assert _result.EXIT == "exit" and _result.PICKLE == "pickle"
    assert mpmsub.FailureKind is _result.FailureKind
